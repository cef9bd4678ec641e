"""Jamba (Mamba-1 / attention decoder layers, each with a SwiGLU MLP or a mixture of experts)
loaded from transformers' save_pretrained directories: logits against transformers' own CPU
forward in PyTorch and ONNX Runtime, the dense variant with tied embeddings, and the one-line
refusals."""
from __future__ import annotations

import json
from collections import Counter

import onnx
import pytest
import torch

import mq_export
from mq_export.commands.cli import main
from mq_export.models.attention import MLP
from mq_export.models.jamba import JambaLM, JambaMambaMixer, SparseMoE
from tests.test_hybrid_nemotron_h import VOCAB, assert_load_refused, assert_ort_matches, relative_error, save_random

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is not installed")

# Odd sizes: hidden 20, an inner width of 40 with a state of 7, dt_rank 3, d_conv 3; 4 query heads
# of 5 channels sharing 2 kv heads; attention at layers 1 and 4 of 5 (period 3, offset 1), MoE of 3
# experts (2 per token) at layers 1 and 3 (period 2, offset 1): every pairing of mixer and
# feed-forward kind occurs.
CONFIG = dict(vocab_size=VOCAB, hidden_size=20, num_hidden_layers=5, attn_layer_period=3, attn_layer_offset=1,
              expert_layer_period=2, expert_layer_offset=1, num_experts=3, num_experts_per_tok=2,
              num_attention_heads=4, num_key_value_heads=2, intermediate_size=14, mamba_d_state=7, mamba_d_conv=3,
              mamba_expand=2, mamba_dt_rank=3, mamba_proj_bias=True, rms_norm_eps=1e-5)
MAMBA_LAYERS = 3


def save_jamba(directory, **overrides):
    config = transformers.JambaConfig(**{**CONFIG, **overrides})
    # transformers' default grouped-matmul experts need sizes aligned to 16 bytes; the eager ones
    # compute the same sum for any size.
    config._experts_implementation = "eager"
    return save_random(transformers.JambaForCausalLM, config, directory)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("jamba")
    return directory, save_jamba(directory)


def test_logits_match_transformers(saved):
    directory, reference = saved
    model = mq_export.load(directory)
    assert type(model) is JambaLM
    layers = model.model.layers
    assert [layer.kind for layer in layers] == ["mamba", "attention", "mamba", "mamba", "attention"]
    assert all(type(layer.mamba) is JambaMambaMixer for layer in layers if layer.kind == "mamba")
    assert [type(layer.feed_forward) for layer in layers] == [MLP, SparseMoE, MLP, SparseMoE, MLP]
    for length in (11, 30):
        ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            assert relative_error(model(ids), reference(ids).logits) <= 1e-4


def test_dense_tied_auto_rank_no_biases(tmp_path):
    """num_experts 1: every layer has the plain MLP; transformers writes no lm_head when tied."""
    reference = save_jamba(tmp_path, num_experts=1, tie_word_embeddings=True, mamba_dt_rank="auto",
                           mamba_proj_bias=False, mamba_conv_bias=False, num_key_value_heads=4)
    model = mq_export.load(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(type(layer.feed_forward) is MLP for layer in model.model.layers)
    ids = torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(model(ids), reference(ids).logits) <= 1e-4


def assert_selective_scan_graph(path, scan_nodes: int) -> None:
    """One graph: `scan_nodes` SelectiveScan nodes of the project domain and no SSDScan, attention
    and the experts' routing as standard ONNX ops, batch and length dynamic."""
    model = onnx.load(str(path))
    ops = Counter((node.domain, node.op_type) for node in model.graph.node)
    assert ops[("mq_export", "SelectiveScan")] == scan_nodes
    assert {domain for domain, _ in ops} == {"", "mq_export"} and ops[("mq_export", "SSDScan")] == 0
    assert ops[("", "Softmax")] >= 1 and ops[("", "TopK")] >= 1
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim] == ["batch", "length"]


def test_cli_export_runs_in_onnxruntime_like_transformers(saved, tmp_path):
    directory, reference = saved
    out = tmp_path / "out"
    assert main(["export", str(directory), "-o", str(out), "--method", "none", "--json"]) == 0
    onnx_settings = json.loads((out / "report.json").read_text())["settings"]["onnx"]
    assert (onnx_settings["scan_nodes"], onnx_settings["ssd_scan_nodes"]) == (MAMBA_LAYERS, 0)
    assert_selective_scan_graph(out / "model.onnx", MAMBA_LAYERS)
    assert_ort_matches(out / "model.onnx", reference)


def test_python_api_export_runs_in_onnxruntime_like_transformers(saved, tmp_path):
    """load → export_onnx, the scans run by the graph's own SelectiveScan function bodies."""
    directory, reference = saved
    path = tmp_path / "model.onnx"
    assert mq_export.export_onnx(mq_export.load(directory), path)["scan_nodes"] == MAMBA_LAYERS
    assert_ort_matches(path, reference, batch=1, length=17, scan="function_body")


@pytest.mark.parametrize("settings, named", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(sliding_window=16), "sliding_window"),
    (dict(attn_layer_offset=3), "attn_layer_offset 3 is not below attn_layer_period 3"),
    (dict(expert_layer_period=0), "expert_layer_period"),
    (dict(num_experts_per_tok=4), "num_experts_per_tok 4 is more than num_experts 3"),
    (dict(num_key_value_heads=3), "num_key_value_heads 3"),
])
def test_unsupported_setting_is_one_line_naming_it(saved, tmp_path, settings, named):
    assert_load_refused(saved[0], tmp_path, settings, named)
