"""mq_export.runtime.engine: argument handling and command strings everywhere, engine builds where TensorRT is."""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from mq_export.runtime.engine import DimRange, EngineForward, build_engine, equivalent_commands, parse_profile
from mq_export.errors import MQExportError
from mq_export.ops.spec import SCAN_DOMAIN, SCAN_DOMAIN_VERSION, SCAN_OP_TYPE, SelectiveScanSpec

PLUGIN_LIB = os.environ.get("MQ_TRT_PLUGIN_LIB")


def save_model(path, nodes, inputs, outputs, initializers=(), domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", 17), *(helper.make_opsetid(d, v) for d, v in domains)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


@pytest.fixture
def fp32_model(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, "length"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, "length"])
    return save_model(tmp_path / "fp32.onnx", [helper.make_node("Relu", ["x"], ["y"])], [x], [y])


@pytest.fixture
def qdq_model(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1])
    zero = helper.make_tensor("zero", TensorProto.INT8, [], [0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"])]
    return save_model(tmp_path / "qdq.onnx", nodes, [x], [y], [scale, zero])


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def assert_one_line_tensorrt_missing(error):
    message = str(error.value)
    assert "TensorRT Python package 'tensorrt' is not installed" in message and ">= 10.3" in message
    assert "\n" not in message


def test_build_engine_without_tensorrt(no_tensorrt, fp32_model, tmp_path):
    with pytest.raises(MQExportError) as error:
        build_engine(fp32_model, tmp_path / "p.so", tmp_path / "m.engine", fp16=True,
                     profiles=[parse_profile("batch=1:2:4,length=1:16:64")])
    assert_one_line_tensorrt_missing(error)


def test_engine_forward_without_tensorrt(no_tensorrt, tmp_path):
    with pytest.raises(MQExportError) as error:
        EngineForward(tmp_path / "m.engine", tmp_path / "p.so")
    assert_one_line_tensorrt_missing(error)


def test_parse_profile():
    assert parse_profile("batch=1:8:32,length=1:784:784") == {"batch": DimRange(1, 8, 32),
                                                              "length": DimRange(1, 784, 784)}
    # A dimension may be 0 (a decode graph's empty key/value caches), but not only 0.
    assert parse_profile("past_length=0:0:4096") == {"past_length": DimRange(0, 0, 4096)}
    for bad in ("batch=1:8", "batch=8:1:32", "batch=a:b:c", "past_length=0:0:0", "batch=-1:1:2"):
        with pytest.raises(MQExportError, match="profile entry"):
            parse_profile(bad)


def test_dynamic_dimension_needs_a_profile(fp32_model, tmp_path):
    with pytest.raises(MQExportError, match="dynamic dimension 'batch'.*--profile batch="):
        build_engine(fp32_model, tmp_path / "p.so", tmp_path / "m.engine")


def test_fp16_flag_refused_for_qdq_graph(qdq_model, tmp_path):
    with pytest.raises(MQExportError, match="strongly typed"):
        build_engine(qdq_model, tmp_path / "p.so", tmp_path / "m.engine", fp16=True)


def test_equivalent_commands(fp32_model, qdq_model):
    commands = equivalent_commands(fp32_model, "libmq_trt_plugins.so", "m.engine", fp16=True,
                                   profile=parse_profile("batch=1:2:4,length=1:16:64"))
    assert commands["trtexec_build"] == (
        f"trtexec --onnx={fp32_model} --dynamicPlugins=libmq_trt_plugins.so --saveEngine=m.engine --fp16 "
        "--minShapes=x:1x4x1 --optShapes=x:2x4x16 --maxShapes=x:4x4x64")
    assert commands["polygraphy_build"].endswith(
        "-o m.engine --fp16 --trt-min-shapes 'x:[1,4,1]' --trt-opt-shapes 'x:[2,4,16]' --trt-max-shapes 'x:[4,4,64]'")
    assert commands["trtexec_run"] == "trtexec --loadEngine=m.engine --dynamicPlugins=libmq_trt_plugins.so"
    quantized = equivalent_commands(qdq_model, "p.so", "q.engine", fp16=False)
    assert "--stronglyTyped" in quantized["trtexec_build"] and "Shapes" not in quantized["trtexec_build"]
    assert "--strongly-typed" in quantized["polygraphy_compare"]


def scan_model(path, spec: SelectiveScanSpec, dim=8, dstate=16):
    """A graph that is one SelectiveScan node; A, D, delta_bias are float32 initializers."""
    rng = np.random.default_rng(0)
    activation = lambda name, middle: helper.make_tensor_value_info(  # noqa: E731
        name, TensorProto.FLOAT, ["batch", middle, "length"])
    parameters = {"A": -np.exp(rng.standard_normal((dim, dstate))), "D": rng.standard_normal(dim),
                  "delta_bias": 0.1 * rng.standard_normal(dim)}
    inputs = [activation("u", dim), activation("delta", dim), activation("B", dstate), activation("C", dstate)]
    if spec.has_z:
        inputs.append(activation("z", dim))
    initializers = [helper.make_tensor(name, TensorProto.FLOAT, value.shape, value.astype(np.float32).ravel())
                    for name, value in parameters.items() if name in spec.input_names()]
    node = helper.make_node(SCAN_OP_TYPE, spec.input_names(), spec.output_names(), domain=SCAN_DOMAIN,
                            **spec.attributes())
    return save_model(path, [node], inputs, [activation("y", dim)], initializers,
                      domains=[(SCAN_DOMAIN, SCAN_DOMAIN_VERSION)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.skipif(not PLUGIN_LIB, reason="set MQ_TRT_PLUGIN_LIB to a built libmq_trt_plugins.so")
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT Python package not installed")
@pytest.mark.parametrize("fp16", [False, True])
def test_build_engine_uses_the_plugin(tmp_path, fp16):
    model = scan_model(tmp_path / "scan.onnx", SelectiveScanSpec())
    out = build_engine(model, PLUGIN_LIB, tmp_path / "scan.engine", fp16=fp16,
                       profiles=[parse_profile("batch=1:2:4,length=1:300:1024")])
    assert out.stat().st_size > 0  # build_engine itself checks that the node became a plugin layer
