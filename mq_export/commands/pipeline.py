"""Pipeline stages that fill a `Report`, shared by `mq-export demo` and `mq-export export`."""
from __future__ import annotations

import time

from torch import Tensor, nn

from ..api import calibrate, quantize
from ..quant.calibrate import CalibrationStats
from ..load.data import Split
from ..evaluate import batched_logits
from ..quant.quantize import QuantConfig
from .report import Report


def quantize_stage(model: nn.Module, calib: Split | Tensor, inputs: Tensor, config: QuantConfig, report: Report, *,
                   labels: Tensor | None = None, metrics=None, fp32_logits: Tensor | None = None,
                   exclude: tuple[Split, ...] = (), batch_size: int = 64, quiet: bool = False
                   ) -> tuple[nn.Module, Tensor, CalibrationStats]:
    """calibrate → quantize → fake-quant logits on `inputs`. Fills `report.settings`, the
    `quantize`/`fake_quant` timings and, when `metrics` and `labels` are given, the `fake_quant`
    block (scored against `fp32_logits`). Returns (quantized model, its logits, calibration stats)."""
    t0 = time.perf_counter()
    stats = calibrate(model, calib, exclude=exclude, batch_size=batch_size, quiet=quiet,
                      covariance=config.needs_covariance)
    qmodel, settings = quantize(model, stats, config, quiet=quiet)
    report.settings.update(settings)
    report.seconds["quantize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = batched_logits(qmodel, inputs, batch_size=batch_size, desc="fake-quant", quiet=quiet)
    report.seconds["fake_quant"] = time.perf_counter() - t0
    report.backends["fake_quant"] = (metrics(logits, labels, fp32_logits)
                                     if metrics is not None and labels is not None else {})
    return qmodel, logits, stats
