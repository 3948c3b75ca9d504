"""HF checkpoint export (ModelOpt NVFP4 and compressed-tensors), its reader and inspector."""

from .formats import ExportFormat
from .hf import ExportSummary, export_hf
from .inspect import InspectReport, inspect_checkpoint
from .reader import CheckpointReader, read_dequantized

__all__ = ["CheckpointReader", "ExportFormat", "ExportSummary", "InspectReport", "export_hf",
           "inspect_checkpoint", "read_dequantized"]
