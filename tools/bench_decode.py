"""Decode benchmark on the bundled char LMs (Mamba-1 shakespeare-charlm, Mamba-2 shakespeare-mamba2):
ONNX Runtime tokens/s of the FP32 and the quantized step graphs (batch 1, greedy), PyTorch step
decoding for reference, and prefill time vs length. Each ORT graph runs twice: scan nodes through
the native kernels (mq_export.runtime.ort_native, where they build) and through the op's function
body.

    python tools/bench_decode.py                       # both models, FP32 vs MambaQuant W8A8, 2 threads
    python tools/bench_decode.py --model shakespeare-mamba2 --method rtn --tokens 500 --lengths 16 128 1024
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import torch

from mq_export.api import calibrate, load, quantize
from mq_export.load.bundled import bundled
from mq_export.export.decode import export_decode
from mq_export.runtime.decode import OrtDecoder, TorchDecoder, generate
from mq_export.runtime.ort import SCAN_ENV, scan_implementation


@contextlib.contextmanager
def scan_choice(choice: str):
    """Sessions made inside use this scan implementation (OrtDecoder reads $MQ_EXPORT_ORT_SCAN)."""
    previous = os.environ.get(SCAN_ENV)
    os.environ[SCAN_ENV] = choice
    try:
        yield
    finally:
        if previous is None:
            del os.environ[SCAN_ENV]
        else:
            os.environ[SCAN_ENV] = previous


def tokens_per_second(decoder, prompt: torch.Tensor, tokens: int, vocab: int) -> float:
    generate(decoder, prompt, 8, vocab)                      # warm-up (session allocations)
    t0 = time.perf_counter()
    generate(decoder, prompt, tokens, vocab)
    return tokens / (time.perf_counter() - t0)


def prefill_ms(decoder, length: int, vocab: int, repeats: int) -> float:
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length))
    decoder.prefill(ids)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        decoder.prefill(ids)
        best = min(best, time.perf_counter() - t0)
    return 1000 * best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=["shakespeare-charlm", "shakespeare-mamba2"])
    p.add_argument("--method", default="mambaquant", help="quantization method of the INT8 graph")
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256, 1024])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    for model in args.model:
        bench_model(model, args)


def bench_model(model_name: str, args: argparse.Namespace) -> None:
    """One bundled LM: its table of tokens/s and prefill times."""
    spec = bundled(model_name)
    tok = spec.tokenizer()
    vocab = len(tok)
    fp32 = load(model_name)
    calib, evaluation = spec.splits(None)
    stats = calibrate(fp32, calib, exclude=(evaluation,), batch_size=spec.batch_size, quiet=True)
    int8, _ = quantize(fp32, stats, method=args.method, w_bits=8, a_bits=8, quiet=True)
    prompt = tok.encode("ROMEO:")
    print(f"\n{model_name}, batch 1, {args.threads} threads, {args.tokens} greedy tokens after a "
          f"{len(prompt)}-character prompt; prefill: best of {args.repeats}")
    scans = ["function_body"] + (["native"] if scan_implementation().name == "native" else [])
    print(f"scan implementations: {', '.join(scans)}")
    rows = [("PyTorch FP32", TorchDecoder(fp32), None)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in (("ORT FP32", fp32), (f"ORT {args.method} W8A8", int8)):
            ex = export_decode(model, Path(tmp) / name.replace(" ", "_"))
            for scan in scans:
                with scan_choice(scan):
                    rows.append((f"{name} ({scan})", OrtDecoder(ex.step, ex.prefill, threads=args.threads), ex))
        header = ["backend", "tokens/s", *(f"prefill {n} ms" for n in args.lengths)]
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for name, decoder, _ in rows:
            tps = tokens_per_second(decoder, prompt, args.tokens, vocab)
            pre = [prefill_ms(decoder, n, vocab, args.repeats) for n in args.lengths]
            print(f"| {name} | {tps:.1f} | " + " | ".join(f"{v:.1f}" for v in pre) + " |", flush=True)


if __name__ == "__main__":
    main()
