"""The fused CPU SSD scan (csrc/ssd_scan_cpu.c, interface csrc/ssd_scan_cpu.h), loaded with ctypes.

Built and cached like the Mamba-1 kernel (`cpu_kernel.compiled_library`; MQ_EXPORT_CPU_KERNEL=0
disables both); its work units (batch element × head) are split over torch.get_num_threads()
threads. Inputs are read in place through their strides, so the model's views need no copies.
"""
from __future__ import annotations

import ctypes
import functools

from torch import Tensor

from . import cpu_kernel

SOURCE = cpu_kernel.SOURCE.with_name("ssd_scan_cpu.c")
HEADER = SOURCE.with_suffix(".h")
ABI = 1            # MQ_SSD_SCAN_ABI in the header
MAX_DSTATE = 256   # MQ_SSD_SCAN_MAX_DSTATE


class SSDScanParams(ctypes.Structure):
    """Mirror of mq_ssd_scan_params."""

    _fields_ = ([(name, ctypes.c_void_p) for name in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "h0",
                                                       "y", "h_last")]
                + [(name, ctypes.c_int64 * 4) for name in ("x_strides", "z_strides", "y_strides")]
                + [("dt_strides", ctypes.c_int64 * 3)]
                + [(name, ctypes.c_int64 * 4) for name in ("B_strides", "C_strides")]
                + [(name, ctypes.c_int64) for name in ("batch", "length", "heads", "headdim", "groups", "dstate")]
                + [(name, ctypes.c_int32) for name in ("dt_softplus", "D_has_hdim")]
                + [(name, ctypes.c_float) for name in ("dt_min", "dt_max")])


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be built (the PyTorch path is used)."""
    return cpu_kernel.load_kernel(SOURCE, [HEADER], "mq_ssd_scan", ABI, SSDScanParams)


def supports(*tensors: Tensor | None) -> bool:
    """Whether the fused kernel can run these scan inputs: fp32 CPU tensors, d_state within the
    kernel's limit (B is the fourth), and the kernel builds. It is not differentiable; callers keep
    autograd away from it."""
    return cpu_kernel.fp32_cpu(tensors) and tensors[3].shape[-1] <= MAX_DSTATE and load() is not None


def ssd_scan_fused(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                   dt_bias: Tensor | None, dt_softplus: bool, dt_limit: tuple[float, float],
                   initial_state: Tensor | None, return_final_state: bool):
    """`ssd_scan.ssd_scan_reference` through the C kernel; the caller checked `supports(...)`."""
    lib = load()
    batch, length, heads, headdim = x.shape
    groups, n = B.shape[2], B.shape[3]
    A, D, dt_bias, h0 = (None if t is None else t.contiguous() for t in (A, D, dt_bias, initial_state))
    y = x.new_empty(batch, length, heads, headdim)
    h_last = x.new_empty(batch, heads, headdim, n) if return_final_state else None
    keep = (x, dt, A, B, C, D, z, dt_bias, h0, y, h_last)   # alive for the call
    strides = lambda t, rank: (ctypes.c_int64 * rank)(*(t.stride() if t is not None else (0,) * rank))  # noqa: E731
    params = SSDScanParams(*(None if t is None else t.data_ptr() for t in keep),
                           strides(x, 4), strides(z, 4), strides(y, 4), strides(dt, 3), strides(B, 4),
                           strides(C, 4), batch, length, heads, headdim, groups, n, int(dt_softplus),
                           int(D is not None and D.dim() == 2), float(dt_limit[0]),
                           float(dt_limit[1]))
    status = cpu_kernel.run_units(lambda begin, end: lib.mq_ssd_scan(ctypes.byref(params), begin, end),
                                  lib.mq_ssd_scan_units(ctypes.byref(params)))
    if any(status):
        raise RuntimeError(f"CPU SSD-scan kernel failed with status {max(status)}")
    return (y, h_last) if return_final_state else y
