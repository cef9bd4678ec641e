"""Calibration: one streamed pass of calibration batches through a model, with hooks on every
`ActivationSite`, and the activation-range calibrators that turn the collected summaries into
static quantization parameters.

Per site the pass keeps (memory O(d²) per site, independent of the number of samples):
per-channel abs-max, the fp64 second-moment matrix Σxxᵀ and Σx (for KLT rotations and GPTQ
Hessians), and a signed histogram whose range doubles when a batch exceeds it (the bounded
summary the `percentile`, `mse` and `entropy` calibrators read).
"""
from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..load.data import Split
from ..errors import MQExportError
from ..evaluate import progress_enabled
from ..models.mamba import ActivationSite
from ..models.registry import family_of
from .qspec import ActQuant

CALIBRATORS = ("absmax", "percentile", "mse", "entropy")
HIST_HALF_BINS = 1024          # bins per sign; the |x| histogram has this many


@dataclass
class SiteStats:
    """Running summary of the activations seen at one site (last dimension = channels)."""
    channels: int
    count: int = 0
    absmax: Tensor | None = None            # (d,) per-channel max |x|
    sum: Tensor | None = None               # (d,) fp64
    sum_outer: Tensor | None = None         # (d, d) fp64 Σ x xᵀ (only when collected with covariance)
    sum_sq: Tensor | None = None            # (d,) fp64 Σ x²: its diagonal, always kept (d², not d, per site)
    hist: Tensor | None = None              # (2·HIST_HALF_BINS,) counts over [-hist_range, hist_range]
    hist_range: float = 0.0
    min: float = math.inf
    max: float = -math.inf

    def update(self, x: Tensor, covariance: bool) -> None:
        x = x.detach().reshape(-1, self.channels).float()
        amax = x.abs().amax(0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))
        sq = x.double().square().sum(0)
        self.sum_sq = sq if self.sum_sq is None else self.sum_sq + sq
        if covariance:
            xd = x.double()
            self.sum = xd.sum(0) if self.sum is None else self.sum + xd.sum(0)
            self.sum_outer = xd.T @ xd if self.sum_outer is None else self.sum_outer + xd.T @ xd
        self.count += x.shape[0]
        self._histogram(x, float(amax.max()))

    def _histogram(self, x: Tensor, batch_absmax: float) -> None:
        if self.hist is None:
            self.hist = torch.zeros(2 * HIST_HALF_BINS, dtype=torch.float64)
            self.hist_range = max(batch_absmax, 1e-12)
        while batch_absmax > self.hist_range:
            # Double the range: adjacent pairs merge and the old bins move to the middle half.
            merged = self.hist.view(-1, 2).sum(1)
            self.hist = torch.zeros_like(self.hist)
            self.hist[HIST_HALF_BINS // 2: HIST_HALF_BINS // 2 + HIST_HALF_BINS] = merged
            self.hist_range *= 2
        r = self.hist_range
        self.hist += torch.histc(x, bins=2 * HIST_HALF_BINS, min=-r, max=r).double()

    @property
    def mean_square(self) -> Tensor:
        """E[x²] per channel (fp64): the diagonal of `second_moment`."""
        return self.sum_sq / max(self.count, 1)

    @property
    def second_moment(self) -> Tensor:
        """E[x xᵀ] (fp64): the GPTQ Hessian (up to a factor)."""
        return self.sum_outer / max(self.count, 1)

    @property
    def covariance(self) -> Tensor:
        """E[(x − μ)(x − μ)ᵀ] (fp64): what the KLT diagonalises."""
        return self.second_moment - self.mean[:, None] * self.mean[None, :]

    @property
    def mean(self) -> Tensor:
        return self.sum / max(self.count, 1)


@dataclass
class CalibrationStats:
    """What `calibrate` hands `quantize`: per-site statistics of the FP model, plus the
    calibration inputs (kept by reference) and the FP logits of the calibrator-selection subset."""
    split: str
    inputs: Tensor
    sites: dict[str, SiteStats]
    selection_logits: Tensor
    batch_size: int = 64

    @property
    def selection_inputs(self) -> Tensor:
        return self.inputs[:len(self.selection_logits)]


def activation_sites(model: nn.Module) -> dict[str, ActivationSite]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ActivationSite)}


