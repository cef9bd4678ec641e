"""Train the bundled character-level LMs (`shakespeare-charlm`, `shakespeare-mamba2`,
`shakespeare-hybrid`) on tinyshakespeare.

    nice -n 10 python tools/train_charlm.py --data ../shared/data/tinyshakespeare/input.txt \
        --out mq_export/assets/shakespeare-charlm
    nice -n 10 python tools/train_charlm.py --arch mamba2 --data ../shared/data/tinyshakespeare/input.txt \
        --out mq_export/assets/shakespeare-mamba2 --batch 16 --threads 1 --time-limit 1080
    nice -n 10 python tools/train_charlm.py --arch nemotron-h --data ../shared/data/tinyshakespeare/input.txt \
        --out mq_export/assets/shakespeare-hybrid --batch 16 --threads 1 --time-limit 1500

The model is this package's `MambaLMHeadModel` (`--arch mamba1`) or `Mamba2LM` (`--arch mamba2`), in
mamba-ssm's layout: embedding, pre-norm RMSNorm residual blocks, final norm, tied head; or a
Nemotron-H hybrid (`--arch nemotron-h`): Mamba-2, attention and MLP layers in `--pattern`, untied
head, built from the transformers config.json it is saved with through the loader's own
`mq_export.load.checkpoints.model_config`, and saved as config.json + model.safetensors in transformers' names, so that
both `mq_export.load` and transformers' `NemotronHForCausalLM.from_pretrained` read the directory.
Both scans pick a differentiable form whenever autograd needs them (Mamba-1: the fused kernel with
its C backward, or `selective_scan_differentiable`; Mamba-2: `ssd_scan`'s chunked form).
Training uses the 90 % training split; the 5 % validation
split picks nothing but is reported; the 5 % test split is scored once at the end and shipped with
the checkpoint, together with a calibration slice of the training text. The learning rate follows
a cosine schedule over `max(step / steps, elapsed / time_limit)`, so a run stopped by the time
limit has still annealed. The tokenizer, test split and calibration slice are written with the
Mamba-1 model (`shakespeare-charlm`); the other two share them.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from mq_export.load.charlm import (CharTokenizer, WINDOW, calibration_text, lm_metrics, ngram_baselines,
                                   split_text, windows)
from mq_export.evaluate import batched_logits
from mq_export.load.checkpoints import model_config, save_mamba_ssm
from mq_export.models.attention import Attention
from mq_export.models.hybrid import HybridLM
from mq_export.models.mamba import LMConfig, MambaLMHeadModel, MambaMixer, MixerConfig
from mq_export.models.mamba2 import Mamba2LM, Mamba2LMConfig, Mamba2Mixer, Mamba2MixerConfig

# Nemotron-H's hybrid_override_pattern characters → transformers' layers_block_type names.
NEMOTRON_H_LAYER_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}


def init_like_mamba_ssm(model: MambaLMHeadModel | HybridLM, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
    """mamba-ssm's initialisation: Δ in [dt_min, dt_max] log-uniform through the Δ bias (Mamba-1:
    dt_proj's bias, one per channel; Mamba-2: dt_bias, one per head, and A = −uniform(1, 16) per
    head), embedding N(0, 0.02), each layer's projection into the residual stream (out_proj; a
    hybrid's attention o_proj and MLP down_proj) scaled by 1/sqrt(layers)."""
    backbone = model.backbone
    embedding = backbone.input_embedding if isinstance(model, HybridLM) else backbone.embedding
    nn.init.normal_(embedding.weight, std=0.02)
    scale = math.sqrt(len(backbone.layers))
    for block in backbone.layers:
        mixer = block.mixer
        with torch.no_grad():
            if not isinstance(mixer, (MambaMixer, Mamba2Mixer)):
                (mixer.o_proj if isinstance(mixer, Attention) else mixer.down_proj).weight /= scale
                continue
            if isinstance(mixer, MambaMixer):
                rank = mixer.cfg.rank
                nn.init.uniform_(mixer.dt_proj.weight, -rank ** -0.5, rank ** -0.5)
                dt_bias = mixer.dt_proj.bias
            else:
                mixer.A_log.copy_(torch.log(torch.empty_like(mixer.A_log).uniform_(1, 16)))
                dt_bias = mixer.dt_bias
            dt = torch.exp(torch.rand(dt_bias.shape) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=1e-4)
            dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))      # inverse softplus
            mixer.out_proj.weight /= scale


