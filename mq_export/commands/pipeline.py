"""The pipeline driver behind `demo`, `export` and `generate`.

    (model, calibration data, evaluation data or none, quantization config, output dir) → Report

`run_pipeline` runs the stages in order (FP32 evaluation → calibrate + quantize → fake-quant
evaluation → ONNX export + ONNX Runtime → optional decode graphs) and assembles the report in
one place; each stage is a function returning a typed result, so `generate` reuses the
quantize stage without the rest.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import Tensor, nn

from ..api import calibrate
from ..errors import MQExportError
from ..evaluate import batched_logits
from ..load.data import Split
from ..quant.calibrate import CalibrationStats
from ..quant.methods import QuantConfig, QuantSettings
from ..quant.quantize import quantize
from .report import Report
from .validate import ONNX_NAME, logits_errors, ort_logits

Metrics = Callable[[Tensor, Tensor, "Tensor | None"], dict]


@dataclass(frozen=True)
class Evaluation:
    """What a run is scored on: inputs, and labels + metrics where the task has them (without,
    backends are only compared with PyTorch)."""
    inputs: Tensor
    name: str                            # report.json eval.split
    batch_size: int
    labels: Tensor | None = None
    metrics: Metrics | None = None
    exclude: tuple[Split, ...] = ()      # splits the calibration data must not overlap

    def score(self, logits: Tensor, fp32_logits: Tensor | None = None) -> dict:
        return (dict(self.metrics(logits, self.labels, fp32_logits))
                if self.metrics is not None and self.labels is not None else {})


@dataclass(frozen=True)
class Calibration:
    inputs: Split | Tensor
    name: str                            # report.json calibration.split


@dataclass(frozen=True)
class Job:
    """One pipeline run. `config` None: FP32 only (`calibration`, if given, is reported unused)."""
    model: nn.Module
    name: str                            # report.json model
    evaluation: Evaluation
    config: QuantConfig | None = None
    calibration: Calibration | None = None
    load_seconds: float = 0.0            # the command's loading, reported as seconds.load
    opset: int | None = None
    decode: bool = False                 # also the stateful prefill/decode_step graphs (language models)
    plot: bool = False                   # the activation-range figure
    quiet: bool = False


@dataclass(frozen=True)
class Scored:
    """A backend's outputs over the evaluation inputs and their metrics."""
    metrics: dict
    logits: Tensor
    seconds: float


@dataclass(frozen=True)
class Quantized:
    model: nn.Module
    settings: QuantSettings
    stats: CalibrationStats
    seconds: float


@dataclass(frozen=True)
class Exported:
    """The ONNX export and its ONNX Runtime run: metrics block, export info, seconds per step."""
    metrics: dict
    info: dict
    seconds: dict


def evaluate_stage(model: nn.Module, evaluation: Evaluation, desc: str, fp32_logits: Tensor | None = None,
                   quiet: bool = False) -> Scored:
    t0 = time.perf_counter()
    logits = batched_logits(model, evaluation.inputs, batch_size=evaluation.batch_size, desc=desc, quiet=quiet)
    return Scored(evaluation.score(logits, fp32_logits), logits, time.perf_counter() - t0)


def quantize_stage(model: nn.Module, calibration: Split | Tensor, config: QuantConfig, *,
                   exclude: tuple[Split, ...] = (), batch_size: int = 64, quiet: bool = False) -> Quantized:
    """calibrate → quantize: a quantized copy of `model` (never mutated)."""
    t0 = time.perf_counter()
    config.check_model(model)   # before calibration: a block size that cannot tile a Linear
    stats = calibrate(model, calibration, exclude=exclude, batch_size=batch_size, quiet=quiet,
                      covariance=config.needs_covariance)
    qmodel, settings = quantize(model, stats, config, quiet=quiet)
    return Quantized(qmodel, settings, stats, time.perf_counter() - t0)


