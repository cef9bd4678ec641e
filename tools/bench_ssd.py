"""Speed of the SSD scans (fused C kernel, chunked PyTorch) against the sequential reference, and of a
small Mamba-2 LM in plain ONNX Runtime (SSDScan through its function body) against PyTorch.

    python tools/bench_ssd.py [--batch 4 --length 1024 --heads 24 --headdim 64 --d-state 128 --groups 1]
                              [--repeats 3] [--lm-model DIR] [--lm-batch 8 --lm-length 256] [--skip-scan]

The defaults are mamba2-130m's layer (issue 17's target: fused ≥ 5× the reference). Candidates run
in turn (A B C A B C …) so drift on a shared machine hits all; each one's median seconds and the
median of the per-round ratios are printed. The LM part exports a Mamba-2 LM (FP32, `--lm-model`:
a checkpoint directory; default: random weights in the bundled Mamba-2 LM's shape, d_model 128,
4 layers, 8 heads × 32, d_state 64) and times plain ONNX Runtime (SSDScan through its function
body; `runtime.ort.session`, torch.get_num_threads() threads) against the PyTorch CPU forward
(fused scan kernel) on the same ids; target: ORT ≤ 1.5× PyTorch. Where the native ORT scan
kernels build, ORT with them is timed too.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mq_export.export.onnx import export_onnx
from mq_export.models.mamba2 import Mamba2LM, Mamba2LMConfig, Mamba2MixerConfig
from mq_export.ops import ssd_cpu_kernel
from mq_export.ops.ssd_scan import ssd_scan, ssd_scan_chunked, ssd_scan_reference


def rounds_of(candidates: dict, repeats: int) -> list[dict[str, float]]:
    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return [{name: timed(fn) for name, fn in candidates.items()} for _ in range(repeats)]


def report(rounds: list[dict[str, float]], baseline: str, target: str, as_time: bool = False) -> None:
    """Each candidate's median seconds and the median per-round ratio to `baseline`: its speed-up
    (baseline time / its time), or with `as_time` its time / baseline time."""
    for name in rounds[0]:
        line = f"  {name:26s}{statistics.median(r[name] for r in rounds):.3f} s (median)"
        if name != baseline:
            ratio = statistics.median((r[name] / r[baseline]) if as_time else (r[baseline] / r[name]) for r in rounds)
            what = "the time of" if as_time else "the speed of"
            line += f"   {ratio:6.2f}x {what} {baseline} (median of per-round ratios; {target})"
        print(line)


def bench_scan(args) -> None:
    b, l, h, p, g, n = args.batch, args.length, args.heads, args.headdim, args.groups, args.d_state
    gen = torch.Generator().manual_seed(0)
    inputs = dict(x=torch.randn(b, l, h, p, generator=gen), dt=torch.randn(b, l, h, generator=gen) - 2,
                  A=-torch.rand(h, generator=gen) * 8, B=torch.randn(b, l, g, n, generator=gen),
                  C=torch.randn(b, l, g, n, generator=gen), D=torch.randn(h, generator=gen),
                  dt_bias=torch.randn(h, generator=gen) * 0.1, dt_softplus=True)
    candidates = {"sequential reference": lambda: ssd_scan_reference(**inputs),
                  "chunked PyTorch": lambda: ssd_scan_chunked(**inputs)}
    if ssd_cpu_kernel.load() is not None:
        candidates["fused C kernel"] = lambda: ssd_scan(**inputs)
    with torch.inference_mode():
        expected = ssd_scan_reference(**inputs)
        for fn in candidates.values():
            torch.testing.assert_close(fn(), expected, rtol=1e-4, atol=1e-4)
        rounds = rounds_of(candidates, args.repeats)
    print(f"SSD scan b={b} l={l} heads={h} headdim={p} d_state={n} groups={g}, {torch.get_num_threads()} threads, "
          f"{args.repeats} rounds")
    if "fused C kernel" not in candidates:
        print("  (no C compiler: the fused kernel is not built; ssd_scan runs the chunked path)")
    report(rounds, "sequential reference", "target >= 5x for the fused kernel")


def bench_lm(args) -> None:
    import mq_export
    from mq_export.runtime.ort import OrtForward, scan_implementation, session

    torch.manual_seed(0)
    if args.lm_model:
        model = mq_export.load(args.lm_model)
    else:
        mixer = Mamba2MixerConfig(d_model=128, d_state=64, headdim=32)
        model = Mamba2LM(Mamba2LMConfig(mixer=mixer, n_layer=4, vocab_size=65))
    model.eval()
    ids = torch.randint(0, model.cfg.vocab_size, (args.lm_batch, args.lm_length),
                        generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path)
        scans = ["function_body"] + (["native"] if scan_implementation("auto").library is not None else [])
        forwards = {f"ORT FP32, {scan}": OrtForward(session(path, scan=scan)) for scan in scans}
        with torch.inference_mode():
            expected = model(ids)
            errors = {name: ((forward(ids) - expected).abs().max() / expected.abs().max()).item()
                      for name, forward in forwards.items()}
            candidates = {"PyTorch forward": lambda: model(ids)}
            candidates.update({name: lambda forward=forward: forward(ids) for name, forward in forwards.items()})
            rounds = rounds_of(candidates, args.repeats)
    print(f"Mamba-2 LM {'from ' + args.lm_model if args.lm_model else '(random, bundled shape)'}: batch "
          f"{args.lm_batch} x {args.lm_length} ids, {torch.get_num_threads()} threads, {args.repeats} rounds; "
          f"max |ORT - PyTorch| / max |PyTorch|: " + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()))
    report(rounds, "PyTorch forward", "target <= 1.5x", as_time=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--d-state", type=int, default=128)
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lm-model", default=None, help="Mamba-2 LM checkpoint directory (default: random weights)")
    p.add_argument("--lm-batch", type=int, default=8)
    p.add_argument("--lm-length", type=int, default=256)
    p.add_argument("--skip-scan", action="store_true", help="only the LM part")
    args = p.parse_args()
    torch.set_flush_denormal(True)
    if not args.skip_scan:
        bench_scan(args)
    bench_lm(args)


if __name__ == "__main__":
    main()
