"""ONNX Runtime sessions for exported models, the policy for INT8 MatMuls, and the optional
registered SelectiveScan kernel.

Without the kernel, ONNX Runtime runs the `SelectiveScan` node through the model-local function
(standard ops). `session(path, scan_kernel=True)` registers an onnxruntime-extensions Python
kernel for the same domain/op_type; ONNX Runtime then claims the node with the kernel instead of
inlining the function, the same precedence TensorRT's parser gives a registered plugin. The
kernel runs `scan.selective_scan` in PyTorch; it exists to prove the mechanism and to
cross-check the function body, not for speed (extensions returns outputs through Python lists).

INT8 MatMuls: at optimization level `all`, ORT fuses DequantizeLinear + MatMul into
MatMulIntegerToFloat / QLinearMatMul, which run MLAS's u8s8 integer GEMM. On x86 CPUs without
VNNI that GEMM adds pairs of u8×s8 products into saturating 16-bit sums (VPMADDUBSW), so a
full-range INT8 weight gives results the Q/DQ graph does not mean. `int8_matmul_policy` decides
per CPU whether the fused kernels are exact; where they are not, `session` keeps Q/DQ as float
ops (ORT's `session.disable_quant_qdq`), which computes exactly what the graph (and TensorRT)
means.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import Tensor

from ..errors import MQExportError
from ..ops.spec import SCAN_DOMAIN, SCAN_OP_TYPE, SelectiveScanSpec

_REGISTERED: dict[int, object] = {}


def scan_spec_of(model: onnx.ModelProto) -> SelectiveScanSpec | None:
    """The SelectiveScan variant used in `model` (None if it has no scan node)."""
    for node in model.graph.node:
        if node.domain == SCAN_DOMAIN and node.op_type == SCAN_OP_TYPE:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            return SelectiveScanSpec(**{k: bool(attrs.get(k, 0)) for k in (
                "delta_softplus", "has_D", "has_z", "has_delta_bias", "has_initial_state", "return_last_state")})
    return None


def _scan_kernel(u, delta, A, B, C, *rest, **attrs):
    from ..ops.selective_scan import selective_scan

    spec = SelectiveScanSpec(**{k: bool(attrs[k]) for k in (
        "delta_softplus", "has_D", "has_z", "has_delta_bias", "has_initial_state", "return_last_state")})
    optional = dict(zip(spec.input_names()[5:], rest))
    as_t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    with torch.inference_mode():
        out = selective_scan(as_t(u), as_t(delta), as_t(A), as_t(B), as_t(C), D=as_t(optional.get("D")),
                             z=as_t(optional.get("z")), delta_bias=as_t(optional.get("delta_bias")),
                             delta_softplus=spec.delta_softplus, return_last_state=spec.return_last_state,
                             initial_state=as_t(optional.get("initial_state")))
    if spec.return_last_state:
        return out[0].numpy(), out[1].numpy()
    return out.numpy()


def register_scan_kernel(spec: SelectiveScanSpec) -> None:
    """Declare the onnxruntime-extensions kernel for `spec`'s input count (idempotent)."""
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    n_in = len(spec.input_names())
    n_out = len(spec.output_names())
    key = n_in * 10 + n_out
    if key in _REGISTERED:
        return
    attrs = {k: (PyCustomOpDef.dt_string if isinstance(v, str) else PyCustomOpDef.dt_int64)
             for k, v in spec.attributes().items()}
    _REGISTERED[key] = onnx_op(op_type=f"{SCAN_DOMAIN}::{SCAN_OP_TYPE}", inputs=[PyCustomOpDef.dt_float] * n_in,
                               outputs=[PyCustomOpDef.dt_float] * n_out, attrs=attrs)(_scan_kernel)


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


def session(model: str | Path | onnx.ModelProto, *, scan_kernel: bool = False, threads: int | None = None,
            optimization: str = "all", int8_matmul: str | Int8MatMul | None = None,
            optimized_model: str | Path | None = None):
    """An `onnxruntime.InferenceSession` on CPU. `scan_kernel`: run SelectiveScan nodes through the
    registered kernel instead of the model's function body. `int8_matmul`: an `Int8MatMul`, or a
    choice for `int8_matmul_policy` (None: $MQ_EXPORT_ORT_INT8_MATMUL, default auto). A path is
    handed to ORT as a path, so models with external data (> 2 GB) load. `optimized_model`: also
    write the graph ORT runs after its optimizations there. Subnormals are flushed to zero (the
    scan's decays produce them; they are slow on x86 and change nothing at fp32 tolerance)."""
    import onnxruntime as ort

    policy = int8_matmul if isinstance(int8_matmul, Int8MatMul) else int8_matmul_policy(int8_matmul)
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
    if scan_kernel:
        spec = scan_spec_of(proto)
        if spec is not None:
            from onnxruntime_extensions import get_library_path
            register_scan_kernel(spec)
            so.register_custom_ops_library(get_library_path())
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