def onnx_stage(model: nn.Module, staging: Path, evaluation: Evaluation, reference_logits: Tensor,
               fp32_logits: Tensor | None = None, opset: int | None = None, quiet: bool = False) -> Exported:
    """Export `model` to staging/model.onnx and run it in ONNX Runtime over the evaluation inputs.
    `reference_logits` are PyTorch's for the same model (fp32 or fake-quant); task metrics are
    scored against `fp32_logits` when given."""
    from ..export.onnx import export_onnx
    from ..runtime.ort import int8_matmul_policy, scan_implementation, session

    seconds = {}
    t0 = time.perf_counter()
    _, info = export_onnx(model, staging / ONNX_NAME, opset=opset)
    seconds["export_onnx"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    int8_matmul, scan = int8_matmul_policy(), scan_implementation()
    logits = ort_logits(session(staging / ONNX_NAME, threads=1, int8_matmul=int8_matmul, scan=scan),
                        evaluation.inputs, evaluation.batch_size, "onnxruntime", quiet)
    seconds["onnxruntime"] = time.perf_counter() - t0
    block = evaluation.score(logits, fp32_logits)
    block.update(logits_errors(logits, reference_logits))
    block["scan_implementation"] = scan.name
    return Exported(block, {**info.to_dict(), "int8_matmul": int8_matmul.to_dict(), "ort_scan": scan.to_dict()},
                    seconds)


def run_pipeline(job: Job, staging: Path) -> Report:
    """Run `job`, writing model.onnx (and the other artifacts) and report.json into `staging`."""
    cfg, evaluation, quiet = job.config, job.evaluation, job.quiet
    calibration = job.calibration
    report = Report(model=job.name, method=cfg.method if cfg else "none", w_bits=cfg.w_bits if cfg else 32,
                    a_bits=cfg.a_bits if cfg else 32,
                    calibration={"samples": len(calibration.inputs), "split": calibration.name} if calibration
                    else {"samples": 0, "split": "none"},
                    eval={"samples": len(evaluation.inputs), "split": evaluation.name})
    report.seconds["load"] = job.load_seconds
    if cfg is not None:
        cfg.check_model(job.model)   # before the FP32 pass: a block size that cannot tile a Linear

    fp32 = evaluate_stage(job.model, evaluation, "fp32", quiet=quiet)
    report.backends["fp32"], report.seconds["fp32"] = fp32.metrics, fp32.seconds
    model, reference = job.model, fp32
    if cfg is not None:
        if calibration is None:
            raise MQExportError(f"--method {cfg.method} needs calibration data")
        quantized = quantize_stage(job.model, calibration.inputs, cfg, exclude=evaluation.exclude,
                                   batch_size=evaluation.batch_size, quiet=quiet)
        report.settings.update(quantized.settings.to_dict())
        report.seconds["quantize"] = quantized.seconds
        model = quantized.model
        reference = evaluate_stage(model, evaluation, "fake-quant", fp32.logits, quiet=quiet)
        report.seconds["fake_quant"] = reference.seconds
        report.backends["fake_quant"] = reference.metrics
        if job.plot:
            from ..quant.plots import plot_activation_ranges
            plot_activation_ranges(quantized.stats, model, staging / "activation_ranges.png", cfg.method)
            report.artifacts["plot"] = "activation_ranges.png"

    # ONNX export of the model as it stands (fake-quant sites/weights → Q/DQ) + ONNX Runtime.
    exported = onnx_stage(model, staging, evaluation, reference.logits,
                          fp32_logits=fp32.logits if cfg is not None else None, opset=job.opset, quiet=quiet)
    report.backends["onnxruntime"] = exported.metrics
    report.settings["onnx"] = exported.info
    report.seconds.update(exported.seconds)
    report.artifacts["onnx"] = ONNX_NAME

    if job.decode:
        from ..export.decode import export_decode
        from ..runtime.decode import check_decode
        t0 = time.perf_counter()
        ex = export_decode(model, staging, opset=job.opset)
        report.settings["decode"] = {**ex.info, "check": check_decode(model, ex, evaluation.inputs[:2, :32])}
        report.seconds["export_decode"] = time.perf_counter() - t0
        report.artifacts["decode_step"], report.artifacts["prefill"] = ex.step.name, ex.prefill.name
    report.artifacts["report"] = "report.json"
    (staging / "report.json").write_text(report.to_json())
    return report
