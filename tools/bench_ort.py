#!/usr/bin/env python3
"""ONNX Runtime latency of exported models, as ratios:

* ORT FP32 vs the PyTorch CPU forward, with the scan nodes run by the native kernels
  (`mq_export.runtime.ort_native`; --scan, default auto) and, for comparison, by the op's
  standard-op function body,
* ORT INT8 (W8A8 Q/DQ export) vs ORT FP32, both with the same scan implementation,

on the bundled MNIST classifier (batch 64, length 784), on a random LM-sized model (d_model 768,
4 layers, vocab 50280, batch 1, length 512) and on the bundled Mamba-2 LM shakespeare-mamba2 (its
scans are SSDScan nodes; batch 8, length 256). The INT8 models use hand-built per-tensor activation
/ per-channel weight quantizers in the qspec contract (absmax scales, RTN weights): latency does
not depend on how the scales were chosen. Also lists which nodes ORT's optimizer turned the Q/DQ
graph into (e.g. MatMulIntegerToFloat, QLinearMatMul, DynamicQuantizeMatMul).

The INT8 sessions follow `mq_export.runtime.ort.int8_matmul_policy` (--int8-matmul, default auto: integer
kernels only on CPUs where ORT's integer GEMM is exact). A speed-up is printed only for an INT8
graph whose logits match fake-quant PyTorch (max rel err <= 1e-2); otherwise the script says why
and exits with status 1.

    python tools/bench_ort.py [--reps 5] [--threads 2] [--skip-lm] [--skip-mamba2]
                              [--int8-matmul auto|integer|exact] [--scan auto|native|function_body]
"""
from __future__ import annotations

import argparse
import collections
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mq_export.export.onnx import export_onnx  # noqa: E402
from mq_export.load.bundled import bundled  # noqa: E402
from mq_export.load.checkpoints import load_classifier  # noqa: E402
from mq_export.models.mamba import LMConfig, MambaLMHeadModel, MixerConfig  # noqa: E402
from mq_export.runtime.ort import (INT8_MATMUL_CHOICES, SCAN_CHOICES, Int8MatMul, ScanImplementation,  # noqa: E402
                                   cpu_info, int8_matmul_policy, scan_implementation, session)
from mq_export.quant.qspec import ActQuant, FakeQuantize, WeightQuant  # noqa: E402

logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def fake_quantize_w8a8(model: torch.nn.Module, sample: torch.Tensor) -> torch.nn.Module:
    peaks = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: peaks.__setitem__(n, float(o.abs().max())))
             for n, m in model.named_modules() if hasattr(m, "quantizer")]
    with torch.inference_mode():
        model(sample)
    for h in hooks:
        h.remove()
    for name, m in model.named_modules():
        if hasattr(m, "quantizer"):
            m.quantizer = FakeQuantize(ActQuant(scale=max(peaks[name], 1e-8) / 127))
        if isinstance(m, torch.nn.Linear) and not hasattr(m, "weight_quant"):
            w = m.weight.data
            wq = WeightQuant(scale=w.abs().amax(1).clamp_min(1e-8) / 127, bits=8)
            m.weight_quant = wq
            if m.weight.data_ptr() == w.data_ptr():
                m.weight.data = wq.dequantize(wq.quantize(w))
    return model


def best_of(fns: dict, reps: int) -> dict:
    """Best time of each function over `reps` rounds; each round runs every function once, so load
    from other jobs falls on all of them alike and their ratios stay meaningful."""
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


MAX_REL_ERROR = 1e-2   # INT8 vs fake-quant logits beyond this: the timing is of a wrong graph


def fused_ops(path: Path, threads: int, int8_matmul: Int8MatMul, scan: ScanImplementation) -> dict:
    """Op histogram of the graph ORT actually runs (optimized model; a function body inlined)."""
    optimized = path.with_name(f"{path.stem}_optimized.onnx")
    session(path, threads=threads, int8_matmul=int8_matmul, scan=scan, optimized_model=optimized)
    counts = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    return {k: counts[k] for k in sorted(counts) if k in {
        "QuantizeLinear", "DequantizeLinear", "MatMul", "FusedMatMul", "QLinearMatMul", "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul", "MatMulInteger", "QGemm", "Gemm", "Loop", "SelectiveScan", "SSDScan", "QLinearConv",
        "Conv"}}


