"""Module families that hold quantizable weights no adapter handles: refused, never passed over.

Megatron models built with the TransformerEngine spec keep their linears in TE modules
(``TELinear``, ``TEColumnParallelLinear``, ``TELayerNormColumnParallelLinear``,
``TERowParallelLinear``) and grouped-GEMM experts in ``TEGroupedMLP`` (``TE*GroupedLinear``);
Megatron's legacy ``GroupedMLP`` needs the ``grouped_gemm`` CUDA package. TransformerEngine is
not available where nvfp4_dist is built and tested, and an adapter no test runs is not shipped.
Skipping these modules would leave their weights (every expert, or every linear) in high
precision without a word, the failure users report from other tools, so discovery raises
instead, naming the supported alternative; excluding them keeps them in high precision by
choice. Matching goes by class name along the MRO: no TransformerEngine import is needed.
"""

from __future__ import annotations

from ..errors import LayoutError
from .adapters import LayoutAdapter

GROUPED_EXPERTS = frozenset({"TEGroupedMLP", "GroupedMLP", "TEGroupedLinear", "TEColumnParallelGroupedLinear",
                             "TERowParallelGroupedLinear"})
TE_LINEARS = frozenset({"TELinear", "TEColumnParallelLinear", "TERowParallelLinear",
                        "TELayerNormColumnParallelLinear"})


def _family(module) -> str | None:
    names = {cls.__name__ for cls in type(module).__mro__}
    if names & GROUPED_EXPERTS:
        return "experts"
    if names & TE_LINEARS:
        return "linear"
    return None


class UnsupportedFamilyAdapter(LayoutAdapter):
    """Refuses the families above (see the module docstring)."""

    def matches(self, module):
        return _family(module) is not None

    def slots(self, name, module, ctx):
        if _family(module) == "experts":
            fix = ("build the MoE layers with SequentialMLP experts (moe_grouped_gemm=False; the same "
                   "parameters, one linear per expert)")
        else:
            fix = ("build the model with Megatron's local layer spec (e.g. get_gpt_layer_local_spec: "
                   "ColumnParallelLinear / RowParallelLinear)")
        raise LayoutError(f"{name}: {type(module).__name__} keeps quantizable weights in TransformerEngine "
                          "or grouped-GEMM layouts, which nvfp4_dist does not calibrate (TransformerEngine is "
                          f"not available where it is built and tested). To quantize them, {fix}; to keep "
                          f"them in high precision, exclude '{name}*'.")
