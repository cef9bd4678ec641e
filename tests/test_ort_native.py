"""The native ONNX Runtime scan kernels (ops/csrc/ort_scan_ops.cc via runtime/ort_native.py):
native kernel = function body = PyTorch reference over the op grid, ORT's precedence for the
registered kernel (counted calls), threads, errors, and the fallback when the library is missing.
Tests that run the library skip, with the reason, where it cannot be built (no ONNX Runtime
headers: tools/fetch_ort_headers.sh)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from mq_export.commands.cli import main
from mq_export.errors import MQExportError
from mq_export.export.decode import export_decode
from mq_export.export.onnx import scan_function
from mq_export.export.ssd_function import ssd_function
from mq_export.models.mamba import LMConfig, MambaLMHeadModel, MixerConfig
from mq_export.ops import cpu_kernel
from mq_export.ops.selective_scan import selective_scan_reference
from mq_export.ops.spec import SCAN_DOMAIN, SSDScanSpec, SelectiveScanSpec
from mq_export.ops.ssd_scan import ssd_scan_reference
from mq_export.runtime import ort as mq_ort
from mq_export.runtime import ort_native

MAX_REL_ERROR = 1e-5


@pytest.fixture(scope="module")
def native():
    ops = ort_native.native_ops()
    if ops.path is None:
        pytest.skip(f"native ONNX Runtime ops unavailable: {ops.reason}")
    return ops


def _rel(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


def single_node_model(spec, function: onnx.FunctionProto) -> onnx.ModelProto:
    names, outputs = spec.input_names(), spec.output_names()
    node = onnx.helper.make_node(spec.op_type, names, outputs, domain=SCAN_DOMAIN, **spec.attributes())
    value = lambda n: onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)  # noqa: E731
    graph = onnx.helper.make_graph([node], "g", [value(n) for n in names], [value(n) for n in outputs])
    return onnx.helper.make_model(graph, functions=[function], opset_imports=[
        onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid(SCAN_DOMAIN, 1)])


def native_and_body(model: onnx.ModelProto, feed: dict, op_type: str, threads: int = 1):
    """Outputs of the native kernel and of the function body; asserts the kernel ran once and the
    body session never called it."""
    calls = ort_native.kernel_calls(op_type)
    native_out = mq_ort.session(model, scan="native", threads=threads).run(None, feed)
    assert ort_native.kernel_calls(op_type) == calls + 1
    body_out = mq_ort.session(model, scan="function_body", threads=threads).run(None, feed)
    assert ort_native.kernel_calls(op_type) == calls + 1
    return native_out, body_out


def assert_native_matches(spec, function: onnx.FunctionProto, inputs: dict, reference) -> None:
    """The native kernel equals the PyTorch reference and the function body (ran it, and only it)."""
    feed = {k: v.numpy() for k, v in inputs.items()}
    native_out, body_out = native_and_body(single_node_model(spec, function), feed, spec.op_type)
    reference = reference if isinstance(reference, tuple) else (reference,)
    assert len(native_out) == len(reference) == len(spec.output_names())
    for n_out, b_out, r_out in zip(native_out, body_out, reference):
        assert n_out.shape == r_out.shape
        assert _rel(n_out, r_out.numpy()) <= MAX_REL_ERROR
        assert _rel(n_out, b_out) <= MAX_REL_ERROR


def selective_scan_inputs(spec: SelectiveScanSpec, length: int, b: int = 3, d: int = 40, n: int = 5, seed: int = 0):
    """d = 40: two full 16-channel blocks and a partial one; every batch row has its own data."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = dict(u=r(b, d, length), delta=r(b, d, length) * 0.5, A=-torch.rand(d, n, generator=g) * 2,
             B=r(b, n, length), C=r(b, n, length), D=r(d), z=r(b, d, length), delta_bias=r(d) * 0.1,
             initial_state=r(b, d, n))
    return {name: t[name] for name in spec.input_names()}


SELECTIVE_SPECS = [SelectiveScanSpec(), SelectiveScanSpec(has_z=False),
                   SelectiveScanSpec(delta_softplus=False, has_D=False, has_delta_bias=False),
                   SelectiveScanSpec(has_initial_state=True, return_last_state=True),
                   SelectiveScanSpec(reverse=True),
                   SelectiveScanSpec(has_z=False, has_initial_state=True, return_last_state=True, reverse=True)]


