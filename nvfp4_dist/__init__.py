"""nvfp4_dist: NVFP4 weight calibration inside distributed training layouts, and engine exports."""

from .calib.pipeline import QuantResult, quantize
from .config import DeadExpertPolicy, KernelBackend, QuantConfig
from .errors import (CalibrationError, ConfigError, ExportError, LayoutError, ModelLoadError,
                     NVFP4DistError)
from .kernels.types import Method
from .parallel.context import ParallelContext

__version__ = "0.1.0"

__all__ = [
    "CalibrationError", "ConfigError", "DeadExpertPolicy", "ExportError", "KernelBackend",
    "LayoutError", "Method", "ModelLoadError", "NVFP4DistError", "ParallelContext", "QuantConfig",
    "QuantResult", "quantize", "__version__",
]
