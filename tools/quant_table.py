"""Compare quantization methods on a bundled model: a markdown table and an activation-range figure.

    python tools/quant_table.py -o quant_table            # writes quant_table.md and quant_table.png
    python tools/quant_table.py --model shakespeare-mamba2 -o quant_table_mamba2   # a language model

A classifier is scored by accuracy, a language model by perplexity (the bundled model's metrics).

All methods × {W8A8, W4A8} (plus MambaQuant without KLT as an ablation) over one calibration pass,
one calibrator-selection procedure and one set of FP32 reference logits. Methods with random signs
run once per seed (transforms + their range pass shared by W8 and W4); RTN and SmoothQuant have no
randomness, so their seeds would give identical models and they run once.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mq_export.api import calibrate, validate
from mq_export.load.bundled import bundled
from mq_export.quant.plots import last_out_proj_site, plot_channel_ranges
from mq_export.quant.methods import METHODS, QUANTIZING_METHODS, QuantConfig
from mq_export.quant.quantize import prepare, quantize_prepared

# key: (label, method, klt): every quantizing method of the registry, plus MambaQuant's KLT ablation.
ROWS = {name: (METHODS[name].label, name, True) for name in QUANTIZING_METHODS}
ROWS["mambaquant-noklt"] = ("MambaQuant w/o KLT (Hadamard + smoothing)", "mambaquant", False)


def _span(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    vals = [v * scale for v in values]
    mean = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(vals):.{digits}f}–{max(vals):.{digits}f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", default="quant_table", help="output path stem (.md and .png)")
    parser.add_argument("--model", default="mnist")
    parser.add_argument("--limit", type=int, default=2000,
                        help="evaluation samples: images or text windows (default 2000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--selection-samples", type=int, default=128,
                        help="calibration images used by --calibrator auto's selection (default 128)")
    parser.add_argument("--range-samples", type=int, default=512,
                        help="calibration images for each transformed model's range pass (default 512)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: the bundled model's (the demo's, so the numbers are the demo's)")
    parser.add_argument("--calibrator", default="auto")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    t_start = time.perf_counter()
    spec = bundled(args.model)
    args.batch_size = args.batch_size or spec.batch_size
    model = spec.load()
    calib, evaluation = spec.splits(args.limit)
    fp32, ref = validate(model, evaluation, spec.metrics, batch_size=args.batch_size, desc="fp32", quiet=args.quiet)
    stats = calibrate(model, calib, exclude=(evaluation,), batch_size=args.batch_size,
                      selection_samples=args.selection_samples, quiet=args.quiet)
    site = last_out_proj_site(model)
    panels = [("FP32 (no transform)", stats.sites[site].absmax)]
    results: dict[tuple[str, int], list[tuple[dict, dict]]] = {}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Seed-major, so an interrupted run still has every method at the first seed; the table is
    # rewritten after every configuration.
    for seed in args.seeds:
        for label, method, klt in (ROWS[key] for key in args.methods):
            if not METHODS[method].randomised and seed != args.seeds[0]:
                continue
            prepared = prepare(model, stats, QuantConfig(method=method, seed=seed, klt=klt,
                                                         range_samples=args.range_samples), quiet=args.quiet)
            if seed == args.seeds[0] and method != "rtn":
                panels.append((label, prepared.sites[site].absmax))
                plot_channel_ranges(panels, out.with_suffix(".png"), f"per-channel max |x| at {site} "
                                    "(calibration data), before/after each transform")
            for w_bits in (8, 4):
                cfg = QuantConfig(method=method, w_bits=w_bits, a_bits=8, seed=seed, klt=klt,
                                  calibrator=args.calibrator)
                qmodel, settings = quantize_prepared(prepared, stats, cfg, quiet=args.quiet)
                metrics, _ = validate(qmodel, evaluation, spec.metrics, ref, batch_size=args.batch_size,
                                      desc=f"{method} W{w_bits} s{seed}", quiet=args.quiet)
                results.setdefault((label, w_bits), []).append((metrics, settings))
                headline = _headline(metrics).key
                print(f"{label:45s} W{w_bits}A8 seed {seed}: {headline} {metrics[headline]:.4f} "
                      f"kl {metrics['kl_to_fp32']:.5f} agree {metrics['agreement_with_fp32']:.4f} "
                      f"calibrator {settings.calibrator}  [{time.perf_counter() - t_start:.0f} s]",
                      file=sys.stderr, flush=True)
                _write_table(out, spec, evaluation, stats, fp32, results, args, time.perf_counter() - t_start)
    print(out.with_suffix(".md").read_text())
    return 0


@dataclass(frozen=True)
class Headline:
    """The task metric a row leads with, and how the table shows it."""
    key: str
    column: str
    scale: float
    digits: int
    relative_delta: bool    # Δ vs FP32 in % of FP32's value, else in the column's unit
    kl_digits: int


def _headline(metrics: dict) -> Headline:
    """A classifier's accuracy (in %, Δ in points), a language model's perplexity (Δ in %)."""
    if "accuracy" in metrics:
        return Headline("accuracy", "accuracy %", 100, 2, False, 5)
    return Headline("perplexity", "perplexity", 1, 4, True, 6)


def _write_table(out, spec, evaluation, stats, fp32, results, args, seconds) -> None:
    h = _headline(fp32)
    lines = [f"Model `{spec.name}`; evaluation {evaluation.name} ({len(evaluation)} samples), calibration "
             f"{stats.split} ({len(stats.inputs)} samples, calibrator selection on its first "
             f"{len(stats.selection_logits)}, post-transform ranges on its first {args.range_samples}); activations static per-tensor symmetric INT8; weights "
             f"per-channel symmetric (W8: clip-searched RTN, W4: GPTQ). FP32 {h.column} "
             f"{h.scale * fp32[h.key]:.{h.digits}f}. Randomised methods: mean (min–max) over seeds "
             f"{', '.join(map(str, args.seeds))}; RTN and SmoothQuant are deterministic (one run). "
             f"Time so far {seconds / 60:.1f} min.", "",
             f"| method | setting | {h.column} | Δ vs FP32 ({'%' if h.relative_delta else 'pt'}) | KL to FP32 "
             f"| agreement with FP32 % | calibrator |",
             "|---|---|---|---|---|---|---|"]
    for (label, w_bits), runs in results.items():
        values = [m[h.key] for m, _ in runs]
        delta = statistics.fmean(values) - fp32[h.key]
        lines.append(
            f"| {label} | W{w_bits}A8 | {_span(values, h.scale, h.digits)} "
            f"| {100 * delta / fp32[h.key] if h.relative_delta else h.scale * delta:+.2f} "
            f"| {_span([m['kl_to_fp32'] for m, _ in runs], 1, h.kl_digits)} "
            f"| {_span([m['agreement_with_fp32'] for m, _ in runs], 100)} "
            f"| {', '.join(sorted({s.calibrator for _, s in runs}))} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