@torch.inference_mode()
def collect_site_stats(model: nn.Module, inputs: Tensor, batch_size: int = 64, covariance: bool = True,
                       keep_logits: int = 0, desc: str = "calibrate",
                       quiet: bool = False) -> tuple[dict[str, SiteStats], Tensor]:
    """Stream `inputs` once through `model`, summarising every ActivationSite's input.
    Returns (site stats, logits of the first `keep_logits` samples)."""
    stats: dict[str, SiteStats] = {}
    handles = []
    for name, site in activation_sites(model).items():
        def hook(_module, args, name=name):
            x = args[0]
            stats.setdefault(name, SiteStats(x.shape[-1])).update(x, covariance)
        handles.append(site.register_forward_pre_hook(hook))
    logits = []
    try:
        for start in tqdm(range(0, len(inputs), batch_size), desc=desc, unit="batch",
                          disable=not progress_enabled(quiet), leave=False):
            out = model(inputs[start:start + batch_size])
            if start < keep_logits:
                logits.append(out[:keep_logits - start].float())
    finally:
        for h in handles:
            h.remove()
    return stats, (torch.cat(logits) if logits else torch.empty(0))


# Two float samples are the same sample when every value differs by at most this fraction of the
# largest magnitude in the evaluation data: float16/bfloat16 copies and re-normalised images still
# match, while the nearest distinct MNIST images (bundled calibration vs evaluation) differ by 39%
# of it. Relative to the evaluation data, so an outlier in the calibration data widens nothing.
OVERLAP_RTOL = 1e-2
_FINGERPRINT_BLOCKS = 8


def _exact_hashes(rows: np.ndarray) -> set[str]:
    return {hashlib.sha1(row.tobytes()).hexdigest() for row in rows}


def _block_means(rows: np.ndarray) -> np.ndarray:
    """A small fingerprint per row: the means of `_FINGERPRINT_BLOCKS` column blocks (fp64). Rows
    that agree within t in every value agree within t in every block mean."""
    blocks = np.array_split(rows, min(_FINGERPRINT_BLOCKS, rows.shape[1]), axis=1)
    return np.stack([block.mean(1, dtype=np.float64) for block in blocks], 1)


def shares_a_sample(calib: Tensor, other: Tensor) -> bool:
    """Whether a calibration sample equals one of `other`'s (the evaluation data): integer data
    (token ids) exactly, float data up to t = OVERLAP_RTOL · max|other|. O(n + m) unless the rows
    cluster: `other`'s rows are bucketed by their block means (cells 4t wide), and a calibration
    row is compared in full only with the rows in the cells its fingerprint ± t touches."""
    a = calib.detach().cpu().reshape(len(calib), -1).contiguous()
    b = other.detach().cpu().reshape(len(other), -1).contiguous()
    if a.shape[1] != b.shape[1] or not len(a) or not len(b) or not a.shape[1]:
        return False
    if not (a.is_floating_point() or b.is_floating_point()):
        return bool(_exact_hashes(a.long().numpy()) & _exact_hashes(b.long().numpy()))
    a, b = a.float().numpy(), b.float().numpy()
    b = b[np.isfinite(b).all(1)]                   # a NaN row equals nothing
    largest = float(np.abs(b).max(initial=0.0))
    tol = OVERLAP_RTOL * largest
    if tol == 0:                                   # `other` holds only rows of zeros, or none
        return bool(len(b)) and bool((a == 0).all(1).any())
    cell = 4 * tol
    buckets: dict[tuple[int, ...], list[int]] = {}
    for i, key in enumerate(np.floor(_block_means(b) / cell).astype(np.int64).tolist()):
        buckets.setdefault(tuple(key), []).append(i)
    # A row that matches has block means within ±(largest + t); clipping changes no such row and
    # keeps the cell numbers of rows with huge values small.
    fingerprints = np.clip(_block_means(a), -largest - 2 * tol, largest + 2 * tol)
    low = np.floor((fingerprints - tol) / cell).astype(np.int64).tolist()
    high = np.floor((fingerprints + tol) / cell).astype(np.int64).tolist()
    for row, lo, hi in zip(a, low, high):
        cells = itertools.product(*({l, h} for l, h in zip(lo, hi)))
        candidates = [j for key in cells for j in buckets.get(key, ())]
        if candidates and (np.abs(b[candidates] - row).max(1) <= tol).any():
            return True
    return False


_RANGE = re.compile(r"^(.*)\[(\d+):(\d+)\]$")


