"""The quantize stage: transforms (per method), weight quantization (clip-searched RTN or GPTQ)
and static activation ranges (one calibrator, or `auto` selection), written onto the model as the
qspec objects (`FakeQuantize` on ActivationSites, `weight_quant` on Linears) that the PyTorch
fake-quant forward and the ONNX Q/DQ exporter both read.

Quant-site table (`quant_sites`): every ActivationSite input (each Linear input — attention's q, k
and v share one, an MLP's gate and up one —, the scan's B and C) and every Linear weight but a
`FloatingPointLinear` (a MoE router); each expert of a MoE is its own MLP (its own sites and
per-channel weight scales). The h·C product of the paper is inside the one custom scan op here,
so it is quantized through its operands outside the op: C (scan_C) and the scan output y (the
out_proj input, after the gate — Mamba-2: the gated RMSNorm — and the online rotation). The scan
recurrence and state, Δ softplus, D skip, conv1d, norms, biases, attention scores, softmax and the
KV cache, and the model input stay in floating point; so do the online transforms (rotation, gate
or state scale).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .calibrate import (CALIBRATORS, CalibrationStats, SiteStats, activation_range, activation_sites,
                        collect_site_stats)
from ..errors import MQExportError
from ..evaluate import batched_logits, kl_to_reference
from ..models.topology import FloatingPointLinear
from .methods import QuantConfig, QuantSettings, floating_point_parts
from .qspec import FakeQuantize, WeightQuant, int_range
from .transforms import apply_transforms

CLIP_RATIOS = torch.linspace(1.0, 0.5, 26).tolist()
# Weight rows the clip search and the fake quantization handle at once: bounds their temporaries
# (a 1.4B model's lm_head has 50k rows of 2048; whole, each pass took 1-2 GB on top of the model).
ROWS_AT_ONCE = 1024


@dataclass
class Prepared:
    """A transformed FP model and the activation statistics of that model."""
    model: nn.Module
    sites: dict[str, SiteStats]
    online: list[str]     # transforms left as online ops (apply_transforms' description)
    online_kinds: list[str]   # their kinds ("gate scale", "rotation", "state scale", "state rotation")


def quant_sites(model: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """(ActivationSite name, names of the Linears it feeds): site `P.sites.K` feeds Linear `P.K`, or
    the Linears `P.site_readers[K]` names (attention's q, k and v read one site)."""
    modules = dict(model.named_modules())
    table = []
    for name in activation_sites(model):
        parent, _, key = name.rpartition(".sites.") if ".sites." in name else ("", "", name.split(".")[-1])
        keys = getattr(modules[parent], "site_readers", {}).get(key, (key,))
        linears = tuple(f"{parent}.{k}" if parent else k for k in keys)
        table.append((name, tuple(linear for linear in linears if isinstance(modules.get(linear), nn.Linear))))
    return table


# --- weights --------------------------------------------------------------------------------

def rtn_scales(weight: Tensor, bits: int, group_size: int | None, importance: Tensor | None = None) -> Tensor:
    """Per-channel (or per-block) scales, each clipped to the ratio of its abs-max that minimises the
    squared rounding error, weighted by the input channels' mean square when known."""
    _, in_f = weight.shape
    gs = group_size or in_f
    imp = torch.ones(in_f) if importance is None else importance.float().clamp_min(1e-12)
    imp = imp.reshape(1, in_f // gs, gs)
    qmin, qmax = int_range(bits)
    best = []
    for rows in weight.split(ROWS_AT_ONCE):    # rows are independent: same result, bounded temporaries
        w = rows.float().reshape(len(rows), in_f // gs, gs)
        amax = w.abs().amax(-1).clamp_min(1e-12)
        best_err, best_rows = torch.full_like(amax, float("inf")), amax / qmax
        for ratio in CLIP_RATIOS:
            scale = amax * ratio / qmax
            err = (((torch.clamp(torch.round(w / scale[..., None]), qmin, qmax) * scale[..., None] - w) ** 2)
                   * imp).sum(-1)
            better = err < best_err
            best_err, best_rows = torch.where(better, err, best_err), torch.where(better, scale, best_rows)
        best.append(best_rows)
    scales = torch.cat(best)
    return (scales[:, 0] if group_size is None else scales).float()


def fake_quantized(weight: Tensor, wq: WeightQuant) -> Tensor:
    """`wq.dequantize(wq.quantize(weight))`, `ROWS_AT_ONCE` rows at a time (bounded temporaries)."""
    out = torch.empty(weight.shape)
    for start in range(0, len(weight), ROWS_AT_ONCE):
        rows = slice(start, start + ROWS_AT_ONCE)
        block = WeightQuant(scale=wq.scale[rows], bits=wq.bits, group_size=wq.group_size)
        out[rows] = block.dequantize(block.quantize(weight[rows]))
    return out


def gptq(weight: Tensor, hessian: Tensor, wq: WeightQuant, damp: float = 0.01) -> Tensor:
    """GPTQ (Frantar et al. 2022) with fixed scales: quantize columns in order, spreading each
    column's error over the remaining ones through the inverse Hessian. Returns dequantized weights."""
    w = weight.double().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(len(h), dtype=torch.float64)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    scale = wq.expanded_scale(w.shape[1]).double()
    qmin, qmax = int_range(wq.bits)
    out = torch.empty_like(w)
    for i in range(w.shape[1]):
        q = torch.clamp(torch.round(w[:, i] / scale[:, i]), qmin, qmax) * scale[:, i]
        err = (w[:, i] - q) / h_inv[i, i]
        w[:, i + 1:] -= err[:, None] * h_inv[i, i + 1:][None, :]
        out[:, i] = q
    return out.float()


def quantize_weights(model: nn.Module, sites: dict[str, SiteStats], cfg: QuantConfig) -> list[str]:
    """Attach `weight_quant` to every Linear but a FloatingPointLinear (a MoE router) and replace its
    weight by the dequantized values."""
    feeding = {linear: site for site, linears in quant_sites(model) for linear in linears}
    names = []
    for name, linear in model.named_modules():
        if not isinstance(linear, nn.Linear) or isinstance(linear, FloatingPointLinear):
            continue
        stats = sites.get(feeding.get(name, ""))
        w = linear.weight.data
        group = cfg.group_size_for(w.shape[1])
        hessian = stats.second_moment if stats is not None and stats.sum_outer is not None else None
        importance = stats.mean_square if stats is not None else None
        wq = WeightQuant(scale=rtn_scales(w, cfg.w_bits, group, importance), bits=cfg.w_bits, group_size=group)
        deq = gptq(w, hessian, wq) if cfg.use_gptq and hessian is not None else w
        linear.weight = nn.Parameter(fake_quantized(deq, wq), requires_grad=False)
        linear.weight_quant = wq
        names.append(name)
    return names


# --- activations ----------------------------------------------------------------------------

def set_activation_quantizers(model: nn.Module, sites: dict[str, SiteStats], cfg: QuantConfig,
                              calibrator: str) -> list[str]:
    modules = dict(model.named_modules())
    for name, _ in quant_sites(model):
        if name not in sites:
            raise MQExportError(f"no calibration statistics for activation site {name!r}")
        modules[name].quantizer = FakeQuantize(activation_range(sites[name], calibrator, cfg.a_bits,
                                                                cfg.asymmetric, cfg.percentile))
    return [name for name, _ in quant_sites(model)]


def prepare(model: nn.Module, stats: CalibrationStats, cfg: QuantConfig, quiet: bool = False) -> Prepared:
    """Apply the method's transforms to a copy of `model` and re-collect activation statistics on
    it (rotations and smoothing change the distributions the ranges are set from)."""
    cfg.check_model(model)
    if cfg.needs_covariance and any(s.sum_outer is None for s in stats.sites.values()):
        raise MQExportError(f"--method {cfg.method} with {cfg.w_bits}-bit weights needs second moments of the "
                            f"activations; calibrate with covariance=True")
    if not (cfg.spec.smooths or cfg.spec.rotation):
        return Prepared(copy.deepcopy(model), stats.sites, [], [])
    transformed, info = apply_transforms(model, stats, cfg.transforms())
    sites, _ = collect_site_stats(transformed, stats.inputs[:cfg.range_samples], stats.batch_size,
                                  covariance=cfg.use_gptq, desc=f"calibrate ({cfg.method})", quiet=quiet)
    return Prepared(transformed, sites, info["online"], info["online_kinds"])


def quantize_prepared(prepared: Prepared, stats: CalibrationStats, cfg: QuantConfig,
                      quiet: bool = False) -> tuple[nn.Module, QuantSettings]:
    """Quantize a copy of `prepared.model` (a Prepared can serve several configurations)."""
    return _quantize_model(copy.deepcopy(prepared.model), prepared, stats, cfg, quiet)


def _quantize_model(model: nn.Module, prepared: Prepared, stats: CalibrationStats, cfg: QuantConfig,
                    quiet: bool) -> tuple[nn.Module, QuantSettings]:
    """Quantize `model` (`prepared.model` or a copy of it) in place."""
    weights = quantize_weights(model, prepared.sites, cfg)
    if cfg.calibrator == "auto":
        # Same selection for every method: the calibrator whose fake-quant outputs are closest
        # (KL) to the FP32 outputs on the calibration-selection subset.
        kls = {}
        for name in CALIBRATORS:
            set_activation_quantizers(model, prepared.sites, cfg, name)
            logits = batched_logits(model, stats.selection_inputs, stats.batch_size, desc=f"select {name}",
                                    quiet=quiet)
            kls[name] = kl_to_reference(stats.selection_logits, logits)
        chosen = min(kls, key=kls.get)
    else:
        kls, chosen = None, cfg.calibrator
    acts = set_activation_quantizers(model, prepared.sites, cfg, chosen)
    return model, QuantSettings(config=cfg, calibrator=chosen, calibrator_selection_kl=kls,
                                calibrator_selection_samples=len(stats.selection_logits), online=prepared.online,
                                online_kinds=tuple(prepared.online_kinds),
                                model_floating_point=floating_point_parts(model),
                                quantized_activation_sites=acts, quantized_weights=weights,
                                calibration_split=stats.split)


def quantize(model: nn.Module, stats: CalibrationStats, cfg: QuantConfig,
             quiet: bool = False) -> tuple[nn.Module, QuantSettings]:
    """A quantized deep copy of `model` (never mutated) and what the quantization did."""
    prepared = prepare(model, stats, cfg, quiet)
    # `prepared.model` is already this call's own copy: quantizing it in place saves another one.
    return _quantize_model(prepared.model, prepared, stats, cfg, quiet)
