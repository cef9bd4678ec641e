"""Training through the fused CPU selective scan: an autograd function whose forward is the C
kernel (`cpu_kernel`) and whose backward is csrc/selective_scan_cpu_grad.c, built and cached the
same way. It covers what training a model needs (a scan from a zero state, forward or reverse);
`selective_scan` falls back to its PyTorch autograd path for the rest.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from . import cpu_kernel

SOURCE = Path(__file__).with_name("csrc") / "selective_scan_cpu_grad.c"
ABI = 1            # MQ_CPU_SCAN_GRAD_ABI in the C file
LANES = 16         # channels per work unit (LANES in the C file): the dB/dC partial sums per block


class GradParams(ctypes.Structure):
    """Mirror of mq_cpu_scan_grad_params."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "u", "delta", "z", "A", "B", "C", "D", "delta_bias", "dout",
        "du", "ddelta", "dz", "dA", "dB", "dC", "dD", "ddelta_bias")] + [
        (name, ctypes.c_int64) for name in ("batch", "dim", "length", "dstate")] + [
        (name, ctypes.c_int32) for name in ("delta_softplus", "reverse")]


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL | None:
    return cpu_kernel.load_kernel(SOURCE, [], "mq_cpu_scan_grad", ABI, GradParams)


def supports(*tensors: Tensor | None) -> bool:
    """fp32 CPU inputs, and both kernels build."""
    return cpu_kernel.supports(*tensors) and load() is not None


class _FusedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, reverse: bool):
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.flags = (delta_softplus, reverse)
        return cpu_kernel.selective_scan_fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus, None, False,
                                               reverse)

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        delta_softplus, reverse = ctx.flags
        b, d, length = u.shape
        n = A.shape[1]
        time_major = lambda x: None if x is None else x.transpose(1, 2).contiguous()  # noqa: E731
        u_t, delta_t, z_t, B_t, C_t, dout_t = map(time_major, (u, delta, z, B, C, dout))
        A_c = A.contiguous()
        D_c, bias_c = (None if t is None else t.contiguous() for t in (D, delta_bias))
        blocks = (d + LANES - 1) // LANES
        du, ddelta, dz = (torch.empty_like(u_t) for _ in range(3))
        dA, dD, dbias = u.new_empty(b, d, n), u.new_empty(b, d), u.new_empty(b, d)
        dB, dC = u.new_empty(blocks, b, length, n), u.new_empty(blocks, b, length, n)
        tensors = (u_t, delta_t, z_t, A_c, B_t, C_t, D_c, bias_c, dout_t, du, ddelta, dz, dA, dB, dC, dD, dbias)
        params = GradParams(*(None if t is None else t.data_ptr() for t in tensors), b, d, length, n,
                            int(delta_softplus), int(reverse))
        lib = load()
        status = cpu_kernel.run_units(lambda begin, end: lib.mq_cpu_scan_grad(ctypes.byref(params), begin, end),
                                      lib.mq_cpu_scan_grad_units(ctypes.byref(params)))
        if any(status):
            raise RuntimeError(f"CPU selective-scan gradient kernel failed with status {max(status)}")
        along_time = lambda x: x.transpose(1, 2)  # noqa: E731   (b, l, k) → (b, k, l)
        return (along_time(du), along_time(ddelta), dA.sum(0), along_time(dB.sum(0)), along_time(dC.sum(0)),
                None if D is None else dD.sum(0), None if z is None else along_time(dz),
                None if delta_bias is None else dbias.sum(0), None, None)


def selective_scan_trainable(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                             z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                             reverse: bool) -> Tensor:
    """`selective_scan` (from a zero state, y only) differentiable through the C kernels; the caller
    checked `supports(...)`."""
    return _FusedScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
