"""Bad checkpoints, configs and calibration data: each is one `MQExportError` naming what is wrong
(and, through the CLI, one `mq-export: error:` line, exit 2, no output directory)."""
import json
import pickle
import re
import warnings

import numpy as np
import pytest
import torch

from mq_export.quant.calibrate import calibrate, shares_a_sample
from mq_export.commands.cli import main
from mq_export.load.data import Split, mnist_splits
from mq_export.errors import MQExportError
from mq_export.load.checkpoints import load_checkpoint, load_classifier, load_lm, save_mamba_ssm
from mq_export.models.mamba import ClassifierConfig, MambaSequenceClassifier, MixerConfig
from mq_export.quant.methods import QuantConfig
from mq_export.quant.transforms import apply_transforms
from tests.test_loaders import small_lm
from tests.test_transforms import classifier_split, lm_split, small_classifier


def tiny_classifier_state() -> dict:
    model = MambaSequenceClassifier(ClassifierConfig(MixerConfig(16, d_state=4, dt_rank=2), n_layers=1, d_input=1))
    return {k: v.clone() for k, v in model.state_dict().items()}


def save_state(state: dict, path):
    torch.save({"model_state_dict": state}, path)
    return path


def raises(message: str):
    return pytest.raises(MQExportError, match=re.escape(message))


# ------------------------------------------------------------------ checkpoint tensors

@pytest.mark.parametrize("key, value, message", [
    ("layers.0.A_log", torch.zeros(32), "layers.0.A_log has shape (32,); expected a 2-D tensor (d_inner, d_state)"),
    ("layers.0.in_proj.weight", torch.zeros(64, 16, 1), "layers.0.in_proj.weight has shape (64, 16, 1); expected "
                                                         "a 2-D tensor (2·d_inner, d_model)"),
    ("layers.0.dt_proj.weight", torch.zeros(32), "layers.0.dt_proj.weight has shape (32,); expected a 2-D tensor"),
    ("layers.0.conv1d.weight", torch.zeros(32, 4), "layers.0.conv1d.weight has shape (32, 4); expected a 3-D"),
    ("input_proj.weight", torch.zeros(16), "input_proj.weight has shape (16,); expected a 2-D tensor"),
    ("classifier.weight", torch.tensor(1.0), "classifier.weight has shape (); expected a 2-D tensor"),
    ("layers.0.A_log", torch.zeros(0, 4), "layers.0.A_log has shape (0, 4); expected a 2-D tensor (d_inner, "
                                          "d_state) with no empty dimension"),
])
def test_wrong_rank_tensors_name_the_key(tmp_path, key, value, message):
    state = tiny_classifier_state()
    state[key] = value
    with raises(message):
        load_classifier(save_state(state, tmp_path / "bad.pth"))


@pytest.mark.parametrize("bad, message", [
    (float("nan"), "layers.0.D contains NaN or Inf values"),
    (float("inf"), "layers.0.D contains NaN or Inf values"),
])
def test_non_finite_weights_are_refused(tmp_path, bad, message):
    state = tiny_classifier_state()
    state["layers.0.D"][3] = bad
    with raises(message):
        load_classifier(save_state(state, tmp_path / "bad.pth"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool])
def test_non_real_float_weights_are_refused(tmp_path, dtype):
    state = tiny_classifier_state()
    state["norm.weight"] = state["norm.weight"].to(dtype)
    with raises(f"norm.weight has dtype {dtype}; the model's weights are real floating point"):
        load_classifier(save_state(state, tmp_path / "bad.pth"))


def test_non_finite_lm_weights_are_refused(tmp_path):
    lm = small_lm()
    with torch.no_grad():
        lm.backbone.layers[1].mixer.x_proj.weight[0, 0] = float("nan")
    save_mamba_ssm(lm, tmp_path)
    with raises("backbone.layers.1.mixer.x_proj.weight contains NaN or Inf"):
        load_lm(tmp_path)


# ------------------------------------------------------------------ unreadable files

