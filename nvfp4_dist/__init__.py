"""nvfp4_dist: NVFP4 weight calibration inside distributed training layouts, and engine exports."""

from .calib.pipeline import QuantResult, quantize
from .config import DeadExpertPolicy, KernelBackend, QuantConfig
from .export.checkpoint import (add_quantizer_sharded_state, init_quantizer_state, load_dcp_checkpoint,
                                load_megatron_checkpoint)
from .errors import (CalibrationError, ConfigError, ExportError, LayoutError, ModelLoadError,
                     NVFP4DistError)
from .integrations.megatron import NVFP4Hook
from .kernels.types import Method
from .parallel.context import ParallelContext

__version__ = "0.1.0"

__all__ = [
    "CalibrationError", "ConfigError", "DeadExpertPolicy", "ExportError", "KernelBackend",
    "LayoutError", "Method", "ModelLoadError", "NVFP4DistError", "NVFP4Hook", "ParallelContext", "QuantConfig",
    "QuantResult", "add_quantizer_sharded_state", "init_quantizer_state", "load_dcp_checkpoint",
    "load_megatron_checkpoint", "quantize", "__version__",
]
