"""mq-export: post-training quantization (MambaQuant) and deployment export for Mamba models."""
from .api import calibrate, export_onnx, load, onnxruntime_forward, quantize, validate
from .calibrate import CalibrationStats
from .errors import MQExportError
from .quantize import QuantConfig

__all__ = ["load", "calibrate", "quantize", "export_onnx", "onnxruntime_forward", "validate", "CalibrationStats", "QuantConfig", "MQExportError"]
__version__ = "0.1.0"
