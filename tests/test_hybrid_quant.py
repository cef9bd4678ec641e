"""Quantizing the hybrid families (Nemotron-H, Bamba, Granite-4.0-H, Falcon-H1, Jamba) through the one
harness: each family's transform topology, every method's transforms FP-equivalent, the quantized
ONNX graphs equal to fake-quant in ONNX Runtime, MoE routers in floating point, and the one-line
refusals of the layers no topology covers yet."""
from __future__ import annotations

import dataclasses

import onnx
import pytest
import torch

import mq_export
from mq_export.export.onnx import export_onnx
from mq_export.models.attention import MLP, Attention, FusedGatedMLP
from mq_export.models.registry import family_of
from mq_export.models.topology import (FloatingPointLinear, GatedStream, HeadStream, LinearStream, NormedStream,
                                       OnlineStateStream, StateStream)
from mq_export.quant.calibrate import activation_sites, calibrate
from mq_export.quant.methods import QuantConfig
from mq_export.quant.quantize import quant_sites
from mq_export.quant.transforms import apply_transforms
from mq_export.runtime.ort import OrtForward, session
from tests.test_hybrid_nemotron_h import assert_one_line_refusal, save_random
from tests.test_transforms import _assert_same_outputs, lm_split

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is not installed")

VOCAB = 30     # lm_split's token range
# Small random configs whose rotated widths have Hadamard matrices (d_model 24, Mamba-2 inner width
# 48 in heads of 12 and states of 12, attention heads of 12 channels, MLP widths 20, Jamba's dt_rank
# 4), grouped-query attention (2 query heads per kv head), Mamba-2 B/C in 2 groups, biases where
# the family has them, every layer kind, and the families' multipliers away from 1.
FAMILIES = {
    "nemotron-h": ("NemotronH", dict(
        hidden_size=24, layers_block_type=["linear_attention", "full_attention", "mlp"], num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, intermediate_size=20, mamba_num_heads=4, mamba_head_dim=12, n_groups=2,
        ssm_state_size=12, conv_kernel=3, chunk_size=4, time_step_min=0.05, use_bias=True, mlp_bias=True)),
    "bamba": ("Bamba", dict(
        hidden_size=24, num_hidden_layers=2, attn_layer_indices=[1], num_attention_heads=4, num_key_value_heads=2,
        head_dim=12, intermediate_size=20, mamba_n_heads=4, mamba_n_groups=2, mamba_d_state=12, mamba_d_conv=3,
        mamba_chunk_size=4, attention_bias=True, mlp_bias=True, mamba_proj_bias=True, time_step_limit=(0.02, 2.0))),
    "granite-hybrid": ("GraniteMoeHybrid", dict(
        hidden_size=24, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], num_attention_heads=2,
        num_key_value_heads=1, shared_intermediate_size=20, num_local_experts=0, mamba_n_heads=4, mamba_n_groups=2,
        mamba_d_state=12, mamba_d_conv=3, mamba_chunk_size=4, position_embedding_type="rope", attention_bias=True,
        embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=2.5, attention_multiplier=0.3,
        tie_word_embeddings=True)),
    "falcon-h1": ("FalconH1", dict(
        hidden_size=24, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=20,
        mamba_d_ssm=48, mamba_n_heads=4, mamba_n_groups=2, mamba_d_state=12, mamba_d_conv=3, mamba_chunk_size=4,
        mamba_proj_bias=True, attention_bias=True, mlp_bias=True, embedding_multiplier=2.5, lm_head_multiplier=0.4,
        key_multiplier=0.7, attention_in_multiplier=1.3, attention_out_multiplier=0.6, ssm_in_multiplier=0.8,
        ssm_out_multiplier=1.4, mlp_multipliers=[0.9, 1.2], ssm_multipliers=[0.5, 1.5, 0.7, 1.3, 2.0])),
    "jamba": ("Jamba", dict(
        hidden_size=24, num_hidden_layers=3, attn_layer_period=3, attn_layer_offset=1, expert_layer_period=2,
        expert_layer_offset=1, num_experts=3, num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=20, mamba_d_state=7, mamba_d_conv=3, mamba_expand=2, mamba_dt_rank=4, mamba_proj_bias=True,
        rms_norm_eps=1e-5)),
}
# The MoE layers, each beside a Mamba-2 layer (Granite's also beside its shared MLP): Nemotron-H's
# 6 routed experts in 3 groups, 3 per token from its best 2 groups, weights scaled by 2.5, and a
# shared expert with biases; Granite's 4 SwiGLU experts, 2 per token, stacked in its files.
FAMILIES["nemotron-h-moe"] = ("NemotronH", {
    **FAMILIES["nemotron-h"][1], "layers_block_type": ["linear_attention", "moe"], "n_routed_experts": 6,
    "num_experts_per_tok": 3, "n_group": 3, "topk_group": 2, "moe_intermediate_size": 20,
    "moe_shared_expert_intermediate_size": 20, "routed_scaling_factor": 2.5})
