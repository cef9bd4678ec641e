"""`mq-export demo`: the whole pipeline on a bundled model, into one output directory."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..load.bundled import bundled
from ..quant.methods import QuantConfig
from .output import staged_output_dir
from .pipeline import Calibration, Evaluation, Job, run_pipeline
from .report import Report


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    model: str = "mnist"
    quant: QuantConfig | None = None   # None: FP32 only
    limit: int | None = None
    force: bool = False
    quiet: bool = False
    plot: bool = False                 # write the activation-range figure (activation_ranges.png)


def run_demo(cfg: DemoConfig) -> Report:
    spec = bundled(cfg.model)
    with staged_output_dir(cfg.out, cfg.force) as staging:
        t0 = time.perf_counter()
        model = spec.load()
        calib, evaluation = spec.splits(cfg.limit)
        load_seconds = time.perf_counter() - t0
        return run_pipeline(Job(
            model=model, name=spec.name, config=cfg.quant, calibration=Calibration(calib, calib.name),
            evaluation=Evaluation(evaluation.inputs, evaluation.name, spec.batch_size, evaluation.labels,
                                  spec.metrics, exclude=(evaluation,)),
            load_seconds=load_seconds, plot=cfg.plot, quiet=cfg.quiet), staging)
