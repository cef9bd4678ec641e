"""The package version (one place: the exporter stamps it into ONNX files)."""
__version__ = "0.1.0"