def bench(name: str, make_model, x: torch.Tensor, feed_name: str, reps: int, threads: int, tmp: Path,
          int8_matmul: Int8MatMul, scan: ScanImplementation) -> dict:
    model = make_model()
    fp32_path, int8_path = tmp / f"{name}_fp32.onnx", tmp / f"{name}_int8.onnx"
    export_onnx(model, fp32_path)
    qmodel = fake_quantize_w8a8(make_model(), x[:1, : min(x.shape[1], 256)])
    export_onnx(qmodel, int8_path)
    s_fp32 = session(fp32_path, threads=threads, scan=scan)
    s_body = session(fp32_path, threads=threads, scan="function_body")
    s_int8 = session(int8_path, threads=threads, int8_matmul=int8_matmul, scan=scan)
    feed = {feed_name: x.numpy()}
    with torch.inference_mode():
        best = best_of({"torch": lambda: model(x), "fp32": lambda: s_fp32.run(None, feed),
                        "body": lambda: s_body.run(None, feed), "int8": lambda: s_int8.run(None, feed)}, reps)
        ref = qmodel(x).numpy()
    t_torch, t_fp32, t_body, t_int8 = best["torch"], best["fp32"], best["body"], best["int8"]
    out = s_int8.run(None, feed)[0]
    return {"model": name, "input": tuple(x.shape), "torch_s": t_torch, "ort_fp32_s": t_fp32, "ort_int8_s": t_int8,
            "ort_body_s": t_body, "ort_fp32_over_torch": t_fp32 / t_torch, "ort_body_over_torch": t_body / t_torch,
            "int8_speedup_over_fp32": t_fp32 / t_int8,
            "int8_vs_fakequant_max_rel": float(np.abs(out - ref).max() / np.abs(ref).max()),
            "ort_int8_graph": fused_ops(int8_path, threads, int8_matmul, scan)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-lm", action="store_true", help="leave out the LM-sized random Mamba-1")
    parser.add_argument("--skip-mamba2", action="store_true", help="leave out shakespeare-mamba2")
    parser.add_argument("--int8-matmul", choices=INT8_MATMUL_CHOICES, default=None,
                        help="INT8 MatMul kernels (default: $MQ_EXPORT_ORT_INT8_MATMUL or auto)")
    parser.add_argument("--scan", choices=SCAN_CHOICES, default=None,
                        help="scan implementation of the timed sessions (default: $MQ_EXPORT_ORT_SCAN or auto)")
    args = parser.parse_args()
    int8_matmul = int8_matmul_policy(args.int8_matmul)
    scan = scan_implementation(args.scan)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows.append(bench("mnist", load_classifier, torch.randn(64, 784, 1), "x", args.reps, args.threads, tmp,
                          int8_matmul, scan))
        if not args.skip_lm:
            cfg = LMConfig(mixer=MixerConfig(d_model=768), n_layer=4, vocab_size=50280)

            def make_lm():
                torch.manual_seed(0)
                return MambaLMHeadModel(cfg).eval()
            ids = torch.randint(0, cfg.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
            rows.append(bench("lm-768x4", make_lm, ids, "input_ids", args.reps, args.threads, tmp, int8_matmul,
                              scan))
        if not args.skip_mamba2:
            mamba2 = bundled("shakespeare-mamba2")
            ids = torch.randint(0, len(mamba2.tokenizer()), (8, 256), generator=torch.Generator().manual_seed(0))
            rows.append(bench("mamba2", mamba2.load, ids, "input_ids", args.reps, args.threads, tmp, int8_matmul, scan))
    print(f"CPU {cpu_info().model}  threads={args.threads}  best of {args.reps} interleaved rounds")
    print(f"INT8 MatMul kernels: {int8_matmul.to_dict()['kernels']} ({int8_matmul.reason})")
    print(f"scan nodes: {scan.name} ({scan.reason})")
    wrong = []
    for r in rows:
        print(f"{r['model']:9s} input {r['input']}: torch {r['torch_s']*1e3:8.1f} ms | ORT fp32 {r['ort_fp32_s']*1e3:8.1f} ms"
              f" | ORT int8 {r['ort_int8_s']*1e3:8.1f} ms | ORT fp32 function body {r['ort_body_s']*1e3:8.1f} ms")
        error = r["int8_vs_fakequant_max_rel"]
        if error <= MAX_REL_ERROR:
            speedup = f"ORT int8 speed-up over ORT fp32 = {r['int8_speedup_over_fp32']:.2f}x"
        else:
            speedup = f"ORT int8 speed-up: not reported, INT8 differs from fake-quant by more than {MAX_REL_ERROR:.0e}"
            wrong.append(f"{r['model']}: ORT INT8 differs from fake-quant PyTorch by max rel err {error:.1e} "
                         f"(> {MAX_REL_ERROR:.0e})")
        print(f"          ORT fp32 / torch = {r['ort_fp32_over_torch']:.2f}x (function body: "
              f"{r['ort_body_over_torch']:.2f}x)   {speedup}   int8 vs fake-quant max rel err = {error:.1e}")
        print(f"          ORT int8 graph after optimization: {r['ort_int8_graph']}")
    if wrong:
        hint = ["(--int8-matmul exact keeps Q/DQ in float)"] if int8_matmul.integer else []
        sys.exit("\n  ".join(["no INT8 speed-up reported for graphs that differ from fake-quant:", *wrong, *hint]))


if __name__ == "__main__":
    main()
