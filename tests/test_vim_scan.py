"""The reverse SelectiveScan (Vision Mamba's backward branch): every implementation equals
flip → forward scan → flip, the definition in ops/spec.py."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from mq_export.export.onnx import export_module, scan_function
from mq_export.ops import cpu_kernel, cpu_scan_grad
from mq_export.ops.selective_scan import (SelectiveScanOp, selective_scan, selective_scan_chunked,
                                          selective_scan_differentiable, selective_scan_reference)
from mq_export.ops.spec import SCAN_DOMAIN, SCAN_OP_TYPE, SelectiveScanSpec

from .conftest import random_scan_inputs

TIME_AXIS_INPUTS = ("u", "delta", "B", "C", "z")


def flipped_forward(x: dict, **kwargs):
    """The definition of the reverse scan: the forward reference on time-flipped inputs, y flipped back."""
    flipped = {k: (v.flip(-1) if k in TIME_AXIS_INPUTS else v) for k, v in x.items()}
    out = selective_scan_reference(**flipped, **kwargs)
    return (out[0].flip(-1), out[1]) if kwargs.get("return_last_state") else out.flip(-1)


def test_spec_carries_reverse_as_last_field_and_attribute():
    spec = SelectiveScanSpec(reverse=True)
    assert list(spec.__dataclass_fields__)[-1] == "reverse"
    assert spec.attributes()["reverse"] == 1
    assert SelectiveScanSpec().attributes()["reverse"] == 0


def test_reverse_reference_differs_from_forward_and_equals_flipped_forward():
    x = random_scan_inputs(length=11)
    h0 = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(3))
    kwargs = dict(delta_softplus=True, return_last_state=True, initial_state=h0)
    y, h = selective_scan_reference(**x, **kwargs, reverse=True)
    y_fwd, h_fwd = selective_scan_reference(**x, **kwargs)
    assert not torch.allclose(y, y_fwd, atol=1e-3) and not torch.allclose(h, h_fwd, atol=1e-3)
    ref_y, ref_h = flipped_forward(x, **kwargs)
    torch.testing.assert_close(y, ref_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h, ref_h, rtol=1e-6, atol=1e-6)
    # The last step sees only itself (and the initial state): its output equals a one-step scan.
    last = {k: (v[..., -1:] if k in TIME_AXIS_INPUTS else v) for k, v in x.items()}
    torch.testing.assert_close(y[..., -1:], selective_scan_reference(**last, delta_softplus=True, initial_state=h0))


@pytest.mark.parametrize("length", [1, 7, 37])
@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_reverse_chunked_equals_flipped_forward(length, chunk):
    x = random_scan_inputs(length=length)
    h0 = torch.randn(2, 6, 4)
    ref_y, ref_h = flipped_forward(x, delta_softplus=True, return_last_state=True, initial_state=h0)
    y, h = selective_scan_chunked(**x, delta_softplus=True, return_last_state=True, initial_state=h0,
                                  reverse=True, chunk=chunk)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(cpu_kernel.load() is None, reason="no C compiler: the fused CPU scan kernel cannot be built")
@pytest.mark.parametrize("length", [1, 7, 130])   # 130: more than two of the kernel's 64-step tiles
@pytest.mark.parametrize("options", ["all", "bare"])
def test_reverse_fused_kernel_equals_flipped_forward(length, options):
    x = random_scan_inputs(b=2, d=37, n=5, length=length)   # 37: a partial 16-channel block
    if options == "bare":
        x = {k: v for k, v in x.items() if k in ("u", "delta", "A", "B", "C")}
        x["delta"] = torch.nn.functional.softplus(x["delta"])   # Δ > 0 as the model's: a bounded state
        kwargs = dict(delta_softplus=False, return_last_state=False, initial_state=None)
    else:
        kwargs = dict(delta_softplus=True, return_last_state=True, initial_state=torch.randn(2, 37, 5))
    expected = flipped_forward(x, **kwargs)
    got = cpu_kernel.selective_scan_fused(**{k: x.get(k) for k in ("u", "delta", "A", "B", "C", "D", "z",
                                                                    "delta_bias")}, **kwargs, reverse=True)
    for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_dispatch_passes_reverse_to_every_path():
    x = random_scan_inputs(length=9)
    expected = flipped_forward(x, delta_softplus=True)
    torch.testing.assert_close(selective_scan(**x, delta_softplus=True, reverse=True), expected,
                               rtol=1e-5, atol=1e-5)
    double = selective_scan(**{k: v.double() for k, v in x.items()}, delta_softplus=True, reverse=True)
    torch.testing.assert_close(double.float(), expected, rtol=1e-5, atol=1e-5)
    grad_u = x["u"].clone().requires_grad_()
    with_grad = selective_scan(**{**x, "u": grad_u}, delta_softplus=True, reverse=True)
    torch.testing.assert_close(with_grad.detach(), expected, rtol=1e-5, atol=1e-5)


def _single_node_model(spec: SelectiveScanSpec, chunk: int) -> onnx.ModelProto:
    names = spec.input_names()
    node = onnx.helper.make_node(SCAN_OP_TYPE, names, spec.output_names(), domain=SCAN_DOMAIN, **spec.attributes())
    vi = lambda n: onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)  # noqa: E731
    graph = onnx.helper.make_graph([node], "g", [vi(n) for n in names], [vi(n) for n in spec.output_names()])
    return onnx.helper.make_model(graph, functions=[scan_function(spec, 18, chunk=chunk)],
                                  opset_imports=[onnx.helper.make_opsetid("", 18),
                                                 onnx.helper.make_opsetid(SCAN_DOMAIN, 1)])


@pytest.mark.parametrize("spec", [SelectiveScanSpec(reverse=True),
                                  SelectiveScanSpec(has_initial_state=True, return_last_state=True, reverse=True)])
@pytest.mark.parametrize("length, chunk", [(1, 8), (23, 8), (5, 1)])
def test_reverse_function_body_equals_flipped_forward(spec, length, chunk):
    """The ONNX function body reads the node's `reverse` attribute, in ONNX Runtime and onnx's
    reference evaluator, at lengths below and above whole chunks (padding at the scan's end)."""
    t = random_scan_inputs(length=length)
    t["initial_state"] = torch.randn(2, 6, 4)
    names = spec.input_names()
    model = _single_node_model(spec, chunk)
    feed = {n: t[n].numpy() for n in names}
    ref = flipped_forward({n: t[n] for n in names}, delta_softplus=True, return_last_state=spec.return_last_state)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for out in (ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed),
                ReferenceEvaluator(model).run(None, feed)):
        for o, r in zip(out, ref, strict=True):
            np.testing.assert_allclose(o, r.numpy(), rtol=1e-4, atol=1e-5)


