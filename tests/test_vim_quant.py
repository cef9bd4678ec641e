"""Vision Mamba through the quantize stage: every transform FP-exact on both scan directions."""
import numpy as np
import pytest
import torch

from mq_export.load.data import Split
from mq_export.models.registry import family_of
from mq_export.models.vim import BiMixerConfig, VimConfig, VisionMamba
from mq_export.quant.calibrate import activation_sites, calibrate
from mq_export.quant.methods import QuantConfig
from mq_export.quant.quantize import quantize
from mq_export.quant.transforms import apply_transforms
from mq_export.export.onnx import export_onnx
from mq_export.runtime.ort import session

from .test_transforms import _assert_same_outputs, _randomise, _referenced

CONFIGS = {"smoothquant": QuantConfig(method="smoothquant").transforms(),
           "hadamard": QuantConfig(method="hadamard").transforms(),
           "mambaquant": QuantConfig(method="mambaquant").transforms(),
           "mambaquant-noklt": QuantConfig(method="mambaquant", klt=False).transforms()}


def small_vim(readout: str = "middle", seed: int = 0) -> VisionMamba:
    cfg = VimConfig(mixer=BiMixerConfig(d_model=32, d_state=8, dt_rank=4), depth=2, image_size=12, patch_size=4,
                    stride=4, in_chans=1, n_classes=5, readout=readout)
    return _randomise(VisionMamba(cfg), seed)


def images(n: int = 8, seed: int = 1) -> Split:
    x = torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))
    return Split(f"images-{seed}[0:{n}]", x, torch.zeros(n, dtype=torch.int64))


def test_topology_names_existing_modules_sites_and_tables():
    model = small_vim()
    modules, sites = dict(model.named_modules()), set(activation_sites(model))
    streams = family_of(model).topology(model)
    for stream in streams:
        names, site_names = _referenced(stream)
        tables = set(getattr(stream, "embeddings", ()))
        assert set(names) - tables <= set(modules) and set(site_names) <= sites, stream
        assert all(isinstance(model.get_parameter(t), torch.nn.Parameter) for t in tables)
    # both directions' dt and state streams, the shared gate, the residual stream
    assert {"layers.0.mixer.sites.dt_proj", "layers.0.mixer.sites.dt_proj_b"} <= {getattr(s, "site", None) for s in streams}
    assert {"layers.1.mixer.sites.scan_C", "layers.1.mixer.sites.scan_C_b"} <= {getattr(s, "c_site", None) for s in streams}


@pytest.mark.parametrize("readout", ["middle", "double"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transforms_are_fp_equivalent(name, readout):
    model = small_vim(readout)
    stats = calibrate(model, images(), selection_samples=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    transformed, info = apply_transforms(model, stats, CONFIGS[name])
    _assert_same_outputs(model, transformed, images(seed=2).inputs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model was mutated"
    changed = {k for k, v in transformed.state_dict().items() if k in before and not torch.equal(before[k], v)}
    if CONFIGS[name].rotation:      # the residual stream's writers and tables are rotated too
        assert {"patch_embed.proj.weight", "pos_embed", "layers.0.mixer.x_proj_b.weight"} <= changed
        assert ("cls_token" if readout == "middle" else "cls_token_tail") in changed
    if CONFIGS[name].smooth_state:   # h·C smoothing of the backward branch's B and C rows
        assert "layers.1.mixer.x_proj_b.weight" in changed


@pytest.mark.parametrize("w_bits", [8, 4])
def test_quantized_export_runs_in_onnx_runtime_as_fake_quant(w_bits, tmp_path):
    """MambaQuant on both directions, exported with Q/DQ: ONNX Runtime computes what fake-quant does."""
    model = small_vim()
    qmodel, settings = quantize(model, calibrate(model, images(16), selection_samples=4),
                                QuantConfig(method="mambaquant", w_bits=w_bits))
    assert any("gate_scale" in item for item in settings.online)
    proto, info = export_onnx(qmodel, tmp_path / "vim.onnx")
    assert info.scan_nodes == 4 and {"layers.1.mixer.sites.scan_C_b", "sites.head"} <= set(info.activation_sites)
    x = images(6, seed=4).inputs
    with torch.no_grad():
        ref = qmodel(x).numpy()
    out = session(tmp_path / "vim.onnx").run(None, {"images": x.numpy()})[0]
    assert np.abs(out - ref).max() <= 1e-3 * np.abs(ref).max()
