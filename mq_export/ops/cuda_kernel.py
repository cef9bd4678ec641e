"""ctypes binding of libmq_scan_kernels.so, the CUDA scans of plugins/kernels.

`selective_scan_cuda` has the semantics of `mq_export.ops.selective_scan.selective_scan_reference`
(mamba-ssm `selective_scan_fn` layout), `ssd_scan_cuda` those of
`mq_export.ops.ssd_scan.ssd_scan_reference` (mamba-ssm `mamba_chunk_scan_combined` layout).
torch is imported only when a kernel is called, so this module imports on CPU-only machines.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
from pathlib import Path

from mq_export.errors import MQExportError

LIBRARY_ENV = "MQ_SCAN_KERNELS_LIB"
DEFAULT_LIBRARY = Path(__file__).resolve().parents[2] / "build" / "plugins" / "libmq_scan_kernels.so"
# Must equal MQ_SCAN_ABI_VERSION / MQ_SCAN_MAX_DSTATE / mq_scan_dtype in plugins/kernels/mq_scan.h.
ABI_VERSION = 2
MAX_DSTATE = 256
_DTYPE_CODES = {"torch.float32": 0, "torch.float16": 1}


class ScanParams(ctypes.Structure):
    """Mirror of mq_scan_params."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state", "out", "final_state")] + [
        ("batch", ctypes.c_int64), ("dim", ctypes.c_int64), ("length", ctypes.c_int64),
        ("dstate", ctypes.c_int64), ("dtype", ctypes.c_int32), ("delta_softplus", ctypes.c_int32),
        ("reverse", ctypes.c_int32)]


