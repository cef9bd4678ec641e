"""Range checks of user-given numbers, shared by the CLI's option parsing and the API functions
behind it. Each check returns its value or raises ValueError saying what is allowed
("must be …, got …"); `require` turns that into a one-line MQExportError naming the argument."""
from __future__ import annotations

import math
from typing import Callable, TypeVar

from .errors import MQExportError

T = TypeVar("T")

MIN_TEMPERATURE = 1e-3   # logits / T stays far from overflow; colder sampling is argmax in all but name


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_in(value, low: float, high: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and low <= value <= high):
        raise ValueError(f"must be {what}, got {value!r}")
    return float(value)


def positive_int(value: int) -> int:
    if not _integer(value) or value < 1:
        raise ValueError(f"must be a positive integer, got {value!r}")
    return value


def seed(value: int) -> int:
    """torch.Generator.manual_seed's range, without its wrap-around of negative seeds."""
    if not _integer(value) or not 0 <= value < 2**64:
        raise ValueError(f"must be an integer in [0, 2**64), got {value!r}")
    return value


def temperature(value: float) -> float:
    return _finite_in(value, MIN_TEMPERATURE, math.inf,
                      f"a finite number >= {MIN_TEMPERATURE:g} (use --greedy for argmax decoding)")


def fraction(value: float) -> float:
    """A number in [0, 1]: SmoothQuant's α, an agreement rate."""
    return _finite_in(value, 0.0, 1.0, "a number in [0, 1]")


def non_negative(value: float) -> float:
    return _finite_in(value, 0.0, math.inf, "a finite number >= 0")


def require(name: str, check: Callable[[T], T], value: T) -> T:
    """`check(value)`, its complaint raised as MQExportError("NAME must be …, got …")."""
    try:
        return check(value)
    except ValueError as exc:
        raise MQExportError(f"{name} {exc}") from None