class _BidirectionalScan(torch.nn.Module):
    """Both directions over the same inputs, as a Vim mixer's two branches."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = torch.nn.Parameter(-torch.rand(6, 4, generator=g) * 2)
        self.A_b = torch.nn.Parameter(-torch.rand(6, 4, generator=g) * 2)
        self.scan, self.scan_b = SelectiveScanOp(), SelectiveScanOp()

    def forward(self, u, delta, B, C):
        return (self.scan(u, delta, self.A, B, C, delta_softplus=True)
                + self.scan_b(u, delta, self.A_b, B, C, delta_softplus=True, reverse=True))


def test_one_export_holds_both_directions():
    module = _BidirectionalScan().eval()
    names = ["u", "delta", "B", "C"]
    t = random_scan_inputs(length=9)
    proto, info = export_module(module, tuple(t[n] for n in names), input_names=names, output_names=["y"],
                                dynamic_axes={n: {0: "batch", 2: "length"} for n in names})
    scans = [n for n in proto.graph.node if n.op_type == SCAN_OP_TYPE]
    assert sorted(onnx.helper.get_attribute_value(a) for n in scans for a in n.attribute if a.name == "reverse") == [0, 1]
    assert len(proto.functions) == 1 and info.scan_nodes == 2
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for length in (1, 17):
        t = random_scan_inputs(length=length)
        with torch.no_grad():
            ref = module(*(t[n] for n in names)).numpy()
        np.testing.assert_allclose(sess.run(None, {n: t[n].numpy() for n in names})[0], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_differentiable_scan_values_and_gradients_equal_the_reference(reverse):
    x = random_scan_inputs(length=13)
    h0 = torch.randn(2, 6, 4)
    grads = []
    for scan in (selective_scan_reference, selective_scan_differentiable):
        leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
        y, h = scan(**leaves, delta_softplus=True, return_last_state=True, initial_state=h0, reverse=reverse)
        (y.square().sum() + h.sum()).backward()
        grads.append((y.detach(), h.detach(), *(leaves[k].grad for k in sorted(leaves))))
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(cpu_scan_grad.load() is None, reason="no C compiler: the CPU scan kernels cannot be built")
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("options", ["all", "bare"])
def test_backward_kernel_equals_autograd_of_the_reference(reverse, options):
    """Gradients of every input through the fused kernels; 37 channels (a partial block), 70 steps
    (more than two 32-step tiles)."""
    x = random_scan_inputs(d=37, n=5, length=70)
    if options == "bare":
        x = {k: v for k, v in x.items() if k in ("u", "delta", "A", "B", "C")}
    weights = torch.randn(2, 37, 70, generator=torch.Generator().manual_seed(5))
    grads = []
    for scan in (selective_scan_reference, cpu_scan_grad.selective_scan_trainable):
        leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
        y = scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves.get("D"),
                 z=leaves.get("z"), delta_bias=leaves.get("delta_bias"), delta_softplus=True, reverse=reverse)
        (y * weights).sum().backward()
        grads.append([y.detach()] + [leaves[k].grad for k in sorted(leaves)])
    for got, expected in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(cpu_scan_grad.load() is None, reason="no C compiler: the CPU scan kernels cannot be built")
def test_training_takes_the_backward_kernel_unless_state_is_involved(monkeypatch):
    calls = []
    real = cpu_scan_grad.selective_scan_trainable
    monkeypatch.setattr(cpu_scan_grad, "selective_scan_trainable", lambda *a: calls.append(1) or real(*a))
    x = {k: v.requires_grad_() for k, v in random_scan_inputs(length=9).items()}
    selective_scan(**x, delta_softplus=True, reverse=True).sum().backward()
    assert calls == [1] and x["A"].grad is not None
    selective_scan(**x, delta_softplus=True, return_last_state=True)[0].sum().backward()
    assert calls == [1]      # a final state: the PyTorch autograd path
