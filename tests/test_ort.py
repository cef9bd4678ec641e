"""ONNX Runtime sessions: the registered SelectiveScan kernel wins over the function body and
agrees with it; the INT8 MatMul policy."""
import logging

import numpy as np
import onnx
import pytest
import torch

from mq_export.runtime import ort as mq_ort
from mq_export.runtime import ort_native
from mq_export.errors import MQExportError
from mq_export.export.onnx import export_onnx
from mq_export.models.mamba import ClassifierConfig, MambaSequenceClassifier, MixerConfig

logging.getLogger("torch.onnx").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("ort") / "model.onnx"
    torch.manual_seed(0)
    model = MambaSequenceClassifier(ClassifierConfig(mixer=MixerConfig(d_model=32), n_layers=2)).eval()
    export_onnx(model, path)
    return model, path


def test_registered_kernel_wins_and_matches_function_body(exported):
    native = ort_native.native_ops()
    if native.path is None:
        pytest.skip(f"native ONNX Runtime ops unavailable: {native.reason}")
    model, path = exported
    x = torch.randn(3, 45, 1)
    calls = ort_native.kernel_calls("SelectiveScan")
    body = mq_ort.OrtForward(mq_ort.session(path, scan="function_body"))(x).numpy()
    assert ort_native.kernel_calls("SelectiveScan") == calls       # a function-body session never calls it
    kernel = mq_ort.OrtForward(mq_ort.session(path))(x).numpy()    # default (auto): the native kernel
    assert ort_native.kernel_calls("SelectiveScan") == calls + 2   # one call per layer: the kernel ran
    np.testing.assert_allclose(kernel, body, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(kernel, model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_unreadable_model_is_an_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(MQExportError):
        mq_ort.session(bad)


# ------------------------------------------------------------------ INT8 MatMul policy

FUSED_INTEGER_OPS = {"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger"}
_BASE_X86 = "fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt aes avx f16c fma bmi1 bmi2 avx2".split()
_AVX512 = "avx512f avx512dq avx512cd avx512bw avx512vl".split()


@pytest.mark.parametrize("machine,flags,exact", [
    ("x86_64", _BASE_X86 + ["sha_ni"], False),                                        # AMD EPYC Zen 2/3
    ("x86_64", _BASE_X86 + _AVX512, False),                                           # Skylake-SP
    ("x86_64", _BASE_X86 + _AVX512 + ["avx_vnni"], False),                            # MLAS picks AVX-512 core
    ("x86_64", _BASE_X86 + _AVX512 + ["avx512_vnni"], True),                          # Cascade Lake, Zen 4
    ("x86_64", _BASE_X86 + ["avx_vnni"], True),                                       # Alder Lake
    ("x86_64", _BASE_X86 + _AVX512 + ["avx512_vnni", "avx_vnni", "amx_tile", "amx_int8"], True),
    ("x86_64", "fpu sse sse2 sse4_2".split(), False),
    ("x86_64", [], False),                                                            # flags unknown
    ("aarch64", "fp asimd crc32 atomics asimddp".split(), True),                      # Graviton 2
    ("aarch64", "fp asimd crc32".split(), False),
    ("riscv64", [], False),
])
def test_integer_gemm_decision_from_cpu_flags(machine, flags, exact):
    is_exact, reason = mq_ort.integer_gemm_is_exact(machine, frozenset(flags))
    assert is_exact is exact and reason
    policy = mq_ort.int8_matmul_policy("auto", cpu=mq_ort.CpuInfo(machine, frozenset(flags), "test cpu"))
    assert policy.integer is exact and policy.reason == reason
    assert policy.to_dict()["kernels"] == ("integer" if exact else "float (exact Q/DQ)")


def test_forced_policies_and_environment(monkeypatch):
    epyc = mq_ort.CpuInfo("x86_64", frozenset(_BASE_X86), "AMD EPYC 7B12")
    forced = mq_ort.int8_matmul_policy("integer", cpu=epyc)
    assert forced.integer and "results may be wrong" in forced.reason
    assert not mq_ort.int8_matmul_policy("exact", cpu=epyc).integer
    monkeypatch.setenv(mq_ort.INT8_MATMUL_ENV, "exact")
    from_env = mq_ort.int8_matmul_policy()
    assert not from_env.integer and mq_ort.INT8_MATMUL_ENV in from_env.reason
    monkeypatch.setenv(mq_ort.INT8_MATMUL_ENV, "fast")
    with pytest.raises(MQExportError, match=mq_ort.INT8_MATMUL_ENV):
        mq_ort.int8_matmul_policy()
    with pytest.raises(MQExportError, match="choose auto, integer, exact"):
        mq_ort.int8_matmul_policy("fast")


def test_cpu_info_reads_the_first_processor_block(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu avx2 fma\n\n"
                       "processor\t: 1\nmodel name\t: other\nflags\t\t: avx512_vnni\n")
    info = mq_ort.cpu_info(cpuinfo)
    assert info.model == "AMD EPYC 7B12" and info.flags == {"fpu", "avx2", "fma"}
    assert mq_ort.cpu_info(tmp_path / "missing").flags == frozenset()


@pytest.fixture(scope="module")
def w8a8_classifier():
    from tests.test_export import _fake_quantize, tiny_classifier

    model = _fake_quantize(tiny_classifier(), torch.randn(4, 60, 1))
    return model, export_onnx(model)[0]


def _optimized_op_types(model, int8_matmul, tmp_path) -> set[str]:
    path = tmp_path / f"optimized_{int8_matmul}.onnx"
    mq_ort.session(model, int8_matmul=int8_matmul, optimized_model=path)
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_exact_policy_keeps_qdq_in_float_and_equals_fake_quant(w8a8_classifier, tmp_path):
    model, proto = w8a8_classifier
    assert FUSED_INTEGER_OPS & _optimized_op_types(proto, "integer", tmp_path)   # what "exact" must prevent
    ops = _optimized_op_types(proto, "exact", tmp_path)
    assert not FUSED_INTEGER_OPS & ops and {"QuantizeLinear", "MatMul"} <= ops
    x = torch.randn(3, 50, 1)
    with torch.no_grad():
        ref = model(x).numpy()
    out = mq_ort.OrtForward(mq_ort.session(proto, int8_matmul="exact"))(x).numpy()
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def _worst_case_matmul(m=4, k=64, n=8) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """x (m, k) → QuantizeLinear/DequantizeLinear (int8, zero point 0) → MatMul with an INT8 weight
    (per-channel DequantizeLinear): the graph ORT fuses into an integer GEMM. Feeding x at the top
    code (127 → 255 once ORT shifts activations to uint8) against weights at ±127 makes every pair
    of products 2·255·127 > 32767, what a 16-bit pair sum cannot hold."""
    from onnx import TensorProto, helper, numpy_helper

    codes = np.where(np.arange(n) % 2 == 0, 127, -127).astype(np.int8)[None, :].repeat(k, 0)
    w_scale = np.linspace(0.01, 0.02, n).astype(np.float32)
    x_scale = np.float32(0.05)
    inits = [numpy_helper.from_array(codes, "w"), numpy_helper.from_array(w_scale, "w_scale"),
             numpy_helper.from_array(np.zeros(n, np.int8), "w_zero"),
             numpy_helper.from_array(x_scale, "x_scale"), numpy_helper.from_array(np.int8(0), "x_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "worst_case", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = np.full((m, k), 127 * x_scale, np.float32)
    expected = (k * 127 * x_scale * codes[0].astype(np.float64) * w_scale)[None].repeat(m, 0)
    return model, x, expected


def test_worst_case_integer_gemm_is_exact_exactly_where_the_cpu_decision_says(tmp_path):
    """On this CPU, ORT's fused integer GEMM equals the Q/DQ meaning iff `integer_gemm_is_exact`
    says so for this CPU (a VNNI machine: equal; AVX2 without VNNI: saturated, different)."""
    model, x, expected = _worst_case_matmul()
    assert "MatMulIntegerToFloat" in _optimized_op_types(model, "integer", tmp_path)
    exact = mq_ort.session(model, int8_matmul="exact").run(None, {"x": x})[0]
    integer = mq_ort.session(model, int8_matmul="integer").run(None, {"x": x})[0]
    np.testing.assert_allclose(exact, expected, rtol=1e-6)
    cpu = mq_ort.cpu_info()
    integer_is_exact = bool(np.allclose(integer, expected, rtol=1e-6))
    assert integer_is_exact == mq_ort.integer_gemm_is_exact(cpu.machine, cpu.flags)[0], (cpu, integer[0])
    auto = mq_ort.session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(auto, expected, rtol=1e-6)     # the default is right on every CPU


def test_session_loads_a_path_with_external_data(exported, tmp_path):
    model, path = exported
    external = tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    onnx.save_model(onnx.load(str(path)), str(external), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data")   # ORT needs small shape tensors inline: default threshold
    assert (external.parent / "model.onnx.data").stat().st_size > 0
    x = torch.randn(2, 30, 1)
    with torch.no_grad():
        np.testing.assert_allclose(mq_ort.OrtForward(mq_ort.session(external))(x).numpy(), model(x).numpy(),
                                   rtol=1e-4, atol=1e-5)
