"""The method registry, the validated QuantConfig, the per-method settings, the shared CLI
quantization options, the pipeline driver through `export`, and `validate --engine` over a split."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import mq_export
from mq_export.commands.cli import build_parser, main, quant_config
from mq_export.errors import MQExportError
from mq_export.quant.methods import METHODS, QUANTIZING_METHODS, QuantConfig, QuantSettings
from mq_export.quant.transforms import TransformConfig
from tests.test_bad_input_cli import mnist_onnx, tiny_lm_dir  # noqa: F401  (fixtures)
from tests.test_transforms import classifier_split, small_classifier

# report.json's settings keys (a contract: add, never rename), in order.
SETTINGS_KEYS = ["method", "w_bits", "a_bits", "seed", "alpha", "rotation", "klt", "smoothing", "calibrator",
                 "calibrator_requested", "calibrator_selection_kl", "calibrator_selection_samples", "percentile",
                 "activations", "weights", "w_group_size", "online", "quantized_activation_sites",
                 "quantized_weights", "floating_point", "h_c_product", "calibration_split"]


# ------------------------------------------------------------------ the registry

def test_every_place_that_lists_methods_reads_the_registry():
    import tools.quant_table as quant_table

    parser = build_parser()
    for command in ("demo", "export", "generate"):
        action = next(a for a in _subparser(parser, command)._actions if a.dest == "method")
        assert tuple(action.choices) == tuple(METHODS)
    assert QUANTIZING_METHODS == ("rtn", "smoothquant", "hadamard", "mambaquant")
    assert set(QUANTIZING_METHODS) <= {method for _, method, _ in quant_table.ROWS.values()}
    assert mq_export.api.METHODS is METHODS


@pytest.mark.parametrize("method, klt, expected", [
    ("rtn", True, TransformConfig()),
    ("smoothquant", True, TransformConfig(smooth_inputs=True)),
    ("hadamard", True, TransformConfig(rotation="hadamard")),
    ("mambaquant", True, TransformConfig(smooth_inputs=True, smooth_gate=True, smooth_state=True, rotation="klt")),
    ("mambaquant", False, TransformConfig(smooth_inputs=True, smooth_gate=True, smooth_state=True,
                                          rotation="hadamard")),
])
def test_each_method_names_its_transforms(method, klt, expected):
    assert QuantConfig(method=method, klt=klt, alpha=0.25, seed=7).transforms() == TransformConfig(
        **{**expected.__dict__, "alpha": 0.25, "seed": 7})


# ------------------------------------------------------------------ validation at construction

@pytest.mark.parametrize("field, value, message", [
    ("method", "none", "unknown method 'none'; choose from rtn, smoothquant, hadamard, mambaquant"),
    ("method", "gptq", "unknown method 'gptq'"),
    ("calibrator", "magic", "unknown calibrator 'magic'; choose from auto, absmax, percentile, mse, entropy"),
    ("w_bits", 5, "--w-bits must be 8 or 4, got 5"),
    ("w_bits", True, "--w-bits must be 8 or 4, got True"),
    ("a_bits", 4, "--a-bits must be 8 or 16, got 4"),
    ("w_group_size", 0, "--w-group-size must be a positive integer, got 0"),
    ("alpha", math.nan, "--alpha must be a number in [0, 1], got nan"),
    ("alpha", 1.5, "--alpha must be a number in [0, 1]"),
    ("seed", -1, "--seed must be an integer in [0, 2**64), got -1"),
    ("seed", 2**64, "--seed must be an integer in [0, 2**64)"),
    ("percentile", 0, "percentile must be a number in (0, 100], got 0"),
    ("range_samples", 0, "range_samples must be a positive integer"),
    ("asymmetric", "yes", "--asymmetric must be True or False, got 'yes'"),
    ("gptq", 1, "--gptq must be True or False or None, got 1"),
])
def test_bad_config_is_refused_when_built(field, value, message):
    with pytest.raises(MQExportError) as error:
        QuantConfig(**{field: value})
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_api_quantize_checks_the_config_before_any_work():
    # stats=None: any work at all would fail on it, so the config error must come first.
    with pytest.raises(MQExportError, match="unknown calibrator 'magic'"):
        mq_export.quantize(small_classifier(), None, method="rtn", calibrator="magic")
    with pytest.raises(MQExportError, match="--w-bits must be 8 or 4"):
        mq_export.quantize(small_classifier(), None, QuantConfig(method="hadamard"), w_bits=2)


def test_group_size_that_cannot_tile_a_linear_is_refused_before_calibration():
    from mq_export.commands.pipeline import quantize_stage

    model = small_classifier()   # Linears with 3, 48, 96 and 4 inputs: 16 tiles 48 and 96, 36 neither
    QuantConfig(method="rtn", w_group_size=16).check_model(model)
    # Calibration data of the wrong width: calibrating first would fail on it instead.
    with pytest.raises(MQExportError, match="--w-group-size 36 does not divide a Linear's 48 input features"):
        quantize_stage(model, torch.zeros(2, 8, 5), QuantConfig(method="rtn", w_group_size=36))


# ------------------------------------------------------------------ settings

def _settings(method: str, **config) -> dict:
    return QuantSettings(config=QuantConfig(method=method, **config), calibrator="mse",
                         calibrator_selection_kl=None, calibrator_selection_samples=4, online=[],
                         quantized_activation_sites=[], quantized_weights=[], calibration_split="c").to_dict()


@pytest.mark.parametrize("method, online_fp, alpha, rotation", [
    ("rtn", None, None, None),
    ("smoothquant", None, 0.5, None),
    ("hadamard", "online rotation", None, "hadamard"),
    ("mambaquant", "online gate scale and rotation", 0.5, "klt"),
])
def test_settings_keys_are_the_contract_and_true_per_method(method, online_fp, alpha, rotation):
    settings = _settings(method)
    assert list(settings) == SETTINGS_KEYS
    online = [item for item in settings["floating_point"] if item.startswith("online")]
    assert online == ([online_fp] if online_fp else [])
    assert settings["alpha"] == alpha and settings["rotation"] == rotation and settings["klt"] == (rotation == "klt")
    assert settings["smoothing"]["smooth_gate"] == (method == "mambaquant")
    assert settings["percentile"] is None                       # the calibrator used is mse
    assert _settings(method, w_bits=4)["weights"] == "symmetric int4 per output channel, GPTQ"
    assert _settings(method, w_group_size=64, gptq=False)["weights"] == (
        "symmetric int8 per output channel, blocks of 64 along the input, RTN with clipping search")
    assert _settings(method, asymmetric=True, a_bits=16)["activations"] == (
        "static per-tensor asymmetric uint16 (ONNX Runtime only)")


def test_rtn_quantization_reports_no_online_transform():
    model = small_classifier()
    stats = mq_export.calibrate(model, classifier_split(), selection_samples=2, quiet=True)
    qmodel, settings = mq_export.quantize(model, stats, method="rtn", calibrator="absmax", quiet=True)
    assert list(settings) == SETTINGS_KEYS and settings["online"] == []
    assert not any(item.startswith("online") for item in settings["floating_point"])
    assert all(m.gate_scale is None and m.out_proj_input_rotation is None for m in qmodel.layers)


# ------------------------------------------------------------------ the shared CLI options

def _subparser(parser, command):
    return next(a for a in parser._actions if a.dest == "command").choices[command]


QUANT_ARGS = ["--method", "hadamard", "--w-bits", "4", "--a-bits", "16", "--w-group-size", "32", "--calibrator",
              "mse", "--alpha", "0.25", "--asymmetric", "--no-gptq"]
EXPECTED = dict(method="hadamard", w_bits=4, a_bits=16, w_group_size=32, calibrator="mse", alpha=0.25,
                asymmetric=True, gptq=False)


@pytest.mark.parametrize("argv", [["demo", "-o", "OUT"], ["export", "m.pth", "-o", "OUT"]])
def test_demo_and_export_share_the_quantization_options(argv):
    args = build_parser().parse_args([*argv, *QUANT_ARGS, "--seed", "9"])
    assert quant_config(args) == QuantConfig(**EXPECTED, seed=9)
    assert quant_config(build_parser().parse_args(argv)) is None          # --method none: FP32


def test_generate_shares_them_with_its_own_sampling_seed():
    args = build_parser().parse_args(["generate", *QUANT_ARGS, "--quant-seed", "9", "--seed", "3"])
    assert quant_config(args) == QuantConfig(**EXPECTED, seed=9) and args.seed == 3


# ------------------------------------------------------------------ the pipeline through `export`

def test_export_quantizes_with_the_new_options_end_to_end(tmp_path, capsys, tiny_lm_dir):  # noqa: F811
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 30, (6, 16)))
    out = tmp_path / "out"
    assert main(["export", str(tiny_lm_dir), "-o", str(out), "--calib", str(ids), "--method", "rtn",
                 "--calibrator", "absmax", "--seed", "5", "--alpha", "0.3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "report.json").read_text())
    assert [k for k in report if k not in ("fp32", "fake_quant", "onnxruntime")] == [
        "model", "method", "w_bits", "a_bits", "calibration", "eval", "settings", "artifacts", "seconds"]
    assert report["calibration"] == {"samples": 6, "split": str(ids)}
    assert report["settings"]["calibrator"] == "absmax" and report["settings"]["seed"] == 5
    assert set(SETTINGS_KEYS) < set(report["settings"]) and "onnx" in report["settings"]
    assert list(report["seconds"]) == ["load", "fp32", "quantize", "fake_quant", "export_onnx", "onnxruntime"]
    # ONNX Runtime runs the Q/DQ graph of the fake-quant model: same argmax, logits within rounding.
    assert report["onnxruntime"]["argmax_agreement_vs_pytorch"] == 1.0
    assert report["onnxruntime"]["max_rel_error_vs_pytorch"] < 1e-3


# ------------------------------------------------------------------ validate --engine over the split

class _FakeEngine:
    """Stands in for a TensorRT engine: ONNX Runtime on the same graph, optionally with one logit of
    one sample off by 100, recording the batches it is given."""
    max_batch = 8
    corrupt: int | None = None

    def __init__(self, engine_path, plugin_path) -> None:
        from mq_export.runtime.ort import OrtForward, session
        self.forward = OrtForward(session(self.onnx_path, threads=1))
        self.seen = _FakeEngine.seen = []

    def __call__(self, x):
        start = sum(self.seen)
        self.seen.append(len(x))
        logits = self.forward(x).clone()
        if self.corrupt is not None and start <= self.corrupt < start + len(x):
            logits[self.corrupt - start, 0] += 100.0
        return logits


@pytest.mark.parametrize("corrupt", [None, 27])
def test_validate_engine_scores_the_whole_split(mnist_onnx, capsys, monkeypatch, corrupt):  # noqa: F811
    import mq_export.runtime.engine as engine

    monkeypatch.setattr(engine, "EngineForward", type("Fake", (_FakeEngine,), {
        "onnx_path": mnist_onnx, "corrupt": corrupt}))
    status = main(["validate", str(mnist_onnx), "--engine", "m.engine", "--plugin", "p.so", "--limit", "30",
                   "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 30 and result["data"] == "mnist-test[0:30]"
    assert _FakeEngine.seen == [8, 8, 8, 6]                      # every sample, in the engine's batch size
    assert set(result["tensorrt"]) == {"accuracy", "kl_to_fp32", "agreement_with_fp32"}
    if corrupt is None:
        assert status == 0 and result["passed"] is True and result["failed"] == []
        assert result["tensorrt"] == result["onnxruntime"]
    else:   # a sample in the last batch: a one-batch check would not have seen it
        assert status == 1 and result["passed"] is False and result["failed"][0].startswith("output ")
        assert result["outputs"][0]["max_abs_error"] == pytest.approx(100.0, rel=1e-4)
        assert result["tensorrt"]["kl_to_fp32"] > result["onnxruntime"]["kl_to_fp32"]
