import json
import subprocess
import sys

import pytest

from mq_export.commands.cli import main


def run_cli(*args):
    """The CLI as a user runs it: a separate process, so tracebacks would show on stderr."""
    return subprocess.run([sys.executable, "-m", "mq_export", *args], capture_output=True, text=True, timeout=300)


def test_demo_none_writes_report(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "-o", str(out), "--limit", "64", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    assert printed == report
    assert report["model"] == "mnist" and report["method"] == "none"
    assert report["calibration"]["samples"] == 1024 and report["eval"]["samples"] == 64
    assert report["calibration"]["split"] == "mnist-test[8976:10000]"
    assert report["eval"]["split"] == "mnist-test[0:64]"
    assert 0.9 <= report["fp32"]["accuracy"] <= 1.0
    assert not [p for p in tmp_path.iterdir() if p.name != "out"], "staging directory left behind"


def test_unknown_model_is_one_line_error(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("demo", "-o", str(out), "--model", "imagenet")
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "unknown model 'imagenet'" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_non_empty_output_needs_force(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    proc = run_cli("demo", "-o", str(tmp_path), "--limit", "8")
    assert proc.returncode != 0 and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_limit_must_be_positive(tmp_path):
    proc = run_cli("demo", "-o", str(tmp_path / "o"), "--limit", "0")
    assert proc.returncode == 2 and "argument --limit: must be a positive integer" in proc.stderr
    assert not (tmp_path / "o").exists()


def _identity_onnx(path):
    import onnx
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_engine_commands_without_tensorrt_fail_in_one_line(tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here; this checks the error a machine without it gives")
    except ImportError:
        pass
    model = tmp_path / "m.onnx"
    _identity_onnx(model)
    for args in (("build-engine", str(model), "--plugin", "p.so", "-o", str(tmp_path / "m.engine")),
                 ("validate", str(model), "--engine", "m.engine", "--plugin", "p.so")):
        proc = run_cli(*args)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and "'tensorrt' is not installed" in proc.stderr
    assert not (tmp_path / "m.engine").exists()


def test_console_script_is_the_cli_main():
    """pyproject's `mq-export` entry point names the CLI's main (it moved with the package layout)."""
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="mq-export")
    assert script.load() is main


REPORT_KEYS = {"model", "method", "w_bits", "a_bits", "calibration", "eval", "fp32", "fake_quant", "onnxruntime",
               "settings", "artifacts", "seconds"}


def _quantized_run(out, capsys) -> dict:
    """report.json of a finished quantized run in `out`, checked against what --json printed and
    against the file it names: ONNX with Q/DQ nodes."""
    import onnx

    report = json.loads((out / "report.json").read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert REPORT_KEYS <= set(report)
    assert sorted(p.name for p in out.iterdir()) == sorted(report["artifacts"].values())
    ops = [n.op_type for n in onnx.load(out / report["artifacts"]["onnx"], load_external_data=False).graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    return report


def _assert_onnxruntime_equals_fake_quant(report: dict, task_metrics: dict[str, float]) -> None:
    """ONNX Runtime runs the graph the fake-quant model means: the same task metrics (each within
    its relative tolerance) and logits within Q/DQ rounding of PyTorch's fake-quant logits."""
    ort, fake = report["onnxruntime"], report["fake_quant"]
    for metric, rel in task_metrics.items():
        assert ort[metric] == pytest.approx(fake[metric], rel=rel, abs=1e-12), metric
    assert abs(ort["agreement_with_fp32"] - fake["agreement_with_fp32"]) <= 0.01
    assert ort["max_rel_error_vs_pytorch"] < 0.02 and ort["argmax_agreement_vs_pytorch"] >= 0.99


def test_demo_mambaquant_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--model", "shakespeare-charlm", "--method", "mambaquant", "--limit", "2", "-o", str(out),
                 "--json"]) == 0
    report = _quantized_run(out, capsys)
    assert (report["model"], report["method"], report["w_bits"], report["a_bits"]) == ("shakespeare-charlm",
                                                                                      "mambaquant", 8, 8)
    assert report["settings"]["rotation"] == "klt" and report["eval"]["samples"] == 2
    _assert_onnxruntime_equals_fake_quant(report, {"perplexity": 1e-3, "kl_to_fp32": 0.05})
    assert report["fake_quant"]["perplexity"] == pytest.approx(report["fp32"]["perplexity"], rel=0.01)


def test_export_rtn_with_calibration_file_end_to_end(tmp_path, capsys):
    import torch

    from mq_export.load.checkpoints import BUNDLED_CLASSIFIER
    from mq_export.load.data import mnist_test

    calib = tmp_path / "calib.pt"
    torch.save(mnist_test()[0][-64:].clone(), calib)      # the last test images: not the evaluated first 16
    out = tmp_path / "exp"
    assert main(["export", str(BUNDLED_CLASSIFIER), "--method", "rtn", "--calib", str(calib), "--limit", "16",
                 "-o", str(out), "--json"]) == 0
    report = _quantized_run(out, capsys)
    assert (report["method"], report["w_bits"], report["a_bits"]) == ("rtn", 8, 8)
    assert report["calibration"] == {"samples": 64, "split": str(calib)}
    assert report["eval"]["samples"] == 16
    _assert_onnxruntime_equals_fake_quant(report, {"accuracy": 0.0, "kl_to_fp32": 0.05})
