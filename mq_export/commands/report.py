"""The machine-readable report (`report.json`). Key names are a contract: add, never rename."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Iterator

from ..errors import MQExportError


def json_text(data: dict, what: str) -> str:
    """`data` as indented JSON. JSON has no NaN or Infinity (Python would write the invalid tokens
    `NaN`/`Infinity`), so a non-finite number is refused with the key that holds it."""
    for key, value in _numbers(data):
        if not math.isfinite(value):
            raise MQExportError(f"{what} value {key} is {value}, which JSON cannot represent (the model's "
                                f"outputs are not finite?); nothing was written")
    return json.dumps(data, indent=2, allow_nan=False)


def _numbers(value, key: str = "") -> Iterator[tuple[str, float]]:
    """(dotted key, number) for every float in nested dicts and lists."""
    if isinstance(value, dict):
        for name, item in value.items():
            yield from _numbers(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _numbers(item, f"{key}[{index}]")
    elif isinstance(value, float):
        yield key, value


@dataclass
class Report:
    model: str
    method: str
    w_bits: int
    a_bits: int
    calibration: dict          # samples, split
    eval: dict                 # samples, split
    # One block per backend that ran: "fp32", "fake_quant", "onnxruntime", ... each with metrics.
    backends: dict[str, dict] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)   # method settings (seed, calibrator, α, online ops…)
    artifacts: dict = field(default_factory=dict)  # file names written into the output directory
    seconds: dict = field(default_factory=dict)    # wall time per stage

    def to_dict(self) -> dict:
        out = {"model": self.model, "method": self.method, "w_bits": self.w_bits, "a_bits": self.a_bits,
               "calibration": self.calibration, "eval": self.eval}
        out.update(self.backends)
        out.update({"settings": self.settings, "artifacts": self.artifacts, "seconds": self.seconds})
        return out

    def to_json(self) -> str:
        return json_text(self.to_dict(), "report.json") + "\n"

    def table(self) -> str:
        """Small human-readable table: one row per backend, one column per metric."""
        metrics = sorted({k for block in self.backends.values() for k, v in block.items()
                          if isinstance(v, (int, float))})
        rows = [["backend", *metrics]]
        for name, block in self.backends.items():
            rows.append([name, *(_fmt(block.get(m)) for m in metrics)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        head = (f"{self.model}  method={self.method}  W{self.w_bits}A{self.a_bits}  "
                f"calibration={self.calibration['samples']} ({self.calibration['split']})  "
                f"eval={self.eval['samples']} ({self.eval['split']})")
        return "\n".join([head, *lines])


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)
