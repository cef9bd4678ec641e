"""Quantization parameters: the one description that PyTorch fake-quant and ONNX Q/DQ share.

An `ActivationSite` (model.py) quantizes when its `quantizer` is a `FakeQuantize`; a Linear's
weight is quantized when it carries a `weight_quant: WeightQuant` attribute (its `.weight` then
holds the dequantized values, so an ordinary forward *is* the fake-quant forward). The exporter
reads exactly these objects to place QuantizeLinear/DequantizeLinear nodes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


def int_range(bits: int, signed: bool = True) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


@dataclass(frozen=True)
class ActQuant:
    """Static per-tensor activation quantization: q = clamp(round(x / scale) + zero_point)."""
    scale: float
    zero_point: int = 0        # 0 = symmetric (TensorRT); otherwise asymmetric uint8 (ORT only)
    bits: int = 8

    @property
    def signed(self) -> bool:
        return self.zero_point == 0

    @property
    def qrange(self) -> tuple[int, int]:
        return int_range(self.bits, self.signed)


class FakeQuantize(nn.Module):
    """Quantize-dequantize an activation with fixed `ActQuant` parameters."""

    def __init__(self, params: ActQuant) -> None:
        super().__init__()
        self.params = params

    def forward(self, x: Tensor) -> Tensor:
        p = self.params
        qmin, qmax = p.qrange
        # In place on one fresh tensor: these activations are large, and each pass is memory-bound.
        q = torch.round(x / p.scale)
        if p.zero_point:
            q.add_(p.zero_point).clamp_(qmin, qmax).sub_(p.zero_point)
        else:
            q.clamp_(qmin, qmax)
        return q.mul_(p.scale)

    def extra_repr(self) -> str:
        return f"scale={self.params.scale:.4g}, zero_point={self.params.zero_point}, bits={self.params.bits}"


@dataclass(frozen=True)
class WeightQuant:
    """Symmetric weight quantization of a Linear weight (out, in).

    `scale` is (out,) per output channel, or (out, in // group_size) when `group_size` is set
    (blocks along the input dimension, as TensorRT's INT4 block quantization needs).
    """
    scale: Tensor
    bits: int
    group_size: int | None = None

    def expanded_scale(self, in_features: int) -> Tensor:
        """The scale broadcast to the weight's shape."""
        if self.group_size is None:
            return self.scale[:, None].expand(-1, in_features)
        return self.scale.repeat_interleave(self.group_size, dim=1)

    def quantize(self, weight: Tensor) -> Tensor:
        """Integer codes (as an integer tensor) for `weight`."""
        qmin, qmax = int_range(self.bits)
        q = torch.clamp(torch.round(weight / self.expanded_scale(weight.shape[1])), qmin, qmax)
        return q.to(torch.int8)

    def dequantize(self, codes: Tensor) -> Tensor:
        return codes.float() * self.expanded_scale(codes.shape[1])
