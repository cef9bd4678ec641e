"""mq-export: post-training quantization (MambaQuant) and deployment export for Mamba models."""
from .api import calibrate, load, quantize, validate
from .calibrate import CalibrationStats
from .errors import MQExportError
from .quantize import QuantConfig

__all__ = ["load", "calibrate", "quantize", "validate", "CalibrationStats", "QuantConfig", "MQExportError"]
__version__ = "0.1.0"
