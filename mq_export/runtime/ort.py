"""ONNX Runtime sessions for exported models: how the scan nodes run, and the policy for INT8
MatMuls.

Scan nodes (`SelectiveScan`, `SSDScan`, domain mq_export): where the native custom-op library of
`ort_native` is available (built from the project's C kernels against ONNX Runtime's headers),
`session` registers it and ORT claims those nodes with its kernels instead of inlining the
model-local function, the same precedence TensorRT's parser gives a registered plugin. Otherwise
ORT runs the function body (standard ops, slower). `scan_implementation` decides (auto, or forced
by `MQ_EXPORT_ORT_SCAN` / the `scan` argument) and says why; the choice is logged once per process.

INT8 MatMuls: at optimization level `all`, ORT fuses DequantizeLinear + MatMul into
MatMulIntegerToFloat / QLinearMatMul, which run MLAS's u8s8 integer GEMM. On x86 CPUs without
VNNI that GEMM adds pairs of u8×s8 products into saturating 16-bit sums (VPMADDUBSW), so a
full-range INT8 weight gives results the Q/DQ graph does not mean. `int8_matmul_policy` decides
per CPU whether the fused kernels are exact; where they are not, `session` keeps Q/DQ as float
ops (ORT's `session.disable_quant_qdq`), which computes exactly what the graph (and TensorRT)
means.
"""
from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import Tensor

from ..errors import MQExportError

logger = logging.getLogger(__name__)

SCAN_ENV = "MQ_EXPORT_ORT_SCAN"
SCAN_CHOICES = ("auto", "native", "function_body")


@dataclass(frozen=True)
class ScanImplementation:
    """How sessions run the scan nodes: the registered native kernels (`library`) or the model's
    function body; `reason` says why."""
    library: Path | None
    reason: str

    @property
    def name(self) -> str:
        """`native` or `function_body` (report.json's onnxruntime.scan_implementation)."""
        return "function_body" if self.library is None else "native"

    def to_dict(self) -> dict:
        return {"implementation": self.name, "reason": self.reason}


_ANNOUNCED: set[ScanImplementation] = set()


def scan_implementation(choice: str | None = None) -> ScanImplementation:
    """The scan implementation for `choice`: "auto" (native where the library builds, else the
    function body), "native" (MQExportError when it is unavailable) or "function_body"; None reads
    $MQ_EXPORT_ORT_SCAN (default auto). Logged once per process and outcome."""
    from . import ort_native

    source = f"scan={choice!r}"
    if choice is None:
        choice = os.environ.get(SCAN_ENV) or "auto"
        source = f"{SCAN_ENV}={choice}"
    if choice not in SCAN_CHOICES:
        raise MQExportError(f"unknown ONNX Runtime scan implementation ({source}); choose {', '.join(SCAN_CHOICES)}")
    if choice == "function_body":
        implementation = ScanImplementation(None, f"set by {source}")
    else:
        native = ort_native.native_ops()
        if native.path is None and choice == "native":
            raise MQExportError(f"{source}: the native ONNX Runtime scan kernels are unavailable: {native.reason}")
        implementation = ScanImplementation(native.path, native.reason if native.path else
                                            f"native kernels unavailable: {native.reason}")
    if implementation not in _ANNOUNCED:
        _ANNOUNCED.add(implementation)
        logger.info("ONNX Runtime scan nodes: %s (%s)", implementation.name, implementation.reason)
    return implementation


INT8_MATMUL_ENV = "MQ_EXPORT_ORT_INT8_MATMUL"
INT8_MATMUL_CHOICES = ("auto", "integer", "exact")


