"""Falcon-H1 (Mamba-2 and attention in parallel in every layer, μP multipliers) loaded from
transformers' save_pretrained directories: logits against transformers' own CPU forward in
PyTorch and ONNX Runtime, and the one-line refusals."""
from __future__ import annotations

import pytest
import torch

import mq_export
from mq_export.models.falcon_h1 import FalconH1LM
from tests.test_hybrid_nemotron_h import (CHUNK, VOCAB, assert_api_export_matches, assert_cli_export_matches,
                                          assert_load_refused, relative_error, save_random)

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is not installed")

# Odd sizes: 6 Mamba heads of 5 channels in 2 groups (mamba_d_ssm 30, not expand × hidden_size),
# a state of 7; 4 query heads of 6 channels sharing 2 kv heads; every multiplier, the ssm_multipliers
# of each in_proj section among them, away from 1; every bias on; Δ limited.
CONFIG = dict(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=20, mamba_d_ssm=30, mamba_n_heads=6, mamba_n_groups=2, mamba_d_state=7,
              mamba_d_conv=3, mamba_chunk_size=CHUNK, mamba_proj_bias=True, projectors_bias=False,
              attention_bias=True, mlp_bias=True, time_step_limit=(0.01, 3.0),
              rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
              embedding_multiplier=2.5, lm_head_multiplier=0.4, key_multiplier=0.7, attention_in_multiplier=1.3,
              attention_out_multiplier=0.6, ssm_in_multiplier=0.8, ssm_out_multiplier=1.4, mlp_multipliers=[0.9, 1.2],
              ssm_multipliers=[0.5, 1.5, 0.7, 1.3, 2.0])
MAMBA_LAYERS = 2


def save_falcon_h1(directory, **overrides):
    config = transformers.FalconH1Config(**{**CONFIG, **overrides})
    return save_random(transformers.FalconH1ForCausalLM, config, directory)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("falcon_h1")
    return directory, save_falcon_h1(directory)


def assert_logits_match(directory, reference, lengths=(CHUNK * 2 + 3,)) -> FalconH1LM:
    model = mq_export.load(directory)
    assert type(model) is FalconH1LM
    for length in lengths:
        ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            assert relative_error(model(ids), reference(ids).logits) <= 1e-4
    return model


def test_logits_match_transformers(saved):
    model = assert_logits_match(*saved, lengths=(1, CHUNK * 2 + 3, 30))
    assert model.model.layers[0].mamba.norm is None         # mamba_rms_norm false: silu(z) gates the scan


def test_multipliers_change_the_logits(saved, tmp_path):
    """The multipliers are read, not defaulted: the same weights with them at 1 give other logits."""
    directory, reference = saved
    plain = save_falcon_h1(tmp_path, embedding_multiplier=1.0, lm_head_multiplier=1.0, key_multiplier=1.0,
                           attention_in_multiplier=1.0, attention_out_multiplier=1.0, ssm_in_multiplier=1.0,
                           ssm_out_multiplier=1.0, mlp_multipliers=[1.0, 1.0], ssm_multipliers=[1.0] * 5)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(mq_export.load(directory)(ids), plain(ids).logits) > 1e-2
    assert_logits_match(tmp_path, plain)


def test_gated_rmsnorm_tied_embeddings_and_expand_sizing(tmp_path):
    """mamba_rms_norm with the norm after the gate; mamba_d_ssm null (mamba_expand × hidden_size)
    with mamba_d_head "auto"; both Mamba projections biased; a tied lm_head."""
    reference = save_falcon_h1(tmp_path, mamba_rms_norm=True, mamba_norm_before_gate=False, mamba_d_ssm=None,
                               mamba_expand=2, mamba_n_heads=8, projectors_bias=True, tie_word_embeddings=True)
    model = assert_logits_match(tmp_path, reference)
    assert model.model.layers[0].mamba.norm is not None
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_cli_export_runs_in_onnxruntime_like_transformers(saved, tmp_path):
    directory, reference = saved
    onnx_settings = assert_cli_export_matches(directory, tmp_path / "out", reference, MAMBA_LAYERS)
    assert onnx_settings["ssd_scan_spec"]["dt_min"] == CONFIG["time_step_limit"][0]


def test_python_api_export_runs_in_onnxruntime_like_transformers(saved, tmp_path):
    directory, reference = saved
    assert_api_export_matches(directory, tmp_path / "model.onnx", reference, MAMBA_LAYERS)


@pytest.mark.parametrize("settings, named", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(mamba_rms_norm=True, mamba_norm_before_gate=True), "mamba_norm_before_gate"),
    (dict(mamba_rms_norm=True, mamba_norm_before_gate=None), "mamba_norm_before_gate"),   # its default: true
    (dict(mamba_d_head=4), "mamba_n_heads × mamba_d_head = 6 × 4 is not mamba_d_ssm = 30"),
    (dict(mamba_n_groups=4), "mamba_n_groups 4 does not divide mamba_n_heads 6"),
    (dict(num_key_value_heads=3), "num_key_value_heads 3"),
    (dict(ssm_multipliers=[1.0, 2.0]), "ssm_multipliers"),
    (dict(key_multiplier=0), "key_multiplier"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}), "rope_parameters.rope_type"),
])
def test_unsupported_setting_is_one_line_naming_it(saved, tmp_path, settings, named):
    assert_load_refused(saved[0], tmp_path, settings, named)
