"""Quantizing Mamba-2: every method through the one harness, FP-equivalent transforms on models
with grouped B/C (ngroups 2) and heads of a non-power-of-two width, the quant sites, what stays
online, and the W8A8 ONNX graphs (full and decode) against fake-quant."""
from __future__ import annotations

import pytest
import torch

import mq_export
from mq_export.export.decode import export_decode
from mq_export.export.onnx import export_onnx
from mq_export.models.mamba2 import Mamba2LM, Mamba2LMConfig, Mamba2MixerConfig
from mq_export.models.registry import family_of
from mq_export.models.topology import GatedStream, LinearStream, NormedStream, OnlineStateStream
from mq_export.quant.calibrate import activation_sites, calibrate
from mq_export.quant.methods import QuantConfig
from mq_export.quant.transforms import TransformConfig, apply_transforms
from mq_export.runtime.decode import check_decode
from mq_export.runtime.ort import OrtForward, session
from tests.test_transforms import _assert_same_outputs, _randomise, lm_split

METHODS = ["rtn", "smoothquant", "hadamard", "mambaquant"]
SITES = ("in_proj", "out_proj", "scan_B", "scan_C")


# Beyond the default (gated RMSNorm, tied embeddings): mamba-ssm's gated MLP after each mixer with
# D per channel and untied embeddings; no gated RMSNorm (the SiLU(z) gate inside the scan op).
VARIANTS = {"default": {}, "mlp": {"d_intermediate": 40, "D_has_hdim": True, "tie_embeddings": False},
            "no-norm": {"rmsnorm": False}}


def small_mamba2(seed: int = 0, d_intermediate: int = 0, tie_embeddings: bool = True, **mixer) -> Mamba2LM:
    """d_model 24, d_inner 48 and d_state 12 (Hadamard orders, none a power of two), 4 heads of
    12 channels, 2 groups of B/C, so every per-group and per-head index is exercised."""
    mixer_cfg = Mamba2MixerConfig(24, d_state=12, headdim=12, ngroups=2, **mixer)
    return _randomise(Mamba2LM(Mamba2LMConfig(mixer_cfg, n_layer=2, vocab_size=30, tie_embeddings=tie_embeddings,
                                              d_intermediate=d_intermediate)), seed)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("method, klt", [("smoothquant", True), ("hadamard", True), ("mambaquant", True),
                                         ("mambaquant", False)])
