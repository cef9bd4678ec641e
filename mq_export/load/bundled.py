"""The models shipped inside the package, each with its data split and its metrics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from .charlm import CHARLM_DIR, CharTokenizer, charlm_splits, lm_metrics
from .data import Split, mnist_splits
from ..errors import MQExportError
from ..evaluate import classification_metrics
from .checkpoints import ASSETS, BUNDLED_CLASSIFIER, load_classifier, load_lm, load_vim
from .mnist_vim import mnist_vim_splits

MAMBA2_CHARLM_DIR = ASSETS / "shakespeare-mamba2"
HYBRID_CHARLM_DIR = ASSETS / "shakespeare-hybrid"
MNIST_VIM = ASSETS / "mnist-vim" / "vim_mnist.pth"


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


def _char_lm(name: str, directory, description: str) -> BundledModel:
    """A character LM trained on tinyshakespeare: all share shakespeare-charlm's tokenizer,
    calibration slice and test split."""
    return BundledModel(name=name, description=description, load=lambda: load_lm(directory), splits=charlm_splits,
                        metrics=lm_metrics, batch_size=16, tokenizer=CharTokenizer.load)


BUNDLED: dict[str, BundledModel] = {
    "mnist": BundledModel(
        name="mnist",
        description="sequential-pixel MNIST classifier, 2 Mamba layers (d_model 64), Apache-2.0",
        load=lambda: load_classifier(BUNDLED_CLASSIFIER),
        splits=mnist_splits,
        metrics=classification_metrics,
    ),
    "shakespeare-charlm": _char_lm(
        "shakespeare-charlm", CHARLM_DIR,
        "character-level LM on tinyshakespeare, 4 Mamba-1 layers (d_model 128), mamba-ssm layout; "
        "calibrates on a training-text slice, evaluates per-character perplexity on the test split"),
    "shakespeare-mamba2": _char_lm(
        "shakespeare-mamba2", MAMBA2_CHARLM_DIR,
        "character-level LM on tinyshakespeare, 4 Mamba-2 layers (d_model 128, 8 heads × 32, d_state 64), "
        "mamba-ssm Mamba2 layout; shakespeare-charlm's tokenizer, calibration slice and test split"),
    "shakespeare-hybrid": _char_lm(
        "shakespeare-hybrid", HYBRID_CHARLM_DIR,
        "character-level LM on tinyshakespeare, Nemotron-H hybrid of 8 layers M-M*M-M- (d_model 128; Mamba-2 "
        "8 heads × 32, d_state 64; attention 4 heads, 2 kv heads; relu² MLPs of 256), transformers' "
        "NemotronHForCausalLM layout; shakespeare-charlm's tokenizer, calibration slice and test split"),
    "mnist-vim": BundledModel(
        name="mnist-vim",
        description="Vision Mamba on 28×28 MNIST images (patch 4, middle class token, 6 bimamba-v2 layers, "
                    "embed 96), hustvl/Vim layout; trained, calibrated and evaluated on disjoint test-set slices",
        load=lambda: load_vim(MNIST_VIM),
        splits=mnist_vim_splits,
        metrics=classification_metrics,
    ),
}


def bundled(name: str) -> BundledModel:
    if name not in BUNDLED:
        raise MQExportError(f"unknown model {name!r}; bundled models: {', '.join(sorted(BUNDLED))}")
    return BUNDLED[name]
