"""Bamba (hybrid Mamba-2 / attention decoder layers, each with a SwiGLU MLP) loaded from
transformers' save_pretrained directories: logits against transformers' own CPU forward in
PyTorch and ONNX Runtime, tied embeddings (one file and sharded), and the one-line refusals."""
from __future__ import annotations

import pytest
import torch

import mq_export
from mq_export.models.bamba import BambaLM
from tests.test_hybrid_nemotron_h import (CHUNK, VOCAB, assert_api_export_matches, assert_cli_export_matches,
                                          assert_load_refused, relative_error, save_random)

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is not installed")

# Odd sizes: 8 Mamba heads of 6 channels in 2 groups, a state of 7; 4 query heads of 6 channels
# sharing 2 kv heads, RoPE on half of each head (3 channels: transformers rotates 2 pairs);
# attention at layers 1 and 3 of 4.
CONFIG = dict(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=4, attn_layer_indices=[1, 3],
              num_attention_heads=4, num_key_value_heads=2, intermediate_size=20, mamba_n_heads=8,
              mamba_d_head="auto", mamba_n_groups=2, mamba_d_state=7, mamba_d_conv=3, mamba_chunk_size=CHUNK,
              attention_bias=True, mlp_bias=True, mamba_proj_bias=True, time_step_limit=(0.02, 2.0))
MAMBA_LAYERS = 2


def save_bamba(directory, save_options=None, **overrides):
    config = transformers.BambaConfig(**{**CONFIG, **overrides})
    return save_random(transformers.BambaForCausalLM, config, directory, **(save_options or {}))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bamba")
    return directory, save_bamba(directory)


def test_logits_match_transformers(saved):
    directory, reference = saved
    model = mq_export.load(directory)
    assert type(model) is BambaLM
    assert [layer.kind for layer in model.model.layers] == ["mamba", "attention", "mamba", "attention"]
    for length in (CHUNK * 2 + 3, 30):
        ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected = reference(ids).logits
            assert relative_error(model(ids), expected) <= 1e-4


@pytest.mark.parametrize("save_options", [{}, {"max_shard_size": "20KB"}], ids=["one-file", "sharded"])
def test_tied_embeddings_full_rope_and_no_biases(tmp_path, save_options):
    """tie_word_embeddings: transformers writes no lm_head; RoPE over whole heads (rope_parameters'
    partial_rotary_factor 1), one attention head per kv head."""
    reference = save_bamba(tmp_path, save_options, tie_word_embeddings=True, num_key_value_heads=4,
                           attention_bias=False, mlp_bias=False, mamba_proj_bias=False,
                           rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0})
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(save_options)
    model = mq_export.load(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(model(ids), reference(ids).logits) <= 1e-4


def test_cli_export_runs_in_onnxruntime_like_transformers(saved, tmp_path):
    directory, reference = saved
    onnx_settings = assert_cli_export_matches(directory, tmp_path / "out", reference, MAMBA_LAYERS)
    assert onnx_settings["ssd_scan_spec"]["dt_max"] == CONFIG["time_step_limit"][1]


def test_python_api_export_runs_in_onnxruntime_like_transformers(saved, tmp_path):
    directory, reference = saved
    assert_api_export_matches(directory, tmp_path / "model.onnx", reference, MAMBA_LAYERS)


@pytest.mark.parametrize("settings, named", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "rope_parameters.rope_type"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.5}),
     "partial_rotary_factor"),
    (dict(attn_layer_indices=[1, 4]), "attn_layer_indices"),
    (dict(mamba_d_head=5), "mamba_n_heads × mamba_d_head"),
    (dict(mamba_n_groups=3), "mamba_n_groups 3 does not divide mamba_n_heads 8"),
    (dict(time_step_limit=[0.5, 0.1]), "time_step_limit"),
])
def test_unsupported_setting_is_one_line_naming_it(saved, tmp_path, settings, named):
    assert_load_refused(saved[0], tmp_path, settings, named)
