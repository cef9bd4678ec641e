"""ONNX export: graph contract (one SelectiveScan node + local function, Q/DQ at the sites),
numerics against PyTorch in ONNX Runtime and onnx's reference evaluator, and bad input."""
import collections
import hashlib
import logging
import tempfile
import threading

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from mq_export.runtime import ort as mq_ort
from mq_export.errors import MQExportError
from mq_export.export.onnx import _Trace, _translated, export_module, export_onnx, scan_function
from mq_export.load.checkpoints import load_classifier
from mq_export.models.mamba import (ActivationSite, ClassifierConfig, LMConfig, MambaLMHeadModel,
                                    MambaSequenceClassifier, MixerConfig)
from mq_export.ops.spec import SCAN_DOMAIN, SCAN_OP_TYPE, SCAN_PLUGIN_NAMESPACE, SCAN_PLUGIN_VERSION, SelectiveScanSpec
from mq_export.quant.qspec import ActQuant, FakeQuantize, WeightQuant
from mq_export.ops.selective_scan import SelectiveScanOp, selective_scan, selective_scan_reference
from tests.conftest import random_scan_inputs

logging.getLogger("torch.onnx").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def fp32_export(classifier):
    return export_onnx(classifier)


def tiny_classifier():
    """One mixer layer, d_model 64 (in_features 64/128: whole blocks of 64), fixed seed."""
    torch.manual_seed(3)
    return MambaSequenceClassifier(ClassifierConfig(mixer=MixerConfig(d_model=64), n_layers=1)).eval()


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _site_ranges(model, x) -> dict[str, tuple[float, float]]:
    """(min, max) of every activation site's input on `x`."""
    ranges = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: ranges.__setitem__(n, (float(o.min()), float(o.max()))))
             for n, m in model.named_modules() if hasattr(m, "quantizer")]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return ranges


def _fake_quantize(model, x, bits=8, group=None):
    """Hand-built quantizers in the qspec contract: max-calibrated sites, RTN weights."""
    ranges = _site_ranges(model, x)
    for name, m in model.named_modules():
        if hasattr(m, "quantizer"):
            m.quantizer = FakeQuantize(ActQuant(scale=max(map(abs, ranges[name])) / 127))
        if isinstance(m, torch.nn.Linear) and m.in_features >= 4:
            w, qmax = m.weight.data, 2 ** (bits - 1) - 1
            g = group if group and m.in_features % group == 0 else None
            scale = (w.reshape(w.shape[0], -1, g).abs().amax(-1) if g else w.abs().amax(1)) / qmax
            wq = WeightQuant(scale=scale, bits=bits, group_size=g)
            m.weight.data = wq.dequantize(wq.quantize(w))
            m.weight_quant = wq
    return model


def test_graph_has_one_scan_node_per_layer_with_plugin_attributes(fp32_export):
    proto, info = fp32_export
    scans = [n for n in proto.graph.node if n.op_type == SCAN_OP_TYPE]
    assert len(scans) == 2 == info.scan_nodes
    spec = SelectiveScanSpec()
    for node in scans:
        assert node.domain == SCAN_DOMAIN and len(node.input) == len(spec.input_names())
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_version"] == SCAN_PLUGIN_VERSION.encode()
        assert attrs["plugin_namespace"] == SCAN_PLUGIN_NAMESPACE.encode()
        assert attrs["delta_softplus"] == 1 and attrs["has_z"] == 1
    [fn] = proto.functions
    assert (fn.domain, fn.name) == (SCAN_DOMAIN, SCAN_OP_TYPE)
    assert list(fn.input) == spec.input_names()
    assert not any(n.domain for n in proto.graph.node if n.op_type != SCAN_OP_TYPE)
    opsets = {o.domain: o.version for o in proto.opset_import}
    assert opsets[""] >= 17 and opsets[SCAN_DOMAIN] == 1
    onnx.checker.check_model(proto, full_check=True)
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == ["batch", "length"]


