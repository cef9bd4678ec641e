"""Running a model over a split and scoring it: the `validate` stage's arithmetic.

Every backend (PyTorch FP32, PyTorch fake-quant, ONNX Runtime, TensorRT) produces logits; the
metrics here are computed the same way for all of them.
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

# Logits for one batch of inputs.
Forward = Callable[[Tensor], Tensor]


def progress_enabled(quiet: bool = False) -> bool:
    return not quiet and sys.stderr.isatty()


def batched_logits(forward: Forward, inputs: Tensor, batch_size: int = 64, desc: str = "evaluate",
                   quiet: bool = False, workers: int = 1) -> Tensor:
    """Logits for all `inputs`, in batches, with a progress bar on a terminal. `workers` > 1 runs
    that many batches at once from threads, for a single-threaded forward that releases the GIL
    (an ONNX Runtime session with one intra-op thread)."""
    def run(start: int) -> Tensor:
        # Per thread: inference mode is thread-local. (The scan's subnormal states are flushed inside
        # the CPU kernel's own call; the caller's floating-point mode is left alone.)
        with torch.inference_mode():
            return forward(inputs[start:start + batch_size]).float()

    starts = range(0, len(inputs), batch_size)
    with ThreadPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        results = pool.map(run, starts) if pool else map(run, starts)
        outs = list(tqdm(results, total=len(starts), desc=desc, unit="batch",
                         disable=not progress_enabled(quiet), leave=False))
    return torch.cat(outs)


def kl_to_reference(reference_logits: Tensor, logits: Tensor) -> float:
    """Mean over samples of KL(P_ref ‖ P) of the output softmax, in nats."""
    ref_logp = torch.log_softmax(reference_logits.double(), dim=-1)
    logp = torch.log_softmax(logits.double(), dim=-1)
    return float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())


def classification_metrics(logits: Tensor, labels: Tensor, reference_logits: Tensor | None = None) -> dict:
    """`accuracy` in [0, 1]; with FP32 reference logits also `kl_to_fp32` and `agreement_with_fp32`."""
    pred = logits.argmax(-1)
    metrics = {"accuracy": float((pred == labels).double().mean())}
    if reference_logits is not None:
        metrics["kl_to_fp32"] = kl_to_reference(reference_logits, logits)
        metrics["agreement_with_fp32"] = float((pred == reference_logits.argmax(-1)).double().mean())
    return metrics
