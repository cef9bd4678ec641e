"""The Python API: one function per pipeline stage, in the order data flows through them.

    load → calibrate → quantize → export_onnx → validate

The CLI only wires these together.
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from .bundled import BUNDLED, bundled
from .data import Split
from .evaluate import Forward, batched_logits
from .loaders import load_checkpoint


def load(model: str | Path = "mnist") -> nn.Module:
    """A bundled model by name (`mnist`, …) or a checkpoint: a classifier-family file, or a
    mamba-ssm / HF Mamba language-model directory."""
    if isinstance(model, str) and model in BUNDLED:
        return bundled(model).load()
    return load_checkpoint(model)


def validate(model: nn.Module | Forward, split: Split, metrics, reference_logits: Tensor | None = None,
             batch_size: int = 64, desc: str = "evaluate", quiet: bool = False) -> tuple[dict, Tensor]:
    """Run `model` (a module or any logits function: an ONNX Runtime or TensorRT session wrapper)
    over `split`; returns (metrics, logits). `metrics` is the bundled model's scoring function."""
    logits = batched_logits(model, split.inputs, batch_size=batch_size, desc=desc, quiet=quiet)
    return metrics(logits, split.labels, reference_logits), logits
