"""ONNX Runtime sessions for exported models, and the optional registered SelectiveScan kernel.

Without the kernel, ONNX Runtime runs the `SelectiveScan` node through the model-local function
(standard ops). `session(path, scan_kernel=True)` registers an onnxruntime-extensions Python
kernel for the same domain/op_type; ONNX Runtime then claims the node with the kernel instead of
inlining the function, the same precedence TensorRT's parser gives a registered plugin. The
kernel runs `scan.selective_scan` in PyTorch; it exists to prove the mechanism and to
cross-check the function body, not for speed (extensions returns outputs through Python lists).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from torch import Tensor

from .errors import MQExportError
from .ops import SCAN_DOMAIN, SCAN_OP_TYPE, SelectiveScanSpec

_KERNEL_CALLS = {"count": 0}       # how often the registered kernel ran (tests read this)
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
    from .scan import selective_scan

    _KERNEL_CALLS["count"] += 1
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


def session(model: str | Path | onnx.ModelProto, *, scan_kernel: bool = False, threads: int | None = None,
            optimization: str = "all"):
    """An `onnxruntime.InferenceSession` on CPU. `scan_kernel`: run SelectiveScan nodes through the
    registered kernel instead of the model's function body. Subnormals are flushed to zero (the
    scan's decays produce them; they are slow on x86 and change nothing at fp32 tolerance)."""
    import onnxruntime as ort

    proto = model if isinstance(model, onnx.ModelProto) else None
    so = ort.SessionOptions()
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
    if threads is None:
        threads = torch.get_num_threads()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if proto is None:
        try:
            proto = onnx.load(str(model))
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
    try:
        return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=disabled or None)
    except Exception as exc:
        name = "the model" if isinstance(model, onnx.ModelProto) else str(model)
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


def kernel_calls() -> int:
    return _KERNEL_CALLS["count"]
