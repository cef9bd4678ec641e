"""The SSDScan node's function body: Mamba-2's scan (ops.ssd_scan.ssd_scan_reference) in standard
ONNX ops, so plain ONNX Runtime and onnx's reference evaluator run an exported Mamba-2 model."""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..ops.spec import SCAN_DOMAIN, SSD_OP_TYPE, SSDScanSpec
from .onnx_builder import Builder

# Time steps per chunk. Measured in plain ORT 1.32 (a mamba2-130m layer: batch 1 × 512 steps, 24 heads
# × 64, d_state 128; 2 threads, loaded machine, median of 5): chunk 32 0.150 s, 64 0.108 s, 128 0.160 s.
DEFAULT_SSD_CHUNK = 64
_INT64_MAX = np.iinfo(np.int64).max


def ssd_function(spec: SSDScanSpec, opset: int, chunk: int = DEFAULT_SSD_CHUNK) -> onnx.FunctionProto:
    """The chunked SSD form (as ops.ssd_scan.ssd_scan_chunked) as an ONNX local function.

    Everything that does not depend on the state runs for the whole sequence at once, as batched
    MatMuls over (batch, chunk, group, head-in-group): within each chunk of `chunk` steps the
    outputs (C·Bᵀ ⊙ exp(segment sums of Δ·A)) @ (Δ·x), with C·Bᵀ formed once per group, and each
    chunk's own contribution to its end state. Only the hand-over of the state from chunk to chunk
    is a Loop, one Mul + Add per chunk on a (b, h, p, n) state; the entering states then reach the
    outputs through one more MatMul. Segment sums are masked cumulative sums (no differences of
    large cumulative sums) and only exponentials of non-positive numbers are taken: stable at any
    length. Steps padded to a whole chunk have Δ = 0 and leave the state unchanged.

    Measured against the alternative, a body of one opset-27 `LinearAttention(update_rule="gated")`
    node (q = C, k = B, v = Δ·x, decay = Δ·A), on the layer of DEFAULT_SSD_CHUNK's note: that body
    took 0.38 s (this one 0.108 s), and ONNX Runtime 1.32 rejects an opset-27 node inside a function
    of an opset-18 model, so it would also force opset 27 on the whole export. (ORT's own
    com.microsoft.LinearAttention kernel took 0.049 s, but onnx's reference evaluator cannot run it.)
    """
    T = int(chunk)
    f = Builder("ssd_")
    c = f.const
    shape_x, shape_b = f("Shape", ["x"]), f("Shape", ["B"])
    batch, length, heads, headdim = (f("Slice", [shape_x, c([i]), c([i + 1])]) for i in range(4))
    groups, n_state = (f("Slice", [shape_b, c([i]), c([i + 1])]) for i in (2, 3))
    per_group = f("Div", [heads, groups])
    n_chunks = f("Div", [f("Add", [length, c([T - 1])]), c([T])])            # ceil(l / T), (1,)
    pads = f("Concat", [c([0]), f("Sub", [f("Mul", [n_chunks, c([T])]), length])], axis=0)
    zero = c(0.0, np.float32)

    def shape(*dims: str) -> str:
        return f("Concat", list(dims), axis=0)

    def chunked(value: str, dims: list[str], perm: list[int]) -> str:  # (b, l, …) → (b, chunks, T, …), permuted
        padded = f("Pad", [value, pads, zero, c([1])])
        return f("Transpose", [f("Reshape", [padded, shape(batch, n_chunks, c([T]), *dims)])], perm=perm)

    # Δ (b, l, h)
    delta = "dt"
    if spec.has_dt_bias:
        delta = f("Add", [delta, "dt_bias"])
    if spec.dt_softplus:
        # softplus(v) = max(v, 0) + log(1 + exp(-|v|)): stable, and vectorised in ONNX Runtime.
        delta = f("Add", [f("Relu", [delta]), f("Log", [f("Add", [f("Exp", [f("Neg", [f("Abs", [delta])])]),
                                                                  c(1.0, np.float32)])])])
    if (spec.dt_min, spec.dt_max) != (0.0, math.inf):
        delta = f("Max", [delta, c(spec.dt_min, np.float32)])
        if math.isfinite(spec.dt_max):
            delta = f("Min", [delta, c(spec.dt_max, np.float32)])
    xd = f("Mul", ["x", f("Unsqueeze", [delta, c([-1])])])                    # Δ·x (b, l, h, p)
    xd_c = chunked(xd, [groups, per_group, headdim], [0, 1, 3, 4, 2, 5])      # (b, c, g, r, T, p)
    a_c = chunked(f("Mul", [delta, "A"]), [groups, per_group], [0, 1, 3, 4, 2])   # Δ·A (b, c, g, r, T)
    b_c, c_c = (f("Unsqueeze", [chunked(v, [groups, n_state], [0, 1, 3, 2, 4]), c([3])])
                for v in ("B", "C"))                                          # (b, c, g, 1, T, n)

    # Within chunks: y_i = Σ_{j≤i} (C_i·B_j) exp(a_{j+1} + … + a_i) Δ_j x_j.
    cum = f("CumSum", [a_c, c(-1)])                                           # (b, c, g, r, T)
    strictly_lower = c(np.tril(np.ones((T, T)), -1), np.float32)
    segment = f("CumSum", [f("Mul", [f("Unsqueeze", [a_c, c([-1])]), strictly_lower]), c(-2)])
    decays = f("Mul", [f("Exp", [segment]), c(np.tril(np.ones((T, T))), np.float32)])  # (b, c, g, r, T, T)
    cb = f("MatMul", [c_c, f("Transpose", [b_c], perm=[0, 1, 2, 3, 5, 4])])  # (b, c, g, 1, T, T)
    y = f("MatMul", [f("Mul", [cb, decays]), xd_c])                           # (b, c, g, r, T, p)

    # Each chunk's inputs carried to its last step, and its total decay.
    last = f("Slice", [cum, c([-1]), c([_INT64_MAX]), c([-1])])               # (b, c, g, r, 1)
    to_end = f("Unsqueeze", [f("Exp", [f("Sub", [last, cum])]), c([-1])])
    chunk_states = f("MatMul", [f("Transpose", [f("Mul", [xd_c, to_end])], perm=[0, 1, 2, 3, 5, 4]), b_c])
    chunk_decay = f("Unsqueeze", [f("Exp", [last]), c([-1])])                 # (b, c, g, r, 1, 1)
    chunk_major = [1, 0, 2, 3, 4, 5]
    states_t = f("Transpose", [chunk_states], perm=chunk_major)               # (c, b, g, r, p, n)
    decay_t = f("Transpose", [chunk_decay], perm=chunk_major)                 # (c, b, g, r, 1, 1)
    state_shape = shape(batch, groups, per_group, headdim, n_state)
    if spec.has_initial_state:
        h0 = f("Reshape", ["initial_state", state_shape])
    else:
        h0 = f("ConstantOfShape", [state_shape], value=numpy_helper.from_array(np.zeros(1, np.float32)))

    # Loop over chunks: emits the state entering each chunk, carries it on.
    g = Builder("ssd_body_")
    step, cond_in, state_in = "ssd_body_iter", "ssd_body_cond", "ssd_body_state"
    gather = lambda v: g("Gather", [v, step], axis=0)  # noqa: E731
    g.output(g("Add", [g("Mul", [gather(decay_t), state_in]), gather(states_t)]), "ssd_body_state_out")
    g.output(cond_in, "ssd_body_cond_out")
    g.output(state_in, "ssd_body_entering")
    body = helper.make_graph(
        g.nodes, "ssd_state_passing",
        [helper.make_tensor_value_info(step, TensorProto.INT64, []),
         helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []),
         helper.make_tensor_value_info(state_in, TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(name, elem, shape_) for name, elem, shape_ in (
            ("ssd_body_cond_out", TensorProto.BOOL, []), ("ssd_body_state_out", TensorProto.FLOAT, None),
            ("ssd_body_entering", TensorProto.FLOAT, None))])
    # An explicit `true` condition: onnx's reference evaluator skips a Loop whose cond is omitted.
    final, entering = f("Loop", [f("Squeeze", [n_chunks, c([0])]), c(True, np.bool_), h0], n_out=2, body=body)

    # The entering state's effect: C_i·h exp(a_1 + … + a_i).
    # Stacked per chunk; onnx's reference evaluator concatenates Loop scan outputs instead, so reshape.
    entering = f("Reshape", [entering, f("Concat", [c([-1]), state_shape], axis=0)])
    entering = f("Transpose", [entering], perm=[1, 0, 2, 3, 5, 4])            # (b, c, g, r, n, p)
    y = f("Add", [y, f("Mul", [f("MatMul", [c_c, entering]), f("Unsqueeze", [f("Exp", [cum]), c([-1])])])])
    y = f("Reshape", [f("Transpose", [y], perm=[0, 1, 4, 2, 3, 5]), shape(batch, c([-1]), heads, headdim)])
    y = f("Slice", [y, c([0]), length, c([1])])                               # (b, l, h, p)
    if spec.has_D:
        y = f("Add", [y, f("Mul", ["x", "D" if spec.D_has_hdim else f("Unsqueeze", ["D", c([-1])])])])
    if spec.has_z:
        y = f("Mul", [y, f("Mul", ["z", f("Sigmoid", ["z"])])])
    f.output(y, "y")
    if spec.return_final_state:
        f.output(f("Reshape", [final, shape(batch, heads, headdim, n_state)]), "final_state")
    return helper.make_function(SCAN_DOMAIN, SSD_OP_TYPE, spec.input_names(), spec.output_names(), f.nodes,
                                [helper.make_opsetid("", opset)], attributes=list(spec.attributes()))
