"""ctypes binding of libmq_scan_kernels.so, the CUDA selective scan of plugins/kernels.

Same semantics as `mq_export.ops.selective_scan.selective_scan_reference` (mamba-ssm `selective_scan_fn` layout).
torch is imported only when the kernel is called, so this module imports on CPU-only machines.
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from mq_export.errors import MQExportError

LIBRARY_ENV = "MQ_SCAN_KERNELS_LIB"
DEFAULT_LIBRARY = Path(__file__).resolve().parents[2] / "build" / "plugins" / "libmq_scan_kernels.so"
# Must equal MQ_SCAN_ABI_VERSION / MQ_SCAN_MAX_DSTATE / mq_scan_dtype in plugins/kernels/mq_scan.h.
ABI_VERSION = 1
MAX_DSTATE = 256
_DTYPE_CODES = {"torch.float32": 0, "torch.float16": 1}


class ScanParams(ctypes.Structure):
    """Mirror of mq_scan_params."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state", "out", "final_state")] + [
        ("batch", ctypes.c_int64), ("dim", ctypes.c_int64), ("length", ctypes.c_int64),
        ("dstate", ctypes.c_int64), ("dtype", ctypes.c_int32), ("delta_softplus", ctypes.c_int32)]


def library_path() -> Path:
    return Path(os.environ.get(LIBRARY_ENV) or DEFAULT_LIBRARY)


def load_library() -> ctypes.CDLL:
    """The kernel library at `library_path()`, loaded once per path."""
    return _open_library(str(library_path()))


@functools.lru_cache(maxsize=None)
def _open_library(path: str) -> ctypes.CDLL:
    if not Path(path).is_file():
        raise MQExportError(f"selective-scan kernel library not found at {path}: build it with "
                            f"`cmake -S plugins -B build/plugins && cmake --build build/plugins` or set {LIBRARY_ENV}")
    try:
        library = ctypes.CDLL(path)
    except OSError as error:
        raise MQExportError(f"cannot load selective-scan kernel library {path}: {error}") from None
    library.mq_scan_abi_version.restype = ctypes.c_int
    if library.mq_scan_abi_version() != ABI_VERSION:
        raise MQExportError(f"{path} has kernel ABI {library.mq_scan_abi_version()}, this mq_export needs "
                            f"{ABI_VERSION}: rebuild plugins/")
    library.mq_selective_scan_forward.argtypes = [ctypes.POINTER(ScanParams), ctypes.c_void_p]
    library.mq_selective_scan_forward.restype = ctypes.c_int
    library.mq_scan_status_string.argtypes = [ctypes.c_int]
    library.mq_scan_status_string.restype = ctypes.c_char_p
    return library


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False, initial_state=None):
    """CUDA selective scan on torch tensors; arguments as `selective_scan_reference`.

    u, delta, B, C, z: one dtype, float32 or float16, on one CUDA device; A, D, delta_bias and
    initial_state are used as float32. Returns y (u's dtype), plus the float32 final state
    (b, d, n) when return_last_state.
    """
    import torch

    library = load_library()
    if not u.is_cuda:
        raise MQExportError("selective_scan_cuda needs CUDA tensors; use mq_export.ops.selective_scan on CPU")
    dtype_code = _DTYPE_CODES.get(str(u.dtype))
    if dtype_code is None:
        raise MQExportError(f"selective_scan_cuda supports float32 and float16 inputs, got {u.dtype}")
    batch, dim, length = u.shape
    dstate = A.shape[1]
    if dstate > MAX_DSTATE:
        raise MQExportError(f"d_state {dstate} exceeds the kernel's limit of {MAX_DSTATE}")
    activations = {"delta": (delta, (batch, dim, length)), "B": (B, (batch, dstate, length)),
                   "C": (C, (batch, dstate, length)), "z": (z, (batch, dim, length))}
    for name, (tensor, shape) in activations.items():
        if tensor is not None and (tuple(tensor.shape) != shape or tensor.dtype != u.dtype
                                   or tensor.device != u.device):
            raise MQExportError(f"{name} must have shape {shape}, dtype {u.dtype} and device {u.device}, "
                                f"got {tuple(tensor.shape)} {tensor.dtype} {tensor.device}")
    parameters = {"A": (A, (dim, dstate)), "D": (D, (dim,)), "delta_bias": (delta_bias, (dim,)),
                  "initial_state": (initial_state, (batch, dim, dstate))}
    for name, (tensor, shape) in parameters.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise MQExportError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")

    def activation(tensor):
        return None if tensor is None else tensor.contiguous()

    def float32(tensor):
        return None if tensor is None else tensor.to(device=u.device, dtype=torch.float32).contiguous()

    tensors = {"u": activation(u), "delta": activation(delta), "A": float32(A), "B": activation(B),
               "C": activation(C), "D": float32(D), "z": activation(z), "delta_bias": float32(delta_bias),
               "initial_state": float32(initial_state),
               "out": torch.empty_like(u, memory_format=torch.contiguous_format),
               "final_state": (torch.empty(batch, dim, dstate, device=u.device, dtype=torch.float32)
                               if return_last_state else None)}
    params = ScanParams(**{name: None if t is None else t.data_ptr() for name, t in tensors.items()},
                        batch=batch, dim=dim, length=length, dstate=dstate, dtype=dtype_code,
                        delta_softplus=int(delta_softplus))
    with torch.cuda.device(u.device):
        stream = torch.cuda.current_stream(u.device).cuda_stream
        status = library.mq_selective_scan_forward(ctypes.byref(params), ctypes.c_void_p(stream))
    if status != 0:
        raise MQExportError(f"selective-scan kernel failed: {library.mq_scan_status_string(status).decode()}")
    y = tensors["out"]
    return (y, tensors["final_state"]) if return_last_state else y
