"""Calibration statistics, range calibrators on synthetic data, and refusal of bad data."""
import pytest
import torch

from mq_export.quant.calibrate import HIST_HALF_BINS, SiteStats, activation_range, calibrate
from mq_export.load.data import Split
from mq_export.errors import MQExportError
from tests.test_transforms import classifier_split, small_classifier


def _stats(x: torch.Tensor, parts: int = 4) -> SiteStats:
    stats = SiteStats(x.shape[-1])
    for part in x.chunk(parts):
        stats.update(part, covariance=True)
    return stats


def test_summaries_are_exact_and_bounded():
    g = torch.Generator().manual_seed(0)
    # Growing magnitudes force the histogram range to double several times.
    x = torch.cat([torch.randn(1000, 6, generator=g) * s for s in (0.1, 1.0, 10.0)])
    stats = _stats(x, parts=3)
    assert torch.equal(stats.absmax, x.abs().amax(0))
    assert torch.allclose(stats.second_moment, x.double().T @ x.double() / len(x))
    shifted = _stats(x + torch.arange(6.0), parts=3)      # the KLT's covariance ignores a mean offset
    assert torch.allclose(shifted.covariance, torch.cov(x.double().T, correction=0))
    assert stats.hist.shape == (2 * HIST_HALF_BINS,) and stats.hist.sum() == x.numel()
    assert stats.hist_range >= float(x.abs().max())


def test_calibrators_give_known_ranges():
    g = torch.Generator().manual_seed(0)
    uniform = _stats(torch.rand(100_000, 4, generator=g) * 6 - 3)
    for method in ("absmax", "percentile", "mse", "entropy"):   # nothing to clip on a uniform
        assert activation_range(uniform, method).scale * 127 == pytest.approx(3.0, rel=0.01), method
    gauss = _stats(torch.randn(200_000, 4, generator=g))
    exact_max = float(gauss.absmax.max())
    assert activation_range(gauss, "absmax").scale * 127 == pytest.approx(exact_max)
    assert activation_range(gauss, "percentile", percentile=99.0).scale * 127 == pytest.approx(2.576, abs=0.03)
    mse = activation_range(gauss, "mse").scale * 127
    assert 2.5 < mse < exact_max                                # clips the far tail, keeps the body
    assert 3.0 < activation_range(gauss, "entropy").scale * 127 <= exact_max


def test_asymmetric_ranges():
    x = torch.rand(50_000, 2, generator=torch.Generator().manual_seed(0)) * 5 - 1     # [-1, 4]
    q = activation_range(_stats(x), "absmax", asymmetric=True)
    assert q.zero_point != 0 and not q.signed
    assert q.scale * 255 == pytest.approx(5.0, rel=0.01)
    assert q.zero_point == pytest.approx(51, abs=1)
    positive = activation_range(_stats(x.clamp_min(0)), "absmax", asymmetric=True)
    assert positive.zero_point >= 1          # zero point 0 would mean "symmetric" in the contract


def test_calibrate_collects_every_site_and_selection_logits():
    model, split = small_classifier(), classifier_split()
    stats = calibrate(model, split, selection_samples=4)
    assert set(stats.sites) == {f"layers.{i}.sites.{k}" for i in range(2) for k in
                                ("in_proj", "x_proj", "dt_proj", "out_proj", "scan_B", "scan_C")} | {"sites.classifier"}
    assert stats.sites["layers.0.sites.in_proj"].second_moment.shape == (48, 48)
    assert stats.selection_logits.shape == (4, 10)


def test_calibration_refuses_bad_data():
    model, split = small_classifier(), classifier_split()
    with pytest.raises(MQExportError, match="empty"):
        calibrate(model, Split("x[0:0]", split.inputs[:0], split.labels[:0]))
    bad = split.inputs.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(MQExportError, match="NaN or Inf"):
        calibrate(model, Split("x[0:8]", bad, split.labels))
    bad[0, 0, 0] = float("inf")
    with pytest.raises(MQExportError, match="NaN or Inf"):
        calibrate(model, Split("x[0:8]", bad, split.labels))
    # Overlap by content (a shared sample) and by index range of the same dataset.
    evaluation = Split("other[0:3]", split.inputs[5:8], split.labels[5:8])
    with pytest.raises(MQExportError, match="overlaps"):
        calibrate(model, split, exclude=(evaluation,))
    by_name = Split("synthetic-1[4:20]", split.inputs * 0 + 7, split.labels)
    with pytest.raises(MQExportError, match="overlaps"):
        calibrate(model, split, exclude=(by_name,))
    disjoint = Split("synthetic-1[8:16]", classifier_split(seed=9).inputs, split.labels)
    calibrate(model, split, exclude=(disjoint,), selection_samples=2)


def _flushes_subnormals() -> bool:
    """Whether this thread's floating-point mode flushes subnormals (torch has no getter for it)."""
    return float(torch.tensor([1e-40]) * 1.0) == 0.0


@pytest.mark.parametrize("flush", [False, True])
def test_calibrate_and_evaluate_leave_the_callers_float_mode_alone(flush):
    from mq_export.evaluate import batched_logits
    model, split = small_classifier().eval(), classifier_split()
    torch.set_flush_denormal(flush)
    try:
        assert _flushes_subnormals() == flush
        calibrate(model, split, quiet=True)
        batched_logits(model, split.inputs, batch_size=4, quiet=True)
        assert _flushes_subnormals() == flush
    finally:
        torch.set_flush_denormal(False)
