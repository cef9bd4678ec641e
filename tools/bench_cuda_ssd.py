"""Benchmark and accuracy check of the CUDA SSD kernel (libmq_scan_kernels.so) against PyTorch's
chunked SSD (`mq_export.ops.ssd_scan.ssd_scan_chunked`) on the same GPU.

Default shape: one mamba2-130m layer's scan (batch 4, length 1024, 24 heads x headdim 64, d_state
128, 1 group; D per head, dt_bias, softplus, no z: mamba-ssm gates with the RMSNorm after the
scan). Accuracy is measured against the chunked SSD in float64 on the same (rounded) inputs, as
max |out - ref| / max |ref|: float32 I/O must be within 1e-5, float16 I/O within 1e-3 (a couple
of float16 steps at the output's scale); the float32 final state within 1e-5 either way. A decode
step (length 1, the prefill's final state in) is checked the same way. Any miss prints FAIL and
exits 1. Needs a CUDA device and the built kernel library (see mq_export.ops.cuda_kernel).

    python tools/bench_cuda_ssd.py [--batch 4 --length 1024 --heads 24 --headdim 64 --dstate 128 --groups 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mq_export.errors import MQExportError  # noqa: E402
from mq_export.ops.cuda_kernel import ssd_scan_cuda  # noqa: E402
from mq_export.ops.ssd_scan import ssd_scan_chunked  # noqa: E402

from bench_cuda_scan import cuda_time  # noqa: E402  (tools/ is this script's directory)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3}
STATE_TOLERANCE = 1e-5
ACTIVATIONS = ("x", "dt", "B", "C")


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return ((got.double() - reference).abs().max() / reference.abs().max()).item()


def layer_inputs(batch, length, heads, headdim, groups, dstate, seed=0, device="cuda") -> dict:
    """float32 inputs shaped like a trained Mamba-2 layer's: A = -exp(U(log 1, log 16)), dt_bias
    softplus^-1 of Δ in [1e-3, 0.1] (mamba-ssm's initialisation)."""
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, device=device, generator=g)  # noqa: E731
    uniform = lambda *shape: torch.rand(*shape, device=device, generator=g)  # noqa: E731
    dt_init = torch.exp(uniform(heads) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                        + torch.log(torch.tensor(1e-3)))
    return dict(x=rand(batch, length, heads, headdim), dt=rand(batch, length, heads) * 0.5,
                A=-torch.exp(uniform(heads) * torch.log(torch.tensor(16.0))),
                B=rand(batch, length, groups, dstate), C=rand(batch, length, groups, dstate), D=rand(heads),
                dt_bias=dt_init + torch.log(-torch.expm1(-dt_init)), dt_softplus=True)


def as_dtype(inputs: dict, dtype) -> dict:
    return {k: v.to(dtype) if k in ACTIVATIONS else v for k, v in inputs.items()}


def float64_reference(inputs: dict, initial_state=None):
    """ssd_scan_chunked in float64 on the inputs as given (already rounded to the I/O dtype)."""
    wide = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    state = None if initial_state is None else initial_state.double()
    return ssd_scan_chunked(**wide, initial_state=state, return_final_state=True)


def check(label: str, error: float, tolerance: float, failures: list[str], io_dtype: str) -> str:
    if error > tolerance:
        failures.append(f"{io_dtype} {label}: relative error {error:.2e} > {tolerance:.0e}")
    return f"{label} {error:.1e} ({'ok' if error <= tolerance else 'FAIL'})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--dstate", type=int, default=128)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda_ssd: no CUDA device; this benchmark needs an NVIDIA GPU", file=sys.stderr)
        return 1
    # The PyTorch side is timed and trusted in full float32, not TF32.
    torch.backends.cuda.matmul.allow_tf32 = False

    shape = (args.batch, args.length, args.heads, args.headdim, args.groups, args.dstate)
    print(f"{torch.cuda.get_device_name(0)}: batch {args.batch}, length {args.length}, {args.heads} heads x "
          f"{args.headdim}, d_state {args.dstate}, {args.groups} group(s)")
    inputs = layer_inputs(*shape)
    chunked_seconds = cuda_time(lambda: ssd_scan_chunked(**inputs), args.repeats)
    chunked_y = ssd_scan_chunked(**inputs)
    failures: list[str] = []
    try:
        for dtype in (torch.float32, torch.float16):
            name = str(dtype).removeprefix("torch.")
            rounded = as_dtype(inputs, dtype)
            y_ref, state_ref = float64_reference(rounded)
            seconds = cuda_time(lambda: ssd_scan_cuda(**rounded), args.repeats)
            y, state = ssd_scan_cuda(**rounded, return_final_state=True)
            # A decode step of the same layer continuing from the kernel's final state.
            next_token = as_dtype(layer_inputs(*shape, seed=1), dtype)
            step = {**rounded, **{k: next_token[k][:, :1] for k in ACTIVATIONS}}
            step_y_ref, step_state_ref = float64_reference(step, initial_state=state)
            step_y, step_state = ssd_scan_cuda(**step, initial_state=state, return_final_state=True)
            results = [check("y", relative_error(y, y_ref), TOLERANCE[dtype], failures, name),
                       check("final state", relative_error(state, state_ref), STATE_TOLERANCE, failures, name),
                       check("decode y", relative_error(step_y, step_y_ref), TOLERANCE[dtype], failures, name),
                       check("decode state", relative_error(step_state, step_state_ref), STATE_TOLERANCE, failures, name)]
            print(f"{name:8s} kernel {seconds * 1e3:8.3f} ms, {chunked_seconds / seconds:6.1f}x the PyTorch chunked "
                  f"SSD (float32, {chunked_seconds * 1e3:.3f} ms); vs float64: " + ", ".join(results))
    except MQExportError as error:
        print(f"bench_cuda_ssd: {error}", file=sys.stderr)
        return 1
    y64, _ = float64_reference(inputs)
    print(f"(PyTorch chunked SSD float32 vs float64: y {relative_error(chunked_y, y64):.1e})")
    if failures:
        print("FAIL: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
