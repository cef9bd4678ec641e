"""Peak memory of `mq-export export` on a real-size language model: a random Mamba of mamba-1.4b's
shape (d_model 2048, 48 layers, vocab 50280, FP32: 5.5 GB) saved as a sharded HF checkpoint, then
`export --method none` and `export --method rtn --w-bits 8` with a small calibration file, each
in its own process. Prints the FP32 weight bytes and, per command, the wall time, the peak RSS
(the child's ru_maxrss from wait4) and its ratio to the weight bytes against the 2.5× target.

    python tools/bench_memory.py --layers 4          # quick look at the memory behaviour
    python tools/bench_memory.py                     # mamba-1.4b's shape (needs ~14 GB free RAM and ~14 GB disk)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

from mq_export.load.checkpoints import mamba_ssm_to_hf_keys, save_sharded
from mq_export.models.mamba import LMConfig, MambaLMHeadModel, MixerConfig

TARGET_RATIO = 2.5


def random_weights(cfg: LMConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named FP32 tensors of the model of `cfg`, made one at a time with trained-model-like
    scales (Linear weights ~ 1/sqrt(fan_in), mamba's A_log/D/dt_proj.bias initialisation), so a
    forward stays finite through every layer. The tied lm_head is left out, as HF saves it."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MambaLMHeadModel(cfg).state_dict().items() if k != "lm_head.weight"}
    gen = torch.Generator().manual_seed(seed)
    n = cfg.mixer.d_state
    for name, hf_name in zip(shapes, mamba_ssm_to_hf_keys(dict.fromkeys(shapes))):
        shape = shapes[name]
        if name.endswith("A_log"):
            t = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(shape[0], 1)
        elif name.endswith(("mixer.D", "norm.weight", "norm_f.weight")):
            t = torch.ones(shape)
        elif name.endswith("dt_proj.bias"):   # softplus⁻¹ of Δ drawn log-uniformly in [0.001, 0.1]
            dt = torch.exp(torch.rand(shape, generator=gen) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
            t = dt + torch.log(-torch.expm1(-dt))
        elif name.endswith("embedding.weight"):
            t = torch.randn(shape, generator=gen) * 0.02
        elif len(shape) >= 2:
            t = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        else:
            t = torch.randn(shape, generator=gen) * 0.1
        yield hf_name, t


def hf_config(cfg: LMConfig) -> dict:
    m = cfg.mixer
    return {"model_type": "mamba", "architectures": ["MambaForCausalLM"], "hidden_size": m.d_model,
            "num_hidden_layers": cfg.n_layer, "vocab_size": cfg.vocab_size, "state_size": m.d_state,
            "expand": m.expand, "conv_kernel": m.d_conv, "time_step_rank": m.rank, "intermediate_size": m.d_inner,
            "use_conv_bias": m.conv_bias, "use_bias": m.bias, "hidden_act": "silu",
            "layer_norm_epsilon": cfg.norm_epsilon, "tie_word_embeddings": cfg.tie_embeddings}


def run_measured(cmd: list[str], log: Path) -> tuple[int, float, int]:
    """(exit status, wall seconds, peak RSS in bytes) of `cmd`, its output going to `log`."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss * 1024   # Linux: ru_maxrss in KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--vocab", type=int, default=50280)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--shard-mb", type=int, default=2000, help="largest shard (default 2000 MB)")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-length", type=int, default=64)
    p.add_argument("--methods", nargs="+", default=["none", "rtn"], choices=["none", "rtn", "smoothquant",
                                                                            "hadamard", "mambaquant"])
    p.add_argument("--dir", type=Path, default=None, help="work here (kept) instead of a temporary directory")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    cfg = LMConfig(mixer=MixerConfig(d_model=args.d_model, d_state=args.d_state), n_layer=args.layers,
                   vocab_size=args.vocab, pad_vocab_size_multiple=1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        ckpt = work / "checkpoint"
        t0 = time.perf_counter()
        print(f"writing a random {args.layers}-layer d_model {args.d_model} checkpoint "
              f"(shards of ≤ {args.shard_mb} MB) …", flush=True)
        index = save_sharded(random_weights(cfg, args.seed), ckpt, args.shard_mb * 10 ** 6)
        (ckpt / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
        weight_bytes = json.loads(index.read_text())["metadata"]["total_size"]
        shards = len(set(json.loads(index.read_text())["weight_map"].values()))
        print(f"  {shards} shards, {time.perf_counter() - t0:.0f} s", flush=True)
        calib = work / "calib.pt"
        torch.save(torch.randint(0, args.vocab, (args.calib_samples, args.calib_length),
                                 generator=torch.Generator().manual_seed(args.seed + 1)), calib)
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   "unknown CPU")
        print(f"model: d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}; "
              f"FP32 weights {weight_bytes / 1e9:.2f} GB; CPU {cpu}, {os.cpu_count()} cores")
        for method in args.methods:
            out = work / f"out-{method}"
            cmd = [sys.executable, "-m", "mq_export", "export", str(ckpt), "-o", str(out), "--method", method,
                   "--json"]
            if method != "none":
                cmd += ["--w-bits", "8", "--calib", str(calib)]
            print(f"export --method {method}{' --w-bits 8' if method != 'none' else ''} …", flush=True)
            status, seconds, peak = run_measured(cmd, work / f"{method}.log")
            ratio = peak / weight_bytes
            onnx_bytes = sum(f.stat().st_size for f in out.glob("model.onnx*")) if out.is_dir() else 0
            print(f"  exit {status}, wall {seconds:.0f} s, peak RSS {peak / 1e9:.2f} GB = {ratio:.2f}× the FP32 "
                  f"weights ({'≤' if ratio <= TARGET_RATIO else '>'} {TARGET_RATIO}×: "
                  f"{'ok' if ratio <= TARGET_RATIO else 'over'}), ONNX files {onnx_bytes / 1e9:.2f} GB", flush=True)
            if status:
                print("  " + "  ".join((work / f"{method}.log").read_text().splitlines(True)[-5:]), flush=True)
            if out.is_dir():
                report = json.loads((out / "report.json").read_text())
                print(f"  seconds {json.dumps({k: round(v, 1) for k, v in report['seconds'].items()})}", flush=True)


if __name__ == "__main__":
    main()