def test_transforms_are_fp_equivalent(method, klt, variant):
    model = small_mamba2(**VARIANTS[variant])
    stats = calibrate(model, lm_split(), selection_samples=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    transformed, info = apply_transforms(model, stats, QuantConfig(method=method, klt=klt).transforms())
    _assert_same_outputs(model, transformed, lm_split(seed=3).inputs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model was mutated"
    mixer, original = transformed.backbone.layers[1].mixer, model.backbone.layers[1].mixer
    rotated, smoothed = method != "smoothquant", method != "hadamard"
    # What has no place in the model is reported, never silently skipped: a rotation of the MLP's
    # fc2 input (behind its SiLU gate), a smoothing of out_proj's input when the gate is in the scan.
    left_out = {"default": [], "mlp": ["mlp.sites.fc2: rotation"] * rotated,
                "no-norm": ["mixer.sites.out_proj: smoothing"] * (method == "mambaquant")}[variant]
    assert len(info.get("not_applied", [])) == 2 * len(left_out)
    assert all(any(item in entry for item in left_out) for entry in info.get("not_applied", []))
    assert (mixer.out_proj_input_rotation is not None) == rotated
    if rotated:
        assert mixer.out_proj_input_rotation.shape == (48, 48)
    if variant != "no-norm":   # out_proj's input smoothing lives in the gated RMSNorm's weight
        assert torch.equal(mixer.norm.weight, original.norm.weight) != smoothed
    if variant == "mlp":       # fc2's input smoothing: fc1's value rows / s, fc2's columns · s
        fc2, original_fc2 = transformed.backbone.layers[1].mlp.fc2, model.backbone.layers[1].mlp.fc2
        # (the residual stream's rotation mixes fc2's rows, which keeps each column's norm)
        column_scale = fc2.weight.double().norm(dim=0) / original_fc2.weight.double().norm(dim=0)
        assert torch.allclose(column_scale, torch.ones_like(column_scale)) != smoothed
    # h·C's smoothing and rotation: the online state scale (per group and state channel) and one
    # orthogonal rotation of the state dimension.
    assert (mixer.state_scale is not None) == (mixer.state_rotation is not None) == (method == "mambaquant")
    if method == "mambaquant":
        assert mixer.state_scale.shape == (2 * 12,) and bool((mixer.state_scale > 0).all())
        r = mixer.state_rotation.double()
        assert r.shape == (12, 12) and torch.allclose(r @ r.T, torch.eye(12, dtype=torch.float64), atol=1e-6)
        assert info["online_kinds"] == ["state scale", "state rotation", "rotation"]


def test_state_smoothing_balances_b_and_c():
    """C·s and B/s with s = √(max|B| / max|C|) per group and state channel: afterwards B's and C's
    per-channel ranges are equal (what the per-tensor quantizers of both then share)."""
    model = small_mamba2()
    stats = calibrate(model, lm_split(), selection_samples=2)
    transformed, _ = apply_transforms(model, stats, TransformConfig(smooth_state=True))
    _assert_same_outputs(model, transformed, lm_split(seed=3).inputs)
    after = calibrate(transformed, lm_split(), selection_samples=2).sites
    for i in range(2):
        b, c = (after[f"backbone.layers.{i}.mixer.sites.{k}"].absmax for k in ("scan_B", "scan_C"))
        assert torch.allclose(b, c, rtol=1e-4), (b, c)
        raw = stats.sites[f"backbone.layers.{i}.mixer.sites.scan_B"].absmax
        assert not torch.allclose(raw, b, rtol=1e-2)        # the scales did change B


def test_topology_names_existing_modules_and_sites():
    model = small_mamba2(**VARIANTS["mlp"])
    modules, sites = dict(model.named_modules()), set(activation_sites(model))
    streams = family_of(model).topology(model)
    assert [type(s) for s in streams] == [OnlineStateStream, GatedStream] * 2 + [LinearStream] * 2 + [NormedStream]
    assert len(streams[-1].readers) == 5 and len(streams[-1].writers) == 4   # in_proj/fc1 ×2 + lm_head; out_proj/fc2 ×2
    for stream in streams:
        if isinstance(stream, OnlineStateStream):
            names, site_names = [stream.mixer], [stream.b_site, stream.c_site]
        elif isinstance(stream, GatedStream):
            names, site_names = [stream.mixer, stream.norm], [f"{stream.mixer}.sites.out_proj"]
        elif isinstance(stream, LinearStream):
            names, site_names = [*(w for w, _ in stream.writers), stream.reader], [stream.site]
        else:
            names = [*stream.writers, *stream.embeddings, *(r.norm for r in stream.readers),
                     *(r.reader for r in stream.readers)]
            site_names = [r.site for r in stream.readers]
        assert set(names) <= set(modules) and set(site_names) <= sites, stream


@pytest.mark.parametrize("method, w_bits", [(method, 8) for method in METHODS] + [("rtn", 4), ("mambaquant", 4)])
def test_quantizes_with_every_method(method, w_bits):
    model = small_mamba2(**VARIANTS["mlp"])
    stats = calibrate(model, lm_split(n=8), selection_samples=2, quiet=True)
    qmodel, settings = mq_export.quantize(model, stats, QuantConfig(method=method, w_bits=w_bits, calibrator="mse"),
                                           quiet=True)
    expected_sites = ([f"backbone.layers.{i}.mixer.sites.{k}" for i in range(2) for k in SITES]
                      + [f"backbone.layers.{i}.mlp.sites.{k}" for i in range(2) for k in ("fc1", "fc2")]
                      + ["sites.lm_head"])
    assert sorted(settings["quantized_activation_sites"]) == sorted(expected_sites)
    assert all(qmodel.get_submodule(name).quantizer is not None for name in expected_sites)
    linears = ([f"backbone.layers.{i}.{k}" for i in range(2) for k in ("mixer.in_proj", "mixer.out_proj",
                                                                       "mlp.fc1", "mlp.fc2")] + ["lm_head"])
    assert sorted(settings["quantized_weights"]) == sorted(linears)
    assert all(qmodel.get_submodule(name).weight_quant.bits == w_bits for name in linears)
    # What stays online is what the transforms inserted: no gate scale in Mamba-2 (the norm holds it).
    online = [item for item in settings["floating_point"] if item.startswith("online")]
    assert online == {"rtn": [], "smoothquant": [], "hadamard": ["online rotation"],
                      "mambaquant": ["online state scale, state rotation and rotation"]}[method]
    x = lm_split(seed=3).inputs
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    # Random weights with uneven channel scales, rows of 24 or 48 weights: ‖Δ‖/‖FP‖ was 8-11 % at
    # W8 and 39-43 % at W4 across the methods.
    assert float((out - ref).norm() / ref.norm()) < {8: 0.2, 4: 0.6}[w_bits]


def test_w8a8_export_matches_fake_quant(tmp_path):
    """Q/DQ at the same sites as fake-quant; the online rotations and state scale are standard ops
    (MatMul, Div, Mul) reading their initializers; ORT's logits equal fake-quant's."""
    model = small_mamba2(**VARIANTS["mlp"])
    stats = calibrate(model, lm_split(n=8), selection_samples=2, quiet=True)
    qmodel, settings = mq_export.quantize(model, stats, QuantConfig(method="mambaquant"), quiet=True)
    proto, info = export_onnx(qmodel, tmp_path / "w8a8.onnx")
    assert info.ssd_scan_nodes == 2
    assert sorted(info.activation_sites) == sorted(settings["quantized_activation_sites"])
    assert sorted(info.quantized_weights) == sorted(f"{name}.weight" for name in settings["quantized_weights"])
    reads = {(node.op_type, name) for node in proto.graph.node for name in node.input}
    for i in range(2):
        mixer = f"backbone.layers.{i}.mixer"
        assert {("MatMul", f"{mixer}.out_proj_input_rotation"), ("Div", f"{mixer}.state_scale"),
                ("Mul", f"{mixer}.state_scale"), ("MatMul", f"{mixer}.state_rotation")} <= reads
    x = lm_split(seed=4).inputs
    with torch.no_grad():
        fake_quant = qmodel(x)
    ort_logits = OrtForward(session(tmp_path / "w8a8.onnx"))(x)
    assert float((ort_logits - fake_quant).abs().max() / fake_quant.abs().max()) < 1e-3
    assert (ort_logits.argmax(-1) == fake_quant.argmax(-1)).float().mean() > 0.95


def test_w8a8_decode_graphs_equal_fake_quant(tmp_path):
    """The online transforms and Q/DQ are in the prefill and step graphs too: decoding token by
    token in ORT gives fake-quant PyTorch's logits."""
    model = small_mamba2()
    stats = calibrate(model, lm_split(n=8), selection_samples=2, quiet=True)
    qmodel, _ = mq_export.quantize(model, stats, QuantConfig(method="mambaquant"), quiet=True)
    token_ids = lm_split(seed=4).inputs
    result = check_decode(qmodel, export_decode(qmodel, tmp_path), token_ids, prefix=4)
    with torch.no_grad():
        scale = float(qmodel(token_ids).abs().max())
    assert result["max_abs_error_vs_pytorch"] <= 1e-4 * scale
    assert result["argmax_agreement_vs_pytorch"] == 1.0
