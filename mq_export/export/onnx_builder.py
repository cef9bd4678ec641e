"""A tiny writer of ONNX nodes with unique value names, for the scan ops' function bodies."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper


class Builder:
    """Appends nodes to `nodes`; every value it creates is named `prefix` + op + a counter."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0

    def __call__(self, op: str, inputs: Sequence[str], n_out: int | None = None, **attrs) -> str | list[str]:
        """One output name, or a list of `n_out` names when `n_out` is given (even if it is 1)."""
        self.count += 1
        outs = [f"{self.prefix}{op.lower()}{self.count}_{i}" for i in range(n_out or 1)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=f"{self.prefix}{op}{self.count}", **attrs))
        return outs if n_out is not None else outs[0]

    def const(self, value, dtype=np.int64) -> str:
        self.count += 1
        name = f"{self.prefix}c{self.count}"
        self.nodes.append(helper.make_node("Constant", [], [name], name=f"{self.prefix}Constant{self.count}",
                                           value=numpy_helper.from_array(np.asarray(value, dtype=dtype), name)))
        return name

    def output(self, value: str, name: str) -> None:
        """Expose `value` under the graph/function output name `name`."""
        self.nodes.append(helper.make_node("Identity", [value], [name], name=f"{self.prefix}Identity_{name}"))
