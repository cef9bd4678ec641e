"""The activation-range figure: per-channel max |x| at one site, before and after transforms."""
from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from .calibrate import CalibrationStats, activation_sites, collect_site_stats


def last_out_proj_site(model: nn.Module) -> str:
    """Name of the last mixer's out_proj-input ActivationSite."""
    return [name for name in activation_sites(model) if name.endswith("sites.out_proj")][-1]


def channel_absmax(model: nn.Module, stats: CalibrationStats, site: str, samples: int = 64) -> Tensor:
    """Per-channel max |x| at `site` of `model` over the first `samples` calibration inputs."""
    sites, _ = collect_site_stats(model, stats.inputs[:samples], stats.batch_size, covariance=False, quiet=True)
    return sites[site].absmax


def plot_channel_ranges(panels: list[tuple[str, Tensor]], path: str | Path, suptitle: str) -> None:
    """One bar panel per (title, per-channel abs-max); each panel has its own y scale (smoothing
    rescales channels), so the flatness is read from the shape and the max/median in the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1.9 * len(panels) + 0.6), squeeze=False)
    for ax, (title, absmax) in zip(axes[:, 0], panels):
        ax.bar(range(len(absmax)), absmax.float().numpy(), width=1.0)
        ax.set_title(f"{title}  (max {float(absmax.max()):.3g}, max/median "
                     f"{float(absmax.max() / absmax.median().clamp_min(1e-12)):.1f})", fontsize=9)
        ax.set_ylabel("max |x|", fontsize=8)
    axes[-1, 0].set_xlabel("channel")
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_activation_ranges(stats: CalibrationStats, model: nn.Module, path: str | Path, label: str) -> None:
    """The demo's figure: FP32 ranges (from the calibration pass) against `model`'s (transformed,
    quantized) ranges at the last layer's out_proj input."""
    site = last_out_proj_site(model)
    plot_channel_ranges([("FP32", stats.sites[site].absmax), (label, channel_absmax(model, stats, site))],
                        path, f"per-channel activation range at {site} (calibration data)")
