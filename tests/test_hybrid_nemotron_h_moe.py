"""Nemotron-H's mixture-of-experts layers (`E` / "moe"; NVIDIA Nemotron-3-Nano) loaded from
transformers' save_pretrained directories (one file or sharded): logits against transformers' own
CPU forward in PyTorch, in stateful decoding and, exported through the CLI, in ONNX Runtime; the
one-line refusals of MoE settings this package does not support."""
from __future__ import annotations

import pytest
import torch

import mq_export
from mq_export.models.nemotron_h import NemotronHLM, NemotronHMoE
from mq_export.runtime.decode import TorchDecoder, generate
from tests.test_hybrid_nemotron_h import (CHUNK, CONFIG, VOCAB, assert_cli_export_matches, assert_load_refused,
                                          copied_checkpoint, relative_error, save_random)

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is not installed")

# Every layer kind, MoE twice: 6 routed experts of an odd width 11 in 3 groups of 2, a token's 3
# experts picked from its best 2 groups (group-limited routing), weights renormalised and scaled
# by 2.5; one shared expert of width 13 with biases (mlp_bias).
PATTERN = "ME*-EM"
MOE = dict(layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "moe", "linear_attention"],
           n_routed_experts=6, num_experts_per_tok=3, n_group=3, topk_group=2, moe_intermediate_size=11,
           moe_shared_expert_intermediate_size=13, routed_scaling_factor=2.5, norm_topk_prob=True)
MAMBA_LAYERS = 2


def save_nemotron_h_moe(directory, **overrides):
    config = transformers.NemotronHConfig(**{**CONFIG, **MOE, **overrides})
    # transformers' default grouped-matmul experts need sizes aligned to 16 bytes; the eager ones
    # compute the same sum for any size.
    config._experts_implementation = "eager"
    reference = save_random(transformers.NemotronHForCausalLM, config, directory)
    # save_random perturbs parameters; the routers' e_score_correction_bias is a buffer (zero as
    # initialised), set here so that it steers the picks, and saved again.
    with torch.no_grad():
        for name, buffer in reference.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.3 * torch.randn_like(buffer))
    reference.save_pretrained(directory)
    return reference


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("nemotron_h_moe")
    return directory, save_nemotron_h_moe(directory)


def logits_error(model, reference, length: int = 2 * CHUNK + 3) -> float:
    """The relative error of `model`'s logits against transformers' (batch 2, `length`)."""
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        return relative_error(model(ids), reference(ids).logits)


def test_logits_match_transformers(saved):
    directory, reference = saved
    model = mq_export.load(directory)
    assert type(model) is NemotronHLM
    assert [type(layer.mixer).__name__ for layer in model.backbone.layers] == \
        ["Mamba2Mixer", "NemotronHMoE", "Attention", "MLP", "NemotronHMoE", "Mamba2Mixer"]
    for length in (2 * CHUNK + 3, 30):
        assert logits_error(model, reference, length) <= 1e-4


def test_hybrid_override_pattern_spells_moe_layers_e(saved, tmp_path):
    directory, reference = saved
    pattern = copied_checkpoint(directory, tmp_path, layers_block_type=None, hybrid_override_pattern=PATTERN)
    assert logits_error(mq_export.load(pattern), reference) <= 1e-4


def test_group_limit_and_correction_bias_change_the_picks(saved, tmp_path):
    """With every group kept (topk_group = n_group), or without the correction biases, the picks
    and so the logits differ from transformers': the comparisons above exercise both."""
    directory, reference = saved
    every_group = copied_checkpoint(directory, tmp_path, topk_group=MOE["n_group"])
    assert logits_error(mq_export.load(every_group), reference) > 1e-3
    model = mq_export.load(directory)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.zero_()
    assert logits_error(model, reference) > 1e-3


@pytest.mark.parametrize("overrides", [
    dict(moe_latent_size=9),                                                # experts on a latent projection
    dict(n_routed_experts=5, n_group=1, topk_group=1, norm_topk_prob=False, mlp_hidden_act="silu"),
])
def test_moe_variants_match_transformers(tmp_path, overrides):
    reference = save_nemotron_h_moe(tmp_path, **overrides)
    model = mq_export.load(tmp_path)
    moe = model.backbone.layers[1].mixer
    assert isinstance(moe, NemotronHMoE) and len(moe.experts) == reference.config.n_routed_experts
    assert logits_error(model, reference) <= 1e-4


def test_sharded_checkpoint_loads(saved, tmp_path):
    """Sharded files load into a model built on the meta device: the routers' correction biases
    (buffers, not parameters) are filled in too."""
    _, reference = saved
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = mq_export.load(tmp_path)
    assert all(not buffer.is_meta for buffer in model.buffers())
    assert logits_error(model, reference) <= 1e-4


def test_cli_export_runs_in_onnxruntime_like_transformers(saved, tmp_path):
    directory, reference = saved
    assert_cli_export_matches(directory, tmp_path / "out", reference, MAMBA_LAYERS)


def test_stateful_decoding_matches_transformers(saved):
    """MoE layers carry no decode state: greedy decoding with the other layers' state (prefill,
    then one token a step) gives transformers' full-forward logits on the generated sequence."""
    directory, reference = saved
    prompt = torch.randint(0, VOCAB, (2 * CHUNK + 3,), generator=torch.Generator().manual_seed(1))
    tokens, logits = generate(TorchDecoder(mq_export.load(directory)), prompt, 64, VOCAB)
    with torch.no_grad():
        expected = reference(torch.cat([prompt, torch.tensor(tokens[:-1])])[None]).logits[0, len(prompt) - 1:]
    assert relative_error(logits, expected) <= 1e-4


@pytest.mark.parametrize("settings, named", [
    (dict(n_group=4), "n_group 4 does not split n_routed_experts 6"),
    (dict(n_group=6, topk_group=3), "n_group 6 does not split n_routed_experts 6 into equal groups of at least two"),
    (dict(topk_group=4), "topk_group 4 is more than n_group 3"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok 5 is more than the 4 experts"),
    (dict(moe_latent_size=0), "moe_latent_size is 0"),
    (dict(routed_scaling_factor=-1), "routed_scaling_factor"),
])
def test_unsupported_moe_setting_is_one_line_naming_it(saved, tmp_path, settings, named):
    assert_load_refused(saved[0], tmp_path, settings, named)
