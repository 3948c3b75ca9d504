"""Block-scale searches and fake-quant: Triton kernels with a torch reference (the spec).

Callers choose ``kernels`` (:class:`~nvfp4_dist.kernels.types.KernelImpl`): ``auto`` runs Triton
on CUDA tensors and the torch reference elsewhere; ``triton`` forces the kernels (on the CPU this needs ``TRITON_INTERPRET=1`` set before
triton is imported); ``torch`` forces the reference. An explicit choice that cannot run raises.
"""

from .dispatch import fake_quant_weight, quantize_pack_weight, search_block_scales, triton_available
from .types import Method, ScaleChoice

__all__ = ["Method", "ScaleChoice", "fake_quant_weight", "quantize_pack_weight", "search_block_scales",
           "triton_available"]
