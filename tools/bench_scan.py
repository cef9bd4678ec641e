"""Speed of the chunked CPU scan against the sequential reference, measured in one run.

    python tools/bench_scan.py [--batch 64 --length 784 --d-inner 128 --d-state 16 --repeats 5]

Runs the two alternately (A B A B …) so drift on a shared machine hits both, and prints each
one's median seconds and the median of the per-pair ratios. Target (issue 3): ≥ 5× at the defaults.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mq_export.scan import selective_scan, selective_scan_reference


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
    inputs = dict(u=torch.randn(b, d, length), delta=torch.randn(b, d, length) * 0.5 - 1.0,
                  A=-torch.rand(d, n) * 8, B=torch.randn(b, n, length), C=torch.randn(b, n, length),
                  D=torch.randn(d), z=torch.randn(b, d, length), delta_bias=torch.randn(d) * 0.1,
                  delta_softplus=True)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn(**inputs)
        return time.perf_counter() - t0

    with torch.inference_mode():
        torch.testing.assert_close(selective_scan(**inputs), selective_scan_reference(**inputs), rtol=1e-4, atol=1e-4)
        pairs = [(timed(selective_scan_reference), timed(selective_scan)) for _ in range(args.repeats)]
    ref, fast = zip(*pairs)
    ratio = statistics.median(r / f for r, f in pairs)
    print(f"selective scan b={b} l={length} d_inner={d} d_state={n}, {torch.get_num_threads()} threads, "
          f"{args.repeats} pairs")
    print(f"  sequential reference  {statistics.median(ref):.3f} s (median)")
    print(f"  chunked               {statistics.median(fast):.3f} s (median)")
    print(f"  speed-up              {ratio:.2f}x (median of per-pair ratios; target >= 5x)")


if __name__ == "__main__":
    main()