@pytest.mark.parametrize("spec", SELECTIVE_SPECS, ids=str)
@pytest.mark.parametrize("length", [1, 7, 300])
def test_selective_scan_native_equals_body_and_reference(native, spec, length):
    t = selective_scan_inputs(spec, length)
    assert_native_matches(spec, scan_function(spec, 18), t, selective_scan_reference(
        **t, delta_softplus=spec.delta_softplus, return_last_state=spec.return_last_state, reverse=spec.reverse))


@pytest.mark.parametrize("spec", SELECTIVE_SPECS, ids=str)
def test_selective_scan_native_is_pytorchs_fused_kernel_bit_for_bit(native, spec):
    """ORT hands the kernel the op's (b, d, l) tensors, PyTorch time-major ones: the same C code must
    give the same bits whatever the layout (one definition of the math, SiLU gate included)."""
    if not cpu_kernel.supports(torch.zeros(1)):
        pytest.skip("PyTorch's fused CPU scan kernel is unavailable")
    t = selective_scan_inputs(spec, 300)
    native_out = mq_ort.session(single_node_model(spec, scan_function(spec, 18)), scan="native", threads=1).run(
        None, {k: v.numpy() for k, v in t.items()})
    fused = cpu_kernel.selective_scan_fused(
        t["u"], t["delta"], t["A"], t["B"], t["C"], t.get("D"), t.get("z"), t.get("delta_bias"), spec.delta_softplus,
        t.get("initial_state"), spec.return_last_state, reverse=spec.reverse)
    fused = fused if isinstance(fused, tuple) else (fused,)
    for n_out, f_out in zip(native_out, fused, strict=True):
        np.testing.assert_array_equal(n_out, f_out.contiguous().numpy())


def ssd_inputs(spec: SSDScanSpec, length: int, b: int = 2, h: int = 4, p: int = 3, g: int = 2, n: int = 5):
    gen = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    t = dict(x=r(b, length, h, p), dt=r(b, length, h) * 0.5, A=-torch.rand(h, generator=gen) * 2,
             B=r(b, length, g, n), C=r(b, length, g, n), D=r(h, p) if spec.D_has_hdim else r(h),
             z=r(b, length, h, p), dt_bias=r(h) * 0.1, initial_state=r(b, h, p, n))
    return {name: t[name] for name in spec.input_names()}


SSD_SPECS = [SSDScanSpec(), SSDScanSpec(has_z=True, D_has_hdim=True, dt_min=0.05, dt_max=0.6),
             SSDScanSpec(dt_softplus=False, has_D=False, has_dt_bias=False, dt_min=0.01),
             SSDScanSpec(has_initial_state=True, return_final_state=True)]


@pytest.mark.parametrize("spec", SSD_SPECS, ids=str)
@pytest.mark.parametrize("length", [1, 7, 300])
def test_ssd_scan_native_equals_body_and_reference(native, spec, length):
    t = ssd_inputs(spec, length)
    assert_native_matches(spec, ssd_function(spec, 18), t, ssd_scan_reference(
        **t, dt_softplus=spec.dt_softplus, dt_limit=(spec.dt_min, spec.dt_max),
        return_final_state=spec.return_final_state))


def test_intra_op_threads_split_the_work_without_changing_results(native):
    """Large enough for several tasks per run: 2 intra-op threads give the 1-thread bits."""
    spec = SelectiveScanSpec(has_initial_state=True, return_last_state=True)
    feed = {k: v.numpy() for k, v in selective_scan_inputs(spec, 300, b=4, d=64, n=16).items()}
    model = single_node_model(spec, scan_function(spec, 18))
    one, two = (mq_ort.session(model, scan="native", threads=threads).run(None, feed) for threads in (1, 2))
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


def test_registered_kernel_wins_in_the_decode_step_graph(native, tmp_path):
    """The exported step graph (one-step scan with initial/final state): the native kernel runs in
    place of the body, once per layer and step, and agrees with the body on logits and states."""
    torch.manual_seed(0)
    model = MambaLMHeadModel(LMConfig(MixerConfig(16, d_state=4), n_layer=2, vocab_size=11)).eval()
    ex = export_decode(model, tmp_path)
    g = torch.Generator().manual_seed(2)
    step = mq_ort.session(ex.step, scan="function_body")
    feed = {"input_ids": np.array([[3], [7]], dtype=np.int64),
            **{i.name: torch.randn(2, *i.shape[1:], generator=g).numpy() for i in step.get_inputs()[1:]}}
    calls = ort_native.kernel_calls("SelectiveScan")
    native_out = mq_ort.session(ex.step, scan="native").run(None, feed)
    assert ort_native.kernel_calls("SelectiveScan") == calls + 2
    for a, b in zip(native_out, step.run(None, feed)):
        assert _rel(a, b) <= MAX_REL_ERROR


