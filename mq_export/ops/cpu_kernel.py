"""The fused CPU selective scan (csrc/selective_scan_cpu.c), compiled on first use and loaded with ctypes.

The C file is built with the system C compiler (`$CC`, else `cc`) for this CPU
(-O3 -ffast-math -march=native) into a per-user cache keyed by the source, the compiler and the
CPU, so it is compiled once per machine (about a second). Without a working compiler, or with
MQ_EXPORT_CPU_KERNEL=0, `load()` returns None and `scan.selective_scan` uses its PyTorch path.
ctypes releases the GIL during the call, so the kernel's work units (batch element × block of
16 channels) are split across a thread pool of torch.get_num_threads() workers.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "selective_scan_cpu.c"
DISABLE_ENV = "MQ_EXPORT_CPU_KERNEL"
ABI = 2            # MQ_CPU_SCAN_ABI in the C file
MAX_DSTATE = 256   # MQ_CPU_SCAN_MAX_DSTATE
_FLAGS = ["-O3", "-ffast-math", "-march=native", "-fPIC"]


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mq_export"


def _cpu_id() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


class ScanParams(ctypes.Structure):
    """Mirror of mq_cpu_scan_params."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "u", "delta", "z", "A", "B", "C", "D", "delta_bias", "h0", "y", "h_last")] + [
        (name, ctypes.c_int64) for name in ("u_sb", "u_st", "delta_sb", "delta_st", "z_sb", "z_st",
                                            "B_sb", "B_st", "C_sb", "C_st", "batch", "dim", "length", "dstate")] + [
        ("delta_softplus", ctypes.c_int32)]


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be built (PyTorch path is used)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + compiler.encode() + " ".join(_FLAGS).encode()
                         + _cpu_id().encode()).hexdigest()[:16]
    library = _cache_dir() / f"selective_scan_cpu-{key}.so"
    if not library.is_file():
        try:
            library.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
                built, obj = Path(tmp) / library.name, Path(tmp) / "scan.o"
                # Compile and link apart: linking with -ffast-math would add crtfastmath, which
                # switches the whole process to flush-to-zero when the library loads.
                for cmd in ([compiler, *_FLAGS, "-c", "-o", str(obj), str(SOURCE)],
                            [compiler, "-shared", "-o", str(built), str(obj), "-lm"]):
                    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
                os.replace(built, library)        # atomic: concurrent builders never see half a file
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        lib = ctypes.CDLL(str(library))
    except OSError:
        return None
    if lib.mq_cpu_scan_abi() != ABI:
        return None
    lib.mq_cpu_scan_units.argtypes = [ctypes.POINTER(ScanParams)]
    lib.mq_cpu_scan_units.restype = ctypes.c_int64
    lib.mq_cpu_scan.argtypes = [ctypes.POINTER(ScanParams), ctypes.c_int64, ctypes.c_int64]
    lib.mq_cpu_scan.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mq-scan")


def supports(*tensors: Tensor | None) -> bool:
    """Whether the fused kernel can run these scan inputs: fp32 CPU tensors, and the kernel builds.
    It is not differentiable; callers keep autograd away from it."""
    present = [t for t in tensors if t is not None]
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in present) and load() is not None


def _time_major(x: Tensor) -> Tensor:
    """(b, c, l) → a (b, l, c) view with unit channel stride, copying only when the storage is not."""
    x = x.transpose(1, 2)
    return x if x.stride(2) == 1 else x.contiguous()


def selective_scan_fused(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                         z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                         initial_state: Tensor | None, return_last_state: bool):
    """`scan.selective_scan_reference` through the C kernel; the caller checked `supports(...)`.
    Inputs whose storage is time-major (u = x.transpose(1, 2) of a (b, l, d) tensor, as the model
    passes them) are read in place; y is returned as a (b, d, l) view of a (b, l, d) tensor."""
    lib = load()
    b, d, length = u.shape
    n = A.shape[1]
    if n > MAX_DSTATE:
        raise ValueError(f"d_state {n} exceeds the CPU kernel's limit {MAX_DSTATE}")
    u_t, delta_t, B_t, C_t = (_time_major(t) for t in (u, delta, B, C))
    z_t = None if z is None else _time_major(z)
    A, D, delta_bias, h0 = (None if t is None else t.contiguous() for t in (A, D, delta_bias, initial_state))
    y = u.new_empty(b, length, d)
    h_last = u.new_empty(b, d, n) if return_last_state else None
    keep = (u_t, delta_t, z_t, A, B_t, C_t, D, delta_bias, h0, y, h_last)   # alive for the call
    params = ScanParams(*(None if t is None else t.data_ptr() for t in keep),
                        u_t.stride(0), u_t.stride(1), delta_t.stride(0), delta_t.stride(1),
                        *((0, 0) if z_t is None else (z_t.stride(0), z_t.stride(1))),
                        B_t.stride(0), B_t.stride(1), C_t.stride(0), C_t.stride(1), b, d, length, n,
                        int(delta_softplus))
    units = lib.mq_cpu_scan_units(ctypes.byref(params))
    workers = max(1, min(torch.get_num_threads(), units))
    bounds = [units * i // workers for i in range(workers + 1)]

    def run(begin: int, end: int) -> int:
        return lib.mq_cpu_scan(ctypes.byref(params), begin, end)

    if workers == 1:
        status = [run(0, units)]
    else:
        status = list(_pool(workers).map(run, bounds[:-1], bounds[1:]))
    if any(status):
        raise RuntimeError(f"CPU selective-scan kernel failed with status {max(status)}")
    y = y.transpose(1, 2)
    return (y, h_last) if return_last_state else y
