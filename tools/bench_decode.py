"""Decode benchmark on the bundled char LMs (Mamba-1 shakespeare-charlm, Mamba-2 shakespeare-mamba2):
ONNX Runtime tokens/s of the FP32 and the quantized step graphs (batch 1, greedy), PyTorch step
decoding for reference, and prefill time vs length. Each ORT graph runs twice: scan nodes through
the native kernels (mq_export.runtime.ort_native, where they build) and through the op's function
body. Then, per quantization method, the step graph alone: its time per token against the FP32
step graph's (interleaved rounds, the same state), which methods' INT8 step is slower than FP32,
and what ORT made of each step graph (node counts by op type after its optimizations).

    python tools/bench_decode.py                       # both models, FP32 vs RTN/SmoothQuant/Hadamard/MambaQuant W8A8
    python tools/bench_decode.py --model shakespeare-charlm --method rtn mambaquant --tokens 500 --lengths 16 128 1024
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from mq_export.api import calibrate, load, quantize
from mq_export.load.bundled import bundled
from mq_export.export.decode import export_decode
from mq_export.runtime.decode import OrtDecoder, TorchDecoder, generate
from mq_export.runtime.ort import SCAN_ENV, scan_implementation, session


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
    p.add_argument("--method", nargs="+", default=["rtn", "smoothquant", "hadamard", "mambaquant"],
                   help="quantization methods of the INT8 graphs (W8A8)")
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256, 1024])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--step-runs", type=int, default=300, help="step graph runs per round (5 rounds)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    for model in args.model:
        bench_model(model, args)


def step_graph(path: Path, threads: int) -> tuple:
    """A session of a step graph and ORT's optimized form of it (the graph it runs)."""
    optimized = path.with_name(f"{path.stem}_optimized.onnx")
    sess = session(path, threads=threads, optimized_model=optimized)
    return sess, onnx.load(str(optimized))


def step_seconds(sessions: dict, feeds: dict, runs: int, rounds: int = 5) -> dict:
    """Per step graph, the best over `rounds` of its mean time over `runs` steps; each round runs
    every graph in turn, so load from other jobs falls on all of them alike."""
    best = dict.fromkeys(sessions, float("inf"))
    for name, sess in sessions.items():
        sess.run(None, feeds[name])                            # warm-up
    for _ in range(rounds):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            for _ in range(runs):
                sess.run(None, feeds[name])
            best[name] = min(best[name], (time.perf_counter() - t0) / runs)
    return best


def bench_model(model_name: str, args: argparse.Namespace) -> None:
    """One bundled LM: its table of tokens/s and prefill times, then the step graphs alone."""
    spec = bundled(model_name)
    tok = spec.tokenizer()
    vocab = len(tok)
    fp32 = load(model_name)
    calib, evaluation = spec.splits(None)
    stats = calibrate(fp32, calib, exclude=(evaluation,), batch_size=spec.batch_size, quiet=True)
    models = {"FP32": fp32}
    for method in args.method:
        models[method] = quantize(fp32, stats, method=method, w_bits=8, a_bits=8, quiet=True)[0]
    prompt = tok.encode("ROMEO:")
    print(f"\n{model_name}, batch 1, {args.threads} threads, {args.tokens} greedy tokens after a "
          f"{len(prompt)}-character prompt; prefill: best of {args.repeats}")
    scans = ["function_body"] + (["native"] if scan_implementation().name == "native" else [])
    print(f"scan implementations: {', '.join(scans)}")
    rows = [("PyTorch FP32", TorchDecoder(fp32))]
    with tempfile.TemporaryDirectory() as tmp:
        exports = {name: export_decode(model, Path(tmp) / name) for name, model in models.items()}
        for name, ex in exports.items():
            label = "ORT FP32" if name == "FP32" else f"ORT {name} W8A8"
            for scan in scans:
                with scan_choice(scan):
                    rows.append((f"{label} ({scan})", OrtDecoder(ex.step, ex.prefill, threads=args.threads)))
        header = ["backend", "tokens/s", *(f"prefill {n} ms" for n in args.lengths)]
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for name, decoder in rows:
            tps = tokens_per_second(decoder, prompt, args.tokens, vocab)
            pre = [prefill_ms(decoder, n, vocab, args.repeats) for n in args.lengths]
            print(f"| {name} | {tps:.1f} | " + " | ".join(f"{v:.1f}" for v in pre) + " |", flush=True)
        compare_steps(exports, rows, prompt, args)


def compare_steps(exports: dict, rows: list, prompt: torch.Tensor, args: argparse.Namespace) -> None:
    """Each step graph alone (scan implementation in use), from the state after the prompt: time
    per step against FP32's, and the nodes ORT runs."""
    scan = scan_implementation().name
    sessions, feeds, graphs = {}, {}, {}
    for name, ex in exports.items():
        decoder = dict(rows)[f"ORT FP32 ({scan})" if name == "FP32" else f"ORT {name} W8A8 ({scan})"]
        decoder.prefill(prompt[None])
        feeds[name] = {"input_ids": np.array([[int(prompt[-1])]], np.int64), **dict(zip(decoder.past, decoder.state))}
        sessions[name], graphs[name] = step_graph(ex.step, args.threads)
    seconds = step_seconds(sessions, feeds, args.step_runs)
    print(f"\nstep graph alone ({scan} scan, {args.threads} threads, best of 5 rounds of {args.step_runs} steps):")
    print("| graph | µs/step | FP32 time / this time | nodes after ORT's optimizations | ops |\n|---|---|---|---|---|")
    slower = []
    for name, t in seconds.items():
        ops = collections.Counter(n.op_type for n in graphs[name].graph.node)
        ratio = seconds["FP32"] / t
        if name != "FP32" and ratio < 1:
            slower.append(f"{name} ({ratio:.2f}x)")
        print(f"| {name} | {t * 1e6:.0f} | {ratio:.2f}x | {sum(ops.values())} | "
              + ", ".join(f"{op} {n}" for op, n in ops.most_common()) + " |")
    print("INT8 step slower than FP32: " + (", ".join(slower) if slower else "none"))


if __name__ == "__main__":
    main()