class SSDParams(ctypes.Structure):
    """Mirror of mq_ssd_params."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state", "out", "final_state")] + [
        (name, ctypes.c_int64) for name in ("batch", "length", "heads", "headdim", "ngroups", "dstate")] + [
        ("dt_min", ctypes.c_float), ("dt_max", ctypes.c_float), ("dtype", ctypes.c_int32),
        ("dt_softplus", ctypes.c_int32), ("D_has_hdim", ctypes.c_int32)]


def library_path() -> Path:
    return Path(os.environ.get(LIBRARY_ENV) or DEFAULT_LIBRARY)


def load_library() -> ctypes.CDLL:
    """The kernel library at `library_path()`, loaded once per path."""
    return _open_library(str(library_path()))


@functools.lru_cache(maxsize=None)
def _open_library(path: str) -> ctypes.CDLL:
    if not Path(path).is_file():
        raise MQExportError(f"CUDA scan kernel library not found at {path}: build it with "
                            f"`cmake -S plugins -B build/plugins && cmake --build build/plugins` or set {LIBRARY_ENV}")
    try:
        library = ctypes.CDLL(path)
    except OSError as error:
        raise MQExportError(f"cannot load CUDA scan kernel library {path}: {error}") from None
    library.mq_scan_abi_version.restype = ctypes.c_int
    if library.mq_scan_abi_version() != ABI_VERSION:
        raise MQExportError(f"{path} has kernel ABI {library.mq_scan_abi_version()}, this mq_export needs "
                            f"{ABI_VERSION}: rebuild plugins/")
    library.mq_selective_scan_forward.argtypes = [ctypes.POINTER(ScanParams), ctypes.c_void_p]
    library.mq_selective_scan_forward.restype = ctypes.c_int
    library.mq_ssd_scan_forward.argtypes = [ctypes.POINTER(SSDParams), ctypes.c_void_p]
    library.mq_ssd_scan_forward.restype = ctypes.c_int
    library.mq_scan_status_string.argtypes = [ctypes.c_int]
    library.mq_scan_status_string.restype = ctypes.c_char_p
    return library


def _device_tensors(name: str, primary, activations: dict, parameters: dict):
    """Checks shapes, dtypes and devices against `primary` (one of the activations); returns the
    activations contiguous, the parameters as contiguous float32 on its device (None stays None)."""
    import torch

    if not primary.is_cuda:
        raise MQExportError(f"{name} needs CUDA tensors; use the mq_export.ops scans on CPU")
    if str(primary.dtype) not in _DTYPE_CODES:
        raise MQExportError(f"{name} supports float32 and float16 inputs, got {primary.dtype}")
    for key, (tensor, shape) in activations.items():
        if tensor is not None and (tuple(tensor.shape) != shape or tensor.dtype != primary.dtype
                                   or tensor.device != primary.device):
            raise MQExportError(f"{key} must have shape {shape}, dtype {primary.dtype} and device {primary.device}, "
                                f"got {tuple(tensor.shape)} {tensor.dtype} {tensor.device}")
    for key, (tensor, shape) in parameters.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise MQExportError(f"{key} must have shape {shape}, got {tuple(tensor.shape)}")
    tensors = {key: None if tensor is None else tensor.contiguous() for key, (tensor, _) in activations.items()}
    tensors.update({key: None if tensor is None else tensor.to(device=primary.device, dtype=torch.float32).contiguous()
                    for key, (tensor, _) in parameters.items()})
    return tensors


def _launch(forward, params, device, what: str) -> None:
    import torch

    library = load_library()
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        status = getattr(library, forward)(ctypes.byref(params), ctypes.c_void_p(stream))
    if status != 0:
        raise MQExportError(f"{what} kernel failed: {library.mq_scan_status_string(status).decode()}")


def _pointers(tensors: dict) -> dict:
    return {name: None if t is None else t.data_ptr() for name, t in tensors.items()}


def _check_dstate(dstate: int) -> None:
    if dstate > MAX_DSTATE:
        raise MQExportError(f"d_state {dstate} exceeds the kernel's limit of {MAX_DSTATE}")


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False, initial_state=None, reverse=False):
    """CUDA selective scan on torch tensors; arguments as `selective_scan_reference`.

    u, delta, B, C, z: one dtype, float32 or float16, on one CUDA device; A, D, delta_bias and
    initial_state are used as float32. Returns y (u's dtype), plus the float32 final state
    (b, d, n) when return_last_state.
    """
    import torch

    load_library()
    batch, dim, length = u.shape
    dstate = A.shape[1]
    _check_dstate(dstate)
    tensors = _device_tensors(
        "selective_scan_cuda", u,
        {"u": (u, (batch, dim, length)), "delta": (delta, (batch, dim, length)), "B": (B, (batch, dstate, length)),
         "C": (C, (batch, dstate, length)), "z": (z, (batch, dim, length))},
        {"A": (A, (dim, dstate)), "D": (D, (dim,)), "delta_bias": (delta_bias, (dim,)),
         "initial_state": (initial_state, (batch, dim, dstate))})
    tensors["out"] = torch.empty_like(u, memory_format=torch.contiguous_format)
    tensors["final_state"] = (torch.empty(batch, dim, dstate, device=u.device, dtype=torch.float32)
                              if return_last_state else None)
    params = ScanParams(**_pointers(tensors), batch=batch, dim=dim, length=length, dstate=dstate,
                        dtype=_DTYPE_CODES[str(u.dtype)], delta_softplus=int(delta_softplus), reverse=int(reverse))
    _launch("mq_selective_scan_forward", params, u.device, "selective-scan")
    y = tensors["out"]
    return (y, tensors["final_state"]) if return_last_state else y


def ssd_scan_cuda(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf),
                  initial_state=None, return_final_state=False):
    """CUDA chunked SSD scan on torch tensors; arguments as `ssd_scan_reference`.

    x, dt, B, C, z: one dtype, float32 or float16, on one CUDA device; A, D, dt_bias and
    initial_state are used as float32. Returns y (x's dtype), plus the float32 final state
    (b, h, p, n) when return_final_state.
    """
    import torch

    load_library()
    batch, length, heads, headdim = x.shape
    groups, dstate = B.shape[2], B.shape[3]
    _check_dstate(dstate)
    if heads % groups:
        raise MQExportError(f"ssd_scan_cuda: {groups} groups of B/C do not divide {heads} heads")
    D_has_hdim = D is not None and D.dim() == 2
    tensors = _device_tensors(
        "ssd_scan_cuda", x,
        {"x": (x, (batch, length, heads, headdim)), "dt": (dt, (batch, length, heads)),
         "B": (B, (batch, length, groups, dstate)), "C": (C, (batch, length, groups, dstate)),
         "z": (z, (batch, length, heads, headdim))},
        {"A": (A, (heads,)), "D": (D, (heads, headdim) if D_has_hdim else (heads,)), "dt_bias": (dt_bias, (heads,)),
         "initial_state": (initial_state, (batch, heads, headdim, dstate))})
    tensors["out"] = torch.empty_like(x, memory_format=torch.contiguous_format)
    tensors["final_state"] = (torch.empty(batch, heads, headdim, dstate, device=x.device, dtype=torch.float32)
                              if return_final_state else None)
    params = SSDParams(**_pointers(tensors), batch=batch, length=length, heads=heads, headdim=headdim,
                       ngroups=groups, dstate=dstate, dt_min=dt_limit[0], dt_max=dt_limit[1],
                       dtype=_DTYPE_CODES[str(x.dtype)], dt_softplus=int(dt_softplus), D_has_hdim=int(D_has_hdim))
    _launch("mq_ssd_scan_forward", params, x.device, "SSD scan")
    y = tensors["out"]
    return (y, tensors["final_state"]) if return_final_state else y
