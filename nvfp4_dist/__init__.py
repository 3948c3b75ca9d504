"""nvfp4_dist: NVFP4 weight calibration inside distributed training layouts, and engine exports."""

from ._version import __version__
from .calib.checkpoint import add_quantizer_sharded_state, load_dcp_checkpoint, load_megatron_checkpoint
from .calib.pipeline import QuantResult, quantize
from .calib.restore import init_quantizer_state
from .config import DeadExpertPolicy, KernelImpl, QuantConfig
from .errors import (CalibrationError, ConfigError, ExportError, LayoutError, ModelLoadError,
                     NVFP4DistError)
from .export.hf import ExportSummary, export_checkpoint
from .integrations.megatron import NVFP4Hook
from .kernels.types import Method
from .parallel.context import ParallelContext

__all__ = [
    "CalibrationError", "ConfigError", "DeadExpertPolicy", "ExportError", "ExportSummary", "KernelImpl",
    "LayoutError", "Method", "ModelLoadError", "NVFP4DistError", "NVFP4Hook", "ParallelContext", "QuantConfig",
    "QuantResult", "add_quantizer_sharded_state", "init_quantizer_state", "load_dcp_checkpoint",
    "load_megatron_checkpoint", "quantize", "export_checkpoint", "__version__",
]
