"""Speed of the CPU scans (fused C kernel, chunked PyTorch) against the sequential reference, in one run.

    python tools/bench_scan.py [--batch 64 --length 784 --d-inner 128 --d-state 16 --repeats 5]

Runs them in turn (A B C A B C …) so drift on a shared machine hits all, and prints each one's
median seconds and the median of the per-round ratios to the reference. `selective_scan` is what
the models call: the fused kernel where it builds. Target (issue 3): ≥ 5× at the defaults.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mq_export.ops import cpu_kernel
from mq_export.ops.selective_scan import selective_scan, selective_scan_chunked, selective_scan_reference


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, default=784)
    p.add_argument("--d-inner", type=int, default=128)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    b, d, n, length = args.batch, args.d_inner, args.d_state, args.length
    # As the model passes them: (b, d, l) views of time-major (b, l, d) storage.
    time_major = lambda *shape: torch.randn(b, length, *shape).transpose(1, 2)  # noqa: E731
    inputs = dict(u=time_major(d), delta=time_major(d) * 0.5 - 1.0, A=-torch.rand(d, n) * 8,
                  B=time_major(n), C=time_major(n), D=torch.randn(d), z=time_major(d),
                  delta_bias=torch.randn(d) * 0.1, delta_softplus=True)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn(**inputs)
        return time.perf_counter() - t0

    candidates = {"sequential reference": selective_scan_reference, "chunked PyTorch": selective_scan_chunked}
    if cpu_kernel.load() is not None:
        candidates["fused C kernel"] = selective_scan
    with torch.inference_mode():
        expected = selective_scan_reference(**inputs)
        for fn in candidates.values():
            torch.testing.assert_close(fn(**inputs), expected, rtol=1e-4, atol=1e-4)
        rounds = [{name: timed(fn) for name, fn in candidates.items()} for _ in range(args.repeats)]
    print(f"selective scan b={b} l={length} d_inner={d} d_state={n}, {torch.get_num_threads()} threads, "
          f"{args.repeats} rounds")
    if "fused C kernel" not in candidates:
        print("  (no C compiler: the fused kernel is not built; selective_scan runs the chunked path)")
    for name in candidates:
        seconds = statistics.median(r[name] for r in rounds)
        line = f"  {name:22s}{seconds:.3f} s (median)"
        if name != "sequential reference":
            ratio = statistics.median(r["sequential reference"] / r[name] for r in rounds)
            line += f"   {ratio:5.1f}x faster than the reference (median of per-round ratios; target >= 5x)"
        print(line)

if __name__ == "__main__":
    main()