def test_unreadable_checkpoints_give_the_reason_without_warnings(tmp_path):
    plain_pickle = tmp_path / "plain.pth"        # torch warns about its pickle protocol before failing
    plain_pickle.write_bytes(pickle.dumps({"a": np.zeros(2)}, protocol=4))
    objects = tmp_path / "objects.pth"
    torch.save({"a": torch.zeros(1), "path": tmp_path}, objects)
    truncated = tmp_path / "truncated.pth"
    torch.save({"a": torch.zeros(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    cases = [(plain_pickle, "(UnpicklingError: Unsupported operand"),
             (objects, "(UnpicklingError: Unsupported global: GLOBAL pathlib."),
             (truncated, "(RuntimeError: PytorchStreamReader failed reading zip archive")]
    for path, reason in cases:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with raises(reason):
                load_checkpoint(path)
        assert not caught, [str(w.message) for w in caught]


def test_directory_and_device_are_named_for_what_they_are(tmp_path):
    with raises("is a directory; pass the checkpoint file"):
        load_classifier(tmp_path)
    with raises("/dev/null is not a regular file"):
        load_checkpoint("/dev/null")
    with raises("does not exist"):
        load_checkpoint(tmp_path / "absent.pth")


# ------------------------------------------------------------------ config.json

def mamba_ssm_dir(tmp_path, edit):
    save_mamba_ssm(small_lm(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg = edit(cfg) or cfg
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def set_key(key, value):
    def edit(cfg):
        *sections, last = key.split(".")
        target = cfg
        for name in sections:
            target = target[name]
        target[last] = value
    return edit


@pytest.mark.parametrize("key, value, expected", [
    ("d_model", "big", 'd_model is "big"; expected an integer ≥ 1'),
    ("d_model", None, "d_model is null; expected an integer ≥ 1"),
    ("d_model", [16], "d_model is [16]; expected an integer ≥ 1"),
    ("d_model", 16.9, "d_model is 16.9; expected an integer ≥ 1"),
    ("d_model", True, "d_model is true; expected an integer ≥ 1"),
    ("n_layer", 0, "n_layer is 0; expected an integer ≥ 1"),
    ("vocab_size", -3, "vocab_size is -3; expected an integer ≥ 1"),
    ("pad_vocab_size_multiple", 0, "pad_vocab_size_multiple is 0; expected an integer ≥ 1"),
    ("norm_epsilon", "1e-5", 'norm_epsilon is "1e-5"; expected a positive number'),
    ("norm_epsilon", 0, "norm_epsilon is 0; expected a positive number"),
    ("rms_norm", "false", 'rms_norm is "false"; expected true or false'),
    ("ssm_cfg.conv_bias", "false", 'ssm_cfg.conv_bias is "false"; expected true or false'),
    ("ssm_cfg.d_state", 0, "ssm_cfg.d_state is 0; expected an integer ≥ 1"),
    ("ssm_cfg.dt_rank", "big", 'ssm_cfg.dt_rank is "big"; expected "auto" or an integer ≥ 1'),
    ("ssm_cfg", [1], "ssm_cfg is [1]; expected an object of settings"),
    ("d_intermediate", "0", 'd_intermediate is "0"; expected an integer ≥ 0'),
])
def test_mamba_ssm_config_values_are_typed(tmp_path, key, value, expected):
    directory = mamba_ssm_dir(tmp_path, set_key(key, value))
    with raises(f"{directory / 'config.json'}: {expected}"):
        load_lm(directory)


def test_integral_float_sizes_are_integers(tmp_path):
    directory = mamba_ssm_dir(tmp_path, set_key("d_model", 16.0))
    assert load_lm(directory).cfg.mixer.d_model == 16


def test_config_that_is_not_an_object(tmp_path):
    directory = mamba_ssm_dir(tmp_path, lambda cfg: [cfg])
    with raises("config.json holds a JSON list, not an object of settings"):
        load_checkpoint(directory)


@pytest.mark.parametrize("key, value, expected", [
    ("hidden_size", "big", 'hidden_size is "big"; expected an integer ≥ 1'),
    ("use_conv_bias", "false", 'use_conv_bias is "false"; expected true or false'),
    ("layer_norm_epsilon", "1e-5", 'layer_norm_epsilon is "1e-5"; expected a positive number'),
    ("time_step_rank", 2.5, 'time_step_rank is 2.5; expected "auto" or an integer ≥ 1'),
    ("num_hidden_layers", None, "num_hidden_layers is null; expected an integer ≥ 1"),
])
def test_hf_config_values_are_typed(tmp_path, key, value, expected):
    cfg = {"model_type": "mamba", "hidden_size": 16, "state_size": 4, "num_hidden_layers": 2, "vocab_size": 30,
           "time_step_rank": 2, "use_conv_bias": True, "layer_norm_epsilon": 1e-5, key: value}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with raises(f"{tmp_path / 'config.json'}: {expected}"):
        load_lm(tmp_path)


# ------------------------------------------------------------------ calibration data

@pytest.mark.parametrize("inputs, message", [
    (torch.zeros(0, 12, 3), "is empty (no samples)"),
    (torch.zeros(4, 0, 3), "has empty samples (shape (4, 0, 3))"),
    (torch.zeros(4, 12, 3, dtype=torch.complex64), "has dtype torch.complex64"),
    (torch.zeros(4, 12, 3, dtype=torch.bool), "has dtype torch.bool"),
    (torch.zeros(4, 12, 5), "this classifier reads real floats (n, L, 3), got torch.float32 (4, 12, 5)"),
    (torch.zeros(4, 12, 3, dtype=torch.int64), "this classifier reads real floats (n, L, 3), got torch.int64"),
])
def test_bad_classifier_calibration_data(inputs, message):
    with raises(message):
        calibrate(small_classifier(), Split("calib", inputs, torch.zeros(len(inputs))), quiet=True)


def test_bad_lm_calibration_data():
    lm = small_lm()
    with raises("has empty samples (shape (3, 0))"):
        calibrate(lm, Split("ids", torch.zeros(3, 0, dtype=torch.int64), torch.zeros(3)), quiet=True)
    with raises("a language model reads integer token ids (n, L), got torch.float32 (3, 5)"):
        calibrate(lm, Split("ids", torch.zeros(3, 5), torch.zeros(3)), quiet=True)
    with raises("token ids outside [0, 30)"):
        calibrate(lm, Split("ids", torch.full((3, 5), 30), torch.zeros(3)), quiet=True)


def test_calibration_inputs_take_the_model_dtype():
    lm, split = small_lm(), lm_split()
    stats = calibrate(lm, Split("ids32", split.inputs.int(), split.labels), selection_samples=2, quiet=True)
    assert stats.inputs.dtype == torch.int64
    split = classifier_split()
    stats = calibrate(small_classifier(), Split("x64", split.inputs.double(), split.labels), selection_samples=2,
                      quiet=True)
    assert stats.inputs.dtype == torch.float32


def test_overlap_is_found_up_to_float_rounding():
    calib, evaluation = mnist_splits(512)
    assert not shares_a_sample(calib.inputs, evaluation.inputs)
    for dtype in (torch.float16, torch.bfloat16):
        one_copy = torch.cat([calib.inputs[:100], evaluation.inputs[300:301].to(dtype).float()])
        assert shares_a_sample(one_copy, evaluation.inputs), dtype
    # One grey level in one pixel is the same image; a different image is not.
    near = evaluation.inputs[7:8].clone()
    near[0, 400, 0] += 1 / 255 / 0.3081
    assert shares_a_sample(near, evaluation.inputs)
    assert not shares_a_sample(evaluation.inputs[7:8] * 0.9, evaluation.inputs)
    # An outlier in the calibration data does not widen the tolerance (it is the evaluation data's).
    assert not shares_a_sample(torch.cat([calib.inputs[:4], torch.full((1, 784, 1), 1e30)]), evaluation.inputs)
    # Token ids compare exactly, whatever their integer dtype.
    ids = torch.randint(0, 30, (6, 10), generator=torch.Generator().manual_seed(0))
    assert shares_a_sample(ids[2:3].int(), ids) and not shares_a_sample((ids[2:3] + 1) % 30, ids)


def test_calibrate_refuses_rounded_copies_of_evaluation_data():
    model, split = small_classifier(), classifier_split(n=16)
    evaluation = Split("held-out", split.inputs[8:], split.labels[8:])
    rounded = Split("calib.npy", torch.cat([split.inputs[:4], split.inputs[12:13].half().float()]),
                    split.labels[:5])
    with raises("calibration split 'calib.npy' overlaps the evaluation split 'held-out'"):
        calibrate(model, rounded, exclude=(evaluation,), quiet=True)


# ------------------------------------------------------------------ Hadamard orders

def test_dt_rank_without_hadamard_matrix_is_named():
    model = MambaSequenceClassifier(ClassifierConfig(MixerConfig(16, d_state=4, dt_rank=3), n_layers=1, d_input=3))
    stats = calibrate(model, classifier_split(), selection_samples=2, quiet=True)
    for method in ("hadamard", "mambaquant"):
        with raises("dt_rank 3 has no Hadamard matrix here"):
            apply_transforms(model, stats, QuantConfig(method=method).transforms())
    apply_transforms(model, stats, QuantConfig(method="smoothquant").transforms())   # the suggested way out works


# ------------------------------------------------------------------ through the CLI

def assert_one_line_error(capsys, tmp_path, argv, message, inputs):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mq-export: error:") and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(inputs), "output or staging left behind"


def test_cli_export_of_non_finite_checkpoint(tmp_path, capsys):
    state = tiny_classifier_state()
    state["layers.0.in_proj.weight"][0, 0] = float("nan")
    path = save_state(state, tmp_path / "nan.pth")
    assert_one_line_error(capsys, tmp_path, ["export", str(path), "-o", str(tmp_path / "out")],
                          "layers.0.in_proj.weight contains NaN or Inf", ["nan.pth"])


def test_cli_export_of_badly_typed_config(tmp_path, capsys):
    directory = mamba_ssm_dir(tmp_path / "lm", set_key("ssm_cfg.conv_bias", "false"))
    assert_one_line_error(capsys, tmp_path, ["export", str(directory), "-o", str(tmp_path / "out")],
                          'ssm_cfg.conv_bias is "false"; expected true or false', ["lm"])


def test_cli_export_refuses_float16_copy_of_evaluation_images(tmp_path, capsys):
    _, evaluation = mnist_splits(32)
    calib = tmp_path / "calib.npy"
    np.save(calib, evaluation.inputs[:16].half().numpy())
    assert_one_line_error(capsys, tmp_path, ["export", "mq_export/assets/mnist/Mamba_best.pth", "-o",
                                             str(tmp_path / "out"), "--method", "rtn", "--calib", str(calib),
                                             "--limit", "32", "--json"],
                          "overlaps the evaluation split 'mnist-test[0:32]'", ["calib.npy"])
