"""Bad command-line input: one line `mq-export: error: …`, exit status 2, nothing written.
And the verdicts that are not input errors: `validate` exits 1 when tolerances are missed."""
from __future__ import annotations

import json
import math
import pickle
import sys
import warnings
from importlib.metadata import version

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from mq_export import checks
from mq_export.commands.cli import build_parser, main
from mq_export.errors import MQExportError
from mq_export.load.checkpoints import BUNDLED_CLASSIFIER, save_mamba_ssm
from mq_export.models.mamba import (ClassifierConfig, LMConfig, MambaLMHeadModel, MambaSequenceClassifier,
                             MixerConfig)
from mq_export.commands.report import Report, json_text


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `mq-export ARGV`; argparse's errors and --version exit
    from parse_args, the rest return a status."""
    try:
        status = main(list(argv))
    except SystemExit as exc:
        status = exc.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(result: tuple[int, str, str], *expected: str) -> str:
    status, _, err = result
    lines = err.splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("mq-export: error: "), err
    for text in expected:
        assert text in lines[0]
    return lines[0]


# ------------------------------------------------------------------ option values

@pytest.mark.parametrize("option, value, message", [
    ("--w-group-size", "0", "must be a positive integer, got 0"),
    ("--w-group-size", "-1", "must be a positive integer, got -1"),
    ("--seed", str(2**64), "must be an integer in [0, 2**64)"),
    ("--seed", "-1", "must be an integer in [0, 2**64), got -1"),
    ("--seed", "1.5", "must be an integer, got '1.5'"),
    ("--alpha", "nan", "must be a number in [0, 1], got nan"),
    ("--alpha", "inf", "got inf"),
    ("--alpha", "1.5", "must be a number in [0, 1]"),
    ("--limit", "0", "must be a positive integer"),
    ("--limit", "-3", "must be a positive integer"),
])
def test_demo_option_values(tmp_path, capsys, option, value, message):
    out = tmp_path / "out"
    line = assert_one_line_error(run(capsys, "demo", "-o", str(out), "--method", "rtn", option, value), message)
    assert f"argument {option}:" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, value, message", [
    ("--temperature", "0", "must be a finite number >= 0.001"),
    ("--temperature", "nan", "got nan"),
    ("--temperature", "-1", "got -1.0"),
    ("--temperature", "inf", "got inf"),
    ("--tokens", "0", "must be a positive integer, got 0"),
    ("--tokens", "-5", "must be a positive integer"),
    ("--tokens", "ten", "must be an integer, got 'ten'"),
    ("--seed", str(2**64), "must be an integer in [0, 2**64)"),
])
def test_generate_option_values(tmp_path, capsys, option, value, message):
    onnx_dir = tmp_path / "graphs"
    assert_one_line_error(run(capsys, "generate", "--backend", "onnxruntime", "--onnx-dir", str(onnx_dir),
                              option, value), f"argument {option}:", message)
    assert list(tmp_path.iterdir()) == []


def test_largest_seed_and_smallest_temperature_are_accepted():
    args = build_parser().parse_args(["generate", "--seed", str(2**64 - 1), "--temperature", "0.001"])
    assert args.seed == 2**64 - 1 and args.temperature == 0.001
    torch.Generator().manual_seed(args.seed)   # the range is the generator's


def test_shared_checks_name_the_argument_for_api_callers():
    from mq_export.commands.generate import run_generate
    with pytest.raises(MQExportError, match=r"^--temperature must be a finite number >= 0.001 .*got nan$"):
        run_generate("shakespeare-charlm", "ROMEO:", 5, temperature=math.nan)
    with pytest.raises(MQExportError, match=r"^--seed must be an integer in \[0, 2\*\*64\), got -1$"):
        run_generate("shakespeare-charlm", "ROMEO:", 5, seed=-1)
    assert checks.require("--alpha", checks.fraction, 0) == 0.0


@pytest.mark.parametrize("extra, option", [(["--compare"], "--compare"), (["--onnx-dir", "graphs"], "--onnx-dir")])
def test_onnxruntime_only_generate_options_with_the_torch_backend(tmp_path, capsys, monkeypatch, extra, option):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(run(capsys, "generate", "--tokens", "3", *extra), option, "add --backend onnxruntime")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ argparse's own errors

@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: command"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["demo"], "the following arguments are required: -o/--output"),
    (["demo", "-o", "OUT", "--w-bits", "5"], "argument --w-bits: invalid choice: 5"),
    (["demo", "-o", "OUT", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["export", "m.pth", "-o", "OUT", "--opset", "x"], "argument --opset: invalid int value: 'x'"),
])
def test_argparse_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(run(capsys, *argv), message)
    assert list(tmp_path.iterdir()) == []


def test_version(capsys):
    status, out, err = run(capsys, "--version")
    assert status == 0 and out == f"mq-export {version('mq-export')}\n" and err == ""


# ------------------------------------------------------------------ export --calib

@pytest.fixture
def tiny_lm_dir(tmp_path):
    torch.manual_seed(0)
    save_mamba_ssm(MambaLMHeadModel(LMConfig(mixer=MixerConfig(d_model=16), n_layer=1, vocab_size=30)).eval(),
                   tmp_path / "lm")
    return tmp_path / "lm"


def test_export_calib_without_a_method_is_refused_where_it_would_go_unused(tmp_path, capsys):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.zeros((4, 16, 1), np.float32))
    assert_one_line_error(run(capsys, "export", str(BUNDLED_CLASSIFIER), "-o", str(tmp_path / "out"),
                              "--calib", str(calib)), "add --method (rtn,", "or drop --calib")
    assert [p.name for p in tmp_path.iterdir()] == ["calib.npy"]


def test_export_without_a_method_reports_no_calibration(tmp_path, capsys, tiny_lm_dir):
    # A language model's --calib stands in for evaluation data: used, but not to calibrate.
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 30, (3, 12)))
    status, out, _ = run(capsys, "export", str(tiny_lm_dir), "-o", str(tmp_path / "out"), "--calib", str(ids),
                         "--json")
    report = json.loads(out)
    assert status == 0 and report["calibration"] == {"samples": 0, "split": "none"}
    assert report["eval"] == {"samples": 3, "split": "calibration sample"}


def _pickle_with_protocol_4(path):
    with open(path, "wb") as f:
        pickle.dump({"ids": [1, 2, 3]}, f, protocol=4)


@pytest.mark.parametrize("model, make_file, message", [
    ("lm", lambda p: np.save(p.with_suffix(".npy"), np.zeros((0, 8), np.int64)), "is empty (got torch.int64 (0, 8))"),
    ("lm", lambda p: np.save(p.with_suffix(".npy"), np.zeros((4, 0), np.int64)), "is empty (got torch.int64 (4, 0))"),
    ("lm", lambda p: np.save(p.with_suffix(".npy"), np.ones((2, 8), np.complex64)), "reads integer token ids (n, L), "
     "got torch.complex64"),
    ("lm", lambda p: torch.save(torch.ones(2, 8, dtype=torch.bool), p.with_suffix(".pt")), "got torch.bool"),
    ("classifier", lambda p: np.save(p.with_suffix(".npy"), np.zeros((4, 0, 1), np.float32)), "is empty"),
    ("classifier", lambda p: np.save(p.with_suffix(".npy"), np.zeros((0, 16, 1), np.float32)), "n >= 1 and L >= 1"),
    ("classifier", lambda p: p.with_suffix(".pt").write_bytes(b"junk"), "cannot read calibration file"),
    ("classifier", lambda p: _pickle_with_protocol_4(p.with_suffix(".pt")), "(UnpicklingError: Unsupported"),
    ("classifier", lambda p: np.save(p.with_suffix(".npy"), np.array([object()]), allow_pickle=True),
     "(ValueError: Object arrays cannot be loaded when allow_pickle=False)"),
])
def test_bad_calibration_files(tmp_path, capsys, tiny_lm_dir, model, make_file, message):
    make_file(tmp_path / "calib")
    calib = next(tmp_path.glob("calib.*"))
    checkpoint = tiny_lm_dir if model == "lm" else BUNDLED_CLASSIFIER
    with warnings.catch_warnings(record=True) as caught:   # torch.load's warnings would print before the error
        warnings.simplefilter("always")
        result = run(capsys, "export", str(checkpoint), "-o", str(tmp_path / "out"), "--method", "rtn",
                     "--calib", str(calib))
    assert_one_line_error(result, f"calibration file {calib}", message)
    assert [str(w.message) for w in caught] == []
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ build-engine

def _graph(path, input_type=TensorProto.FLOAT, input_shape=("batch", "length", 1)):
    """The mean over axis 1 of an input of the given type and shape (output (batch, 1) for the default)."""
    x = helper.make_tensor_value_info("x", input_type, list(input_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["xf", "axes"], ["y"], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[axes])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)   # importing it would fail with another message


@pytest.mark.parametrize("kind, message", [
    ("absent", "ONNX model not found"),
    ("directory", "is a directory; pass the exported .onnx file in it"),
    ("text", "is not an ONNX model (DecodeError"),
    ("empty", "is not an ONNX model (no graph in it)"),
])
def test_build_engine_refuses_what_is_not_an_onnx_file(tmp_path, capsys, no_tensorrt, kind, message):
    if kind == "directory":
        model = tmp_path
    else:
        model = tmp_path / f"{kind}.onnx"
        if kind != "absent":
            model.write_bytes(b"not a model" if kind == "text" else b"")
    before = sorted(tmp_path.iterdir())
    assert_one_line_error(run(capsys, "build-engine", str(model), "--plugin", "p.so", "-o",
                              str(tmp_path / "m.engine")), message)
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("extra, message", [
    (["--workspace-mb", "0"], "argument --workspace-mb: must be a positive integer, got 0"),
    (["--workspace-mb", "-4"], "must be a positive integer, got -4"),
])
def test_build_engine_option_values(tmp_path, capsys, extra, message):
    model = _graph(tmp_path / "m.onnx")
    assert_one_line_error(run(capsys, "build-engine", str(model), "--plugin", "p.so", "-o",
                              str(tmp_path / "m.engine"), *extra), message)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.parametrize("out, message", [("sub", "is a directory; give the engine file"),
                                          ("absent/m.engine", "directory")])
def test_build_engine_output_path_checked_first(tmp_path, capsys, no_tensorrt, out, message):
    model = _graph(tmp_path / "m.onnx")
    (tmp_path / "sub").mkdir()
    assert_one_line_error(run(capsys, "build-engine", str(model), "--plugin", "p.so", "-o", str(tmp_path / out)),
                          message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "sub"]


# ------------------------------------------------------------------ validate

@pytest.mark.parametrize("graph, message", [
    (dict(input_type=TensorProto.INT64), "takes int64 (batch, length, 1) but mnist's inputs are float (batch, 784, 1)"),
    (dict(input_shape=("batch", 784)), "takes float (batch, 784) but mnist's inputs are float (batch, 784, 1)"),
    (dict(input_shape=("batch", "length", 3)), "takes float (batch, length, 3)"),
    (dict(input_shape=(1, 784, 1)), "takes float (1, 784, 1)"),
    (dict(), "outputs (batch, 1) but mnist gives (batch, 10)"),
])
def test_validate_refuses_a_graph_that_does_not_fit_the_model(tmp_path, capsys, graph, message):
    model = _graph(tmp_path / "m.onnx", **graph)
    assert_one_line_error(run(capsys, "validate", str(model), "--limit", "4"), message,
                          "pass the --model it was exported from")


def test_validate_refuses_a_graph_with_several_inputs(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 784, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 784, 1])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 784, 1])
    graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "g", [x, y], [z])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "two.onnx")
    assert_one_line_error(run(capsys, "validate", str(tmp_path / "two.onnx")), "takes 2 inputs (x, y)")


def test_validate_refuses_what_is_not_an_onnx_file(tmp_path, capsys):
    assert_one_line_error(run(capsys, "validate", str(tmp_path)), "is a directory")
    (tmp_path / "w.pt").write_bytes(b"junk")
    assert_one_line_error(run(capsys, "validate", str(tmp_path / "w.pt")), "is not an ONNX model")


@pytest.fixture(scope="module")
def mnist_onnx(tmp_path_factory):
    """The bundled classifier exported in FP32 (evaluated on 16 images)."""
    out = tmp_path_factory.mktemp("export") / "out"
    assert main(["export", str(BUNDLED_CLASSIFIER), "-o", str(out), "--limit", "16", "--json"]) == 0
    return out / "model.onnx"


def test_validate_passes_within_the_default_tolerances(mnist_onnx, capsys):
    # --model CHECKPOINT of a classifier with MNIST's shape: the bundled MNIST evaluation split.
    status, out, err = run(capsys, "validate", str(mnist_onnx), "--model", str(BUNDLED_CLASSIFIER), "--limit", "16",
                           "--json")
    result = json.loads(out)
    assert status == 0 and err == "" and result["passed"] is True and result["failed"] == []
    assert result["graph"] == "FP32" and result["data"] == "mnist-test[0:16]" and "accuracy" in result["onnxruntime"]
    assert result["checks"]["max_rel_error_vs_pytorch"]["max"] == 1e-3
    assert result["checks"]["argmax_agreement_vs_pytorch"] == {"value": 1.0, "min": 0.999, "passed": True}


def test_validate_exits_1_when_a_tolerance_is_missed(mnist_onnx, capsys):
    status, out, err = run(capsys, "validate", str(mnist_onnx), "--limit", "16", "--json", "--max-rel-error", "0")
    result = json.loads(out)
    assert status == 1 and result["passed"] is False
    assert result["checks"]["max_rel_error_vs_pytorch"]["passed"] is False
    assert result["checks"]["argmax_agreement_vs_pytorch"]["passed"] is True
    assert len(result["failed"]) == 1 and result["failed"][0].startswith("max_rel_error_vs_pytorch ")
    assert err.splitlines() == [f"mq-export: validation failed: {result['failed'][0]}"]
    assert result["failed"][0].endswith("> max 0")


def test_validate_tolerance_values(mnist_onnx, capsys):
    assert_one_line_error(run(capsys, "validate", str(mnist_onnx), "--min-agreement", "1.5"),
                          "argument --min-agreement: must be a number in [0, 1], got 1.5")
    assert_one_line_error(run(capsys, "validate", str(mnist_onnx), "--max-rel-error", "nan"),
                          "argument --max-rel-error: must be a finite number >= 0, got nan")


def test_validate_a_classifier_checkpoint_without_bundled_data(tmp_path, capsys):
    torch.manual_seed(0)
    model = MambaSequenceClassifier(ClassifierConfig(mixer=MixerConfig(d_model=16), n_layers=1, d_input=3,
                                                     n_classes=4)).eval()
    checkpoint = tmp_path / "clf.pth"
    torch.save({"model_state_dict": model.state_dict()}, checkpoint)
    data = tmp_path / "inputs.npy"
    np.save(data, np.random.default_rng(0).standard_normal((6, 20, 3)).astype(np.float32))
    assert main(["export", str(checkpoint), "-o", str(tmp_path / "out"), "--calib", str(data), "--json"]) == 0
    capsys.readouterr()
    onnx_file = str(tmp_path / "out" / "model.onnx")
    assert_one_line_error(run(capsys, "validate", onnx_file, "--model", str(checkpoint)),
                          "no bundled evaluation data (d_input 3, 4 classes); pass --data FILE", "(n, L, 3)")
    status, out, _ = run(capsys, "validate", onnx_file, "--model", str(checkpoint), "--data", str(data), "--json")
    result = json.loads(out)
    assert status == 0 and result["passed"] and result["data"] == "inputs.npy[0:6]" and result["samples"] == 6
    assert_one_line_error(run(capsys, "validate", onnx_file, "--model", str(checkpoint), "--data",
                              str(tmp_path / "absent.npy")), f"--data {tmp_path / 'absent.npy'} does not exist")


# ------------------------------------------------------------------ JSON output

def test_non_finite_report_value_is_refused_by_key():
    report = Report(model="m", method="rtn", w_bits=8, a_bits=8, calibration={"samples": 1, "split": "s"},
                    eval={"samples": 1, "split": "s"}, backends={"fake_quant": {"kl_to_fp32": math.nan}})
    with pytest.raises(MQExportError, match=r"^report.json value fake_quant.kl_to_fp32 is nan, which JSON"):
        report.to_json()
    with pytest.raises(MQExportError, match=r"value outputs\[1\].error is inf"):
        json_text({"outputs": [{"error": 0.5}, {"error": math.inf}]}, "validate result")
    assert json.loads(json_text({"a": [1, 2.5]}, "x")) == {"a": [1, 2.5]}
