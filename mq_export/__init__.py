"""mq-export: post-training quantization (MambaQuant) and deployment export for Mamba models."""
from .api import load, validate
from .errors import MQExportError

__all__ = ["load", "validate", "MQExportError"]
__version__ = "0.1.0"
