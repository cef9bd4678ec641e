"""mq-export: post-training quantization (MambaQuant) and deployment export for Mamba models."""
from .api import (calibrate, convert_mamba_mixers, export_module, export_onnx, load, onnxruntime_forward, quantize,
                  validate)
from .quant.calibrate import CalibrationStats
from ._version import __version__
from .errors import MQExportError
from .quant.quantize import QuantConfig

__all__ = ["load", "convert_mamba_mixers", "calibrate", "quantize", "export_onnx", "export_module", "onnxruntime_forward",
           "validate", "CalibrationStats", "QuantConfig", "MQExportError"]
