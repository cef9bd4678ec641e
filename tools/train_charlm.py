"""Train the bundled character-level Mamba LM (`shakespeare-charlm`) on tinyshakespeare.

    nice -n 10 python tools/train_charlm.py --data ../shared/data/tinyshakespeare/input.txt \
        --out mq_export/assets/shakespeare-charlm

The model is this package's `MambaLMHeadModel` (mamba-ssm layout: embedding, pre-norm RMSNorm
residual blocks, final norm, tied head). Training uses the 90 % training split; the 5 % validation
split picks nothing but is reported; the 5 % test split is scored once at the end and shipped with
the checkpoint, together with a calibration slice of the training text. The learning rate follows
a cosine schedule over `max(step / steps, elapsed / time_limit)`, so a run stopped by the time
limit has still annealed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from mq_export.load.charlm import (CharTokenizer, WINDOW, calibration_text, lm_metrics, ngram_baselines,
                              split_text, windows)
from mq_export.evaluate import batched_logits
from mq_export.load.checkpoints import save_mamba_ssm
from mq_export.models.mamba import LMConfig, MambaLMHeadModel, MixerConfig
from mq_export.ops.selective_scan import SelectiveScanOp, _discretize_delta, _finish


def differentiable_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                        z: Tensor | None = None, delta_bias: Tensor | None = None,
                        delta_softplus: bool = False, return_last_state: bool = False,
                        initial_state: Tensor | None = None):
    """`scan.selective_scan` without its in-place buffers, which autograd cannot differentiate:
    decays and inputs for all steps at once, one out-of-place multiply-add per step."""
    delta = _discretize_delta(delta, delta_bias, delta_softplus).transpose(1, 2)   # (b, l, d)
    decay = torch.exp(delta[..., None] * A)                                         # (b, l, d, n)
    inputs = (delta * u.transpose(1, 2))[..., None] * B.transpose(1, 2)[:, :, None, :]
    h = inputs.new_zeros(inputs[:, 0].shape) if initial_state is None else initial_state
    states = []
    # unbind, not indexing: an indexed slice's backward writes a full-size zero gradient per step.
    for inputs_t, decay_t in zip(inputs.unbind(1), decay.unbind(1)):
        h = torch.addcmul(inputs_t, decay_t, h)
        states.append(h)
    y = (torch.stack(states, 1) @ C.transpose(1, 2)[..., None]).squeeze(-1)        # (b, l, d)
    y = _finish(y.transpose(1, 2), u, D, z)
    return (y, h) if return_last_state else y


@contextlib.contextmanager
def differentiable_scans(model: nn.Module):
    """While open, `model`'s own scan modules run `differentiable_scan` (an instance attribute on
    each, removed after; the checkpoint holds weights only)."""
    scans = [m for m in model.modules() if isinstance(m, SelectiveScanOp)]
    for scan in scans:
        scan.forward = differentiable_scan
    try:
        yield
    finally:
        for scan in scans:
            del scan.forward


def init_like_mamba_ssm(model: MambaLMHeadModel, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
    """mamba-ssm's initialisation: Δ in [dt_min, dt_max] log-uniform through dt_proj's bias,
    embedding N(0, 0.02), out_proj scaled by 1/sqrt(n_layer) for the residual stream."""
    nn.init.normal_(model.backbone.embedding.weight, std=0.02)
    for block in model.backbone.layers:
        mixer = block.mixer
        rank = mixer.cfg.rank
        nn.init.uniform_(mixer.dt_proj.weight, -rank ** -0.5, rank ** -0.5)
        dt = torch.exp(torch.rand(mixer.cfg.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        with torch.no_grad():
            mixer.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))      # inverse softplus
            mixer.out_proj.weight /= math.sqrt(model.cfg.n_layer)


@torch.no_grad()
def perplexity(model: MambaLMHeadModel, ids: Tensor, limit: int | None = None) -> float:
    inputs, labels = windows(ids)
    if limit is not None:
        inputs, labels = inputs[:limit], labels[:limit]
    return lm_metrics(batched_logits(model, inputs, batch_size=32, quiet=True), labels)["perplexity"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="tinyshakespeare input.txt")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--time-limit", type=float, default=22 * 60, help="seconds; the run stops there")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    text = args.data.read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    parts = split_text(text)
    ids = {name: tok.encode(part) for name, part in parts.items()}
    train = ids["train"]

    cfg = LMConfig(mixer=MixerConfig(d_model=args.d_model, d_state=args.d_state), n_layer=args.n_layer,
                   vocab_size=len(tok))
    model = MambaLMHeadModel(cfg)
    init_like_mamba_ssm(model)
    # Weight decay on matrices only (not norms, biases, A_log, D), as is usual for Mamba.
    decayed = [p for n, p in model.named_parameters() if p.dim() >= 2 and "A_log" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "A_log" not in n)]
    opt = torch.optim.AdamW([{"params": decayed, "weight_decay": args.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params} parameters, vocab {len(tok)}, train/val/test chars "
          f"{len(train)}/{len(ids['validation'])}/{len(ids['test'])}", flush=True)

    history = []
    start = time.perf_counter()
    step = 0
    with differentiable_scans(model):
        while step < args.steps:
            elapsed = time.perf_counter() - start
            progress = max(step / args.steps, elapsed / args.time_limit)
            if progress >= 1:
                break
            lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * progress))
            for group in opt.param_groups:
                group["lr"] = lr
            offsets = torch.randint(0, len(train) - args.seq_len - 1, (args.batch,))
            batch = torch.stack([train[o:o + args.seq_len + 1] for o in offsets])
            model.train()
            logits = model(batch[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % 20 == 0:
                print(f"step {step} loss {loss.item():.4f} lr {lr:.2e} {time.perf_counter() - start:.0f}s",
                      flush=True)
            if step % args.eval_every == 0:
                model.eval()
                val = perplexity(model, ids["validation"], limit=64)
                history.append({"step": step, "seconds": round(time.perf_counter() - start), "val_ppl_64w": val})
                print(f"step {step} validation perplexity (64 windows) {val:.3f}", flush=True)
    train_seconds = time.perf_counter() - start

    model.eval()
    baselines = {split: ngram_baselines(train, ids[split], len(tok)) for split in ("validation", "test")}
    summary = {
        "data": "tinyshakespeare input.txt, split by position 90/5/5 (train/validation/test)",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("data", "out")},
        "parameters": n_params, "steps": step, "train_seconds": round(train_seconds),
        "tokens_seen": step * args.batch * args.seq_len,
        "validation_perplexity": perplexity(model, ids["validation"]),
        "test_perplexity": perplexity(model, ids["test"]),
        "eval_window": WINDOW,
        "baselines_add_one": baselines,
        "history": history,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save_mamba_ssm(model, args.out)
    tok.save(args.out / "vocab.json")
    (args.out / "test.txt").write_text(parts["test"], encoding="utf-8")
    (args.out / "calibration.txt").write_text(calibration_text(parts["train"]), encoding="utf-8")
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
