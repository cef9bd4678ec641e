"""FalconMamba through the model-family adapter: transformers parity (PyTorch and ONNX Runtime),
FP-equivalent transforms for every method, a W8A8 export equal to fake-quant, decode graphs."""
from __future__ import annotations

import pytest
import torch

import mq_export
from mq_export.export.decode import export_decode
from mq_export.export.onnx import export_onnx
from mq_export.models.falcon_mamba import FalconMambaLM, FalconMambaMixerConfig
from mq_export.models.mamba import LMConfig
from mq_export.quant.calibrate import calibrate
from mq_export.quant.methods import QuantConfig
from mq_export.quant.transforms import apply_transforms
from mq_export.runtime.decode import check_decode
from mq_export.runtime.ort import OrtForward, session
from tests.test_transforms import _assert_same_outputs, _randomise, lm_split

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is not installed")

VOCAB = 51


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """transformers' FalconMambaForCausalLM on a small random config with odd sizes, saved with
    save_pretrained and loaded back with mq_export.load."""
    torch.manual_seed(0)
    cfg = transformers.FalconMambaConfig(vocab_size=VOCAB, hidden_size=40, state_size=6, num_hidden_layers=3,
                                         expand=2, conv_kernel=4, time_step_rank=5, mixer_rms_eps=1e-5)
    reference = transformers.FalconMambaForCausalLM(cfg).eval()
    with torch.no_grad():   # Δ biases of both signs, so the norms' outputs move the decay
        for layer in reference.backbone.layers:
            layer.mixer.dt_proj.bias.normal_(-1, 1.5)
    directory = tmp_path_factory.mktemp("falcon_mamba")
    reference.save_pretrained(directory)
    return reference, mq_export.load(directory)


@pytest.fixture(scope="module")
def token_ids():
    return torch.randint(0, VOCAB, (3, 23), generator=torch.Generator().manual_seed(1))


def test_loads_as_falcon_mamba(hf_pair):
    _, ours = hf_pair
    assert type(ours) is FalconMambaLM
    mixer = ours.backbone.layers[0].mixer.cfg
    assert (mixer.d_model, mixer.d_state, mixer.rank, mixer.rms_eps) == (40, 6, 5, 1e-5)


def test_logits_match_transformers_in_pytorch_and_onnxruntime(hf_pair, token_ids, tmp_path):
    reference, ours = hf_pair
    with torch.no_grad():
        expected = reference(token_ids).logits
        torch_logits = ours(token_ids)
    assert _relative_error(torch_logits, expected) <= 1e-4
    proto, info = export_onnx(ours, tmp_path / "model.onnx")
    assert info.scan_nodes == 3
    ort_logits = OrtForward(session(tmp_path / "model.onnx"))(token_ids)
    assert _relative_error(ort_logits, expected) <= 1e-4


def small_falcon(seed: int = 0) -> FalconMambaLM:
    """Widths with Hadamard matrices (d_model 48, d_inner 96, dt_rank 4), an odd state size."""
    mixer = FalconMambaMixerConfig(48, d_state=6, dt_rank=4, rms_eps=1e-5)
    return _randomise(FalconMambaLM(LMConfig(mixer, n_layer=2, vocab_size=30)), seed)


@pytest.mark.parametrize("method, klt", [("smoothquant", True), ("hadamard", True), ("mambaquant", True),
                                         ("mambaquant", False)])
def test_transforms_are_fp_equivalent(method, klt):
    model = small_falcon()
    stats = calibrate(model, lm_split(), selection_samples=2)
    transformed, info = apply_transforms(model, stats, QuantConfig(method=method, klt=klt).transforms())
    _assert_same_outputs(model, transformed, lm_split(seed=3).inputs)
    # Smoothing cannot pass the weight-free RMSNorms on dt, B and C: the report says it was left out.
    not_applied = info.get("not_applied", [])
    assert any("sites.dt_proj" in item for item in not_applied) == (method != "hadamard")
    assert any("scan_B" in item for item in not_applied) == (method == "mambaquant")


def test_dt_rotation_is_applied():
    """The dt stream is rotated (the RMSNorm commutes with it): x_proj's dt rows change."""
    model = small_falcon()
    stats = calibrate(model, lm_split(), selection_samples=2)
    transformed, _ = apply_transforms(model, stats, QuantConfig(method="hadamard").transforms())
    before = model.backbone.layers[0].mixer.x_proj.weight[:4]
    after = transformed.backbone.layers[0].mixer.x_proj.weight[:4]
    assert not torch.allclose(before, after, atol=1e-3)


@pytest.mark.parametrize("method", ["rtn", "smoothquant", "hadamard", "mambaquant"])
def test_quantizes_with_every_method(method):
    model = small_falcon()
    stats = calibrate(model, lm_split(n=8), selection_samples=2, quiet=True)
    qmodel, _ = mq_export.quantize(model, stats, QuantConfig(method=method), quiet=True)
    x = lm_split(seed=3).inputs
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    sites = [m for name, m in qmodel.named_modules() if name.split(".")[-2:-1] == ["sites"]]
    assert type(qmodel) is FalconMambaLM and sites and all(m.quantizer is not None for m in sites)
    # W8A8 on random weights with uneven channel scales: 16-23 % (‖Δ‖/‖FP‖) across the methods.
    assert float((out - ref).norm() / ref.norm()) < 0.3


def test_w8a8_export_matches_fake_quant(tmp_path):
    model = small_falcon()
    stats = calibrate(model, lm_split(n=8), selection_samples=2, quiet=True)
    qmodel, _ = mq_export.quantize(model, stats, QuantConfig(method="mambaquant"), quiet=True)
    _, info = export_onnx(qmodel, tmp_path / "w8a8.onnx")
    assert info.activation_sites and info.quantized_weights
    x = lm_split(seed=4).inputs
    with torch.no_grad():
        fake_quant = qmodel(x)
    ort_logits = OrtForward(session(tmp_path / "w8a8.onnx"))(x)
    assert _relative_error(ort_logits, fake_quant) < 1e-3
    assert (ort_logits.argmax(-1) == fake_quant.argmax(-1)).float().mean() > 0.95


def test_decode_graphs_equal_full_forward(hf_pair, token_ids, tmp_path):
    _, ours = hf_pair
    with torch.no_grad():   # PyTorch: state carried over steps equals the full sequence
        full = ours(token_ids)
        logits, state = ours(token_ids[:, :5], ours.zero_state(3))
        pieces = [logits]
        for t in range(5, token_ids.shape[1]):
            logits, state = ours(token_ids[:, t:t + 1], state)
            pieces.append(logits)
    assert _relative_error(torch.cat(pieces, 1), full) <= 1e-5
    result = check_decode(ours, export_decode(ours, tmp_path), token_ids, prefix=5)
    assert result["max_abs_error_vs_pytorch"] <= 1e-4 * float(full.abs().max())
    assert result["argmax_agreement_vs_pytorch"] == 1.0
