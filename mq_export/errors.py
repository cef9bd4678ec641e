"""User-facing errors: the CLI prints these as one line and exits non-zero."""
from __future__ import annotations

import re


class MQExportError(Exception):
    """A problem with the user's input, stated with what to do about it."""


def error_reason(exc: Exception) -> str:
    """The first sentence of an exception's text, trimmed: why a library (torch, safetensors, numpy,
    onnx) refused a file, for a one-line `MQExportError`."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    # torch's weights-only refusal puts a paragraph of advice before the actual reason.
    _, marker, detail = text.partition("WeightsUnpickler error:")
    first_line = next((line.strip() for line in (detail if marker else text).splitlines() if line.strip()), "")
    sentence = first_line.split(". ")[0].rstrip(".")
    reason = sentence if len(sentence) <= 160 else sentence[:157] + "..."
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