def check_calibration_split(split: Split, exclude: tuple[Split, ...] = ()) -> None:
    """Refuse empty, zero-length, complex/bool, non-finite or evaluation-overlapping calibration data."""
    x = split.inputs
    if not isinstance(x, Tensor):
        raise MQExportError(f"calibration split {split.name!r} holds a {type(x).__name__}, not a tensor")
    if x.dim() == 0 or len(x) == 0:
        raise MQExportError(f"calibration split {split.name!r} is empty (no samples)")
    if x.numel() == 0:
        raise MQExportError(f"calibration split {split.name!r} has empty samples (shape {tuple(x.shape)}); calibrate "
                            f"on sequences of at least one step")
    if x.is_complex() or x.dtype == torch.bool:
        raise MQExportError(f"calibration split {split.name!r} has dtype {x.dtype}; calibration inputs are real "
                            f"floats (classifiers) or integer token ids (language models)")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise MQExportError(f"calibration split {split.name!r} contains NaN or Inf values")
    for other in exclude:
        a, b = _RANGE.match(split.name), _RANGE.match(other.name)
        by_name = (a and b and a.group(1) == b.group(1)
                   and int(a.group(2)) < int(b.group(3)) and int(b.group(2)) < int(a.group(3)))
        if by_name or shares_a_sample(x, other.inputs):
            raise MQExportError(f"calibration split {split.name!r} overlaps the evaluation split "
                                f"{other.name!r}; calibrate on data disjoint from what you evaluate")


def model_inputs(model: nn.Module, inputs: Tensor, what: str) -> Tensor:
    """`inputs` checked against what `model` reads, in the dtype it computes with: a language model
    integer token ids (n, L) below its vocabulary size, a classifier real floats (n, L, d_input);
    a module of no known family gets them unchecked."""
    family = family_of(model, required=False)
    return inputs if family is None else family.check_inputs(model, inputs, what)


def recorded_inputs(model: nn.Module, forward_loop: Callable[[nn.Module], object]) -> Tensor:
    """The inputs `forward_loop(model)` feeds `model`'s top-level forward, as one tensor: the
    quantize stage runs the model on them again (ranges after transforms, `auto` calibrator
    selection), so each call must pass one input tensor, and all of one shape beyond the batch."""
    batches: list[Tensor] = []

    def record(_module, args, kwargs):
        if len(args) != 1 or kwargs or not isinstance(args[0], Tensor):
            raise MQExportError(f"the forward loop called {type(model).__name__} with {len(args)} positional and "
                                f"{len(kwargs)} keyword arguments; calibration records one input tensor per call")
        batches.append(args[0].detach().clone())

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        handle.remove()
    return stacked_batches(batches, "the forward loop")


def stacked_batches(batches: Iterable[Tensor], what: str) -> Tensor:
    """Calibration batches (each (n, …), one shape beyond the batch dimension) as one tensor."""
    batches = list(batches)
    if not batches:
        raise MQExportError(f"{what} gave no calibration inputs")
    bad = next((b for b in batches if not isinstance(b, Tensor) or b.dim() == 0), None)
    if bad is not None:
        got = f"a {type(bad).__name__}" if not isinstance(bad, Tensor) else "a 0-D tensor"
        raise MQExportError(f"{what} must give input tensors with a batch dimension (n, …), got {got}")
    shapes = sorted({tuple(b.shape[1:]) for b in batches})
    if len(shapes) > 1:
        raise MQExportError(f"{what} gave calibration inputs of several shapes beyond the batch dimension "
                            f"({shapes[:3]}); give them one shape (pad or crop them)")
    return torch.cat(batches)


def calibrate(model: nn.Module, split: Split, exclude: tuple[Split, ...] = (), batch_size: int = 64,
              selection_samples: int = 256, quiet: bool = False, covariance: bool = True) -> CalibrationStats:
    """Stream the calibration split once through the FP `model`. `exclude`: splits (the
    evaluation split) the calibration data must not overlap. `covariance`: also keep each site's
    d×d second moments (KLT rotations and GPTQ need them; a 1.4B model's take 14 GB)."""
    check_calibration_split(split, tuple(exclude))
    inputs = model_inputs(model, split.inputs, f"calibration split {split.name!r}")
    sites, logits = collect_site_stats(model, inputs, batch_size, covariance=covariance, keep_logits=selection_samples,
                                       quiet=quiet)
    return CalibrationStats(split=split.name, inputs=inputs, sites=sites, selection_logits=logits,
                            batch_size=batch_size)


# --- activation range calibrators (symmetric thresholds on a |x| histogram) ------------------

