"""The models shipped inside the package, each with its data split and its metrics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from .charlm import CHARLM_DIR, CharTokenizer, charlm_splits, lm_metrics
from .data import Split, mnist_splits
from ..errors import MQExportError
from ..evaluate import classification_metrics
from .checkpoints import BUNDLED_CLASSIFIER, load_classifier, load_lm


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    load: Callable[[], nn.Module]
    # (calibration, evaluation) splits; the int limits the evaluation split.
    splits: Callable[[int | None], tuple[Split, Split]]
    # (logits, labels, fp32 reference logits or None) → metrics dict
    metrics: Callable[[Tensor, Tensor, Tensor | None], dict]
    batch_size: int = 64
    tokenizer: Callable[[], object] | None = None   # language models: text ↔ ids (encode/decode)


BUNDLED: dict[str, BundledModel] = {
    "mnist": BundledModel(
        name="mnist",
        description="sequential-pixel MNIST classifier, 2 Mamba layers (d_model 64), Apache-2.0",
        load=lambda: load_classifier(BUNDLED_CLASSIFIER),
        splits=mnist_splits,
        metrics=classification_metrics,
    ),
    "shakespeare-charlm": BundledModel(
        name="shakespeare-charlm",
        description="character-level LM on tinyshakespeare, 4 Mamba-1 layers (d_model 128), mamba-ssm layout; "
                    "calibrates on a training-text slice, evaluates per-character perplexity on the test split",
        load=lambda: load_lm(CHARLM_DIR),
        splits=charlm_splits,
        metrics=lm_metrics,
        batch_size=16,
        tokenizer=CharTokenizer.load,
    ),
}


def bundled(name: str) -> BundledModel:
    if name not in BUNDLED:
        raise MQExportError(f"unknown model {name!r}; bundled models: {', '.join(sorted(BUNDLED))}")
    return BUNDLED[name]
