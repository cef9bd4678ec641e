"""The bundled character-level language model (`shakespeare-charlm`): its tokenizer, its fixed
data splits and its metrics.

tinyshakespeare (1,115,394 characters) is split by position: the first 90 % trains, the next 5 %
validates, the last 5 % tests. The package ships the test split and a calibration slice of the
training text (`CALIBRATION_WINDOWS` windows spread evenly over it), never test text for
calibration. Evaluation windows are non-overlapping and each starts from a zero state, so the
perplexity is that of `WINDOW`-character contexts.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from .data import Split
from ..errors import MQExportError
from ..evaluate import kl_to_reference
from .checkpoints import ASSETS

CHARLM_DIR = ASSETS / "shakespeare-charlm"
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)          # train, validation, test, by position
WINDOW = 256                                  # characters scored per evaluation window
CALIBRATION_WINDOWS = 64


class CharTokenizer:
    """One id per character of a fixed alphabet (ids follow the sorted alphabet)."""

    def __init__(self, alphabet: str) -> None:
        if len(set(alphabet)) != len(alphabet):
            raise MQExportError("tokenizer alphabet has repeated characters")
        self.alphabet = alphabet
        self._ids = {c: i for i, c in enumerate(alphabet)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @classmethod
    def load(cls, path: str | Path = CHARLM_DIR / "vocab.json") -> "CharTokenizer":
        return cls(json.loads(Path(path).read_text(encoding="utf-8"))["alphabet"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"alphabet": self.alphabet}, ensure_ascii=False) + "\n",
                              encoding="utf-8")

    def __len__(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> Tensor:
        unknown = sorted(set(text) - set(self._ids))
        if unknown:
            raise MQExportError(f"characters {''.join(unknown)!r} are not in the model's alphabet")
        return torch.tensor([self._ids[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.alphabet[int(i)] for i in ids)


def split_text(text: str) -> dict[str, str]:
    """{"train", "validation", "test"}: consecutive slices of `text` by `SPLIT_FRACTIONS`."""
    n = len(text)
    train_end = int(n * SPLIT_FRACTIONS[0])
    val_end = int(n * (SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]))
    return {"train": text[:train_end], "validation": text[train_end:val_end], "test": text[val_end:]}


def windows(ids: Tensor, length: int = WINDOW) -> tuple[Tensor, Tensor]:
    """Non-overlapping (inputs, next-character labels) windows, each (n, length)."""
    n = (len(ids) - 1) // length
    if n == 0:
        raise MQExportError(f"text of {len(ids)} characters is shorter than one window of {length + 1}")
    inputs = ids[:n * length].reshape(n, length)
    labels = ids[1:n * length + 1].reshape(n, length)
    return inputs, labels


def calibration_text(train_text: str, count: int = CALIBRATION_WINDOWS, length: int = WINDOW) -> str:
    """`count` windows of `length + 1` characters spread evenly over the training text, joined."""
    stride = (len(train_text) - (length + 1)) // max(count - 1, 1)
    return "".join(train_text[i * stride:i * stride + length + 1] for i in range(count))


def charlm_splits(limit: int | None = None, directory: Path = CHARLM_DIR) -> tuple[Split, Split]:
    """(calibration, evaluation) from the shipped files: the training-text slice and the test split
    (its first `limit` windows when given)."""
    tok = CharTokenizer.load(directory / "vocab.json")
    calib_ids = tok.encode((directory / "calibration.txt").read_text(encoding="utf-8"))
    calib = calib_ids.reshape(-1, WINDOW + 1)
    test_ids = tok.encode((directory / "test.txt").read_text(encoding="utf-8"))
    inputs, labels = windows(test_ids)
    if limit is not None:
        if limit <= 0:
            raise MQExportError(f"--limit must be positive, got {limit}")
        inputs, labels = inputs[:limit], labels[:limit]
    n = len(inputs)
    return (Split(f"tinyshakespeare-train-slice[{len(calib)}x{WINDOW}]", calib[:, :-1], calib[:, 1:]),
            Split(f"tinyshakespeare-test[0:{n * WINDOW}]", inputs, labels))


def lm_metrics(logits: Tensor, labels: Tensor, reference_logits: Tensor | None = None) -> dict:
    """Per-character `perplexity` and `next_char_accuracy`; with FP32 reference logits also
    `kl_to_fp32` (nats per character) and `agreement_with_fp32` (same argmax)."""
    flat = logits.reshape(-1, logits.shape[-1]).double()
    target = labels.reshape(-1)
    nll = torch.nn.functional.cross_entropy(flat, target)
    pred = flat.argmax(-1)
    metrics = {"perplexity": math.exp(float(nll)),
               "next_char_accuracy": float((pred == target).double().mean())}
    if reference_logits is not None:
        ref = reference_logits.reshape(-1, reference_logits.shape[-1])
        metrics["kl_to_fp32"] = kl_to_reference(ref, flat)
        metrics["agreement_with_fp32"] = float((pred == ref.argmax(-1)).double().mean())
    return metrics


def ngram_baselines(train_ids: Tensor, test_ids: Tensor, vocab_size: int) -> dict[str, float]:
    """Test perplexity of add-one-smoothed character unigram and bigram models fit on training ids."""
    unigram = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    unigram_logp = (unigram / unigram.sum()).log()
    pairs = torch.bincount(train_ids[:-1] * vocab_size + train_ids[1:],
                           minlength=vocab_size * vocab_size).double().reshape(vocab_size, vocab_size) + 1
    bigram_logp = (pairs / pairs.sum(1, keepdim=True)).log()
    return {"unigram": math.exp(-float(unigram_logp[test_ids[1:]].mean())),
            "bigram": math.exp(-float(bigram_logp[test_ids[:-1], test_ids[1:]].mean()))}
