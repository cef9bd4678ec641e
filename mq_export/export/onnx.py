"""ONNX export: any module whose scans are `SelectiveScanOp` / `SSDScanOp` submodules, with Q/DQ at
the quant sites.

How the graph is made:

* The module is traced by `torch.onnx.export(dynamo=True)` while four kinds of its own
  submodules are translated (`_translated`: their `forward`, on these instances only): each
  `SelectiveScanOp` emits ONE `SelectiveScan` node of the project domain, each `SSDScanOp` ONE
  `SSDScan` node (op contracts: `ops/spec.py`); each nn.Linear emits a weight marker so its
  weight becomes a [in, out] MatMul operand (a Linear with a `scale_output` method: the marker,
  then that); each `ActivationSite` whose quantizer is a
  `qspec.FakeQuantize` emits a site marker. Nothing else about the model changes, so
  rotations/smoothing the quantize stage folded into weights are simply the exported
  initializers, and online ops (`out_proj_input_rotation`, `gate_scale`) are ordinary
  MatMul/Mul/Sigmoid nodes.
* The markers are then rewritten with onnx-graphsurgeon: a site marker becomes
  QuantizeLinear→DequantizeLinear with the site's `ActQuant`; a weight marker becomes either a
  float [in, out] initializer or, when the Linear carries `weight_quant`, an integer initializer
  (INT8, or INT4 at opset ≥ 21) with one DequantizeLinear (per-channel on axis 1, or blocked along
  the input dimension with `block_size` = `WeightQuant.group_size`).
* Layout copies the traced views would cost are rewritten away with the same values: a site
  marker moves before the Transpose feeding it (per-tensor Q/DQ commutes with it), Transposes
  that undo each other cancel, and a float Linear read channel-major becomes W·xᵀ, one MatMul per
  feature range where a Split only cuts its output apart (`_projection_plan`).
* Each scan op type gets a local function (FunctionProto) of the same domain/name that computes
  the scan with standard ops (`scan_function`; `ssd_function.ssd_function` for SSDScan), so any
  ONNX runtime can run the file; a registered kernel (ORT custom op, TensorRT plugin) takes
  precedence over it. An export holds one variant (attribute set) per op type.
* Initializer bytes stay out of the ModelProto until the file is written (`_Initializers`): the
  rewrite, shape inference and checks work on a proto of a few MB at any model size, and a model
  with more than `EXTERNAL_DATA_BYTES` of weights is written as `model.onnx` + `model.onnx.data`
  (protobuf cannot hold 2 GB), streamed one tensor at a time.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import threading
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx
import torch
from onnx import AttributeProto, TensorProto, helper, numpy_helper
from torch import Tensor, nn

from ..errors import MQExportError
from ..ops.selective_scan import DeltaProjection, SelectiveScanOp
from ..ops.spec import SCAN_DOMAIN, SCAN_DOMAIN_VERSION, SelectiveScanSpec, SSDScanSpec
from ..ops.ssd_scan import NO_DT_LIMIT, SSDScanOp
from ..quant.qspec import ActQuant, FakeQuantize, WeightQuant
from .onnx_builder import Builder
from .ssd_function import ssd_function

MARK_DOMAIN = "mq_export.mark"   # temporary marker nodes; none survive in the written file
MIN_OPSET, MAX_OPSET = 18, 21   # torch's exporter writes opset ≥ 18
INT4_OPSET = 21                  # INT4 tensors and DequantizeLinear block_size
# Time steps per Loop iteration of the scan function body. Measured (1-thread CPU time, ORT 1.32):
# bundled model batch 64 × 784: T=4 0.59 s, 8 0.62–0.67 s, 16 0.71–0.75 s; d_model-768 LM layer
# at batch 1 × 512: equal for 4/8/16.
DEFAULT_CHUNK = 8
# Weights above this many bytes go to an external data file: protobuf refuses messages over 2 GiB,
# and the graph itself and the inline small tensors need some of that room.
EXTERNAL_DATA_BYTES = 1_800_000_000
EXTERNAL_MIN_TENSOR_BYTES = 1024    # smaller initializers stay inline even in an external-data model
_EXTERNAL_ALIGNMENT = 4096          # page-aligned offsets let ONNX Runtime map the weights from the file
_DEFERRED = "mq_export.deferred"    # location of an initializer whose bytes are filled in when written


@dataclass
class ExportInfo:
    """What the exporter did, for report.json."""
    opset: int
    scan_nodes: int = 0
    reverse_scan_nodes: int = 0        # of scan_nodes, those scanning from the last step (Vision Mamba)
    scan_spec: dict = field(default_factory=dict)   # the variant's attributes but `reverse`, which varies per node
    ssd_scan_nodes: int = 0
    ssd_scan_spec: dict = field(default_factory=dict)
    activation_sites: list[str] = field(default_factory=list)      # sites with Q/DQ
    quantized_weights: dict[str, str] = field(default_factory=dict)  # param → "int8 per-channel" …
    external_data: str | None = None   # the weights file next to the model (relative name), if any

    def to_dict(self) -> dict:
        return {"opset": self.opset, "scan_nodes": self.scan_nodes, "reverse_scan_nodes": self.reverse_scan_nodes,
                "scan_spec": self.scan_spec,
                "ssd_scan_nodes": self.ssd_scan_nodes, "ssd_scan_spec": self.ssd_scan_spec,
                "qdq_activation_sites": self.activation_sites, "quantized_weights": self.quantized_weights,
                "external_data": self.external_data}


# ------------------------------------------------------------------ initializers kept out of the proto

class _Initializers:
    """Initializers whose bytes are produced only when the model is written: name → a function
    returning the array whose memory is the tensor's raw_data (INT4: already packed). In the proto
    each is a placeholder with external location `_DEFERRED`, so no step before writing copies
    weights, and the transposed / integer weights are made one tensor at a time."""

    def __init__(self) -> None:
        self.sources: dict[str, Callable[[], np.ndarray]] = {}

    def placeholder(self, name: str, data_type: int, dims: Sequence[int],
                    source: Callable[[], np.ndarray]) -> onnx.TensorProto:
        tensor = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims),
                                  data_location=TensorProto.EXTERNAL)
        tensor.external_data.add(key="location", value=_DEFERRED)
        self.sources[name] = source
        return tensor

    def graph_surgeon_constant(self, gs, name: str, data_type: int, dims: Sequence[int],
                               source: Callable[[], np.ndarray]):
        # graphsurgeon exports a lazily-loaded proto as-is: the placeholder survives the rewrite.
        return gs.Constant(name, gs.ir.tensor.LazyValues(self.placeholder(name, data_type, dims, source)))

    def take_from(self, program) -> onnx.ModelProto:
        """The exporter's graph as a proto, each initializer of `EXTERNAL_MIN_TENSOR_BYTES` or more
        replaced by a placeholder whose source is the exporter's tensor (a view of the parameter)."""
        import onnx_ir as ir

        for value in program.model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None or tensor.nbytes < EXTERNAL_MIN_TENSOR_BYTES:
                continue
            self.sources[value.name] = tensor.numpy
            value.const_value = ir.ExternalTensor(_DEFERRED, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                                  name=value.name)
        return ir.serde.serialize_model(program.model)

    def deferred(self, proto: onnx.ModelProto) -> list[onnx.TensorProto]:
        return [t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL and
                any(e.key == "location" and e.value == _DEFERRED for e in t.external_data)]

    def nbytes(self, proto: onnx.ModelProto) -> int:
        return sum(_tensor_nbytes(t) for t in self.deferred(proto))

    def embed(self, proto: onnx.ModelProto) -> None:
        """Fill every placeholder's raw_data (the model then lives in memory, under 2 GB)."""
        for tensor in self.deferred(proto):
            tensor.raw_data = self._bytes(tensor)
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT

    def write_external(self, proto: onnx.ModelProto, data_path: Path) -> None:
        """Stream the placeholders' bytes into `data_path` (page-aligned, in graph order, so the same
        model gives the same bytes) and point them there by the file's name; small ones go inline."""
        with open(data_path, "wb") as f:
            for tensor in self.deferred(proto):
                data = self._bytes(tensor)
                del tensor.external_data[:]
                if len(data) < EXTERNAL_MIN_TENSOR_BYTES:
                    tensor.raw_data = data
                    tensor.data_location = TensorProto.DEFAULT
                    continue
                offset = -(-f.tell() // _EXTERNAL_ALIGNMENT) * _EXTERNAL_ALIGNMENT
                f.write(b"\0" * (offset - f.tell()))
                f.write(data)
                for key, value in (("location", data_path.name), ("offset", offset), ("length", len(data))):
                    tensor.external_data.add(key=key, value=str(value))

    def _bytes(self, tensor: onnx.TensorProto) -> bytes:
        data = np.asarray(self.sources[tensor.name]()).tobytes()   # C order, one copy of one tensor
        if len(data) != _tensor_nbytes(tensor):
            raise AssertionError(f"initializer {tensor.name}: {len(data)} bytes for a "
                                 f"{_tensor_nbytes(tensor)}-byte tensor")
        return data


def _tensor_nbytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (count + 1) // 2
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


# ------------------------------------------------------------------ tracing-time substitutions

class _Trace:
    def __init__(self) -> None:
        self.specs: list[SelectiveScanSpec] = []
        self.ssd_specs: list[SSDScanSpec] = []
        self.sites: dict[str, ActQuant] = {}


def _op_node(spec: SelectiveScanSpec | SSDScanSpec, inputs: list[Tensor], shapes: list[tuple]):
    """One node of the project domain for `spec` (op type and attributes from ops/spec.py); its
    outputs have the first input's dtype and `shapes`: one tensor, or a tuple for several."""
    op, dtype = f"{SCAN_DOMAIN}::{spec.op_type}", inputs[0].dtype
    if len(shapes) == 1:
        return torch.onnx.ops.symbolic(op, inputs, spec.attributes(), dtype=dtype, shape=shapes[0],
                                       version=SCAN_DOMAIN_VERSION)
    return tuple(torch.onnx.ops.symbolic_multi_out(op, inputs, spec.attributes(), dtypes=[dtype] * len(shapes),
                                                   shapes=shapes, version=SCAN_DOMAIN_VERSION))


def _scan_as_node(trace: _Trace):
    def selective_scan_node(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            return_last_state=False, initial_state=None, reverse=False):
        spec = SelectiveScanSpec(delta_softplus=bool(delta_softplus), has_D=D is not None, has_z=z is not None,
                                 has_delta_bias=delta_bias is not None,
                                 has_initial_state=initial_state is not None,
                                 return_last_state=bool(return_last_state), reverse=bool(reverse))
        trace.specs.append(spec)
        inputs = [u, delta, A, B, C] + [t for t in (D, z, delta_bias, initial_state) if t is not None]
        b, d, _ = u.shape
        return _op_node(spec, inputs, [u.shape, (b, d, A.shape[1])][:1 + bool(return_last_state)])
    return selective_scan_node


def _ssd_scan_as_node(trace: _Trace):
    def ssd_scan_node(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=NO_DT_LIMIT,
                      initial_state=None, return_final_state=False):
        spec = SSDScanSpec(dt_softplus=bool(dt_softplus), has_D=D is not None,
                           D_has_hdim=D is not None and D.dim() == 2, has_z=z is not None,
                           has_dt_bias=dt_bias is not None,
                           has_initial_state=initial_state is not None, return_final_state=bool(return_final_state),
                           dt_min=float(dt_limit[0]), dt_max=float(dt_limit[1]))
        trace.ssd_specs.append(spec)
        inputs = [x, dt, A, B, C] + [t for t in (D, z, dt_bias, initial_state) if t is not None]
        b, _, h, p = x.shape
        return _op_node(spec, inputs, [x.shape, (b, h, p, B.shape[-1])][:1 + bool(return_final_state)])
    return ssd_scan_node


def _linear_marker(linear: nn.Linear):
    # DeltaProjection's bias is the scan's delta_bias, not part of its own output.
    adds_bias = not isinstance(linear, DeltaProjection)

    def forward(x: Tensor) -> Tensor:
        # The parameters are read when called: while tracing they are the exporter's stand-ins.
        weight, bias = linear.weight, linear.bias if adds_bias else None
        w_t = torch.onnx.ops.symbolic(f"{MARK_DOMAIN}::Weight", [weight], {}, dtype=weight.dtype,
                                      shape=(weight.shape[1], weight.shape[0]), version=1)
        y = torch.matmul(x, w_t)
        return y if bias is None else y + bias
    return forward


def _scaled_linear_marker(linear: nn.Linear):
    marker = _linear_marker(linear)

    def forward(x: Tensor) -> Tensor:
        return linear.scale_output(marker(x))
    return forward


def _site_marker(name: str):
    def forward(x: Tensor) -> Tensor:
        return torch.onnx.ops.symbolic(f"{MARK_DOMAIN}::Site", [x], {"site": name}, dtype=x.dtype,
                                       shape=x.shape, version=1)
    return forward


@contextlib.contextmanager
def _translated(model: nn.Module, trace: _Trace) -> Iterator[None]:
    """While tracing, this model's own modules emit the export's nodes: each `SelectiveScanOp` one
    SelectiveScan node, each `SSDScanOp` one SSDScan node, each nn.Linear (or DeltaProjection) a
    weight marker, each ActivationSite with a `FakeQuantize` a site marker. Only `forward`
    attributes of these instances change, and each is restored to what it was (so translations
    nest); nothing module- or process-wide is touched. The caller holds `_TRACER_LOCK`, so no
    other thread's export sees these instances meanwhile."""
    replacements: list[tuple[nn.Module, Callable]] = []
    for name, module in model.named_modules():
        if isinstance(module, SelectiveScanOp):
            replacements.append((module, _scan_as_node(trace)))
        elif isinstance(module, SSDScanOp):
            replacements.append((module, _ssd_scan_as_node(trace)))
        elif type(module).forward in (nn.Linear.forward, DeltaProjection.forward):
            replacements.append((module, _linear_marker(module)))
        elif isinstance(module, nn.Linear) and hasattr(module, "scale_output"):
            # Linear's forward, then a fixed scaling of its output (Falcon-H1's in_proj multipliers).
            replacements.append((module, _scaled_linear_marker(module)))
        elif isinstance(module, nn.Linear) and getattr(module, "weight_quant", None) is not None:
            # A Linear subclass computes its own way: its forward is traced as written, without a marker.
            raise MQExportError(f"{name} ({type(module).__name__}) has its own forward, so its quantized "
                                f"weight cannot be exported; quantize plain nn.Linear modules")
        elif isinstance(getattr(module, "quantizer", None), FakeQuantize):
            trace.sites[name] = module.quantizer.params
            replacements.append((module, _site_marker(name)))
    previous = [(module, module.__dict__.get("forward")) for module, _ in replacements]
    try:
        for module, forward in replacements:
            module.forward = forward                     # an instance attribute shadows the class's
        yield
    finally:
        for module, forward in reversed(previous):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


# torch.export's tracer is process-wide (one proxy-mode slot; two threads tracing at once fail),
# so exports trace one at a time; what follows the trace (rewrite, checks, writing) runs freely.
# Reentrant: an export started from inside a traced forward gets torch's error, not a deadlock.
_TRACER_LOCK = threading.RLock()


# ------------------------------------------------------------------ the scan as standard ops

def scan_function(spec: SelectiveScanSpec, opset: int, chunk: int = DEFAULT_CHUNK) -> onnx.FunctionProto:
    """The SelectiveScan semantics (scan.selective_scan_reference) as an ONNX local function.

    Design. The masked cumulative-sum form (exp of non-positive differences of cumsum(Δ·A) for
    all step pairs of a chunk) needs b·l·T·d·n exponentials for Mamba-1, whose decay differs per
    state channel: T times the recurrence's. Measured on the bundled model (batch 64, l 784, 2
    threads, loaded machine): ORT's Exp alone over those elements costs ~6.3 s per batch at T=16
    (~1.6 s at T=4), more than this whole exported forward (~2.2 s). So instead: everything that
    does not depend on the state is computed for the whole sequence at once (Δ bias + softplus,
    Δ·u, time-major layout, padding to whole chunks); a Loop runs over chunks of `chunk` steps; inside one iteration the
    recurrence h ← exp(Δ_t A)·h + Δ_t B_t u_t and the read-out h·C are unrolled `chunk` times
    (the exact arithmetic of the reference, no exponentials of positive numbers, stable at any
    length). Each step's (b, n, d) decay and input are formed where they are used; computing a
    chunk's slabs at once and splitting them apart was ~10% slower in ORT (the extra copies).
    Padded steps have Δ = 0, so they leave the state unchanged and the final state is exact.

    One body serves both directions: it reads the node's `reverse` attribute (an attribute
    reference, so `spec.reverse` does not matter here) and, when set, puts the time-major inputs
    in scan order (a Slice with step -1) and y back in time order. For a forward node the Slices
    are full-range with step 1, which ONNX Runtime removes once it inlines the constant attribute.
    """
    T = int(chunk)
    f = Builder("ss_")
    inputs = spec.input_names()
    c = f.const
    # Δ (b, d, l)
    delta = "delta"
    if spec.has_delta_bias:
        delta = f("Add", [delta, f("Unsqueeze", ["delta_bias", c([-1])])])
    if spec.delta_softplus:
        # softplus(x) = max(x, 0) + log(1 + exp(-|x|)): stable, and vectorised Exp/Log are far
        # faster in ONNX Runtime than its scalar Softplus kernel.
        delta = f("Add", [f("Relu", [delta]), f("Log", [f("Add", [f("Exp", [f("Neg", [f("Abs", [delta])])]),
                                                                  c(1.0, np.float32)])])])
    du = f("Mul", [delta, "u"])
    # Time-major, state layout (…, n, d): d is innermost, so every broadcast runs over d-long spans.
    dlt_t = f("Transpose", [delta], perm=[2, 0, 1])                           # (l, b, d)
    du_t = f("Transpose", [du], perm=[2, 0, 1])                               # (l, b, d)
    b_t = f("Transpose", ["B"], perm=[2, 0, 1])                               # (l, b, n)
    c_t = f("Transpose", ["C"], perm=[2, 0, 1])                               # (l, b, n)
    reverse = f("Constant", [])
    f.nodes[-1].attribute.append(helper.make_attribute_ref("value_int", AttributeProto.INT, ref_attr_name="reverse"))
    step = f("Reshape", [f("Sub", [c(1), f("Mul", [c(2), reverse])]), c([1])])   # [1] forward, [-1] reverse
    # start 0 / -1 (the last step); end past the far edge either way (Slice clamps it)
    starts, ends = f("Neg", [f("Reshape", [reverse, c([1])])]), f("Mul", [step, c([np.iinfo(np.int64).max])])

    def in_scan_order(x: str) -> str:                       # time-major; its own inverse
        return f("Slice", [x, starts, ends, c([0]), step])

    dlt_t, du_t, b_t, c_t = (in_scan_order(x) for x in (dlt_t, du_t, b_t, c_t))
    a_t = f("Transpose", ["A"], perm=[1, 0])                                  # (n, d)
    shape_u = f("Shape", ["u"])
    batch = f("Slice", [shape_u, c([0]), c([1])])
    d_inner = f("Slice", [shape_u, c([1]), c([2])])
    length = f("Slice", [shape_u, c([2]), c([3])])
    n_state = f("Slice", [f("Shape", ["A"]), c([1]), c([2])])
    n_chunks = f("Div", [f("Add", [length, c([T - 1])]), c([T])])           # ceil(l / T), (1,)
    pad = f("Sub", [f("Mul", [n_chunks, c([T])]), length])
    pads = f("Concat", [c([0]), c([0]), c([0]), pad, c([0]), c([0])], axis=0)
    zero_f = c(0.0, np.float32)

    def chunked(x: str, last: str, unsqueeze: int) -> str:  # (l, b, k) → (n_chunks, T, b, [1,] k[, 1])
        padded = f("Pad", [x, pads, zero_f])
        shape = [n_chunks, c([T]), batch] + ([c([1]), last] if unsqueeze == 3 else [last, c([1])])
        return f("Reshape", [padded, f("Concat", shape, axis=0)])

    dlt_c, du_c = chunked(dlt_t, d_inner, 3), chunked(du_t, d_inner, 3)     # (nc, T, b, 1, d)
    b_c, c_c = chunked(b_t, n_state, 4), chunked(c_t, n_state, 3)           # (nc,T,b,n,1), (nc,T,b,1,n)
    if spec.has_initial_state:
        h0 = f("Unsqueeze", [f("Transpose", ["initial_state"], perm=[0, 2, 1]), c([0])])   # (1, b, n, d)
    else:
        h0 = f("ConstantOfShape", [f("Concat", [c([1]), batch, n_state, d_inner], axis=0)],
               value=numpy_helper.from_array(np.zeros(1, np.float32)))

    # ---- Loop body: one chunk of T steps
    g = Builder("body_")
    it, cond_in, h_in = "body_iter", "body_cond", "body_h"
    ones = g.const([1] * T)
    # Split the chunk's small per-step tensors (b·d or b·n values each), then form each step's
    # (b, n, d) decay and input where it is used: no T-step slab is written and copied apart.
    dlt_steps, du_steps, b_steps, c_steps = (g("Split", [g("Gather", [x, it], axis=0), ones], n_out=T, axis=0)
                                             for x in (dlt_c, du_c, b_c, c_c))
    h, ys = h_in, []
    for t in range(T):
        decay = g("Exp", [g("Mul", [dlt_steps[t], a_t])])                    # (1, b, n, d)
        h = g("Add", [g("Mul", [decay, h]), g("Mul", [du_steps[t], b_steps[t]])])
        ys.append(g("MatMul", [c_steps[t], h]))                             # (1, b, 1, d): h·C
    y_chunk = g("Concat", ys, axis=0)                                        # (T, b, 1, d)
    g.nodes.append(helper.make_node("Identity", [cond_in], ["body_cond_out"], name="body_Identity_cond"))
    g.nodes.append(helper.make_node("Identity", [h], ["body_h_out"], name="body_Identity_h"))
    g.nodes.append(helper.make_node("Identity", [y_chunk], ["body_y"], name="body_Identity_y"))
    body = helper.make_graph(
        g.nodes, "selective_scan_chunk",
        [helper.make_tensor_value_info(it, TensorProto.INT64, []),
         helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []),
         helper.make_tensor_value_info(h_in, TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("body_cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("body_h_out", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("body_y", TensorProto.FLOAT, None)])
    trip = f("Squeeze", [n_chunks, c([0])])
    # An explicit `true` condition: onnx's reference evaluator skips a Loop whose cond is omitted.
    h_last, y_chunks = f("Loop", [trip, c(True, np.bool_), h0], n_out=2, body=body)  # (1,b,n,d), (nc,T,b,1,d)
    y = f("Reshape", [y_chunks, f("Concat", [c([-1]), batch, d_inner], axis=0)])
    y = in_scan_order(f("Slice", [y, c([0]), length, c([0])]))               # (l, b, d)
    y = f("Transpose", [y], perm=[1, 2, 0])                                  # (b, d, l)
    if spec.has_D:
        y = f("Add", [y, f("Mul", ["u", f("Unsqueeze", ["D", c([-1])])])])
    if spec.has_z:
        y = f("Mul", [y, f("Mul", ["z", f("Sigmoid", ["z"])])])
    f.nodes.append(helper.make_node("Identity", [y], ["y"], name="ss_Identity_y"))
    outputs = ["y"]
    if spec.return_last_state:
        f.nodes.append(helper.make_node("Transpose", [f("Squeeze", [h_last, c([0])])], ["final_state"],
                                        perm=[0, 2, 1], name="ss_Transpose_h"))
        outputs.append("final_state")
    return helper.make_function(SCAN_DOMAIN, spec.op_type, inputs, outputs, f.nodes,
                                [helper.make_opsetid("", opset)], attributes=list(spec.attributes()))


# ------------------------------------------------------------------ Q/DQ rewriting

def _qtype(bits: int, signed: bool) -> int:
    table = {(8, True): TensorProto.INT8, (8, False): TensorProto.UINT8, (16, True): TensorProto.INT16,
             (16, False): TensorProto.UINT16, (4, True): TensorProto.INT4, (4, False): TensorProto.UINT4}
    if (bits, signed) not in table:
        raise MQExportError(f"{bits}-bit quantization cannot be exported (8 and 16-bit activations, "
                            f"8 and 4-bit weights)")
    return table[(bits, signed)]


def _owners(model: nn.Module) -> dict[str, nn.Module]:
    """Every name of every parameter (tied ones under all their names) → the module holding it."""
    modules = dict(model.named_modules(remove_duplicate=False))
    out = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        out[name] = modules[name.rpartition(".")[0]]
    return out


def _weight_quant_for(model: nn.Module, param_name: str) -> tuple[WeightQuant | None, Tensor]:
    params = dict(model.named_parameters(remove_duplicate=False))
    if param_name not in params:
        return None, None  # type: ignore[return-value]
    weight = params[param_name].detach()
    # Tied parameters: the one that carries weight_quant decides (e.g. a quantized lm_head).
    for name, owner in _owners(model).items():
        if params[name] is params[param_name] and isinstance(owner, nn.Linear):
            wq = getattr(owner, "weight_quant", None)
            if isinstance(wq, WeightQuant):
                return wq, weight
    return None, weight


def _rewrite_markers(proto: onnx.ModelProto, model: nn.Module, trace: _Trace, info: ExportInfo,
                     opset: int, initializers: _Initializers) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(proto)
    tensors = graph.tensors()
    _sites_before_transposes(graph)
    for node in list(graph.nodes):
        if node.domain != MARK_DOMAIN:
            continue
        out = node.outputs[0]
        if node.op == "Site":
            site = node.attrs["site"]
            p = trace.sites[site]
            qtype = _qtype(p.bits, p.signed)
            if p.bits == 16 and opset < INT4_OPSET:
                raise MQExportError(f"16-bit activation Q/DQ needs opset {INT4_OPSET} or later; pass --opset 21")
            zp_np = helper.tensor_dtype_to_np_dtype(qtype)
            scale = gs.Constant(f"{site}.act_scale", np.asarray(p.scale, np.float32))
            zp = gs.Constant(f"{site}.act_zero_point", np.asarray(p.zero_point, zp_np))
            q = gs.Variable(f"{site}.quantized", dtype=zp_np)
            graph.nodes.append(gs.Node("QuantizeLinear", f"{site}/QuantizeLinear", inputs=[node.inputs[0], scale, zp],
                                       outputs=[q]))
            graph.nodes.append(gs.Node("DequantizeLinear", f"{site}/DequantizeLinear", inputs=[q, scale, zp],
                                       outputs=[out]))
            info.activation_sites.append(site)
        else:  # Weight: [out, in] parameter → [in, out] MatMul operand
            src = node.inputs[0]
            param = src.name
            wq, weight = _weight_quant_for(model, param) if isinstance(src, gs.Constant) else (None, None)
            plan = _projection_plan(graph, out, weight) if weight is not None and wq is None else None
            if weight is None:       # not a parameter: transpose at run time
                graph.nodes.append(gs.Node("Transpose", f"{out.name}/Transpose", attrs={"perm": [1, 0]},
                                           inputs=[src], outputs=[out]))
            elif plan is not None:
                _write_projection(gs, graph, plan, src, weight, initializers)
            elif wq is None:
                const = initializers.graph_surgeon_constant(gs, f"{param}.T", TensorProto.FLOAT, weight.shape[::-1],
                                                            lambda w=weight: w.numpy().T)
                _replace_uses(graph, out, const)
            else:
                graph.nodes.append(_weight_dq(gs, param, weight, wq, out, opset, info, initializers))
        node.outputs.clear()
        node.inputs.clear()
    _cancel_transposes(graph)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    del tensors
    return gs.export_onnx(graph, do_type_check=False)


# ------------------------------------------------------------------ layout: no copies the model did not ask for
#
# A mixer that works channel-major (b, channels, l) between its projections (Mamba-1's) applies
# Linears and sites to channels-last views: x.transpose(1, 2) in, .transpose(1, 2) out. Traced
# literally, that is a Transpose (a copy) around every one. These rewrites give the same values
# with the layout copies gone: per-tensor Q/DQ commutes with a Transpose, two Transposes that undo
# each other cancel, and (x·Wᵀ)ᵀ = W·xᵀ.

def _swaps_last_axes(node) -> bool:
    return node.op == "Transpose" and list(node.attrs.get("perm", ())) == [0, 2, 1]


def _sole_use(tensor, graph):
    """The one node reading `tensor`, or None (several readers, or a graph output)."""
    uses = list(tensor.outputs)
    return uses[0] if len(uses) == 1 and tensor not in graph.outputs else None


def _sites_before_transposes(graph) -> None:
    """Transpose → site marker becomes site marker → Transpose: the Transpose then meets the next
    layout change (a MatMul's or another Transpose) and goes away, and ORT and TensorRT see
    Q→DQ next to the op that reads it."""
    for node in graph.nodes:
        if node.domain != MARK_DOMAIN or node.op != "Site" or not node.inputs[0].inputs:
            continue
        transpose = node.inputs[0].inputs[0]
        if transpose.op != "Transpose" or _sole_use(transpose.outputs[0], graph) is not node:
            continue
        site_out, moved = node.outputs[0], transpose.outputs[0]
        node.inputs[0], node.outputs[0] = transpose.inputs[0], moved
        transpose.inputs[0], transpose.outputs[0] = moved, site_out
        moved.shape = None


def _cancel_transposes(graph) -> None:
    """Readers of Transpose(Transpose(x)) read x where the two permutations undo each other."""
    for node in graph.nodes:
        first = node.inputs[0].inputs[0] if node.op == "Transpose" and node.inputs and node.inputs[0].inputs else None
        if first is None or first.op != "Transpose" or node.outputs[0] in graph.outputs:
            continue
        outer, inner = list(node.attrs["perm"]), list(first.attrs["perm"])
        if [inner[i] for i in outer] == list(range(len(outer))):
            _replace_uses(graph, node.outputs[0], first.inputs[0])


@dataclass(frozen=True)
class _ProjectionPlan:
    """How to write the MatMul x·Wᵀ of a float Linear: W·xᵀ (weight on the left) when the product
    is only read transposed to (b, out, l) (`channel_major`); one MatMul per row range of the
    weight (`rows`) writing `outputs`, the outputs of the Split that was the product's only reader.
    `replaced`: the MatMul, then the Transpose and Split whose outputs the new MatMuls write."""
    replaced: tuple
    channel_major: bool
    rows: tuple[tuple[int, int], ...]
    outputs: tuple


def _projection_plan(graph, marker_out, weight: Tensor) -> _ProjectionPlan | None:
    """The plan for the float Linear whose weight marker output is `marker_out`, or None where the
    plain x @ Wᵀ is already the best form. A product read channel-major gets the weight on the
    left: one MatMul writes the layout its reader wants. A product only read split along its
    features into k pieces becomes k MatMuls over row ranges of the weight when reading the input
    k times moves less data than copying the product, (k − 1)·in < out (Mamba-1's in_proj into x
    and z; not x_proj into dt, B, C). Integer weights keep x @ DQ(Wᵀ): ORT fuses only that form
    into integer GEMMs (MatMulIntegerToFloat takes a per-tensor scale only for its left operand,
    and leaves a Q that two MatMuls read unfused), and TensorRT reads per-channel weights there."""
    import onnx_graphsurgeon as gs

    matmul = _sole_use(marker_out, graph)
    if matmul is None or matmul.op != "MatMul" or matmul.inputs[1] is not marker_out:
        return None
    product = matmul.outputs[0]
    result, channel_major, replaced = product, False, [matmul]
    swap = _sole_use(product, graph)
    if swap is not None and _swaps_last_axes(swap):
        result, channel_major = swap.outputs[0], True
        replaced.append(swap)
    out_f, in_f = weight.shape
    rows, outputs = ((0, out_f),), (result,)
    split = _sole_use(result, graph)
    rank = len(product.shape) if product.shape is not None else None
    if split is not None and split.op == "Split" and rank is not None:
        if len(split.inputs) > 1 and isinstance(split.inputs[1], gs.Constant):
            sizes = [int(v) for v in split.inputs[1].values]
        else:
            count = int(split.attrs.get("num_outputs", len(split.outputs)))
            sizes = [out_f // count] * count if out_f % count == 0 else []
        if (split.attrs.get("axis", 0) % rank == (1 if channel_major else rank - 1) and sum(sizes) == out_f
                and len(sizes) == len(split.outputs) and (len(sizes) - 1) * in_f < out_f):
            starts = np.cumsum([0] + sizes[:-1])
            rows = tuple((int(a), int(a) + n) for a, n in zip(starts, sizes))
            outputs = tuple(split.outputs)
            replaced.append(split)
    if len(rows) == 1 and not channel_major:
        return None
    return _ProjectionPlan(tuple(replaced), channel_major, rows, outputs)


def _write_projection(gs, graph, plan: _ProjectionPlan, param, weight: Tensor, initializers: _Initializers) -> None:
    """The plan's MatMuls in place of its MatMul (and the Transpose and Split after it). `param`:
    the weight's [out, in] constant."""
    matmul = plan.replaced[0]
    x, name, in_f = matmul.inputs[0], matmul.name, weight.shape[1]
    whole = len(plan.rows) == 1
    for node in plan.replaced:
        node.outputs.clear()
        node.inputs.clear()
    if plan.channel_major:
        x_t = gs.Variable(f"{name}/input_transposed", dtype=x.dtype)
        graph.nodes.append(gs.Node("Transpose", f"{name}/Transpose_input", attrs={"perm": [0, 2, 1]},
                                   inputs=[x], outputs=[x_t]))
        x = x_t
    for (a, b), y in zip(plan.rows, plan.outputs):
        part = "" if whole else f"[{a}:{b}]"
        if plan.channel_major:
            w = param if whole else initializers.graph_surgeon_constant(
                gs, f"{param.name}{part}", TensorProto.FLOAT, (b - a, in_f), lambda a=a, b=b: weight[a:b].numpy())
            inputs = [w, x]
        else:
            inputs = [x, initializers.graph_surgeon_constant(gs, f"{param.name}{part}.T", TensorProto.FLOAT,
                                                             (in_f, b - a), lambda a=a, b=b: weight[a:b].numpy().T)]
        graph.nodes.append(gs.Node("MatMul", f"{name}{part}", inputs=inputs, outputs=[y]))


def _replace_uses(graph, old, new) -> None:
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new
    for i, t in enumerate(graph.outputs):
        if t is old:
            graph.outputs[i] = new


def _weight_dq(gs, param: str, weight: Tensor, wq: WeightQuant, out, opset: int, info: ExportInfo,
               initializers: _Initializers):
    out_f, in_f = weight.shape
    if wq.bits == 4 and opset < INT4_OPSET:
        raise MQExportError(f"INT4 weights need opset {INT4_OPSET} or later (got --opset {opset})")
    if wq.group_size is not None and opset < INT4_OPSET:
        raise MQExportError(f"block-quantized weights (group_size) need opset {INT4_OPSET} or later "
                            f"(got --opset {opset})")
    qtype = _qtype(wq.bits, True)
    attrs: dict = {}
    if wq.group_size is None:
        scale = wq.scale.detach().float().numpy().reshape(out_f)
        attrs["axis"] = 1
        zp_shape: tuple = (out_f,)
        kind = "per-channel"
    else:
        if in_f % wq.group_size:
            raise MQExportError(f"{param}: in_features {in_f} is not a multiple of group_size {wq.group_size}")
        scale = np.ascontiguousarray(wq.scale.detach().float().numpy().T)     # (in/g, out)
        attrs.update(axis=0, block_size=int(wq.group_size))
        zp_shape = scale.shape
        kind = f"blocked(block_size={wq.group_size}, input axis)"
    # Integer codes (in, out), made when the file is written.
    codes = initializers.graph_surgeon_constant(gs, f"{param}.T.quantized", qtype, (in_f, out_f),
                                                lambda: _int_bytes(wq.quantize(weight).numpy().T, qtype))
    zero_point = initializers.graph_surgeon_constant(gs, f"{param}.T.zero_point", qtype, zp_shape,
                                                     lambda: _int_bytes(np.zeros(zp_shape, np.int8), qtype))
    info.quantized_weights[param] = f"int{wq.bits} {kind}"
    return gs.Node("DequantizeLinear", f"{param}/DequantizeLinear", attrs=attrs,
                   inputs=[codes, gs.Constant(f"{param}.T.scale", scale.astype(np.float32)), zero_point],
                   outputs=[out])


def _int_bytes(values: np.ndarray, qtype: int) -> np.ndarray:
    """The raw_data of integer `values` as `qtype`: INT4 packs two per byte, the first in the low nibble."""
    if qtype not in (TensorProto.INT4, TensorProto.UINT4):
        return values.astype(helper.tensor_dtype_to_np_dtype(qtype))
    nibbles = np.ascontiguousarray(values, dtype=np.int8).reshape(-1).view(np.uint8) & 0x0F
    if len(nibbles) % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


# ------------------------------------------------------------------ public API

def export_module(model: nn.Module, args: tuple, path: str | Path | None = None, *,
                  input_names: Sequence[str], output_names: Sequence[str],
                  dynamic_axes: dict[str, dict[int, str]] | None = None, opset: int | None = None,
                  chunk: int = DEFAULT_CHUNK, check: bool = True,
                  external_data: bool | None = None) -> tuple[onnx.ModelProto, ExportInfo]:
    """Export `model(*args)` to ONNX: one `SelectiveScan` node (+ local function) per call of a
    `SelectiveScanOp` submodule and one `SSDScan` node per call of an `SSDScanOp` (a scan must go
    through one: the exporter translates those),
    Q/DQ at every `ActivationSite` with a `FakeQuantize`, integer weights for Linears with
    `weight_quant`. `dynamic_axes` maps input/output names to {axis: dim name}. Returns the model
    (also written to `path` if given) and what was exported. Deterministic for the same inputs.

    `external_data`: write the weights to `<path>.data` next to `path` (referenced by that relative
    name); None decides by size (more than `EXTERNAL_DATA_BYTES`). The returned proto then holds
    references to that file instead of the weights."""
    wants_int4 = any(getattr(m, "weight_quant", None) is not None and
                     (m.weight_quant.bits == 4 or m.weight_quant.group_size is not None)
                     for m in model.modules())
    wants_16 = any(isinstance(getattr(m, "quantizer", None), FakeQuantize) and m.quantizer.params.bits == 16
                   for m in model.modules())
    if opset is None:
        opset = INT4_OPSET if (wants_int4 or wants_16) else MIN_OPSET
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise MQExportError(f"opset {opset} is not supported; choose {MIN_OPSET}–{MAX_OPSET} "
                            f"({INT4_OPSET} or later for INT4 weights)")
    if (wants_int4 or wants_16) and opset < INT4_OPSET:
        raise MQExportError(f"INT4 / block-quantized weights and 16-bit activations need opset {INT4_OPSET} "
                            f"(got --opset {opset})")
    info = ExportInfo(opset=opset)
    trace = _Trace()
    # A strided view as example input makes torch.export trace aten.sym_stride, which has no ONNX op.
    args = tuple(a.detach().clone().contiguous() if isinstance(a, Tensor) else a for a in args)
    model = model.eval()
    with _TRACER_LOCK, _translated(model, trace), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynamic_shapes = None
        if dynamic_axes:
            dynamic_shapes = tuple({axis: torch.export.Dim.DYNAMIC for axis in dynamic_axes.get(name, {})} or None
                                   for name in input_names)
        sink = io.StringIO()
        torch_onnx_log = logging.getLogger("torch.onnx")
        level = torch_onnx_log.level
        torch_onnx_log.setLevel(logging.ERROR)   # "torchvision is not installed" and progress chatter
        try:
            with contextlib.redirect_stdout(sink):
                program = torch.onnx.export(model, tuple(args), dynamo=True, input_names=list(input_names),
                                            output_names=list(output_names), opset_version=opset,
                                            dynamic_shapes=dynamic_shapes, optimize=True, verbose=False)
        except Exception as exc:
            cause = exc
            while cause is not None and not isinstance(cause, MQExportError):
                cause = cause.__cause__         # torch wraps what the traced forward raised
            if cause is not None:
                raise cause from None
            raise MQExportError(f"torch.onnx.export failed for {type(model).__name__}: "
                                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        finally:
            torch_onnx_log.setLevel(level)
    initializers = _Initializers()
    proto = initializers.take_from(program)
    del program
    # One function body serves both scan directions (it reads each node's `reverse`).
    specs = {replace(s, reverse=False) for s in trace.specs}
    if len(specs) > 1:
        raise MQExportError("the model runs its SelectiveScanOps with different settings "
                            f"({sorted(map(str, specs))}); one export holds one SelectiveScan variant")
    spec = next(iter(specs)) if specs else None
    info.scan_nodes = len(trace.specs)
    info.reverse_scan_nodes = sum(s.reverse for s in trace.specs)
    info.scan_spec = {k: v for k, v in (spec.attributes() if spec is not None else {}).items() if k != "reverse"}
    # SSDScan nodes get their own function: a model may hold one variant of each op type.
    ssd_specs = set(trace.ssd_specs)
    if len(ssd_specs) > 1:
        raise MQExportError("the model runs its SSDScanOps with different settings "
                            f"({sorted(map(str, ssd_specs))}); one export holds one SSDScan variant")
    ssd_spec = next(iter(ssd_specs)) if ssd_specs else None
    info.ssd_scan_nodes = len(trace.ssd_specs)
    # JSON has no infinity (the report is strict JSON): an unlimited dt_max is reported as null.
    info.ssd_scan_spec = {k: None if v == math.inf else v
                          for k, v in (ssd_spec.attributes() if ssd_spec is not None else {}).items()}
    proto = _rewrite_markers(proto, model, trace, info, opset, initializers)
    proto = _finish(proto, spec, ssd_spec, opset, chunk, input_names, output_names, dynamic_axes)
    _save(proto, initializers, path, info, external_data, check, type(model).__name__)
    return proto, info


def _save(proto: onnx.ModelProto, initializers: _Initializers, path: str | Path | None, info: ExportInfo,
          external_data: bool | None, check: bool, what: str) -> None:
    """Fill in the weights (inline, or streamed to `<path>.data`), write `path`, check. A written
    model is checked from its file: checking a proto in memory serializes it several times over."""
    weight_bytes = initializers.nbytes(proto)
    external = weight_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data
    too_big = f"{what} has {weight_bytes / 1e9:.1f} GB of weights, more than one ONNX protobuf holds (2 GB)"
    if external:
        if path is None:
            raise MQExportError(f"{too_big}; pass a path, and they are written next to it as external data")
        data_path = Path(path).with_name(f"{Path(path).name}.data")
        initializers.write_external(proto, data_path)
        info.external_data = data_path.name
    elif weight_bytes > EXTERNAL_DATA_BYTES:
        raise MQExportError(f"{too_big}; write it with external data")
    else:
        initializers.embed(proto)
    if path is not None:
        Path(path).write_bytes(proto.SerializeToString())
    if check:
        check_model(proto if path is None else path)


def _finish(proto: onnx.ModelProto, spec: SelectiveScanSpec | None, ssd_spec: SSDScanSpec | None, opset: int,
            chunk: int, input_names, output_names, dynamic_axes) -> onnx.ModelProto:
    """Opset, the scan ops' functions, names of dynamic dims, metadata; stable bytes."""
    domains = {o.domain: o.version for o in proto.opset_import}
    domains[""] = opset
    functions = ([scan_function(spec, opset, chunk)] if spec is not None else []) + (
        [ssd_function(ssd_spec, opset)] if ssd_spec is not None else [])
    if functions:
        domains[SCAN_DOMAIN] = SCAN_DOMAIN_VERSION
        del proto.functions[:]
        proto.functions.extend(functions)
    domains.pop(MARK_DOMAIN, None)
    del proto.opset_import[:]
    proto.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(domains.items()))
    proto.ir_version = 10 if opset >= 21 else 8
    # Caller's names for the dynamic dimensions.
    for value in list(proto.graph.input) + list(proto.graph.output):
        axes = (dynamic_axes or {}).get(value.name, {})
        dims = value.type.tensor_type.shape.dim
        for axis, dim_name in axes.items():
            if axis < len(dims):
                dims[axis].Clear()
                dims[axis].dim_param = dim_name
    del proto.graph.value_info[:]
    del proto.metadata_props[:]
    proto.producer_name, proto.producer_version = "mq-export", _version()
    proto.doc_string = ""
    proto.graph.doc_string = ""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)


def _version() -> str:
    from .._version import __version__
    return __version__


def check_model(model: onnx.ModelProto | str | Path) -> None:
    """onnx.checker (full check) and strict shape inference; raises MQExportError. A path is
    checked from the file, with its external data (a proto over 2 GB cannot be checked in memory)."""
    try:
        if isinstance(model, onnx.ModelProto):
            onnx.checker.check_model(model, full_check=True)
            onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        else:
            onnx.checker.check_model(str(model), full_check=True)   # full_check: strict shape inference too
    except Exception as exc:
        raise MQExportError(f"exported model fails the ONNX checker: {str(exc).splitlines()[0]}") from exc


def export_onnx(model: nn.Module, path: str | Path | None = None, *, opset: int | None = None,
                chunk: int = DEFAULT_CHUNK, check: bool = True,
                external_data: bool | None = None) -> tuple[onnx.ModelProto, ExportInfo]:
    """Export a model of a registered family (models/registry.py) with its family's example inputs,
    input/output names and dynamic axes: a classifier `x` (batch, length, d_input) → `logits`
    (batch, classes), a language model `input_ids` (batch, length) int64 → `logits` (batch, length,
    vocab). Other modules: use `export_module` with your own names/axes.
    `external_data`: as for `export_module` (None: the weights go to `<path>.data` above
    `EXTERNAL_DATA_BYTES`)."""
    from ..models.registry import family_of

    family = family_of(model, required=False)
    if family is None:
        raise MQExportError(f"export_onnx knows the registered model families, not {type(model).__name__}; "
                            f"call export_module with input/output names and axes")
    # Example sizes equal to no static dimension, so neither gets specialised.
    args = family.example_inputs(model, 2, 37, torch.Generator().manual_seed(0))
    return export_module(model, args, path, input_names=list(family.input_names),
                         output_names=list(family.output_names), dynamic_axes=family.dynamic_axes,
                         opset=opset, chunk=chunk, check=check, external_data=external_data)