FAMILIES["granite-moe"] = ("GraniteMoeHybrid", {
    **FAMILIES["granite-hybrid"][1], "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 20})
WITH_ROUTERS = {"jamba", "nemotron-h-moe", "granite-moe"}
TRANSFORMING = [("smoothquant", True), ("hadamard", True), ("mambaquant", True), ("mambaquant", False)]


def save_family(directory, family: str, **overrides):
    prefix, settings = FAMILIES[family]
    config = getattr(transformers, f"{prefix}Config")(vocab_size=VOCAB, **{**settings, **overrides})
    # transformers' default grouped-matmul experts need aligned sizes; the eager ones compute the same sum.
    config._experts_implementation = "eager"
    save_random(getattr(transformers, f"{prefix}ForCausalLM"), config, directory)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """family → (model loaded from a save_pretrained directory, its calibration statistics), made on
    first use."""
    cache = {}

    def get(family: str):
        if family not in cache:
            directory = tmp_path_factory.mktemp(family)
            save_family(directory, family)
            model = mq_export.load(directory)
            cache[family] = model, calibrate(model, lm_split(), selection_samples=2, quiet=True)
        return cache[family]
    return get


def online_rotation(mlp: MLP | FusedGatedMLP) -> str:
    """The name of the buffer holding an MLP's online rotation before its down projection."""
    return "down_proj_input_rotation" if isinstance(mlp, MLP) else "output_linear_input_rotation"


def stream_names(stream) -> tuple[list[str], list[str]]:
    """(module names, ActivationSite names) a stream refers to."""
    if isinstance(stream, LinearStream):
        return [*(w for w, _ in stream.writers), stream.reader, *([stream.norm] if stream.norm else [])], [stream.site]
    if isinstance(stream, HeadStream):
        return [stream.v_proj, stream.o_proj], [stream.site]
    if isinstance(stream, StateStream):
        return [stream.x_proj], [stream.b_site, stream.c_site]
    if isinstance(stream, OnlineStateStream):
        return [stream.mixer], [stream.b_site, stream.c_site]
    if isinstance(stream, GatedStream):
        return [stream.mixer, *([stream.norm] if stream.norm else [])], [f"{stream.mixer}.sites.out_proj"]
    assert isinstance(stream, NormedStream)
    return ([*stream.writers, *stream.embeddings, *(r.norm for r in stream.readers),
             *(name for r in stream.readers for name in r.linears)], [s for r in stream.readers for s in r.sites])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_topology_names_existing_modules_and_covers_every_site(loaded, family):
    model, _ = loaded(family)
    modules, sites = dict(model.named_modules()), set(activation_sites(model))
    named_sites = set()
    for stream in family_of(model).topology(model):
        names, stream_sites = stream_names(stream)
        assert set(names) <= set(modules) and set(stream_sites) <= sites, stream
        named_sites |= set(stream_sites)
    # Every site a transform can reach is in a stream; x_proj's input (Jamba's Mamba-1, behind
    # conv1d + SiLU) has nothing to fold into, as in the Mamba-1 LMs.
    assert named_sites == {s for s in sites if not s.endswith("sites.x_proj")}
    # Attention's one input site feeds q, k and v; an MLP's feeds gate and up.
    feeds = dict(quant_sites(model))
    for name, module in modules.items():
        if isinstance(module, Attention):
            assert feeds[f"{name}.sites.input"] == tuple(f"{name}.{p}" for p in ("q_proj", "k_proj", "v_proj"))
        elif isinstance(module, MLP):
            assert feeds[f"{name}.sites.input"] == tuple(f"{name}.{p}" for p in module.site_readers["input"])


@pytest.mark.parametrize("method, klt", TRANSFORMING)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_transforms_are_fp_equivalent(loaded, family, method, klt):
    model, stats = loaded(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    transformed, info = apply_transforms(model, stats, QuantConfig(method=method, klt=klt).transforms())
    _assert_same_outputs(model, transformed, lm_split(seed=3).inputs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model was mutated"
    rotated = method != "smoothquant"
    modules = dict(transformed.named_modules())
    for name, original in model.named_modules():
        if isinstance(original, Attention):      # v rows and o columns per head carry smoothing and rotation
            for linear in ("v_proj", "o_proj"):
                assert not torch.allclose(modules[name].get_submodule(linear).weight,
                                          original.get_submodule(linear).weight), (name, linear)
        elif isinstance(original, (MLP, FusedGatedMLP)):    # QuaRot's online rotation before the down projection
            assert (getattr(modules[name], online_rotation(original)) is not None) == rotated, name
    # What has no place in these models is reported, never silently skipped: the out_proj input's
    # S-SiLU where the gate is inside the scan (Falcon-H1's mixers without their gated RMSNorm);
    # smoothing behind Jamba's dt_layernorm when dt is rotated, and its B/C state smoothing (RMS-normalised).
    expected = {"falcon-h1": ["sites.out_proj: smoothing"] * 2,
                "jamba": ["sites.dt_proj: smoothing", "state smoothing"] * 2}.get(family, [])
    not_applied = info.get("not_applied", [])
    assert len(not_applied) == (len(expected) if method == "mambaquant" else 0)
    assert all(any(item in entry for entry in not_applied) for item in expected if method == "mambaquant")


def graph_initializers(path) -> set[str]:
    return {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer}


@pytest.mark.parametrize("family", ["nemotron-h", "jamba", "falcon-h1", "nemotron-h-moe", "granite-moe"])
def test_w8a8_export_matches_fake_quant_with_routers_in_floating_point(loaded, family, tmp_path):
    """Q/DQ at the fake-quant sites and integer weights for every Linear but the MoE routers (float
    initializers); the online down-projection rotations are MatMuls; ORT's logits equal fake-quant's.
    The MoEs (Jamba's, Nemotron-H's, Granite's): per-expert weights and sites; Falcon-H1: in_proj's
    section multipliers after its quantized weight."""
    model, stats = loaded(family)
    qmodel, settings = mq_export.quantize(model, stats, QuantConfig(method="mambaquant", calibrator="mse"), quiet=True)
    path = tmp_path / "w8a8.onnx"
    proto, info = export_onnx(qmodel, path)
    assert sorted(info.activation_sites) == sorted(settings["quantized_activation_sites"])
    assert sorted(info.quantized_weights) == sorted(f"{name}.weight" for name in settings["quantized_weights"])
    routers = [name for name, m in qmodel.named_modules() if isinstance(m, FloatingPointLinear)]
    assert bool(routers) == (family in WITH_ROUTERS)
    linears = [name for name, m in qmodel.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(settings["quantized_weights"]) == sorted(set(linears) - set(routers))
    assert all(not hasattr(qmodel.get_submodule(name), "weight_quant") for name in routers)
    assert ("attention scores, softmax and KV cache" in settings["floating_point"]) == any(
        isinstance(m, Attention) for m in qmodel.modules())
    assert ("MoE routers" in settings["floating_point"]) == bool(routers)
    assert {f"{name}.weight.T" for name in routers} <= graph_initializers(path)
    reads = {(node.op_type, name) for node in proto.graph.node for name in node.input}
    mlps = {name: m for name, m in qmodel.named_modules() if isinstance(m, (MLP, FusedGatedMLP))}
    assert mlps and all(("MatMul", f"{name}.{online_rotation(m)}") in reads for name, m in mlps.items())
    if family in WITH_ROUTERS:    # each expert its own weight scales and input site
        experts = [name for name in mlps if ".experts." in name]
        assert len(experts) > 1 and all(f"{name}.sites.{site}" in settings["quantized_activation_sites"]
                                        for name in experts for site in mlps[name].sites)
    x = lm_split(seed=4).inputs
    with torch.no_grad():
        fake_quant = qmodel(x)
    ort_logits = OrtForward(session(path))(x)
    # Not bit-equal: where a value lies within float error of a rounding boundary, ORT and PyTorch
    # round it to neighbouring codes (seen: one code of Nemotron-H's attention input after the
    # Mamba-2 layer, moving two tokens' logits by 1.3e-2 of the largest), as in the Mamba-2 models.
    assert float((ort_logits - fake_quant).norm() / fake_quant.norm()) < 1e-2
    assert (ort_logits.argmax(-1) == fake_quant.argmax(-1)).float().mean() > 0.95


def test_w4_gptq_quantizes_every_linear_but_routers(loaded):
    model, stats = loaded("jamba")
    qmodel, settings = mq_export.quantize(model, stats, QuantConfig(method="mambaquant", w_bits=4, calibrator="mse"),
                                          quiet=True)
    assert "GPTQ" in settings["weights"]
    quantized = [m for m in qmodel.modules() if hasattr(m, "weight_quant")]
    assert quantized and all(m.weight_quant.bits == 4 for m in quantized)
    assert not any(isinstance(m, FloatingPointLinear) for m in quantized)


def test_layers_without_a_topology_are_refused_in_one_line(loaded, tmp_path):
    """Nemotron-H's MoE layers with moe_latent_size (the routed experts in a latent stream between
    two projections) are refused before calibration, naming the layer; a rotation needs a Hadamard
    order of head_dim, and of a Granite expert's width (named as its config names it)."""
    save_family(tmp_path, "nemotron-h-moe", moe_latent_size=12)
    assert_one_line_refusal(lambda: QuantConfig(method="rtn").check_model(mq_export.load(tmp_path)),
                            r"quantizing Nemotron-H MoE layers with moe_latent_size \(backbone.layers.1.mixer\) "
                            r"is not supported yet")
    model, stats = loaded("nemotron-h")
    odd_heads = dataclasses.replace(model.cfg, attention=dataclasses.replace(model.cfg.attention, heads=8, kv_heads=4,
                                                                             head_dim=6))
    rebuilt = type(model)(odd_heads)
    odd_stats = calibrate(rebuilt, lm_split(), selection_samples=2, quiet=True)
    assert_one_line_refusal(lambda: apply_transforms(rebuilt, odd_stats, QuantConfig(method="hadamard").transforms()),
                            "head_dim 6 has no Hadamard matrix")
    model, _ = loaded("granite-moe")
    odd_experts = type(model)(dataclasses.replace(model.cfg, expert_hidden=13))
    odd_stats = calibrate(odd_experts, lm_split(), selection_samples=2, quiet=True)
    assert_one_line_refusal(lambda: apply_transforms(odd_experts, odd_stats, QuantConfig(method="hadamard").transforms()),
                            "(?<!shared_)intermediate_size 13 has no Hadamard matrix")
