"""Benchmark of the CUDA selective-scan kernel (libmq_scan_kernels.so) against HBM bandwidth.

Reports, per I/O precision, the kernel time, the bytes it must move at least (u, delta, z read,
y written, B and C read once), achieved bytes/s against the device's peak (from its memory
clock and bus width, else --peak-gbs) and against a measured device copy, and the speed-up over
the PyTorch reference scan on the same GPU. Needs a CUDA device.

    python tools/bench_cuda_scan.py [--batch 8 --length 4096 --dim 2048 --dstate 16] [--peak-gbs 3350]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mq_export.errors import MQExportError  # noqa: E402
from mq_export.ops.cuda_kernel import selective_scan_cuda  # noqa: E402
from mq_export.ops.selective_scan import selective_scan_reference  # noqa: E402


def cuda_time(fn, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def peak_bandwidth(props, override_gbs: float | None) -> float | None:
    if override_gbs:
        return override_gbs * 1e9
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None  # double data rate


def copy_bandwidth() -> float:
    source = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    return 2 * source.numel() / cuda_time(lambda: target.copy_(source), 10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--dstate", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peak-gbs", type=float, help="device memory peak in GB/s, when torch does not report it")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda_scan: no CUDA device; this benchmark needs an NVIDIA GPU", file=sys.stderr)
        return 1

    props = torch.cuda.get_device_properties(0)
    peak = peak_bandwidth(props, args.peak_gbs)
    copy = copy_bandwidth()
    b, l, d, n = args.batch, args.length, args.dim, args.dstate
    print(f"{props.name}: peak {'unknown (pass --peak-gbs)' if peak is None else f'{peak / 1e9:.0f} GB/s'}, "
          f"device copy {copy / 1e9:.0f} GB/s; batch {b}, length {l}, d_inner {d}, d_state {n}")
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, device="cuda", generator=g)  # noqa: E731
    params = dict(A=-torch.exp(rand(d, n) * 0.5), D=rand(d), delta_bias=0.1 * rand(d), delta_softplus=True)
    activations = dict(u=rand(b, d, l), delta=rand(b, d, l) * 0.5 - 1, B=rand(b, n, l), C=rand(b, n, l),
                       z=rand(b, d, l))
    reference_time = cuda_time(lambda: selective_scan_reference(**activations, **params), 1)
    try:
        for dtype in (torch.float32, torch.float16):
            inputs = {k: v.to(dtype) for k, v in activations.items()}
            seconds = cuda_time(lambda: selective_scan_cuda(**inputs, **params), args.repeats)
            element = torch.finfo(dtype).bits // 8
            moved = (4 * b * d * l + 2 * b * n * l) * element + (d * n + 2 * d) * 4
            achieved = moved / seconds
            of_peak = "" if peak is None else f", {100 * achieved / peak:.0f}% of peak"
            print(f"{str(dtype).removeprefix('torch.'):8s} {seconds * 1e3:8.3f} ms  {moved / 1e6:8.1f} MB  "
                  f"{achieved / 1e9:7.0f} GB/s{of_peak}, {100 * achieved / copy:.0f}% of copy; "
                  f"{reference_time / seconds:.0f}x the PyTorch reference ({reference_time * 1e3:.0f} ms, fp32)")
    except MQExportError as error:
        print(f"bench_cuda_scan: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
