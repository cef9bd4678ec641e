"""Quantizers round-trip within their step; quantize() is pure and fills the qspec contract."""
import pytest
import torch
from torch import nn

from mq_export import QuantConfig, calibrate, quantize
from mq_export.errors import MQExportError
from mq_export.quant.qspec import ActQuant, FakeQuantize, WeightQuant
from mq_export.quant.quantize import gptq, quant_sites, rtn_scales
from tests.test_transforms import classifier_split, small_classifier, small_lm, lm_split


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [None, 16])
def test_weight_round_trip_within_step(bits, group):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    wq = WeightQuant(scale=rtn_scales(w, bits, group), bits=bits, group_size=group)
    assert wq.scale.shape == ((24,) if group is None else (24, 64 // group))
    deq = wq.dequantize(wq.quantize(w))
    step = wq.expanded_scale(64)
    qmax = 2 ** (bits - 1) - 1
    inside = w.abs() <= step * qmax                           # not clipped by the clipping search
    assert ((deq - w).abs() <= step / 2 + 1e-7)[inside].all()
    assert ((deq - w).abs() <= w.abs() - step * qmax + step / 2 + 1e-6)[~inside].all()


def test_clipping_search_never_worse_than_absmax():
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(1)) ** 3      # heavy tails
    for bits in (8, 4):
        searched = WeightQuant(rtn_scales(w, bits, None), bits)
        absmax = WeightQuant(w.abs().amax(1) / (2 ** (bits - 1) - 1), bits)
        err = lambda q: ((q.dequantize(q.quantize(w)) - w) ** 2).sum(1)  # noqa: E731
        assert (err(searched) <= err(absmax) + 1e-9).all()


def test_activation_round_trip_within_step():
    x = torch.linspace(-3, 3, 1001)
    for params in (ActQuant(scale=3 / 127), ActQuant(scale=6 / 255, zero_point=128)):
        assert ((FakeQuantize(params)(x) - x).abs() <= params.scale / 2 + 1e-6).all()


def test_gptq_lowers_output_error_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g) @ torch.randn(8, 32, generator=g)      # low-rank, correlated
    w = torch.randn(16, 32, generator=g)
    h = x.double().T @ x.double() / len(x)
    wq = WeightQuant(rtn_scales(w, 4, None), 4)
    rtn = wq.dequantize(wq.quantize(w))
    out = lambda v: ((x @ (v - w).T) ** 2).mean()  # noqa: E731
    assert out(gptq(w, h, wq)) < out(rtn)


@pytest.mark.parametrize("method", ["rtn", "smoothquant", "hadamard", "mambaquant"])
def test_quantize_is_pure_and_fills_the_contract(method):
    model, split = small_classifier(), classifier_split()
    stats = calibrate(model, split, selection_samples=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibrator = "auto" if method == "mambaquant" else "percentile"      # auto runs 4 selection passes
    qmodel, settings = quantize(model, stats, QuantConfig(method=method, w_bits=4, seed=3, calibrator=calibrator),
                                quiet=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(hasattr(m, "weight_quant") for m in model.modules())
    modules = dict(qmodel.named_modules())
    for site, linear in quant_sites(qmodel):
        assert isinstance(modules[site].quantizer, FakeQuantize) and modules[site].quantizer.params.zero_point == 0
    for name, m in qmodel.named_modules():
        if isinstance(m, nn.Linear):
            assert m.weight_quant.bits == 4
            assert torch.equal(m.weight, m.weight_quant.dequantize(m.weight_quant.quantize(m.weight)))
    assert settings["seed"] == 3 and settings["calibrator"] in (settings["calibrator_selection_kl"] or [calibrator])
    assert "GPTQ" in settings["weights"]
    with torch.no_grad():
        assert torch.isfinite(qmodel(split.inputs)).all()


def test_quantize_options():
    model, split = small_classifier(), classifier_split()
    stats = calibrate(model, split, selection_samples=2)
    qmodel, settings = quantize(model, stats, method="hadamard", calibrator="mse", asymmetric=True,
                                w_group_size=16, gptq=False, quiet=True)
    assert settings["calibrator"] == "mse" and settings["calibrator_selection_kl"] is None
    assert all(m.quantizer.params.zero_point != 0 for m in qmodel.modules() if hasattr(m, "quantizer"))
    assert qmodel.layers[0].x_proj.weight_quant.group_size == 16          # 96 inputs: 6 blocks
    assert qmodel.layers[0].dt_proj.weight_quant.group_size is None       # 4 inputs: per channel
    with pytest.raises(MQExportError, match="does not divide"):
        quantize(model, stats, method="rtn", w_group_size=36, quiet=True)
    with pytest.raises(MQExportError, match="unknown calibrator"):
        quantize(model, stats, method="rtn", calibrator="magic", quiet=True)


def test_quantize_language_model():
    model, split = small_lm(), lm_split()
    stats = calibrate(model, split, selection_samples=2)
    qmodel, settings = quantize(model, stats, QuantConfig(method="mambaquant"), quiet=True)
    assert qmodel.lm_head.weight is not qmodel.backbone.embedding.weight
    assert any("out_proj_input_rotation" in item for item in settings["online"])
    with torch.no_grad():
        assert torch.isfinite(qmodel(split.inputs)).all()


@pytest.mark.parametrize("method", ["rtn", "smoothquant", "hadamard", "mambaquant"])
@pytest.mark.parametrize("w_bits", [8, 4])
def test_calibration_keeps_what_each_method_needs(method, w_bits):
    """The CLI calibrates with covariance=config.needs_covariance; every method must then run
    (hadamard/smoothquant W8 once failed on a missing covariance)."""
    model, split = small_classifier(), classifier_split()
    config = QuantConfig(method=method, w_bits=w_bits)
    stats = calibrate(model, split, selection_samples=4, covariance=config.needs_covariance)
    assert all((s.sum_outer is None) != config.needs_covariance for s in stats.sites.values())
    qmodel, _ = quantize(model, stats, config)
    assert qmodel is not model
