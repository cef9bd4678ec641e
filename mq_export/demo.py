"""`mq-export demo`: the whole pipeline on a bundled model, into one output directory."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .api import validate
from .bundled import bundled
from .output import staged_output_dir
from .report import Report

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

        report.artifacts["report"] = "report.json"
        (staging / "report.json").write_text(report.to_json())
    return report
