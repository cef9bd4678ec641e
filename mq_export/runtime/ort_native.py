"""The native ONNX Runtime custom-op library for the scan ops (ops/csrc/ort_scan_ops.cc): found,
built on first use and cached.

The library registers the project's scan ops (domain `mq_export`) for ORT's CPU execution provider;
its kernels call the same fused C kernels as PyTorch (ops/csrc/selective_scan_cpu.c and
ssd_scan_cpu.c). Building it needs ONNX Runtime's C/C++ API headers, which the
PyPI wheel does not ship: they are looked up in $MQ_EXPORT_ORT_INCLUDE, the per-user cache that
tools/fetch_ort_headers.sh fills (~/.cache/mq_export/ort-headers/), then /usr/include and
/usr/local/include. The library is compiled once per (sources, ORT headers, compilers, CPU) into
~/.cache/mq_export/ (about 10 s) and reused; `native_ops()` says whether it is available and, if
not, why. `mq-export build-ort-ops` builds it explicitly.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import MQExportError
from ..ops import cpu_kernel
from ..ops.spec import OP_SPECS, SCAN_DOMAIN

INCLUDE_ENV = "MQ_EXPORT_ORT_INCLUDE"
CSRC = cpu_kernel.SOURCE.parent
SOURCE = CSRC / "ort_scan_ops.cc"
KERNELS = (cpu_kernel.SOURCE, CSRC / "ssd_scan_cpu.c")     # C sources, each with its .h
ORT_HEADERS = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_cxx_inline.h",
               "onnxruntime_float16.h")
_CXX_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden"]
FETCH_HINT = "run tools/fetch_ort_headers.sh or set MQ_EXPORT_ORT_INCLUDE to the directory of onnxruntime_cxx_api.h"


@dataclass(frozen=True)
class NativeOps:
    """The built library (`path`) or why there is none (`reason`)."""
    path: Path | None
    reason: str
    handle: ctypes.CDLL | None = dataclasses.field(default=None, repr=False, compare=False)


def header_cache() -> Path:
    """Where tools/fetch_ort_headers.sh unpacks libonnxruntime-dev (one folder per version)."""
    return cpu_kernel.cache_dir() / "ort-headers"


def find_headers() -> Path:
    """The directory holding onnxruntime_cxx_api.h; MQExportError saying where it looked otherwise."""
    configured = os.environ.get(INCLUDE_ENV)
    if configured:
        for candidate in (Path(configured), Path(configured) / "onnxruntime"):
            if (candidate / "onnxruntime_cxx_api.h").is_file():
                return candidate
        raise MQExportError(f"{INCLUDE_ENV}={configured} holds no onnxruntime_cxx_api.h")
    fetched = sorted(header_cache().glob("*/usr/include/onnxruntime"))
    for candidate in [*reversed(fetched), *(Path(root) / sub for root in ("/usr/include", "/usr/local/include")
                                            for sub in ("onnxruntime", ""))]:
        if (candidate / "onnxruntime_cxx_api.h").is_file():
            return candidate
    raise MQExportError(f"no ONNX Runtime C/C++ API headers found (the PyPI wheel has none): {FETCH_HINT}")


def header_api_version(include: Path) -> int:
    """ORT_API_VERSION of the headers in `include`."""
    match = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", (include / "onnxruntime_c_api.h").read_text())
    if match is None:
        raise MQExportError(f"{include}/onnxruntime_c_api.h defines no ORT_API_VERSION")
    return int(match.group(1))


def runtime_api_version() -> int:
    """The C API version the installed onnxruntime serves (its minor version number)."""
    import onnxruntime

    return int(onnxruntime.__version__.split(".")[1])


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _op_table(name: str, spec_class) -> list[str]:
    """C++ tables of one op: its attributes (the spec's fields with their defaults) and, per input
    and output in spec order, the index of the flag attribute whose zero drops it (-1: always there)."""
    fields = [f.name for f in dataclasses.fields(spec_class)]
    defaults = spec_class()
    flags = [f for f in fields if isinstance(getattr(defaults, f), bool)]
    everything = spec_class(**{f: True for f in flags})

    def roles(listed) -> list[str]:
        entries = []
        for role in listed(everything):
            gates = [fields.index(f) for f in flags if role not in listed(dataclasses.replace(everything, **{f: False}))]
            entries.append(f"{{{_c_string(role)}, {gates[0] if gates else -1}}}")
        return entries

    def default(value) -> str:
        return "__builtin_inf()" if value == math.inf else repr(float(value))

    attributes = [f"{{{_c_string(f)}, {'false' if f in flags else 'true'}, {default(getattr(defaults, f))}}}"
                  for f in fields]
    inputs, outputs = roles(spec_class.input_names), roles(spec_class.output_names)
    return [f"inline constexpr Attribute k{name}Attributes[] = {{{', '.join(attributes)}}};",
            f"inline constexpr Role k{name}Inputs[] = {{{', '.join(inputs)}}};",
            f"inline constexpr Role k{name}Outputs[] = {{{', '.join(outputs)}}};",
            f"inline constexpr Op k{name} = {{{_c_string(spec_class.op_type)}, k{name}Attributes, {len(attributes)}, "
            f"k{name}Inputs, {len(inputs)}, k{name}Outputs, {len(outputs)}}};"]


def spec_header() -> str:
    """mq_ort_spec.h: the ops' names, attributes and input/output order from ops/spec.py."""
    lines = ["// Generated by mq_export/runtime/ort_native.py from mq_export/ops/spec.py. Do not edit.",
             "#pragma once", "namespace mq_spec {",
             "struct Attribute { const char* name; bool is_float; double default_value; };",
             "struct Role { const char* name; int gating_attribute; };",
             "struct Op { const char* op_type; const Attribute* attributes; int num_attributes;",
             "            const Role* inputs; int num_inputs; const Role* outputs; int num_outputs; };",
             f"inline constexpr const char* kDomain = {_c_string(SCAN_DOMAIN)};"]
    for index, (name, spec_class) in enumerate(OP_SPECS.items()):
        lines += _op_table(name, spec_class) + [f"constexpr int k{name}Index = {index};"]
    lines += [f"constexpr int kNumOps = {len(OP_SPECS)};",
              f"inline constexpr const Op* kOps[] = {{{', '.join(f'&k{name}' for name in OP_SPECS)}}};",
              "}  // namespace mq_spec"]
    return "\n".join(lines) + "\n"


def _compilers() -> tuple[str, str]:
    cc = shutil.which(os.environ.get("CC", "cc"))
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cc is None or cxx is None:
        raise MQExportError("building the native ONNX Runtime ops needs a C and a C++ compiler "
                            f"($CC / $CXX, default cc / c++); found {cc or 'no C'} and {cxx or 'no C++'} compiler")
    return cc, cxx


def library_path(include: Path) -> tuple[Path, str]:
    """Where the library for these headers, sources, compilers and this CPU is cached, and the
    generated spec header it is built with."""
    cc, cxx = _compilers()
    spec = spec_header()
    sources = [SOURCE, *KERNELS, *(kernel.with_suffix(".h") for kernel in KERNELS)]
    digest = hashlib.sha256()
    for part in ([path.read_bytes() for path in sources] + [(include / h).read_bytes() for h in ORT_HEADERS
                                                           if (include / h).is_file()]
                 + [spec.encode(), cc.encode(), cxx.encode(), " ".join(cpu_kernel.C_FLAGS + _CXX_FLAGS).encode(),
                    cpu_kernel.cpu_id().encode()]):
        digest.update(hashlib.sha256(part).digest())
    return cpu_kernel.cache_dir() / f"mq_ort_ops-{digest.hexdigest()[:16]}.so", spec


def build(force: bool = False) -> Path:
    """Build the library (unless cached and not `force`) and return its path; MQExportError with
    the reason when the headers, a compiler or the compilation fail. A failed compilation is
    remembered next to where the library would be, so later processes do not retry it (`force`
    does)."""
    include = find_headers()
    header_version, runtime_version = header_api_version(include), runtime_api_version()
    if header_version > runtime_version:
        raise MQExportError(f"the ONNX Runtime headers in {include} are API version {header_version}, newer than "
                            f"the installed onnxruntime ({runtime_version}); use headers of version <= {runtime_version}")
    library, spec = library_path(include)
    failed = library.with_suffix(".failed")
    if not force:
        if library.is_file():
            return library
        if failed.is_file():
            raise MQExportError(f"{failed.read_text().strip()} (an earlier build; `mq-export build-ort-ops` retries)")
    cc, cxx = _compilers()
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        tmp = Path(tmp)
        (tmp / "mq_ort_spec.h").write_text(spec)
        # The C kernels with PyTorch's flags (the same code, so the same results); compile and link
        # apart, as cpu_kernel does: -ffast-math at link time would add crtfastmath, which switches the
        # whole process to flush-to-zero when the library loads.
        objects = [tmp / f"{source.stem}.o" for source in KERNELS] + [tmp / "ort_scan_ops.o"]
        commands = [[cc, *cpu_kernel.C_FLAGS, f"-I{CSRC}", "-c", "-o", str(obj), str(source)]
                    for source, obj in zip(KERNELS, objects)]
        commands.append([cxx, *_CXX_FLAGS, f"-I{tmp}", f"-I{CSRC}", f"-I{include}", "-c", "-o", str(objects[-1]),
                         str(SOURCE)])
        built = tmp / library.name
        commands.append([cxx, "-shared", "-o", str(built), *map(str, objects), "-lm"])
        for command in commands:
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as exc:
                raise MQExportError(f"cannot run {command[0]}: {exc}") from None
            if done.returncode != 0:
                first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:300])
                message = f"building the native ONNX Runtime ops failed ({Path(command[-1]).name}): {first}"
                failed.write_text(message + "\n")
                raise MQExportError(message)
        os.replace(built, library)        # atomic: concurrent builders never see half a file
    failed.unlink(missing_ok=True)
    return library


@functools.lru_cache(maxsize=None)
def native_ops() -> NativeOps:
    """The library, built on first use and kept loaded (so `kernel_calls` reads the instance ORT
    runs), or why it is unavailable. Never raises."""
    try:
        path = build()
        handle = ctypes.CDLL(str(path))
    except (MQExportError, OSError) as exc:
        return NativeOps(None, str(exc))
    handle.mq_ort_kernel_calls.argtypes = [ctypes.c_char_p]
    handle.mq_ort_kernel_calls.restype = ctypes.c_int64
    ops = ", ".join(OP_SPECS)
    return NativeOps(path, f"native kernels ({ops}) from {path}", handle)


def kernel_calls(op_type: str) -> int:
    """How often ORT has run the native kernel of `op_type` in this process (a debug counter of the
    library; 0 when the library is not loaded)."""
    handle = native_ops().handle
    return max(handle.mq_ort_kernel_calls(op_type.encode()), 0) if handle is not None else 0
