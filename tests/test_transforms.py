"""Every transform leaves the FP model's outputs unchanged; seeds fix every random sign."""
import pytest
import torch

from mq_export.quant.calibrate import activation_sites, calibrate
from mq_export.load.data import Split
from mq_export.errors import MQExportError
from mq_export.quant.hadamard import hadamard_matrix, random_hadamard
from mq_export.models.mamba import (ClassifierConfig, LMConfig, MambaLMHeadModel, MambaSequenceClassifier, MixerConfig,
                             RMSNorm)
from mq_export.quant.methods import QuantConfig
from mq_export.quant.transforms import apply_transforms, klt_rotation
from mq_export.models.registry import family_of
from mq_export.models.topology import GatedStream, LinearStream, StateStream

CONFIGS = {
    "smoothquant": QuantConfig(method="smoothquant").transforms(),
    "hadamard": QuantConfig(method="hadamard").transforms(),
    "mambaquant": QuantConfig(method="mambaquant").transforms(),
    "mambaquant-noklt": QuantConfig(method="mambaquant", klt=False).transforms(),
}


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights with uneven channel scales, so smoothing and rotations do real work."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "A_log" in name:
                continue
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1:
                p.copy_(noise * 0.3 + (1.0 if "norm" in name else 0.0))
            else:
                channel_scale = torch.rand(p.shape[-1], generator=g).add(0.3)
                p.copy_(noise * channel_scale / p[0].numel() ** 0.5)
    return model.eval()


def small_classifier(d_model: int = 48, seed: int = 0) -> MambaSequenceClassifier:
    return _randomise(MambaSequenceClassifier(ClassifierConfig(MixerConfig(d_model, d_state=8, dt_rank=4),
                                                               n_layers=2, d_input=3)), seed)


def small_lm(d_model: int = 48, rms_norm: bool = True, seed: int = 0) -> MambaLMHeadModel:
    return _randomise(MambaLMHeadModel(LMConfig(MixerConfig(d_model, d_state=8, dt_rank=4), n_layer=2,
                                                vocab_size=30, rms_norm=rms_norm)), seed)


def classifier_split(n: int = 8, length: int = 12, seed: int = 1) -> Split:
    x = torch.randn(n, length, 3, generator=torch.Generator().manual_seed(seed)) * torch.tensor([1.0, 2.0, 0.3])
    return Split(f"synthetic-{seed}[0:{n}]", x, torch.zeros(n, dtype=torch.int64))


def lm_split(n: int = 6, length: int = 10, seed: int = 1) -> Split:
    ids = torch.randint(0, 30, (n, length), generator=torch.Generator().manual_seed(seed))
    return Split(f"tokens-{seed}[0:{n}]", ids, torch.zeros(n, dtype=torch.int64))


def _assert_same_outputs(a, b, x):
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert torch.allclose(ya, yb, rtol=1e-4, atol=1e-4 * float(ya.abs().max())), float((ya - yb).abs().max())


@pytest.mark.parametrize("d_model", [48, 64])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_classifier_transforms_are_fp_equivalent(name, d_model):
    model, split = small_classifier(d_model), classifier_split()
    stats = calibrate(model, split, selection_samples=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    transformed, info = apply_transforms(model, stats, CONFIGS[name])
    _assert_same_outputs(model, transformed, classifier_split(seed=2).inputs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model was mutated"
    if CONFIGS[name].rotation:
        assert isinstance(transformed.norm, RMSNorm)    # LayerNorm made rotation-invariant
        assert transformed.layers[1].out_proj_input_rotation.shape == (2 * d_model, 2 * d_model)
        assert any("out_proj_input_rotation" in item for item in info["online"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lm_transforms_are_fp_equivalent(name):
    model, split = small_lm(), lm_split()
    stats = calibrate(model, split, selection_samples=2)
    transformed, _ = apply_transforms(model, stats, CONFIGS[name])
    _assert_same_outputs(model, transformed, lm_split(seed=3).inputs)
    assert model.lm_head.weight is model.backbone.embedding.weight      # the input keeps its tie


def test_layernorm_lm_smoothing_is_fp_equivalent_and_rotation_refused():
    model, split = small_lm(rms_norm=False), lm_split()
    stats = calibrate(model, split, selection_samples=2)
    transformed, _ = apply_transforms(model, stats, CONFIGS["smoothquant"])
    _assert_same_outputs(model, transformed, lm_split(seed=3).inputs)
    with pytest.raises(MQExportError, match="RMSNorm"):
        apply_transforms(model, stats, CONFIGS["hadamard"])


def test_same_seed_gives_identical_weights_and_other_seeds_differ():
    model, split = small_classifier(), classifier_split()
    stats = calibrate(model, split, selection_samples=4)
    runs = [apply_transforms(model, stats, QuantConfig(method="mambaquant", seed=s).transforms())[0].state_dict() for s in (5, 5, 6)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.equal(runs[0]["layers.0.in_proj.weight"], runs[2]["layers.0.in_proj.weight"])


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 48, 96, 128, 160, 768])
def test_hadamard_orders(n):
    h = hadamard_matrix(n)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64)) and set(h.unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("n", [3, 6, 92])
def test_unsupported_hadamard_orders_fail_clearly(n):
    with pytest.raises(MQExportError, match=f"order {n}"):
        hadamard_matrix(n)


def test_rotations_are_orthogonal_and_seeded():
    x = torch.randn(500, 12, dtype=torch.float64) * torch.linspace(0.1, 5, 12, dtype=torch.float64)
    r1 = klt_rotation(x.T @ x / 500, torch.Generator().manual_seed(0))
    r2 = klt_rotation(x.T @ x / 500, torch.Generator().manual_seed(0))
    assert torch.equal(r1, r2)
    assert torch.allclose(r1 @ r1.T, torch.eye(12, dtype=torch.float64), atol=1e-12)
    h = random_hadamard(12, torch.Generator().manual_seed(0))
    assert torch.allclose(h @ h.T, torch.eye(12, dtype=torch.float64), atol=1e-12)



def _referenced(stream) -> tuple[list[str], list[str]]:
    """(module names, activation-site names) a topology stream refers to."""
    if isinstance(stream, LinearStream):
        return [w for w, _ in stream.writers] + [stream.reader], [stream.site]
    if isinstance(stream, StateStream):
        return [stream.x_proj], [stream.b_site, stream.c_site]
    if isinstance(stream, GatedStream):
        return [stream.mixer], [f"{stream.mixer}.sites.out_proj"]
    modules = [*stream.writers, *stream.embeddings, *(r.norm for r in stream.readers), *(r.reader for r in stream.readers)]
    return modules, [r.site for r in stream.readers]


@pytest.mark.parametrize("model", [small_classifier(), small_lm()], ids=["classifier", "lm"])
def test_topology_names_existing_modules_and_sites(model):
    """Each family's topology refers to modules and activation sites the model has."""
    modules, sites = dict(model.named_modules()), set(activation_sites(model))
    for stream in family_of(model).topology(model):
        names, site_names = _referenced(stream)
        assert set(names) <= set(modules) and set(site_names) <= sites, stream
