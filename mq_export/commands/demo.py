"""`mq-export demo`: the whole pipeline on a bundled model, into one output directory."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..api import validate
from ..load.bundled import bundled
from .output import staged_output_dir
from ..quant.quantize import QuantConfig
from .report import Report
from .pipeline import quantize_stage

METHODS = ("none", "rtn", "smoothquant", "hadamard", "mambaquant")


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    model: str = "mnist"
    method: str = "none"
    w_bits: int = 8
    a_bits: int = 8
    limit: int | None = None
    force: bool = False
    quiet: bool = False
    seed: int = 0
    calibrator: str = "auto"
    alpha: float = 0.5
    w_group_size: int | None = None
    asymmetric: bool = False
    gptq: bool | None = None         # None: GPTQ for W4, clip-searched RTN for W8
    plot: bool = False               # write the activation-range figure (activation_ranges.png)


def run_demo(cfg: DemoConfig) -> Report:
    spec = bundled(cfg.model)
    with staged_output_dir(cfg.out, cfg.force) as staging:
        t0 = time.perf_counter()
        model = spec.load()
        calib, evaluation = spec.splits(cfg.limit)
        quantized = cfg.method != "none"
        report = Report(model=spec.name, method=cfg.method, w_bits=cfg.w_bits if quantized else 32,
                        a_bits=cfg.a_bits if quantized else 32,
                        calibration={"samples": len(calib), "split": calib.name},
                        eval={"samples": len(evaluation), "split": evaluation.name})
        report.seconds["load"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        fp32_metrics, fp32_logits = validate(model, evaluation, spec.metrics, batch_size=spec.batch_size,
                                             desc="fp32", quiet=cfg.quiet)
        report.backends["fp32"] = fp32_metrics
        report.seconds["fp32"] = time.perf_counter() - t0

        if quantized:
            qcfg = QuantConfig(method=cfg.method, w_bits=cfg.w_bits, a_bits=cfg.a_bits, calibrator=cfg.calibrator,
                               asymmetric=cfg.asymmetric, w_group_size=cfg.w_group_size, gptq=cfg.gptq,
                               alpha=cfg.alpha, seed=cfg.seed)
            model, fq_logits, stats = quantize_stage(
                model, calib, evaluation.inputs, qcfg, report, labels=evaluation.labels, metrics=spec.metrics,
                fp32_logits=fp32_logits, exclude=(evaluation,), batch_size=spec.batch_size, quiet=cfg.quiet)
            if cfg.plot:
                from ..quant.plots import plot_activation_ranges
                plot_activation_ranges(stats, model, staging / "activation_ranges.png", cfg.method)
                report.artifacts["plot"] = "activation_ranges.png"

        # ONNX export of the model as it stands (fake-quant sites/weights → Q/DQ) + ONNX Runtime.
        from .validate import ONNX_NAME, onnx_stage
        ort_metrics, onnx_info, onnx_seconds = onnx_stage(
            model, evaluation.inputs, staging, fq_logits if quantized else fp32_logits,
            labels=evaluation.labels, metrics=spec.metrics,
            fp32_logits=fp32_logits if quantized else None, batch_size=spec.batch_size, quiet=cfg.quiet)
        report.backends["onnxruntime"] = ort_metrics
        report.settings["onnx"] = onnx_info
        report.seconds.update(onnx_seconds)
        report.artifacts["onnx"] = ONNX_NAME

        report.artifacts["report"] = "report.json"
        (staging / "report.json").write_text(report.to_json())
    return report
