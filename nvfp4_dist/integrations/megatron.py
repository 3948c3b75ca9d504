"""NVFP4 in a Megatron-core training loop: calibrate, train with fake-quant weights (QAT), export.

Lifecycle (every rank runs every call, with the same arguments)::

    hook = NVFP4Hook(QuantConfig(method="local_hessian"), calib_microbatches=32,
                     export_dir="out/nvfp4", hf_config=hf_config_dict, dist_ckpt_dir="out/ckpt")
    hook.calibrate(model, data_iterator, forward_step_func,
                   seq_length=args.seq_length, micro_batch_size=args.micro_batch_size)
    ... training iterations as usual (forward_backward_func + optimizer.step()) ...
    hook.export(model)

1. ``calibrate`` (before training, or at any iteration): runs ``calib_microbatches`` microbatches of
   the user's ``data_iterator`` through the user's ``forward_step_func`` with Megatron's own
   schedule (``get_forward_backward_func()(..., forward_only=True)``), in eval mode and under
   ``torch.no_grad()``, while :func:`nvfp4_dist.quantize` observes every quantized linear. The
   loss function ``forward_step_func`` returns is called by the schedule; its output is ignored.
   The model's train/eval mode is restored afterwards. ``quantize`` then searches the block
   scales on each rank's own TP shard, stores them as buffers next to each weight, and installs
   the fake-quant forward. Data parallel ranks each feed their own data; their statistics are
   summed (:func:`~nvfp4_dist.parallel.megatron.megatron_context` with ``data_split=True``).
2. Training (QAT, "quantization-aware training" here): every forward computes with the NVFP4
   quantize-dequantize image ``fq(w)`` of each calibrated weight, through a straight-through
   estimator: the backward treats ``fq`` as the identity, so ``d loss / d w = d loss / d fq(w)``
   and the optimizer keeps updating the high-precision weight ``w``. The scales stay as
   calibrated: the global and block amaxes (and DSS betas, input amaxes) are frozen buffers,
   never trained and never recomputed from the changing weights; weights that grow past their
   calibrated block amax are clamped by the FP4 range, which the training sees as error.
3. ``export``: the trained weights quantized with the calibrated scales, written as one Hugging
   Face NVFP4 checkpoint (streamed per rank, :func:`~nvfp4_dist.export.hf.export_checkpoint`);
   its dequantized weights are exactly the forward's ``fq(w)``. With ``dist_ckpt_dir`` also a
   Megatron distributed checkpoint (weights + quantizer state, restorable at another TP size).
   Megatron's own checkpointing during training already carries the quantizer state: ``quantize``
   wraps the model's ``sharded_state_dict``.

Restarts (QAT resumed from a checkpoint, at any TP size; no recalibration)::

    hook = NVFP4Hook(config, export_dir=..., hf_config=...)   # the calibrating run's QuantConfig
    hook.prepare_resume(model)      # BEFORE Megatron's load_checkpoint (it calls sharded_state_dict)
    load_checkpoint(model, optimizer, opt_param_scheduler)     # Megatron's own, unchanged
    ... training iterations ...
    hook.export(model)

or, with a checkpoint saved by :meth:`NVFP4Hook.export` (``dist_ckpt_dir``) or
:func:`~nvfp4_dist.calib.checkpoint.save_megatron_checkpoint`, ``hook.resume(model, ckpt_dir)``
(prepares and loads weights + quantizer state, after checking that the checkpoint carries the
state this config expects). ``prepare_resume`` gives every quantized linear NaN state buffers of
this rank's shard shape, the fake-quant forward and the straight-through backward exactly as
``calibrate`` installs them, and the ``sharded_state_dict`` wrapper that carries the state; the
load fills the buffers. The hook's :attr:`~NVFP4Hook.result` (what :meth:`~NVFP4Hook.export`
writes) is then built from the loaded buffers when first needed. The config must name the saved
run's ``dss``, ``quantize_inputs`` and include/exclude: other settings fail the load, naming the
keys.

Re-calibration (``calibrate`` again at any iteration, also after a resume): the fake-quant hooks
and state buffers of the previous calibration are removed first, so the statistics are observed,
and the scales searched, on the current high-precision weights exactly as for a first
calibration of a model holding those weights; the model's ``sharded_state_dict`` then carries
the new state (one set of entries) and ``export`` writes the new scales.

Models are taken as Megatron passes them: a module or a list of model chunks, each possibly
wrapped in Megatron's ``DistributedDataParallel`` and/or ``Float16Module`` (unwrapped with
``megatron.core.utils.unwrap_model``; quantize sees the inner ``GPTModel``, whose
``sharded_state_dict`` the wrappers call).

Pipeline parallelism: every rank passes its stage's model chunk; ``calibrate`` runs Megatron's
pipeline schedule, so each stage observes its own layers on the hidden states the previous stage
sent, and reduces their statistics within the stage's TP/DP/EP groups; names (report, export)
use global layer indices; ``export`` writes one checkpoint from all stages; the report logged on
rank 0 lists every stage's layers. Not supported, refused with a
:class:`~nvfp4_dist.errors.LayoutError` / :class:`ConfigError`: virtual pipeline stages (several
model chunks per rank), Megatron/torch FSDP wrappers, and ``gradient_accumulation_fusion`` (its
fused kernel writes the weight gradient into the parameter's ``main_grad`` directly, bypassing
the straight-through image).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from ..calib.checkpoint import load_megatron_checkpoint, save_megatron_checkpoint
from ..calib.discover import Inventory
from ..calib.pipeline import QuantResult, quantize
from ..calib.restore import clear_quantizer_state, init_quantizer_state, restored_result
from ..config import QuantConfig
from ..errors import ConfigError
from ..export.hf import export_checkpoint
from ..export.formats import ExportFormat
from ..parallel.context import ParallelContext
from ..progress import is_main_rank, progress
from ..runs import whole_table

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Chunks:
    """The user's model (as the schedule takes it) and the module quantize() sees."""

    wrapped: list[nn.Module]
    inner: nn.Module


