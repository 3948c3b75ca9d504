"""Apply: modules compute with NVFP4 quantize-dequantized weights (the fake-quant forward).

The parameter itself is untouched (nothing is lost, and QAT keeps training the high-precision
weight): a forward pre-hook swaps the parameter attribute for its fake-quant image and a forward
hook puts the parameter back. With autograd enabled the image is a straight-through estimator,
``w + (fq(w) - w).detach()``, so gradients reach the weight unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import KernelImpl, QuantConfig
from ..kernels.dispatch import fake_quant_weight
from ..parallel.fsdp import state_for_weight
from .checkpoint import register_checkpoint_state
from .state import SlotState, attach_state, has_state, read_state

_HANDLES_ATTR = "_nvfp4_fake_quant_handles"


def _local(t, weight):
    # FSDP2: the state is a DTensor sharded like the weight; the forward sees the whole weight.
    return None if t is None else state_for_weight(t, weight)


def fake_quant_param(module: nn.Module, param_name: str, weight: torch.Tensor,
                     kernels: KernelImpl = KernelImpl.AUTO) -> torch.Tensor:
    """Fake-quant image of ``weight`` (the module's parameter, 2-D or 3-D experts)."""
    state = read_state(module, param_name)
    g, bamax, beta = state["global_amax"], state["block_amax"], state.get("dss_beta")
    if weight.dim() == 2:
        fq = fake_quant_weight(weight.detach(), _local(bamax, weight), _local(g, weight), _local(beta, weight),
                               kernels=kernels)
    else:  # [E, rows, cin] fused experts, one global amax per expert: one launch for all
        fq = fake_quant_weight(weight.detach(), bamax, g, beta, kernels=kernels)
    if torch.is_grad_enabled() and weight.requires_grad:
        return weight + (fq - weight).detach()
    return fq


def install_fake_quant(module: nn.Module, param_names: list[str],
                       kernels: KernelImpl = KernelImpl.AUTO) -> None:
    """Make ``module`` compute with fake-quant images of ``param_names`` (idempotent)."""
    remove_fake_quant(module)
    params = [p for p in param_names if has_state(module, p)]
    stash: dict[str, nn.Parameter] = {}

    def pre_hook(mod, args):
        for p in params:
            param = mod._parameters[p]
            stash[p] = param
            del mod._parameters[p]
            setattr(mod, p, fake_quant_param(mod, p, param, kernels))

    def post_hook(mod, args, output):
        for p, param in stash.items():
            delattr(mod, p)
            mod._parameters[p] = param
        stash.clear()

    handles = [module.register_forward_pre_hook(pre_hook), module.register_forward_hook(post_hook, always_call=True)]
    setattr(module, _HANDLES_ATTR, handles)


def remove_fake_quant(module: nn.Module) -> None:
    for handle in getattr(module, _HANDLES_ATTR, []):
        handle.remove()
    if hasattr(module, _HANDLES_ATTR):
        delattr(module, _HANDLES_ATTR)


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
    for slot in inventory.slots:
        attach_state(slot, states[slot.name])
    for module, _adapter, slots in inventory.modules.values():
        install_fake_quant(module, sorted({s.param_name for s in slots}), kernels=config.kernels)