def nemotron_h_config(args: argparse.Namespace, vocab_size: int) -> dict:
    """The hybrid's config.json: every setting of transformers' NemotronHConfig that shapes the
    model, written out (Mamba-2 layers of expand 2 × d_model channels in heads of `--headdim`,
    grouped-query attention over whole d_model, relu² MLPs), no special tokens (a character
    vocabulary has none)."""
    return {
        "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "dtype": "float32",
        "vocab_size": vocab_size, "hidden_size": args.d_model,
        "layers_block_type": [NEMOTRON_H_LAYER_TYPES[c] for c in args.pattern],
        "mamba_num_heads": 2 * args.d_model // args.headdim, "mamba_head_dim": args.headdim,
        "n_groups": args.ngroups, "ssm_state_size": args.d_state, "conv_kernel": 4, "expand": 2,
        "use_conv_bias": True, "use_bias": False, "mamba_hidden_act": "silu", "chunk_size": 64,
        "time_step_min": 1e-3, "time_step_max": 0.1, "time_step_floor": 1e-4,
        "num_attention_heads": args.attention_heads, "num_key_value_heads": args.kv_heads,
        "head_dim": args.d_model // args.attention_heads, "attention_bias": False, "attention_dropout": 0.0,
        "sliding_window": None, "max_position_embeddings": WINDOW,
        "intermediate_size": args.mlp_width, "mlp_hidden_act": "relu2", "mlp_bias": False,
        "layer_norm_epsilon": 1e-5, "residual_in_fp32": False, "hidden_dropout": 0.0,
        "tie_word_embeddings": False, "num_nextn_predict_layers": 0, "initializer_range": 0.02,
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None, "use_cache": True,
    }


def build_model(args: argparse.Namespace, vocab_size: int) -> MambaLMHeadModel | HybridLM:
    if args.arch == "nemotron-h":
        # Built as the loader builds it from the config.json it is saved with.
        family, cfg, _ = model_config(nemotron_h_config(args, vocab_size), Path("nemotron-h"))
        return family.build(cfg)
    if args.arch == "mamba1":
        return MambaLMHeadModel(LMConfig(mixer=MixerConfig(d_model=args.d_model, d_state=args.d_state),
                                         n_layer=args.n_layer, vocab_size=vocab_size))
    mixer = Mamba2MixerConfig(d_model=args.d_model, d_state=args.d_state, headdim=args.headdim,
                              ngroups=args.ngroups)
    return Mamba2LM(Mamba2LMConfig(mixer=mixer, n_layer=args.n_layer, vocab_size=vocab_size))


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor, limit: int | None = None) -> float:
    inputs, labels = windows(ids)
    if limit is not None:
        inputs, labels = inputs[:limit], labels[:limit]
    return lm_metrics(batched_logits(model, inputs, batch_size=32, quiet=True), labels)["perplexity"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="tinyshakespeare input.txt")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--arch", choices=("mamba1", "mamba2", "nemotron-h"), default="mamba1")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4, help="mamba1/mamba2 only")
    p.add_argument("--d-state", type=int, default=None, help="default 16 (mamba1), 64 (mamba2, nemotron-h)")
    p.add_argument("--headdim", type=int, default=32, help="Mamba-2 layers only")
    p.add_argument("--ngroups", type=int, default=1, help="Mamba-2 layers only")
    p.add_argument("--pattern", default="M-M*M-M-",
                   help="nemotron-h only: one character per layer, M Mamba-2, * attention, - MLP")
    p.add_argument("--attention-heads", type=int, default=4, help="nemotron-h only")
    p.add_argument("--kv-heads", type=int, default=2, help="nemotron-h only")
    p.add_argument("--mlp-width", type=int, default=256, help="nemotron-h only")
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
    if args.d_state is None:
        args.d_state = 16 if args.arch == "mamba1" else 64
    if not args.pattern or set(args.pattern) - set(NEMOTRON_H_LAYER_TYPES):
        p.error(f"--pattern {args.pattern!r}: expected a string of {', '.join(NEMOTRON_H_LAYER_TYPES)}")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    text = args.data.read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    parts = split_text(text)
    ids = {name: tok.encode(part) for name, part in parts.items()}
    train = ids["train"]

    model = build_model(args, len(tok))
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
    if args.arch == "nemotron-h":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out / "model.safetensors"),
                  metadata={"format": "pt"})
        (args.out / "config.json").write_text(json.dumps(nemotron_h_config(args, len(tok)), indent=2) + "\n")
    else:
        save_mamba_ssm(model, args.out)
    if args.arch == "mamba1":
        tok.save(args.out / "vocab.json")
        (args.out / "test.txt").write_text(parts["test"], encoding="utf-8")
        (args.out / "calibration.txt").write_text(calibration_text(parts["train"]), encoding="utf-8")
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