def unwrap_chunks(model) -> _Chunks:
    """The single model chunk of ``model`` (a module or a list of chunks) and its inner module
    without Megatron's DDP / Float16Module wrappers; refuses what the hook does not support."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module
    from megatron.core.utils import unwrap_model

    from ..parallel.megatron import check_no_virtual_pipeline  # imports megatron.core (optional)

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    check_no_virtual_pipeline(len(chunks))  # one chunk per pipeline stage
    inner = unwrap_model(chunks[0], (DistributedDataParallel, Float16Module))
    if unwrap_model(inner) is not inner:
        raise ConfigError(f"NVFP4Hook: the model is wrapped in {type(inner).__name__}; FSDP-sharded "
                          "Megatron models are not supported by the hook (use Megatron's "
                          "DistributedDataParallel, or nvfp4_dist.quantize on an FSDP2 model)")
    fused = sorted(name for name, m in inner.named_modules() if getattr(m, "gradient_accumulation_fusion", False))
    if fused:
        raise ConfigError(
            f"NVFP4Hook: gradient_accumulation_fusion is on in {fused[:4]}: its fused kernel writes "
            "weight gradients into main_grad directly, bypassing the fake-quant straight-through "
            "estimator. Set TransformerConfig(gradient_accumulation_fusion=False) "
            "(--no-gradient-accumulation-fusion) for quantization-aware training.")
    return _Chunks(chunks, inner)


class NVFP4Hook:
    """Calibrate, QAT and export NVFP4 from a Megatron training script (see the module docstring).

    config: the quantization options (default ``QuantConfig()``).
    calib_microbatches: microbatches of the data iterator the calibration consumes per rank.
    export_dir / export_format: where :meth:`export` writes the HF checkpoint and in which format
        (``modelopt`` | ``compressed-tensors``); None: no HF export.
    hf_config: the Hugging Face ``config.json`` content of the model (needed with ``export_dir``).
    source_dir: a directory whose tokenizer/generation files are copied into the export.
    dist_ckpt_dir: where :meth:`export` also saves the Megatron distributed checkpoint (a new or
        empty directory); None: none.
    overwrite: replace an existing ``export_dir``.
    show_progress: progress bars on rank 0, and the per-layer report table logged there
        (logger ``nvfp4_dist.integrations.megatron``, level INFO).
    """

    def __init__(self, config: QuantConfig | None = None, calib_microbatches: int = 16,
                 export_dir=None, export_format: ExportFormat | str = ExportFormat.MODELOPT,
                 hf_config: dict | None = None, source_dir=None, dist_ckpt_dir=None,
                 overwrite: bool = False, show_progress: bool = True):
        if calib_microbatches < 1:
            raise ConfigError(f"NVFP4Hook: calib_microbatches={calib_microbatches} must be at least 1")
        if export_dir is not None and hf_config is None:
            raise ConfigError("NVFP4Hook: export_dir needs hf_config (the Hugging Face config.json "
                              "content of the model, e.g. AutoConfig.from_pretrained(path).to_dict())")
        self.config = config or QuantConfig()
        self.calib_microbatches = calib_microbatches
        self.export_dir = export_dir
        self.export_format = ExportFormat.parse(export_format)
        self.hf_config = hf_config
        self.source_dir = source_dir
        self.dist_ckpt_dir = dist_ckpt_dir
        self.overwrite = overwrite
        self.show_progress = show_progress
        self._result: QuantResult | None = None
        self._model: nn.Module | None = None
        self._restored: tuple[Inventory, ParallelContext] | None = None  # prepare_resume's, until built

    @property
    def result(self) -> QuantResult | None:
        """The :class:`QuantResult` of the model's current quantizer state: the one
        :meth:`calibrate` returned or, after :meth:`prepare_resume` / :meth:`resume`, one built
        from the loaded buffers on first access (no statistics: its report has no Hessian columns;
        raises :class:`~nvfp4_dist.errors.ExportError` naming the weights whose state was never
        loaded). None before either."""
        if self._result is None and self._restored is not None:
            inventory, ctx = self._restored
            self._result = restored_result(self._model, inventory, self.config, ctx)
            self._restored = None
        return self._result

    def calibrate(self, model, data_iterator: Iterator | None, forward_step_func: Callable, *,
                  seq_length: int, micro_batch_size: int) -> QuantResult:
        """Calibrate ``model`` (module or ``[chunk]``, possibly DDP/Float16Module-wrapped) on
        ``calib_microbatches`` microbatches through Megatron's schedule; installs the fake-quant
        forward and returns the :class:`QuantResult` (rank 0 logs its table). ``data_iterator``
        and ``forward_step_func`` are the training script's (the iterator may be None on ranks
        whose ``forward_step_func`` does not read it); ``seq_length`` / ``micro_batch_size`` are
        passed to the schedule as in training."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from ..parallel.megatron import megatron_context  # imports megatron.core (optional)

        chunks = unwrap_chunks(model)
        modes = [m.training for m in chunks.wrapped]
        schedule = get_forward_backward_func()
        ticks = iter(progress(range(self.calib_microbatches), desc="calibrate", enabled=self.show_progress))

        def counted_step(*args):
            next(ticks, None)
            return forward_step_func(*args)

        def forward_loop(_inner):
            # The schedule gets the user's (wrapped) model; the observers sit on the inner modules.
            with torch.no_grad():
                schedule(forward_step_func=counted_step, data_iterator=data_iterator, model=chunks.wrapped,
                         num_microbatches=self.calib_microbatches, seq_length=seq_length,
                         micro_batch_size=micro_batch_size, forward_only=True)
            deque(ticks, maxlen=0)  # finish (and close) the progress bar

        ctx = megatron_context(data_split=True)
        # Re-calibration: the previous fake-quant forward and state go first, so the statistics
        # and the search see the current high-precision weights (as a first calibration would).
        clear_quantizer_state(chunks.inner)
        self._result, self._restored = None, None
        for m in chunks.wrapped:
            m.eval()
        try:
            result = quantize(chunks.inner, self.config, forward_loop, ctx=ctx, show_progress=self.show_progress)
        finally:
            for m, training in zip(chunks.wrapped, modes):
                m.train(training)
        self._result, self._model = result, chunks.inner
        if self.show_progress:
            table = whole_table(result)  # collective: every rank, every pipeline stage's rows
            if is_main_rank():
                logger.info("NVFP4 calibration report:\n%s", table)
        return result

    def prepare_resume(self, model) -> None:
        """Make ``model`` (module or ``[chunk]``, possibly DDP/Float16Module-wrapped, built at any
        TP size) ready to receive the quantizer state of a checkpoint, without calibrating: call
        it on every rank BEFORE Megatron's ``load_checkpoint`` (whose ``sharded_state_dict`` must
        list the state). Installs the fake-quant forward / straight-through backward as
        :meth:`calibrate` does, on NaN state that the load fills; a model used before the load
        computes NaN. Any state from an earlier calibration of ``model`` is dropped first."""
        from ..parallel.megatron import megatron_context  # imports megatron.core (optional)

        chunks = unwrap_chunks(model)
        ctx = megatron_context(data_split=True)
        clear_quantizer_state(chunks.inner)
        inventory = init_quantizer_state(chunks.inner, self.config, ctx)
        self._result, self._model, self._restored = None, chunks.inner, (inventory, ctx)

    def resume(self, model, checkpoint_dir) -> QuantResult:
        """:meth:`prepare_resume`, then load weights and quantizer state from the Megatron
        distributed checkpoint ``checkpoint_dir`` (saved at any TP size by :meth:`export` with
        ``dist_ckpt_dir``, by :func:`~nvfp4_dist.calib.checkpoint.save_megatron_checkpoint`, or
        ``dist_checkpointing.save(model.sharded_state_dict(), dir)``); every rank calls it.
        The checkpoint's metadata is checked first: one without quantizer state, or with other
        ``dss`` / ``quantize_inputs`` / include/exclude settings than this hook's config, is
        refused with an :class:`~nvfp4_dist.errors.ExportError` naming the keys. Returns the
        restored :class:`QuantResult` (also :attr:`result`). Optimizer state is not loaded
        (Megatron's ``load_checkpoint`` does that, after :meth:`prepare_resume`)."""
        self.prepare_resume(model)
        load_megatron_checkpoint(self._model, str(checkpoint_dir))
        return self.result

    def export(self, model) -> Path | None:
        """Write the HF NVFP4 checkpoint of the (trained) ``model`` to ``export_dir`` and, with
        ``dist_ckpt_dir``, the Megatron distributed checkpoint; returns the HF export path (None
        without ``export_dir``). ``model`` must be the one :meth:`calibrate` was given."""
        if self._result is None and self._restored is None:
            raise ConfigError("NVFP4Hook.export: call hook.calibrate(model, ...) or "
                              "hook.resume(model, checkpoint_dir) first")
        inner = unwrap_chunks(model).inner
        if inner is not self._model:
            raise ConfigError("NVFP4Hook.export: this model is not the one calibrate() quantized "
                              "(or prepare_resume() prepared); pass the same model (chunks) to both")
        result = self.result  # after a resume: built from the loaded state
        out = None
        if self.export_dir is not None:
            out = export_checkpoint(inner, result, self.export_dir, fmt=self.export_format,
                                    source_dir=self.source_dir, overwrite=self.overwrite,
                                    config=self.hf_config).path
        if self.dist_ckpt_dir is not None:
            save_megatron_checkpoint(inner, self.dist_ckpt_dir)
        return out