def _threshold(hist: np.ndarray, width: float, exact_max: float, method: str, levels: int,
               percentile: float) -> float:
    """Clipping threshold t for |x| given its histogram (bins of `width` from 0)."""
    total = hist.sum()
    if total == 0 or exact_max == 0:
        return exact_max
    if method == "absmax":
        return exact_max
    edges = width * np.arange(1, len(hist) + 1)
    if method == "percentile":
        idx = int(np.searchsorted(np.cumsum(hist) / total, percentile / 100.0))
        return float(min(edges[min(idx, len(hist) - 1)], exact_max))
    centres = edges - width / 2
    if method == "mse":
        # Expected squared error per value: rounding noise step²/12 inside, (|x| − t)² when clipped.
        cands = edges[max(0, len(hist) // 256 - 1)::max(1, len(hist) // 256)]
        cands = np.unique(np.append(cands, exact_max))
        steps = cands / levels
        clipped = np.clip(centres[None, :] - cands[:, None], 0, None) ** 2
        inside = (centres[None, :] <= cands[:, None]) * (steps[:, None] ** 2 / 12)
        err = ((clipped + inside) * hist[None, :]).sum(1)
        return float(cands[int(np.argmin(err))])
    if method == "entropy":
        return _kl_threshold(hist, edges, exact_max, levels + 1)
    raise MQExportError(f"unknown calibrator {method!r}; choose from {', '.join(CALIBRATORS)} or auto")


def _kl_threshold(hist: np.ndarray, edges: np.ndarray, exact_max: float, n_quant: int) -> float:
    """TensorRT's entropy calibration: the threshold whose n_quant-level quantisation of the
    histogram below it has the least KL divergence from the reference, which also holds the
    clipped outliers in its last bin (so clipping costs, and too wide a range costs resolution)."""
    if n_quant >= len(hist):
        return exact_max
    best, best_t = math.inf, exact_max
    nonzero_cum = np.concatenate([[0], np.cumsum(hist > 0)])
    hist_cum = np.concatenate([[0], np.cumsum(hist)])
    for i in range(n_quant, len(hist) + 1, max(1, len(hist) // 256)):
        p = hist[:i].copy()
        p[-1] += hist_cum[-1] - hist_cum[i]
        # Merge the i bins into n_quant groups, then spread each group's mass over its non-empty bins.
        bounds = np.linspace(0, i, n_quant + 1).astype(int)
        sums = hist_cum[bounds[1:]] - hist_cum[bounds[:-1]]
        nonzero = nonzero_cum[bounds[1:]] - nonzero_cum[bounds[:-1]]
        q = np.repeat(sums / np.maximum(nonzero, 1), np.diff(bounds)) * (hist[:i] > 0)
        mask = p > 0
        p_n, q_n = p / p.sum(), q / max(q.sum(), 1e-30)
        kl = float(np.sum(p_n[mask] * np.log(p_n[mask] / np.maximum(q_n[mask], 1e-30))))
        if kl < best:
            best, best_t = kl, float(edges[i - 1])
    return min(best_t, exact_max)


def activation_range(stats: SiteStats, method: str, bits: int = 8, asymmetric: bool = False,
                     percentile: float = 99.99) -> ActQuant:
    """Static per-tensor quantization parameters for one site with one calibrator."""
    hist = stats.hist.numpy()
    half = HIST_HALF_BINS
    width = stats.hist_range / half
    positive, negative = hist[half:], hist[:half][::-1]
    if not asymmetric:
        levels = 2 ** (bits - 1) - 1
        t = _threshold(positive + negative, width, max(abs(stats.min), abs(stats.max)), method, levels,
                       percentile)
        return ActQuant(scale=max(t, 1e-12) / levels, zero_point=0, bits=bits)
    # Asymmetric (ONNX Runtime only): each tail calibrated on its own half of the histogram.
    levels = 2 ** bits - 1
    hi = _threshold(positive, width, max(stats.max, 0.0), method, 2 ** (bits - 1), percentile)
    lo = -_threshold(negative, width, max(-stats.min, 0.0), method, 2 ** (bits - 1), percentile)
    scale = max(hi - lo, 1e-12) / levels
    # zero_point 0 means "symmetric signed" in the qspec contract, so a one-signed range keeps one
    # level below zero (zero_point ≥ 1).
    zero_point = int(min(max(round(-lo / scale), 1), levels))
    return ActQuant(scale=scale, zero_point=zero_point, bits=bits)