def test_bad_shapes_are_an_onnxruntime_error_naming_the_op(native):
    spec = SelectiveScanSpec()
    feed = {k: v.numpy() for k, v in selective_scan_inputs(spec, 7).items()}
    feed["A"] = feed["A"][:, :3].copy()      # d_state 3, B and C have 5
    sess = mq_ort.session(single_node_model(spec, scan_function(spec, 18)), scan="native")
    with pytest.raises(Exception, match="SelectiveScan: B must be"):
        sess.run(None, feed)


def test_choices_and_fallback_without_headers(tmp_path, monkeypatch):
    """auto falls back to the function body (and says why), native refuses, function_body needs
    nothing; an unknown choice is a one-line error."""
    assert mq_ort.scan_implementation("function_body").name == "function_body"
    with pytest.raises(MQExportError, match="choose auto, native, function_body"):
        mq_ort.scan_implementation("fast")
    monkeypatch.setenv(ort_native.INCLUDE_ENV, str(tmp_path))
    ort_native.native_ops.cache_clear()
    try:
        fallback = mq_ort.scan_implementation("auto")
        assert fallback.name == "function_body" and fallback.library is None
        assert ort_native.INCLUDE_ENV in fallback.reason and "onnxruntime_cxx_api.h" in fallback.reason
        with pytest.raises(MQExportError, match="native ONNX Runtime scan kernels are unavailable"):
            mq_ort.scan_implementation("native")
        monkeypatch.setenv(mq_ort.SCAN_ENV, "native")
        with pytest.raises(MQExportError, match=mq_ort.SCAN_ENV):
            mq_ort.scan_implementation()
    finally:
        monkeypatch.undo()
        ort_native.native_ops.cache_clear()


def test_spec_header_follows_the_spec():
    """The generated C++ tables gate each optional input on its flag, in the spec's order."""
    header = ort_native.spec_header()
    assert ('kSelectiveScanInputs[] = {{"u", -1}, {"delta", -1}, {"A", -1}, {"B", -1}, {"C", -1}, {"D", 1}, '
            '{"z", 2}, {"delta_bias", 3}, {"initial_state", 4}}') in header
    assert '{"dt_max", true, __builtin_inf()}' in header and '{"reverse", false, 0.0}' in header


def test_build_command_prints_the_library(native, capsys):
    assert main(["build-ort-ops"]) == 0
    assert str(native.path) in capsys.readouterr().out


def test_a_failed_build_is_remembered_until_forced(native, monkeypatch):
    """A compiler that fails (here `false` as the C++ compiler) gives the reason once; later
    processes get it from the cache without compiling again, and `force` retries."""
    monkeypatch.setenv("CXX", "false")
    failed = ort_native.library_path(ort_native.find_headers())[0].with_suffix(".failed")
    try:
        with pytest.raises(MQExportError, match="building the native ONNX Runtime ops failed"):
            ort_native.build(force=True)
        assert failed.is_file()
        with pytest.raises(MQExportError, match="an earlier build"):
            ort_native.build()
    finally:
        failed.unlink(missing_ok=True)


def test_report_names_the_scan_implementation(tmp_path, monkeypatch):
    """report.json: onnxruntime.scan_implementation, and settings.onnx.ort_scan with the reason."""
    from mq_export.commands.pipeline import Evaluation, onnx_stage
    from mq_export.models.mamba import ClassifierConfig, MambaSequenceClassifier

    monkeypatch.delenv(mq_ort.SCAN_ENV, raising=False)
    torch.manual_seed(0)
    model = MambaSequenceClassifier(ClassifierConfig(mixer=MixerConfig(d_model=16), n_layers=1)).eval()
    x = torch.randn(4, 9, 1)
    with torch.no_grad():
        reference = model(x)
    exported = onnx_stage(model, tmp_path, Evaluation(inputs=x, name="random", batch_size=2), reference, quiet=True)
    expected = "function_body" if ort_native.native_ops().path is None else "native"
    assert exported.metrics["scan_implementation"] == expected
    assert exported.info["ort_scan"]["implementation"] == expected and exported.info["ort_scan"]["reason"]
    assert exported.metrics["max_rel_error_vs_pytorch"] < 1e-4
