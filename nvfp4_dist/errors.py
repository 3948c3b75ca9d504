"""Exception hierarchy: one root, a subclass per stage. Messages name the layer and the fix."""


class NVFP4DistError(Exception):
    """Root of every error nvfp4_dist raises on purpose."""


class ConfigError(NVFP4DistError, ValueError):
    """Conflicting or invalid options."""


class LayoutError(NVFP4DistError):
    """A weight's shape or parallel layout cannot be quantized as NVFP4."""


class CalibrationError(NVFP4DistError):
    """Calibration could not produce valid statistics or scales."""


class ExportError(NVFP4DistError):
    """An export could not be written, or an exported checkpoint is invalid."""


class ModelLoadError(NVFP4DistError):
    """A model path or model name could not be loaded."""


class DistributedError(NVFP4DistError):
    """A collective failed or timed out: another rank raised, died or never joined."""
