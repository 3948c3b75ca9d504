"""Apply: modules compute with NVFP4 quantize-dequantized weights (the fake-quant forward).

The parameter itself is untouched (nothing is lost, and QAT keeps training the high-precision
weight): a forward pre-hook swaps the parameter attribute for its fake-quant image and a forward
hook puts the parameter back. With autograd enabled the image is a straight-through estimator,
``w + (fq(w) - w).detach()``, so gradients reach the weight unchanged.

W4A4 (a state with ``input_amax``): the same pre-hook also replaces the module's input by its
activation fake-quant as the engines serve the checkpoint (dynamic per-16 FP8 block scales under
the calibrated static global input scale, :func:`~nvfp4_dist.numerics.nvfp4.fake_quant_input`),
straight-through as well: ``x + (fq(x) - x).detach()``, so the gradient reaching x is unchanged.
This covers modules with one quantized 2-D weight whose first argument is the GEMM input (HF
``nn.Linear``, Megatron column/row-parallel linears and ``SequentialMLP`` experts). A Megatron
row-parallel input (``input_is_parallel``) is the rank's channel slice: it holds whole 16-channel
blocks and the global input scale is reduced over the whole row, so the slice quantizes exactly
as the same channels of the whole row. transformers' fused 3-D experts quantize each expert's
inputs with that expert's scales: their forward is replaced while the fake-quant is installed
(:mod:`~nvfp4_dist.parallel.hf_experts_w4a4`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..config import KernelImpl, QuantConfig
from ..kernels.dispatch import fake_quant_input, fake_quant_weight
from ..parallel.access import local_tensor
from ..parallel.fsdp import state_for_weight
from ..parallel.hf_experts import is_fused_experts
from ..parallel.hf_experts_w4a4 import experts_forward_w4a4, first_projection
from .checkpoint import register_checkpoint_state
from .state import SlotState, attach_states, buffer_name, has_state, read_state

_HANDLES_ATTR = "_nvfp4_fake_quant_handles"
_FORWARD_ATTR = "_nvfp4_w4a4_forward"  # set where the fake-quant replaced the forward


def _local(t, weight):
    # FSDP2: the state is a DTensor sharded like the weight; the forward sees the whole weight.
    return None if t is None else state_for_weight(t, weight)


def fake_quant_param(module: nn.Module, param_name: str, weight: torch.Tensor,
                     kernels: KernelImpl = KernelImpl.AUTO) -> torch.Tensor:
    """Fake-quant image of ``weight`` (the module's parameter, 2-D, or 3-D fused experts with one
    global amax per expert: one launch for all)."""
    state = read_state(module, param_name)
    # the one-byte codes as they are: the kernels read them (the reference decodes them)
    fq = fake_quant_weight(weight.detach(), _local(state["block_scale"], weight), _local(state["global_amax"], weight),
                           _local(state.get("dss_beta_code"), weight), kernels=kernels)
    if torch.is_grad_enabled() and weight.requires_grad:
        return weight + (fq - weight).detach()
    return fq


def fake_quant_activation(x: torch.Tensor, input_amax: torch.Tensor,
                          kernels: KernelImpl = KernelImpl.AUTO, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W4A4 input image of ``x [..., K]`` (straight-through under autograd: the gradient
    reaching x is the gradient of the image); ``row_scale``: per-row indices into ``input_amax``."""
    fq = fake_quant_input(x.detach(), input_amax, kernels=kernels, row_scale=row_scale)
    if torch.is_grad_enabled() and x.requires_grad:
        return x + (fq - x).detach()
    return fq


def _input_amax_buffer(module: nn.Module, params: list[str]) -> str | None:
    """Name of the static input amax buffer the module's input is fake-quantized with: the one
    quantized 2-D weight's (W4A4), else None (weight-only, or fused experts)."""
    # The state's dimensionality, not the parameter's: FSDP1 holds flattened 1-D views of its
    # parameters outside a forward, while the block scales keep the weight's [rows, cin/16].
    if len(params) != 1 or getattr(module, buffer_name(params[0], "block_scale")).dim() != 2:
        return None
    name = buffer_name(params[0], "input_amax")
    return name if hasattr(module, name) else None


_INPUT_KEYWORDS = ("input", "input_", "hidden_states", "x")


