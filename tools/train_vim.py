"""Train the bundled Vision Mamba (`mnist-vim`) on the bundled MNIST test images.

    nice -n 10 python tools/train_vim.py --out mq_export/assets/mnist-vim

The model is this package's `VisionMamba` (hustvl/Vim's architecture and parameter names: patch
embedding, middle class token, absolute position embedding, pre-norm RMSNorm blocks of bimamba-v2
mixers, final norm, head) with patch 4 on 28×28 images: 49 patches + the class token. The data are
the three disjoint slices of `mq_export/load/mnist_vim.py`: this script reads only the training
slice; the evaluation slice, which neither training nor calibration sees, is scored once at the end.
Augmentation: random shifts of up to `--max-shift` pixels. The learning rate warms up, then follows a cosine
schedule over `max(step / steps, elapsed / time_limit)`, so a run stopped by the time limit has
still annealed. The scan trains through the fused CPU kernel and its backward kernel.

Writes OUT/vim_mnist.pth ({"model": state dict}, hustvl's layout) and OUT/report.json.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mq_export.evaluate import batched_logits
from mq_export.load.data import MNIST_MEAN, MNIST_STD
from mq_export.load.mnist_vim import SLICES, mnist_vim_split
from mq_export.models.vim import BiMixerConfig, VimConfig, VisionMamba

CHECKPOINT = "vim_mnist.pth"
BACKGROUND = (0.0 - MNIST_MEAN) / MNIST_STD      # a black pixel, normalised


def init_like_hustvl(model: VisionMamba, generator: torch.Generator, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
    """hustvl/Vim's initialisation: truncated-normal (0.02) position embedding, class token and
    head; mamba-ssm's dt_proj (uniform weight, bias = softplus⁻¹ of a log-uniform Δ in
    [dt_min, dt_max]) for both branches; out_proj scaled by 1/√depth; zero Linear biases."""
    with torch.no_grad():
        for p in (model.pos_embed, model.cls_token, model.head.weight):
            nn.init.trunc_normal_(p, std=0.02, generator=generator)
        nn.init.zeros_(model.head.bias)
        for block in model.layers:
            mixer = block.mixer
            for dt_proj in (mixer.dt_proj, mixer.dt_proj_b):
                std = mixer.cfg.rank ** -0.5
                nn.init.uniform_(dt_proj.weight, -std, std, generator=generator)
                dt = torch.exp(torch.rand(dt_proj.bias.shape, generator=generator)
                               * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            nn.init.kaiming_uniform_(mixer.out_proj.weight, a=math.sqrt(5), generator=generator)
            mixer.out_proj.weight /= math.sqrt(len(model.layers))


def shifted(images: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Each image moved by up to `max_shift` pixels in each direction, the border filled with background."""
    padded = F.pad(images, (max_shift,) * 4, value=BACKGROUND)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator).tolist()
    size = images.shape[-1]
    return torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--embed-dim", type=int, default=96)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--d-state", type=int, default=8)
    # 8, not mamba-ssm's auto ceil(96 / 16) = 6: the rotating methods need a Hadamard order on the dt path
    parser.add_argument("--dt-rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=30, help="steps of linear learning-rate warmup")
    parser.add_argument("--max-shift", type=int, default=1, help="augmentation: random shifts of up to this many pixels")
    parser.add_argument("--time-limit", type=float, default=1080, help="seconds of training (default 18 min)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)

    train = mnist_vim_split("training")
    cfg = VimConfig(mixer=BiMixerConfig(d_model=args.embed_dim, d_state=args.d_state, dt_rank=args.dt_rank),
                    depth=args.depth, image_size=28, patch_size=4, stride=4, in_chans=1, n_classes=10,
                    readout="middle")
    model = VisionMamba(cfg)
    init_like_hustvl(model, generator)
    decay = [p for name, p in model.named_parameters() if p.dim() >= 2 and "pos_embed" not in name]
    no_decay = [p for name, p in model.named_parameters() if p.dim() < 2 or "pos_embed" in name]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = len(train) // args.batch
    steps = args.epochs * steps_per_epoch
    print(f"{sum(p.numel() for p in model.parameters())} parameters; training on {train.name}, "
          f"{steps_per_epoch} steps per epoch, at most {args.epochs} epochs or {args.time_limit:.0f} s")
    start, step, progress = time.perf_counter(), 0, 0.0
    model.train()
    while progress < 1.0:
        order = torch.randperm(len(train), generator=generator)
        for first in range(0, steps_per_epoch * args.batch, args.batch):
            progress = max(step / steps, (time.perf_counter() - start) / args.time_limit)
            if progress >= 1.0:
                break
            lr = args.lr * min((step + 1) / args.warmup, 0.5 * (1 + math.cos(math.pi * progress)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = order[first:first + args.batch]
            loss = F.cross_entropy(model(shifted(train.inputs[index], generator, args.max_shift)),
                                   train.labels[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step % 50 == 0:
                print(f"step {step} epoch {step / steps_per_epoch:.2f} loss {loss.item():.4f} lr {lr:.2e} "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
    train_seconds = time.perf_counter() - start
    model.eval()
    evaluation = mnist_vim_split("evaluation")
    logits = batched_logits(model, evaluation.inputs, 256)
    accuracy = float((logits.argmax(-1) == evaluation.labels).double().mean())
    print(f"FP32 accuracy on {evaluation.name}: {accuracy:.4f} ({train_seconds:.0f} s of training, {step} steps)")

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, args.out / CHECKPOINT)
    report = {
        "model": "VisionMamba (hustvl/Vim bimamba v2, middle class token, abs pos embed, RMSNorm), "
                 f"embed {cfg.mixer.d_model}, depth {cfg.depth}, d_state {cfg.mixer.d_state}, dt_rank {cfg.mixer.rank}, "
                 f"patch {cfg.patch_size} "
                 f"on 28×28 ({cfg.length} tokens)",
        "checkpoint": CHECKPOINT,
        "data": {name: f"mnist-test[{a}:{b}]" for name, (a, b) in SLICES.items()},
        "fp32_accuracy": {"split": evaluation.name, "accuracy": accuracy},
        "training": {"steps": step, "epochs": round(step / steps_per_epoch, 2), "seconds": round(train_seconds),
                     "batch": args.batch, "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed,
                     "threads": args.threads, "augmentation": f"random shifts ≤ {args.max_shift} px",
                     "label_smoothing": 0.1,
                     "cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "command": "python tools/train_vim.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
