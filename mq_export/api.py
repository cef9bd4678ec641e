"""The Python API: one function per pipeline stage, in the order data flows through them.

    load → calibrate → quantize → export_onnx → validate

A model of your own: convert_mamba_mixers → calibrate → quantize → export_module. The CLI only
wires these together.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .load.bundled import BUNDLED, bundled
from .quant.calibrate import CalibrationStats
from .quant.calibrate import calibrate as _calibrate
from .quant.calibrate import recorded_inputs, stacked_batches
from .load.data import Split
from .errors import MQExportError
from .evaluate import Forward, batched_logits
from .load.checkpoints import load_checkpoint
from .models.convert import convert_mamba_mixers  # noqa: F401  (a stage of its own: bring your own model)
from .quant.methods import METHODS, QuantConfig  # noqa: F401  (METHODS: the method registry, for API users)
from .quant.quantize import quantize as _quantize


def load(model: str | Path = "mnist") -> nn.Module:
    """A bundled model by name (`mnist`, …) or a checkpoint: a classifier-family file, or a
    mamba-ssm / HF Mamba language-model directory."""
    if isinstance(model, str) and model in BUNDLED:
        return bundled(model).load()
    return load_checkpoint(model)


def calibrate(model: nn.Module, calib: Split | Tensor | Iterable[Tensor] | None = None, exclude: tuple[Split, ...] = (),
              batch_size: int = 64, selection_samples: int = 256, quiet: bool = False, covariance: bool = True,
              forward_loop: Callable[[nn.Module], object] | None = None) -> CalibrationStats:
    """Stream calibration data once through the FP model, collecting what the transforms and
    quantizers need. `calib`: a Split, a tensor of model inputs, or an iterable of input batches
    (one shape beyond the batch dimension); or instead `forward_loop`, a function that runs the
    model on its calibration data (each call with one input tensor; they are recorded, because
    quantize runs the model on them again). `exclude`: the evaluation split(s) it must not overlap.
    Refuses empty, NaN/Inf or overlapping data. `covariance=False` skips the per-site d×d second
    moments (`QuantConfig.needs_covariance` says when they are needed; for a large model they are
    the biggest part of calibration's memory)."""
    if (calib is None) == (forward_loop is None):
        raise MQExportError("calibrate needs calibration data or a forward_loop (one of them)")
    if forward_loop is not None:
        calib = recorded_inputs(model, forward_loop)
    elif not isinstance(calib, (Split, Tensor)):
        calib = stacked_batches(calib, "the calibration batches")
    if isinstance(calib, Tensor):
        calib = Split("calibration inputs", calib, torch.zeros(len(calib), dtype=torch.int64))
    return _calibrate(model, calib, tuple(exclude), batch_size, selection_samples, quiet, covariance)


def quantize(model: nn.Module, stats: CalibrationStats, config: QuantConfig | None = None, quiet: bool = False,
             **overrides) -> tuple[nn.Module, dict]:
    """A quantized deep copy of `model` (the input is never mutated) and the method's settings
    (report.json's `settings` block). `config` defaults to QuantConfig(); keyword overrides
    (method=, w_bits=, …) replace its fields. The config is checked before any work starts;
    `METHODS` lists the methods."""
    config = dataclasses.replace(config or QuantConfig(), **overrides)
    qmodel, settings = _quantize(model, stats, config, quiet)
    return qmodel, settings.to_dict()


def export_onnx(model: nn.Module, path: str | Path, opset: int | None = None) -> dict:
    """Write `model` (fp32 or fake-quantized) to an ONNX file: one SelectiveScan node + local
    function per scan, Q/DQ at the quant sites, dynamic batch/length. Returns what was exported
    (opset, scan variant, Q/DQ sites, weight storage). Any other module: `export_module`."""
    from .export.onnx import export_onnx as _export_onnx
    return _export_onnx(model, path, opset=opset)[1].to_dict()


def export_module(model: nn.Module, args: tuple, path: str | Path, *, input_names: Sequence[str],
                  output_names: Sequence[str], dynamic_axes: dict[str, dict[int, str]] | None = None,
                  opset: int | None = None) -> dict:
    """`export_onnx` for any module (your own, after `convert_mamba_mixers`): `model(*args)` traced
    with your example inputs, ONNX input/output names and dynamic axes ({name: {axis: dim name}})."""
    from .export.onnx import export_module as _export_module
    return _export_module(model, args, path, input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset=opset)[1].to_dict()


def onnxruntime_forward(path: str | Path, scan: str | None = None) -> Forward:
    """A logits function over an ONNX Runtime session of `path`, usable with `validate`.
    `scan`: auto (default: the native scan kernels where available), native or function_body."""
    from .runtime.ort import OrtForward, session
    return OrtForward(session(path, scan=scan))


def validate(model: nn.Module | Forward, split: Split, metrics, reference_logits: Tensor | None = None,
             batch_size: int = 64, desc: str = "evaluate", quiet: bool = False) -> tuple[dict, Tensor]:
    """Run `model` (a module or any logits function: an ONNX Runtime or TensorRT session wrapper)
    over `split`; returns (metrics, logits). `metrics` is the bundled model's scoring function."""
    logits = batched_logits(model, split.inputs, batch_size=batch_size, desc=desc, quiet=quiet)
    return metrics(logits, split.labels, reference_logits), logits