@dataclass(frozen=True)
class CpuInfo:
    """What decides ORT's integer GEMM kernel: the architecture and the CPU's feature flags."""
    machine: str            # platform.machine(), lower case: x86_64, amd64, aarch64, arm64, ...
    flags: frozenset[str]   # /proc/cpuinfo "flags" (x86) or "Features" (arm); empty where unknown
    model: str              # /proc/cpuinfo "model name", or platform.processor()


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuInfo:
    """This machine's `CpuInfo`, from the first processor block of /proc/cpuinfo (all cores of one
    machine share the flags that matter here)."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    flags = fields.get("flags") or fields.get("features") or ""
    return CpuInfo(machine=platform.machine().lower(), flags=frozenset(flags.split()),
                   model=fields.get("model name") or platform.processor() or "unknown")


_AVX512_CORE = frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl"})


def integer_gemm_is_exact(machine: str, flags: frozenset[str] | set[str]) -> tuple[bool, str]:
    """Whether ORT's CPU u8s8 GEMM (MLAS, behind MatMulIntegerToFloat / QLinearMatMul) sums in
    int32 without saturating on a CPU with these flags, and why. Mirrors MLAS's kernel choice
    (onnxruntime/core/mlas/lib/platform.cpp); what MLAS was not checked for counts as inexact."""
    if machine in ("x86_64", "amd64"):
        if _AVX512_CORE <= flags:
            # MLAS prefers its AVX-512-core kernel over the AVX-VNNI one, so only AVX-512 VNNI
            # helps here. AMX CPUs all have it (MLAS's AMX path falls back to it for small GEMMs).
            if "avx512_vnni" in flags:
                return True, "AVX-512 VNNI: ORT's integer GEMM accumulates in int32 (exact)"
            return False, ("AVX-512 without VNNI: ORT's u8s8 GEMM (VPMADDUBSW) saturates 16-bit sums of "
                           "INT8 products")
        if "avx2" in flags:
            if "avx_vnni" in flags:
                return True, "AVX-VNNI: ORT's integer GEMM accumulates in int32 (exact)"
            return False, "AVX2 without VNNI: ORT's u8s8 GEMM (VPMADDUBSW) saturates 16-bit sums of INT8 products"
        return False, "x86-64 without AVX2: ORT's integer GEMM for this CPU was not checked"
    if machine in ("aarch64", "arm64"):
        if flags & {"asimddp", "i8mm"}:
            return True, "Arm dot-product / I8MM: ORT's integer GEMM accumulates in int32 (exact)"
        return False, "Arm without dot-product flags (or flags unknown): ORT's integer GEMM was not checked"
    return False, f"{machine or 'unknown architecture'}: ORT's integer GEMM for this CPU was not checked"


@dataclass(frozen=True)
class Int8MatMul:
    """How a session runs Q/DQ-wrapped MatMuls: `integer` lets ORT fuse them into integer GEMMs;
    otherwise Q/DQ stay float ops, exactly what the graph means. `reason` says why."""
    integer: bool
    reason: str

    def to_dict(self) -> dict:
        return {"kernels": "integer" if self.integer else "float (exact Q/DQ)", "reason": self.reason}


def int8_matmul_policy(choice: str | None = None, cpu: CpuInfo | None = None) -> Int8MatMul:
    """The INT8 MatMul policy for `choice`: "auto" (integer kernels only where
    `integer_gemm_is_exact`), "integer" or "exact"; None reads $MQ_EXPORT_ORT_INT8_MATMUL
    (default auto). `cpu` defaults to this machine."""
    source = f"int8_matmul={choice!r}"
    if choice is None:
        choice = os.environ.get(INT8_MATMUL_ENV) or "auto"
        source = f"{INT8_MATMUL_ENV}={choice}"
    if choice not in INT8_MATMUL_CHOICES:
        raise MQExportError(f"unknown ONNX Runtime INT8 MatMul policy ({source}); choose "
                            f"{', '.join(INT8_MATMUL_CHOICES)}")
    cpu = cpu or cpu_info()
    exact, why = integer_gemm_is_exact(cpu.machine, cpu.flags)
    if choice == "auto":
        return Int8MatMul(integer=exact, reason=why)
    if choice == "exact":
        return Int8MatMul(integer=False, reason=f"set by {source}")
    return Int8MatMul(integer=True, reason=f"set by {source}; {why}" + ("" if exact else ": results may be wrong"))


def session(model: str | Path | onnx.ModelProto, *, scan: str | ScanImplementation | None = None,
            threads: int | None = None, optimization: str = "all", int8_matmul: str | Int8MatMul | None = None,
            optimized_model: str | Path | None = None):
    """An `onnxruntime.InferenceSession` on CPU. `scan`: a `ScanImplementation`, or a choice for
    `scan_implementation` (None: $MQ_EXPORT_ORT_SCAN, default auto: the native scan kernels where
    available, else the model's function body). `int8_matmul`: an `Int8MatMul`, or a
    choice for `int8_matmul_policy` (None: $MQ_EXPORT_ORT_INT8_MATMUL, default auto). A path is
    handed to ORT as a path, so models with external data (> 2 GB) load. `optimized_model`: also
    write the graph ORT runs after its optimizations there. Subnormals are flushed to zero (the
    scan's decays produce them; they are slow on x86 and change nothing at fp32 tolerance)."""
    import onnxruntime as ort

    policy = int8_matmul if isinstance(int8_matmul, Int8MatMul) else int8_matmul_policy(int8_matmul)
    scan = scan if isinstance(scan, ScanImplementation) else scan_implementation(scan)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    if not policy.integer:
        # Keeps DequantizeLinear → MatMul unfused (no MatMulIntegerToFloat / QLinearMatMul / MatMulInteger).
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    # INT4 DequantizeLinear → MatMul becomes MatMulNBits, whose default accuracy level (4) also
    # quantizes the activations to int8 per block: 1e-2 logit error on a small LM, not the graph's
    # meaning. Level 1 keeps the INT4 weights and computes in fp32 (error 3.6e-7).
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
    if threads is None:
        threads = torch.get_num_threads()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if optimized_model is not None:
        so.optimized_model_filepath = str(optimized_model)
    if isinstance(model, onnx.ModelProto):
        proto, name = model, "the model"
    else:
        name = str(model)
        try:   # the graph only: the weights (possibly external data) stay on disk for ORT
            proto = onnx.load(name, load_external_data=False)
        except Exception as exc:
            raise MQExportError(f"{model} is not a readable ONNX model ({type(exc).__name__})") from None
    disabled = []
    if _opset(proto) >= 21:
        # ORT 1.32's QDQ propagation copies a QuantizeLinear across a Transpose with a uint8 zero
        # point and output_dtype int8 at opset 21, and the session fails to load; skip that pass.
        disabled.append("QDQPropagationTransformer")
    if scan.library is not None:
        so.register_custom_ops_library(str(scan.library))
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else name
    try:
        return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=disabled or None)
    except Exception as exc:
        raise MQExportError(f"ONNX Runtime cannot load {name}: {str(exc).splitlines()[0]}") from exc


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


class OrtForward:
    """A logits function over an ONNX Runtime session: torch in, torch out (`evaluate.Forward`)."""

    def __init__(self, sess, input_name: str | None = None, output_name: str | None = None) -> None:
        self.session = sess
        self.input_name = input_name or sess.get_inputs()[0].name
        self.output_name = output_name or sess.get_outputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        feed = {self.input_name: x.detach().cpu().numpy()}
        return torch.from_numpy(self.session.run([self.output_name], feed)[0])