@pytest.mark.parametrize("length", [100, 333])
def test_ort_function_body_matches_pytorch(classifier, fp32_export, length):
    x = torch.randn(3, length, 1)
    with torch.no_grad():
        ref = classifier(x).numpy()
    out = mq_ort.OrtForward(mq_ort.session(fp32_export[0]))(x).numpy()
    assert _rel(out, ref) < 1e-4


def test_reference_evaluator_matches_pytorch(classifier, fp32_export):
    x = torch.randn(2, 21, 1)
    with torch.no_grad():
        ref = classifier(x).numpy()
    out = ReferenceEvaluator(fp32_export[0]).run(None, {"x": x.numpy()})[0]
    assert _rel(out, ref) < 1e-4


@pytest.mark.parametrize("spec", [SelectiveScanSpec(), SelectiveScanSpec(has_z=False),
                                  SelectiveScanSpec(delta_softplus=False, has_D=False, has_delta_bias=False),
                                  SelectiveScanSpec(has_initial_state=True, return_last_state=True)])
@pytest.mark.parametrize("length, chunk", [(1, 8), (23, 8), (40, 8), (5, 1)])
def test_scan_function_body_matches_reference(spec, length, chunk):
    """The function body alone, every variant, lengths below/at/above whole chunks, and the
    one-step body the decode graph uses."""
    import onnxruntime as ort

    t = random_scan_inputs(length=length)
    t["initial_state"] = torch.randn(2, 6, 4)
    fn = scan_function(spec, 18, chunk=chunk)
    names = spec.input_names()
    node = onnx.helper.make_node(SCAN_OP_TYPE, names, spec.output_names(), domain=SCAN_DOMAIN, **spec.attributes())
    vi = lambda n: onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)  # noqa: E731
    graph = onnx.helper.make_graph([node], "g", [vi(n) for n in names], [vi(n) for n in spec.output_names()])
    model = onnx.helper.make_model(graph, functions=[fn], opset_imports=[onnx.helper.make_opsetid("", 18),
                                                                        onnx.helper.make_opsetid(SCAN_DOMAIN, 1)])
    feed = {n: t[n].numpy() for n in names}
    ref = selective_scan_reference(**{n: t[n] for n in names}, delta_softplus=spec.delta_softplus,
                                   return_last_state=spec.return_last_state)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for out in (ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed),
                ReferenceEvaluator(model).run(None, feed)):
        for o, r in zip(out, ref):
            np.testing.assert_allclose(o, r.numpy(), rtol=1e-4, atol=1e-5)


def test_long_sequence_small_decay_is_finite():
    """Tiny Δ·A for thousands of steps, then large Δ: no overflow/NaN in the body."""
    import onnxruntime as ort

    spec = SelectiveScanSpec(has_z=False)
    t = random_scan_inputs(length=3000)
    t["delta"][..., :2000] = -30.0      # softplus → ~1e-13
    t["delta"][..., 2000:] = 30.0
    fn = scan_function(spec, 18)
    names = spec.input_names()
    node = onnx.helper.make_node(SCAN_OP_TYPE, names, ["y"], domain=SCAN_DOMAIN, **spec.attributes())
    vi = lambda n: onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)  # noqa: E731
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [vi(n) for n in names], [vi("y")]),
                                   functions=[fn], opset_imports=[onnx.helper.make_opsetid("", 18),
                                                                  onnx.helper.make_opsetid(SCAN_DOMAIN, 1)])
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {n: t[n].numpy() for n in names})[0]
    ref = selective_scan_reference(**{n: t[n] for n in names}, delta_softplus=True)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-4)


def test_export_is_deterministic():
    first, _ = export_onnx(tiny_classifier())
    again, _ = export_onnx(tiny_classifier())
    assert hashlib.sha256(again.SerializeToString()).digest() == hashlib.sha256(first.SerializeToString()).digest()


