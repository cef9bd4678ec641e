"""The backward scan of a bidirectional (Vision Mamba) mixer two ways: the SelectiveScan op with
`reverse` set, or the forward op between flips of its time-axis inputs and of y (what a graph
without the attribute does). Times the fused CPU kernel (PyTorch) and the ONNX function body in
ONNX Runtime on the same inputs, and checks both ways agree.

    python3 tools/bench_reverse_scan.py [--batch 8 --dim 384 --length 197 --dstate 16 --threads 1]

Defaults: one Vim-T mixer (d_inner 384, d_state 16) on a 224² image (196 patches + class token).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from mq_export.export.onnx import scan_function
from mq_export.ops import cpu_kernel
from mq_export.ops.spec import SCAN_DOMAIN, SCAN_OP_TYPE, SelectiveScanSpec

TIME_AXIS = ("u", "delta", "B", "C", "z")


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def scan_graph(reverse: bool, flips: bool, opset: int = 18) -> onnx.ModelProto:
    """One SelectiveScan node; with `flips`, its time-axis inputs and y go through Slice(step -1)."""
    spec = SelectiveScanSpec(reverse=reverse)
    names = spec.input_names()
    nodes, node_inputs = [], list(names)
    consts = [helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.array(v, np.int64), name))
              for name, v in (("start", [-1]), ("end", [np.iinfo(np.int64).min]), ("axis", [2]), ("step", [-1]))]
    if flips:
        nodes += consts
        node_inputs = [f"{n}_flipped" if n in TIME_AXIS else n for n in names]
        nodes += [helper.make_node("Slice", [n, "start", "end", "axis", "step"], [f"{n}_flipped"])
                  for n in names if n in TIME_AXIS]
    scan_out = "y_flipped" if flips else "y"
    nodes.append(helper.make_node(SCAN_OP_TYPE, node_inputs, [scan_out], domain=SCAN_DOMAIN, **spec.attributes()))
    if flips:
        nodes.append(helper.make_node("Slice", [scan_out, "start", "end", "axis", "step"], ["y"]))
    vi = lambda n: helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)  # noqa: E731
    return helper.make_model(helper.make_graph(nodes, "g", [vi(n) for n in names], [vi("y")]),
                             functions=[scan_function(spec, opset)],
                             opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(SCAN_DOMAIN, 1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--length", type=int, default=197)
    parser.add_argument("--dstate", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    b, d, length, n = args.batch, args.dim, args.length, args.dstate
    x = dict(u=torch.randn(b, d, length, generator=g), delta=torch.randn(b, d, length, generator=g) * 0.5,
             A=-torch.rand(d, n, generator=g) * 2, B=torch.randn(b, n, length, generator=g),
             C=torch.randn(b, n, length, generator=g), D=torch.randn(d, generator=g),
             z=torch.randn(b, d, length, generator=g), delta_bias=torch.randn(d, generator=g) * 0.1)
    print(f"batch {b}, d_inner {d}, length {length}, d_state {n}, {args.threads} thread(s); best of {args.repeats}")

    if cpu_kernel.load() is not None:
        kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True, initial_state=None,
                  return_last_state=False)

        def attribute():
            return cpu_kernel.selective_scan_fused(x["u"], x["delta"], x["A"], x["B"], x["C"], **kw, reverse=True)

        def two_flips():
            f = {k: x[k].flip(-1) for k in ("u", "delta", "B", "C")}
            y = cpu_kernel.selective_scan_fused(f["u"], f["delta"], x["A"], f["B"], f["C"],
                                                **{**kw, "z": x["z"].flip(-1)})
            return y.flip(-1)

        torch.testing.assert_close(attribute(), two_flips(), rtol=1e-5, atol=1e-5)
        t_attr, t_flip = best_of(attribute, args.repeats), best_of(two_flips, args.repeats)
        t_fwd = best_of(lambda: cpu_kernel.selective_scan_fused(x["u"], x["delta"], x["A"], x["B"], x["C"], **kw),
                        args.repeats)
        print(f"CPU kernel   forward {t_fwd * 1e3:7.2f} ms | reverse attribute {t_attr * 1e3:7.2f} ms | "
              f"flips + forward {t_flip * 1e3:7.2f} ms")
    else:
        print("CPU kernel   not built (no C compiler)")

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    feed = {k: v.numpy() for k, v in x.items()}
    runs = {}
    for label, reverse, flips in (("forward", False, False), ("reverse attribute", True, False),
                                  ("flips + forward", False, True)):
        sess = ort.InferenceSession(scan_graph(reverse, flips).SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
        runs[label] = sess.run(None, feed)[0]
        runs[label + " time"] = best_of(lambda: sess.run(None, feed), args.repeats)
    np.testing.assert_allclose(runs["reverse attribute"], runs["flips + forward"], rtol=1e-4, atol=1e-5)
    print("ORT function " + " | ".join(f"{label} {runs[label + ' time'] * 1e3:7.2f} ms"
                                       for label in ("forward", "reverse attribute", "flips + forward")))


if __name__ == "__main__":
    main()