def _quantize_first_input(args, kwargs, input_amax, kernels):
    """``(args, kwargs)`` with the GEMM input (the first positional argument, or the one
    keyword among ``_INPUT_KEYWORDS``) replaced by its fake-quant image."""
    if args and isinstance(args[0], torch.Tensor):
        return (fake_quant_activation(args[0], input_amax, kernels), *args[1:]), kwargs
    for key in _INPUT_KEYWORDS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return args, {**kwargs, key: fake_quant_activation(kwargs[key], input_amax, kernels)}
    return args, kwargs


def install_fake_quant(module: nn.Module, param_names: list[str],
                       kernels: KernelImpl = KernelImpl.AUTO) -> None:
    """Make ``module`` compute with fake-quant images of ``param_names`` and, when their state
    has an input amax (W4A4, dense modules), of its input (idempotent)."""
    remove_fake_quant(module)
    params = [p for p in param_names if has_state(module, p)]
    input_buffer = _input_amax_buffer(module, params)
    stash: dict[str, nn.Parameter] = {}

    def pre_hook(mod, args, kwargs):
        for p in params:
            param = mod._parameters[p]
            stash[p] = param
            del mod._parameters[p]
            setattr(mod, p, fake_quant_param(mod, p, param, kernels))
        if input_buffer is None:
            return None
        # read at every call: a checkpoint load fills the buffer in place after installation
        return _quantize_first_input(args, kwargs, local_tensor(getattr(mod, input_buffer)), kernels)

    def post_hook(mod, args, output):
        for p, param in stash.items():
            delattr(mod, p)
            mod._parameters[p] = param
        stash.clear()

    handles = [module.register_forward_pre_hook(pre_hook, with_kwargs=True),
               module.register_forward_hook(post_hook, always_call=True)]
    setattr(module, _HANDLES_ATTR, handles)
    if _experts_w4a4(module, params):
        module.forward = functools.partial(experts_forward_w4a4, module,
                                           functools.partial(_expert_input, kernels=kernels))
        setattr(module, _FORWARD_ATTR, True)


def _experts_w4a4(module: nn.Module, params: list[str]) -> bool:
    """transformers fused experts whose two projections both carry input amaxes (W4A4)."""
    return (is_fused_experts(module) and set(params) == {first_projection(module), "down_proj"}
            and all(hasattr(module, buffer_name(p, "input_amax")) for p in params))


def _expert_input(module: nn.Module, x: torch.Tensor, expert, param: str,
                  kernels: KernelImpl = KernelImpl.AUTO) -> torch.Tensor:
    """W4A4 image of fused experts' input rows ``x`` to ``param``, each under its expert's own
    static input scale: ``expert`` one index (all rows its), or a tensor of one per row."""
    # FSDP2: a DTensor replicated on every rank (hf_experts_fsdp): its local tensor, no collective
    input_amax = local_tensor(getattr(module, buffer_name(param, "input_amax")))
    if isinstance(expert, torch.Tensor):  # all experts' rows in one launch
        return fake_quant_activation(x, input_amax, kernels, row_scale=expert)
    return fake_quant_activation(x, input_amax[expert], kernels)


def remove_fake_quant(module: nn.Module) -> None:
    for handle in getattr(module, _HANDLES_ATTR, []):
        handle.remove()
    if hasattr(module, _HANDLES_ATTR):
        delattr(module, _HANDLES_ATTR)
    if getattr(module, _FORWARD_ATTR, False):
        del module.forward  # the instance attribute: the class's forward again
        delattr(module, _FORWARD_ATTR)


def apply_states(model: nn.Module, inventory, states: dict[str, SlotState], config: QuantConfig) -> None:
    """Stage 5, apply: store each slot's state as buffers on its module, make the modules compute
    with fake-quant weights, and make the state travel with the model's checkpoints.

    The one step shared by :func:`~nvfp4_dist.calib.pipeline.quantize` (searched states) and
    :func:`~nvfp4_dist.calib.restore.init_quantizer_state` (NaN placeholders a load fills in).
    """
    install_states(inventory, states, config)
    register_checkpoint_state(model, inventory.slots, config)  # state travels with the checkpoints


def install_states(inventory, states: dict[str, SlotState], config: QuantConfig) -> None:
    """The slots' states as buffers on their modules, which then compute with fake-quant weights
    (apply without the checkpoint hooks: GPTQ's sequential mode, layer group by layer group)."""
    attach_states(inventory.slots, states)  # fused experts: a projection at a time
    for module, _adapter, slots in inventory.modules.values():
        install_fake_quant(module, sorted({s.param_name for s in slots}), kernels=config.kernels)
