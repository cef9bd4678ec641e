"""The fused CPU selective scan (csrc/selective_scan_cpu.c), compiled on first use and loaded with ctypes.

The C file is built with the system C compiler (`$CC`, else `cc`) for this CPU
(-O3 -ffast-math -march=native) into a per-user cache keyed by the source, the compiler and the
CPU, so it is compiled once per machine (about a second). Without a working compiler, or with
MQ_EXPORT_CPU_KERNEL=0, `load()` returns None and `scan.selective_scan` uses its PyTorch path.
ctypes releases the GIL during the call, so the kernel's work units (batch element × block of
16 channels) are split across a thread pool of torch.get_num_threads() workers. The build cache
(`compiled_library`, `load_kernel`) and the thread split (`run_units`) serve the SSD kernel too
(ssd_cpu_kernel.py).
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
from typing import Callable, Sequence

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "selective_scan_cpu.c"
HEADER = SOURCE.with_suffix(".h")
DISABLE_ENV = "MQ_EXPORT_CPU_KERNEL"
ABI = 4            # MQ_CPU_SCAN_ABI in the header
MAX_DSTATE = 256   # MQ_CPU_SCAN_MAX_DSTATE
C_FLAGS = ["-O3", "-ffast-math", "-march=native", "-fPIC"]


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mq_export"


def cpu_id() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


class ScanParams(ctypes.Structure):
    """Mirror of mq_cpu_scan_params (csrc/selective_scan_cpu.h)."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "u", "delta", "z", "A", "B", "C", "D", "delta_bias", "h0", "y", "h_last")] + [
        (name, ctypes.c_int64) for name in ("u_sb", "u_st", "u_sd", "delta_sb", "delta_st", "delta_sd",
                                            "z_sb", "z_st", "z_sd", "y_sb", "y_st", "y_sd",
                                            "B_sb", "B_st", "B_sn", "C_sb", "C_st", "C_sn",
                                            "batch", "dim", "length", "dstate")] + [
        ("delta_softplus", ctypes.c_int32), ("reverse", ctypes.c_int32)]


def compiled_library(source: Path, headers: Sequence[Path] = ()) -> ctypes.CDLL | None:
    """`source` (a C file including `headers` from its folder) built for this CPU into the per-user
    cache, once per machine, and loaded; None where it cannot be built or MQ_EXPORT_CPU_KERNEL=0.
    The cache key covers the source, the headers, the compiler, the flags and the CPU."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    key = hashlib.sha256(b"".join(f.read_bytes() for f in (source, *headers)) + compiler.encode()
                         + " ".join(C_FLAGS).encode() + cpu_id().encode()).hexdigest()[:16]
    library = cache_dir() / f"{source.stem}-{key}.so"
    if not library.is_file():
        try:
            library.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
                built, obj = Path(tmp) / library.name, Path(tmp) / "kernel.o"
                # Compile and link apart: linking with -ffast-math would add crtfastmath, which
                # switches the whole process to flush-to-zero when the library loads.
                for cmd in ([compiler, *C_FLAGS, f"-I{source.parent}", "-c", "-o", str(obj), str(source)],
                            [compiler, "-shared", "-o", str(built), str(obj), "-lm"]):
                    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
                os.replace(built, library)        # atomic: concurrent builders never see half a file
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        return ctypes.CDLL(str(library))
    except OSError:
        return None


def load_kernel(source: Path, headers: Sequence[Path], name: str, abi: int,
                params: type[ctypes.Structure]) -> ctypes.CDLL | None:
    """`compiled_library(source, headers)` with its entry points declared: `<name>_abi()` (must
    return `abi`), `<name>_units(params*)` and `<name>(params*, unit_begin, unit_end)`."""
    lib = compiled_library(source, headers)
    if lib is None or getattr(lib, f"{name}_abi")() != abi:
        return None
    units, scan = getattr(lib, f"{name}_units"), getattr(lib, name)
    units.argtypes, units.restype = [ctypes.POINTER(params)], ctypes.c_int64
    scan.argtypes, scan.restype = [ctypes.POINTER(params), ctypes.c_int64, ctypes.c_int64], ctypes.c_int
    return lib


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be built (PyTorch path is used)."""
    return load_kernel(SOURCE, [HEADER], "mq_cpu_scan", ABI, ScanParams)


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mq-scan")


def run_units(scan: Callable[[int, int], int], units: int) -> list[int]:
    """Run a kernel's work units [0, units) split into contiguous ranges over
    torch.get_num_threads() threads (ctypes releases the GIL); each range's status code."""
    workers = max(1, min(torch.get_num_threads(), units))
    if workers == 1:
        return [scan(0, units)]
    bounds = [units * i // workers for i in range(workers + 1)]
    return list(_pool(workers).map(scan, bounds[:-1], bounds[1:]))


def fp32_cpu(tensors) -> bool:
    """Whether every given tensor (None: an absent optional input) is fp32 on the CPU, which is all
    the C kernels read."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors if t is not None)


def supports(*tensors: Tensor | None) -> bool:
    """Whether the fused kernel can run these scan inputs: fp32 CPU tensors, and the kernel builds.
    It is not differentiable; callers keep autograd away from it."""
    return fp32_cpu(tensors) and load() is not None


def _time_major(x: Tensor) -> Tensor:
    """(b, c, l) → a (b, l, c) view with unit channel stride, copying only when the storage is not."""
    x = x.transpose(1, 2)
    return x if x.stride(2) == 1 else x.contiguous()


def selective_scan_fused(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                         z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                         initial_state: Tensor | None, return_last_state: bool, reverse: bool = False):
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
                        *u_t.stride(), *delta_t.stride(), *((0, 0, 0) if z_t is None else z_t.stride()),
                        *y.stride(), *B_t.stride(), *C_t.stride(), b, d, length, n,
                        int(delta_softplus), int(reverse))
    status = run_units(lambda begin, end: lib.mq_cpu_scan(ctypes.byref(params), begin, end),
                       lib.mq_cpu_scan_units(ctypes.byref(params)))
    if any(status):
        raise RuntimeError(f"CPU selective-scan kernel failed with status {max(status)}")
    y = y.transpose(1, 2)
    return (y, h_last) if return_last_state else y