def test_lm_exports_with_head(tmp_path):
    lm = MambaLMHeadModel(LMConfig(mixer=MixerConfig(d_model=32), n_layer=2, vocab_size=50)).eval()
    proto, info = export_onnx(lm, tmp_path / "lm.onnx")
    assert info.scan_nodes == 2 and (tmp_path / "lm.onnx").is_file()
    sess = mq_ort.session(tmp_path / "lm.onnx")
    for length in (3, 29):
        ids = torch.randint(0, 50, (2, length))
        with torch.no_grad():
            ref = lm(ids).numpy()
        out = sess.run(None, {"input_ids": ids.numpy()})[0]
        assert out.shape == ref.shape and _rel(out, ref) < 1e-4


def _qdq_nodes(proto):
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    return [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")], inits


class _ChannelMajor(torch.nn.Module):
    """Linears applied to channels-last views of channel-major tensors, like Mamba-1's mixer: a
    wide one split in two along its features, an elementwise op, a narrow one behind a site."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wide = torch.nn.Linear(6, 16, bias=False)       # split: (2 − 1)·6 < 16
        self.narrow = torch.nn.Linear(8, 3, bias=False)
        self.site = ActivationSite()

    def forward(self, x):                                    # (b, l, 6) → (b, 3, l)
        a, b = self.wide(x).transpose(1, 2).chunk(2, dim=1)  # (b, 8, l) each
        return self.narrow(self.site((torch.relu(a) * b).transpose(1, 2))).transpose(1, 2)


def _export_channel_major(model):
    return export_module(model, (torch.randn(2, 9, 6),), input_names=["x"], output_names=["y"],
                         dynamic_axes={"x": {0: "batch", 1: "length"}, "y": {0: "batch", 2: "length"}})[0]


def test_channel_major_linears_are_written_without_layout_copies():
    """FP32: each piece of the split Linear and the narrow one are MatMuls with the weight on the
    left (W·xᵀ), the only Transpose is the input's (ORT folds it into the MatMul), no Split; the
    site is Q→DQ on the channel-major tensor itself. Both graphs equal PyTorch in ORT."""
    model = _ChannelMajor().eval()
    x = torch.randn(3, 11, 6)
    proto = _export_channel_major(model)
    inits = {i.name for i in proto.graph.initializer}
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Transpose") == 1 and "Split" not in ops and ops.count("MatMul") == 3
    assert all(n.input[0] in inits for n in proto.graph.node if n.op_type == "MatMul")
    with torch.no_grad():
        assert _rel(mq_ort.OrtForward(mq_ort.session(proto))(x).numpy(), model(x).numpy()) < 1e-6
    quantized = _fake_quantize(_ChannelMajor().eval(), x)
    proto = _export_channel_major(quantized)
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    assert producers[q.input[0]] == "Mul"
    # Integer weights stay the right operand (integer GEMMs), with the Transpose after.
    assert all(producers[n.input[1]] == "DequantizeLinear" for n in proto.graph.node if n.op_type == "MatMul")
    with torch.no_grad():
        assert _rel(mq_ort.OrtForward(mq_ort.session(proto))(x).numpy(), quantized(x).numpy()) < 1e-5


def test_mamba1_mixer_graph_copies_no_layouts(fp32_export):
    """The bundled model's FP32 graph: in_proj's x and z are two MatMuls, x_proj and dt_proj write
    channel-major outputs, the conv pads only the past ([d_conv − 1, 0], no Slice); what ORT runs
    has no Transpose, Slice or Split of in_proj's output left."""
    proto, _ = fp32_export
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["Slice"] == 0 and ops["Split"] == 2 and ops["MatMul"] == 2 * 5 + 2
    conv_pads = [onnx.helper.get_attribute_value(a) for n in proto.graph.node if n.op_type == "Conv"
                 for a in n.attribute if a.name == "pads"]
    assert conv_pads == [[3, 0], [3, 0]]
    with tempfile.TemporaryDirectory() as tmp:
        mq_ort.session(proto, optimized_model=f"{tmp}/optimized.onnx")
        optimized = collections.Counter(n.op_type for n in onnx.load(f"{tmp}/optimized.onnx").graph.node)
    assert optimized["Transpose"] == optimized["Slice"] == 0 and optimized["Split"] == 2


@pytest.mark.parametrize("bits,group", [(8, None), (4, 64), (4, None)])
def test_qdq_export_matches_fake_quant(bits, group):
    """W8 on the bundled model; W4 (blocked for TensorRT, per-channel for ORT) on a 1-layer model."""
    base = load_classifier() if bits == 8 else tiny_classifier()
    model = _fake_quantize(base, torch.randn(8, 100, 1), bits=bits, group=group)
    proto, info = export_onnx(model)
    nodes, inits = _qdq_nodes(proto)
    sites = [n for n, m in model.named_modules() if isinstance(getattr(m, "quantizer", None), FakeQuantize)]
    assert sorted(info.activation_sites) == sorted(sites)
    assert sum(n.op_type == "QuantizeLinear" for n in nodes) == len(sites)
    for n in nodes:
        assert len(n.input) == 3 and not inits[n.input[2]].any(), f"{n.name}: zero point not 0"
        if n.op_type == "QuantizeLinear":
            assert inits[n.input[1]].shape == ()
    weight_dq = [n for n in nodes if n.input[0] in inits]
    assert len(weight_dq) == len(info.quantized_weights) == (9 if bits == 8 else 5)
    expected_type = onnx.TensorProto.INT8 if bits == 8 else onnx.TensorProto.INT4
    for n in weight_dq:
        init = next(i for i in proto.graph.initializer if i.name == n.input[0])
        assert init.data_type == expected_type
    if group:
        assert any(a.name == "block_size" and a.i == group for n in weight_dq for a in n.attribute)
    assert {o.domain: o.version for o in proto.opset_import}[""] == (21 if bits == 4 else 18)
    x = torch.randn(4, 70, 1)
    with torch.no_grad():
        ref = model(x).numpy()
    # The default INT8 MatMul policy must give the Q/DQ meaning on whatever CPU runs this.
    out = mq_ort.OrtForward(mq_ort.session(proto))(x).numpy()
    assert _rel(out, ref) < 1e-3 and (out.argmax(-1) == ref.argmax(-1)).all(), mq_ort.int8_matmul_policy()


def test_bad_opset_and_int4_without_opset_21(classifier):
    with pytest.raises(MQExportError, match="opset 12 is not supported"):
        export_onnx(classifier, opset=12)
    model = _fake_quantize(tiny_classifier(), torch.randn(2, 30, 1), bits=4, group=64)
    with pytest.raises(MQExportError, match="opset 21"):
        export_onnx(model, opset=18)


def test_export_module_rejects_unknown_module():
    with pytest.raises(MQExportError, match="export_module"):
        export_onnx(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------ CLI: export / validate / bad input

def test_cli_export_none_and_validate(tmp_path, capsys):
    import json

    from mq_export.commands.cli import main
    from mq_export.load.checkpoints import BUNDLED_CLASSIFIER

    out = tmp_path / "exp"
    assert main(["export", str(BUNDLED_CLASSIFIER), "-o", str(out), "--limit", "16", "--json"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json"]
    assert report["onnxruntime"]["accuracy"] == report["fp32"]["accuracy"]
    assert report["onnxruntime"]["max_rel_error_vs_pytorch"] < 1e-4
    capsys.readouterr()
    assert main(["validate", str(out / "model.onnx"), "--limit", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["argmax_agreement_vs_pytorch"] == 1.0 and result["polygraphy_match_1e-4"] is True


def test_cli_export_lm_directory(tmp_path):
    from mq_export.commands.cli import main
    from mq_export.load.checkpoints import save_mamba_ssm

    lm = MambaLMHeadModel(LMConfig(mixer=MixerConfig(d_model=16), n_layer=1, vocab_size=30)).eval()
    save_mamba_ssm(lm, tmp_path / "lm")
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 30, (4, 20)))
    assert main(["export", str(tmp_path / "lm"), "-o", str(tmp_path / "out"), "--calib", str(ids), "--json"]) == 0
    import json
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["onnxruntime"]["max_rel_error_vs_pytorch"] < 1e-4


@pytest.mark.parametrize("extra,message", [
    (["--opset", "12"], "opset 12"),
    (["--method", "rtn"], "--calib"),
])
def test_cli_export_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys, extra, message):
    from mq_export.commands.cli import main
    from mq_export.load.checkpoints import BUNDLED_CLASSIFIER

    out = tmp_path / "exp"
    assert main(["export", str(BUNDLED_CLASSIFIER), "-o", str(out), *extra]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert list(tmp_path.iterdir()) == []


def test_cli_export_refuses_non_empty_dir_and_bad_checkpoint(tmp_path, capsys):
    from mq_export.commands.cli import main
    from mq_export.load.checkpoints import BUNDLED_CLASSIFIER

    out = tmp_path / "exp"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["export", str(BUNDLED_CLASSIFIER), "-o", str(out)]) != 0
    assert "--force" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"junk")
    assert main(["export", str(bad), "-o", str(tmp_path / "o2")]) != 0
    assert "checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "exp"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_export_refuses_calibration_overlapping_the_evaluation_images(tmp_path, capsys):
    from mq_export.commands.cli import main
    from mq_export.load.data import mnist_test
    from mq_export.load.checkpoints import BUNDLED_CLASSIFIER

    calib = tmp_path / "calib.pt"
    torch.save(mnist_test()[0][:16].clone(), calib)   # the first evaluation images
    out = tmp_path / "exp"
    assert main(["export", str(BUNDLED_CLASSIFIER), "-o", str(out), "--method", "rtn", "--calib", str(calib),
                 "--limit", "32"]) != 0
    assert "overlaps the evaluation split" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.pt"]


def test_asymmetric_activation_sites_export_uint8_zero_points():
    """The ORT-only asymmetric option: uint8 Q/DQ with the calibrated zero point."""
    model = tiny_classifier()
    x = torch.randn(4, 40, 1)
    ranges = _site_ranges(model, x)
    for name, m in model.named_modules():
        if hasattr(m, "quantizer"):
            lo, hi = min(ranges[name][0], 0.0), max(ranges[name][1], 0.0)
            scale = (hi - lo) / 255
            m.quantizer = FakeQuantize(ActQuant(scale=scale, zero_point=int(round(-lo / scale)) or 1))
    proto, _ = export_onnx(model)
    nodes, inits = _qdq_nodes(proto)
    assert nodes and all(inits[n.input[2]].dtype == np.uint8 and inits[n.input[2]].item() > 0 for n in nodes)
    with torch.no_grad():
        ref = model(x).numpy()
    out = mq_ort.OrtForward(mq_ort.session(proto))(x).numpy()
    assert _rel(out, ref) < 1e-3


class _StatefulScan(torch.nn.Module):
    """A decode-style module: scan from a given state, return output and final state."""

    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(-torch.rand(6, 4) * 2)
        self.D = torch.nn.Parameter(torch.randn(6))
        self.scan = SelectiveScanOp()

    def forward(self, u, delta, B, C, state):
        return self.scan(u, delta, self.A, B, C, self.D, delta_softplus=True, initial_state=state,
                         return_last_state=True)


def test_export_module_with_state_inputs_and_outputs():
    module = _StatefulScan().eval()
    t = random_scan_inputs(length=9)
    args = (t["u"], t["delta"], t["B"], t["C"], torch.randn(2, 6, 4))
    names = ["u", "delta", "B", "C", "state"]
    axes = {n: {0: "batch", 2: "length"} for n in names[:4]}
    axes["state"] = {0: "batch"}
    proto, info = export_module(module, args, input_names=names, output_names=["y", "new_state"], dynamic_axes=axes)
    assert info.scan_spec["has_initial_state"] == 1 and info.scan_spec["return_last_state"] == 1
    sess = mq_ort.session(proto)
    for length in (1, 17):
        t = random_scan_inputs(length=length)
        args = (t["u"], t["delta"], t["B"], t["C"], torch.randn(2, 6, 4))
        with torch.no_grad():
            ref_y, ref_h = module(*args)
        y, h = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})
        np.testing.assert_allclose(y, ref_y.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(h, ref_h.numpy(), rtol=1e-4, atol=1e-5)


class _DirectScan(torch.nn.Module):
    """Calls the scan function itself instead of a SelectiveScanOp: the exporter cannot translate it."""

    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(-torch.rand(6, 4))

    def forward(self, u, delta, B, C):
        return selective_scan(u, delta, self.A, B, C)


def test_scan_outside_a_selective_scan_op_is_refused_in_one_line():
    t = random_scan_inputs(length=5)
    with pytest.raises(MQExportError, match="through a SelectiveScanOp submodule"):
        export_module(_DirectScan().eval(), (t["u"], t["delta"], t["B"], t["C"]), input_names=["u", "delta", "B", "C"],
                      output_names=["y"])


def _small_lm():
    torch.manual_seed(4)
    return MambaLMHeadModel(LMConfig(mixer=MixerConfig(d_model=16), n_layer=1, vocab_size=11)).eval()


def _instance_forwards(*models) -> list[str]:
    """Modules that carry a `forward` of their own (an export's translation left behind)."""
    return [type(m).__name__ for model in models for m in model.modules() if "forward" in m.__dict__]


def test_export_nested_in_a_translation_of_the_same_model_restores_it():
    """An export inside another translation of the same model: it writes only its own trace, gives
    the same bytes, hands the outer translation back, and afterwards nothing of either is left."""
    model = tiny_classifier()
    expected = export_onnx(model)[0].SerializeToString()
    outer = _Trace()
    with _translated(model, outer):
        outer_forwards = {id(m): m.forward for m in model.modules() if "forward" in m.__dict__}
        assert len(outer_forwards) == 6 + 1    # input_proj, 4 mixer Linears (dt_proj too), classifier; the scan
        assert export_onnx(model)[0].SerializeToString() == expected
        assert {id(m): m.forward for m in model.modules() if "forward" in m.__dict__} == outer_forwards
    assert outer.specs == [] and not _instance_forwards(model)
    x = torch.randn(2, 9, 1)
    with torch.no_grad():
        assert torch.equal(model(x), tiny_classifier()(x))     # the model computes as before


def test_exports_from_two_threads_do_not_interfere():
    """Two models and the same model exported from three threads at once give the bytes of exports
    one after another, and leave no translated module behind."""
    models = {"classifier": tiny_classifier(), "lm": _small_lm()}
    expected = {name: export_onnx(m)[0].SerializeToString() for name, m in models.items()}
    got, errors = {}, []

    def run(job: str, name: str) -> None:
        try:
            got[job] = export_onnx(models[name])[0].SerializeToString()
        except Exception as exc:   # noqa: BLE001 - reported by the assertion below
            errors.append(f"{job}: {exc!r}")

    jobs = {"classifier": "classifier", "lm": "lm", "classifier again": "classifier"}
    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {job: got[job] == expected[name] for job, name in jobs.items()} == dict.fromkeys(jobs, True)
    assert not _instance_forwards(*models.values())


class _DoubledLinear(torch.nn.Linear):
    """A Linear subclass with a forward of its own, which the exporter must not replace."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_linear_subclass_keeps_its_forward_and_refuses_weight_quant():
    module = torch.nn.Sequential(_DoubledLinear(4, 3)).eval()
    x = torch.randn(2, 4)
    proto, info = export_module(module, (x,), input_names=["x"], output_names=["y"])
    (y,) = mq_ort.session(proto).run(None, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y, module(x).numpy(), rtol=1e-6, atol=1e-6)
    assert info.quantized_weights == {}
    module[0].weight_quant = WeightQuant(scale=torch.full((3, 1), 0.01), bits=8)
    with pytest.raises(MQExportError, match=r"^0 \(_DoubledLinear\) has its own forward"):
        export_module(module, (x,), input_names=["x"], output_names=["y"])
    assert not _instance_forwards(module)
