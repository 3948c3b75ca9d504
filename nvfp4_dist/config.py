"""QuantConfig: every behaviour switch of a quantization run, frozen and validated."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .errors import ConfigError
from .kernels.types import KernelImpl, Method
from .numerics.compact import check_beta_grid

# Module-name patterns (fnmatch) that are never quantized unless the user targets them:
# output heads and embeddings (accuracy-critical, usually kept in high precision by engines)
# and MoE routers (tiny, and their logits decide routing).
DEFAULT_EXCLUDES = ("*lm_head", "*embed_tokens", "*embeddings*", "*.router", "*.mlp.gate",
                    "*output_layer", "*word_embeddings")


class GPTQScaleTiming(str, enum.Enum):
    """When GPTQ chooses a 16-column block's FP8 scales (see :mod:`nvfp4_dist.kernels.gptq`)."""

    BEFORE = "before"  # all blocks from the original weight, before any update
    GROUP = "group"  # each block from the updated weight, when the column sweep reaches it


class DeadExpertPolicy(str, enum.Enum):
    """What happens to an MoE expert that received no calibration token."""

    WEIGHT_ONLY = "weight_only"  # MSE sweep instead of the Hessian; input amax from sibling experts
    ROUTE_ALL = "route_all"  # statistics from every token through every expert (costs E/topk forwards)


@dataclass(frozen=True)
class QuantConfig:
    """Options of :func:`nvfp4_dist.quantize`.

    method: block-scale objective (``max`` | ``mse`` | ``local_hessian``), or ``gptq``: the
        block scales by the ``gptq_scales`` objective, then column-sequential quantization with
        Hessian-inverse error compensation; the compensated weight is written into the parameter.
    gptq_scales: objective of GPTQ's block scales (``local_hessian`` default | ``mse``).
    gptq_scale_timing: ``before`` (scales from the original weight) or ``group`` (each block's
        scales from the updated weight when the sweep reaches it).
    gptq_damp: damping added to the Hessian diagonal, relative to its mean diagonal.
    gptq_sequential: observe decoder layer by layer, each layer's statistics taken with the
        earlier layers already quantized (decoder layers run alone on inputs cached from one
        forward loop; Megatron and FSDP1: one forward loop per layer group).
    dss: decoupled scale search on top of ``local_hessian``.
    dss_beta_min/max/step: the DSS beta grid (default [0.5, 1.5] step 0.05); its values must be
        multiples of 0.01 up to 2.55 (betas are stored as hundredths, one byte per block).
    quantize_inputs: W4A4 (True) records a static input scale from the observed input amax;
        W4A16 (False) is weight-only.
    include: fnmatch patterns of module names to quantize (empty: every supported linear).
    exclude: patterns never quantized (applied after ``include``).
    kernels: which implementation runs the searches and fake-quant (see :class:`KernelImpl`).
    dead_experts: policy for MoE experts that no calibration token reaches.
    """

    method: Method = Method.LOCAL_HESSIAN
    dss: bool = False
    dss_beta_min: float = 0.5
    dss_beta_max: float = 1.5
    dss_beta_step: float = 0.05
    quantize_inputs: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = field(default=DEFAULT_EXCLUDES)
    kernels: KernelImpl = KernelImpl.AUTO
    dead_experts: DeadExpertPolicy = DeadExpertPolicy.WEIGHT_ONLY
    gptq_scales: Method = Method.LOCAL_HESSIAN  # measured: benchmarks/RESULTS.md, GPTQ on MiniLM
    gptq_scale_timing: GPTQScaleTiming = GPTQScaleTiming.GROUP
    gptq_damp: float = 0.01
    gptq_sequential: bool = False

    def __post_init__(self):
        # Accept the enums' string values at the API edge, without changing any meaning.
        for name, kind in (("method", Method), ("kernels", KernelImpl),
                           ("dead_experts", DeadExpertPolicy), ("gptq_scales", Method),
                           ("gptq_scale_timing", GPTQScaleTiming)):
            value = getattr(self, name)
            if not isinstance(value, kind):
                try:
                    object.__setattr__(self, name, kind(value))
                except ValueError:
                    choices = ", ".join(m.value for m in kind)
                    raise ConfigError(f"{name}={value!r} is not one of: {choices}") from None
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.dss and self.method is not Method.LOCAL_HESSIAN:
            raise ConfigError(
                f"dss=True needs method='local_hessian' (got {self.method.value!r}): decoupled "
                "scales only pay under the Hessian objective; for the plain L2 objective the "
                "126-candidate sweep is already optimal")
        if not (0 < self.dss_beta_min <= 1.0 <= self.dss_beta_max) or self.dss_beta_step <= 0:
            raise ConfigError(
                f"DSS beta grid [{self.dss_beta_min}, {self.dss_beta_max}] step "
                f"{self.dss_beta_step} must be positive and contain 1.0")
        if self.dss and (why := check_beta_grid(self.dss_beta_min, self.dss_beta_max, self.dss_beta_step)):
            raise ConfigError(f"DSS beta grid [{self.dss_beta_min}, {self.dss_beta_max}] step "
                              f"{self.dss_beta_step}: {why}")

        if self.gptq_scales not in (Method.MSE, Method.LOCAL_HESSIAN):
            raise ConfigError(f"gptq_scales={self.gptq_scales.value!r} is not one of: mse, local_hessian")
        if not (0.0 <= self.gptq_damp < 1e3) or self.gptq_damp != self.gptq_damp:
            raise ConfigError(f"gptq_damp={self.gptq_damp} must be a non-negative number (relative to the "
                              "mean Hessian diagonal; default 0.01)")
        if self.gptq_sequential and self.method is not Method.GPTQ:
            raise ConfigError(f"gptq_sequential=True needs method='gptq' (got {self.method.value!r})")

    @property
    def needs_hessian(self) -> bool:
        return self.method in (Method.LOCAL_HESSIAN, Method.GPTQ)

    @property
    def needs_full_hessian(self) -> bool:
        """GPTQ: one full ``cin x cin`` Hessian per statistics key (float64)."""
        return self.method is Method.GPTQ
