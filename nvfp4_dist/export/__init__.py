"""HF checkpoint export (ModelOpt NVFP4 and compressed-tensors), its reader and inspector.

:func:`export_checkpoint` is the one exporter: one process, or every rank under torchrun.
"""

from .checks import check_fused_groups
from .formats import ExportFormat
from .hf import ExportSummary, export_checkpoint
from .inspect import InspectReport, inspect_checkpoint
from .output import CONFIG_NAME, HF_QUANT_CONFIG_NAME, SOURCE_FILE_PATTERNS
from .pieces import quantize_pack
from .reader import CheckpointReader, read_dequantized

__all__ = ["CONFIG_NAME", "CheckpointReader", "ExportFormat", "ExportSummary", "HF_QUANT_CONFIG_NAME",
           "InspectReport", "SOURCE_FILE_PATTERNS", "check_fused_groups", "export_checkpoint",
           "inspect_checkpoint", "quantize_pack", "read_dequantized"]
