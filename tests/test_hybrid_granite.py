"""Granite-4.0-H, dense and MoE variants (Bamba's layout with μP-style multipliers, a fused gated
MLP and in the MoE variant a mixture of experts beside it), loaded from transformers'
save_pretrained directories: logits against transformers' own CPU forward in PyTorch and ONNX
Runtime, and the one-line refusals."""
from __future__ import annotations

import json

import pytest
import torch

import mq_export
from mq_export.models.granitemoehybrid import GraniteMoE, GraniteMoeHybridLM
from tests.test_hybrid_nemotron_h import (CHUNK, VOCAB, assert_api_export_matches, assert_cli_export_matches,
                                          assert_load_refused, edited_config, relative_error, save_random)

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is not installed")

# Odd sizes: 8 Mamba heads of 6 channels in 2 groups, a state of 7; 4 query heads of 6 channels
# sharing 2 kv heads with RoPE; every multiplier away from 1.
CONFIG = dict(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=4,
              layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
              num_attention_heads=4, num_key_value_heads=2, shared_intermediate_size=20, num_local_experts=0,
              mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=7, mamba_d_conv=3, mamba_chunk_size=CHUNK,
              position_embedding_type="rope", attention_bias=True, time_step_limit=(0.01, 3.0),
              embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=2.5, attention_multiplier=0.3,
              tie_word_embeddings=True)
MAMBA_LAYERS = 2
# The MoE variant: 5 experts of an odd width 13, 3 per token.
MOE = dict(num_local_experts=5, num_experts_per_tok=3, intermediate_size=13)


def save_granite(directory, **overrides):
    config = transformers.GraniteMoeHybridConfig(**{**CONFIG, **overrides})
    # transformers' default grouped-matmul experts need sizes aligned to 16 bytes; the eager ones
    # compute the same sum for any size.
    config._experts_implementation = "eager"
    return save_random(transformers.GraniteMoeHybridForCausalLM, config, directory)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("granite")
    return directory, save_granite(directory)


@pytest.fixture(scope="module")
def saved_moe(tmp_path_factory):
    directory = tmp_path_factory.mktemp("granite_moe")
    return directory, save_granite(directory, **MOE)


def assert_logits_match(directory, reference) -> GraniteMoeHybridLM:
    model = mq_export.load(directory)
    assert type(model) is GraniteMoeHybridLM
    ids = torch.randint(0, VOCAB, (2, CHUNK * 2 + 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(model(ids), reference(ids).logits) <= 1e-4
    return model


def test_logits_match_transformers(saved):
    model = assert_logits_match(*saved)
    assert model.lm_head.weight is model.model.embed_tokens.weight     # tie_word_embeddings
    assert all(layer.block_sparse_moe is None for layer in model.model.layers)


def test_moe_variant_logits_match_transformers(saved_moe):
    model = assert_logits_match(*saved_moe)
    assert all(type(layer.block_sparse_moe) is GraniteMoE for layer in model.model.layers)


def test_moe_variant_sharded_checkpoint_loads_with_the_files_stacked_expert_weights(saved_moe, tmp_path):
    """The files stack each MoE's expert weights (input_linear.weight: experts × 2·hidden × d_model):
    split into each expert's Linears when loading shards into a model built on the meta device,
    and stacked again under the files' names in state_dict(), which load_state_dict reads back."""
    from safetensors import safe_open    # installed with transformers
    _, reference = saved_moe
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1
    model = assert_logits_match(tmp_path, reference)
    assert not any(p.is_meta for p in model.parameters())
    state = model.state_dict()
    assert set(state) - {"lm_head.weight"} == set(weight_map)     # lm_head is tied to the embedding
    stacked = "model.layers.1.block_sparse_moe.output_linear.weight"
    with safe_open(str(tmp_path / weight_map[stacked]), framework="pt") as shard:
        assert torch.equal(state[stacked], shard.get_tensor(stacked))
    twin = GraniteMoeHybridLM(model.cfg)
    twin.load_state_dict(state)
    ids = torch.randint(0, VOCAB, (1, CHUNK + 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(twin(ids), model(ids))


def test_moe_variant_cli_export_runs_in_onnxruntime_like_transformers(saved_moe, tmp_path):
    directory, reference = saved_moe
    assert_cli_export_matches(directory, tmp_path / "out", reference, MAMBA_LAYERS)


def test_no_positional_encoding_and_legacy_layer_names(tmp_path):
    """position_embedding_type null: attention without RoPE; layer_types in the older spelling."""
    reference = save_granite(tmp_path, position_embedding_type=None, tie_word_embeddings=False)
    edited_config(tmp_path, layer_types=["mamba", "attention", "mamba", "attention"])
    assert_logits_match(tmp_path, reference)


def test_cli_export_runs_in_onnxruntime_like_transformers(saved, tmp_path):
    directory, reference = saved
    onnx_settings = assert_cli_export_matches(directory, tmp_path / "out", reference, MAMBA_LAYERS)
    assert onnx_settings["ssd_scan_spec"]["dt_min"] == CONFIG["time_step_limit"][0]


def test_python_api_export_runs_in_onnxruntime_like_transformers(saved, tmp_path):
    directory, reference = saved
    assert_api_export_matches(directory, tmp_path / "model.onnx", reference, MAMBA_LAYERS)


@pytest.mark.parametrize("settings, named", [
    (dict(num_local_experts=2, num_experts_per_tok=3), "num_experts_per_tok 3 is more than num_local_experts 2"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(position_embedding_type="alibi"), "position_embedding_type"),
    (dict(layer_types=["linear_attention", "sliding_attention", "linear_attention", "full_attention"]),
     "unknown layer types"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}), "rope_parameters.rope_type"),
])
def test_unsupported_setting_is_one_line_naming_it(saved, tmp_path, settings, named):
    assert_load_refused(saved[0], tmp_path, settings, named)
