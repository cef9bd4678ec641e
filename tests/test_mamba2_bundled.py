"""The bundled Mamba-2 character LM (`shakespeare-mamba2`): a mamba-ssm Mamba2 checkpoint within
the size budget, the same tokenizer and test split as `shakespeare-charlm`, and the test
perplexity its training record states."""
from __future__ import annotations

import json

import pytest
import torch

from mq_export.load.bundled import MAMBA2_CHARLM_DIR, bundled
from mq_export.load.charlm import CHARLM_DIR, CharTokenizer
from mq_export.models.mamba2 import Mamba2LM


def test_shipped_checkpoint_is_a_small_mamba_ssm_mamba2_directory():
    config = json.loads((MAMBA2_CHARLM_DIR / "config.json").read_text())
    assert config["ssm_cfg"]["layer"] == "Mamba2" and "model_type" not in config
    assert sum(p.stat().st_size for p in MAMBA2_CHARLM_DIR.iterdir()) <= 8 * 2**20
    assert isinstance(bundled("shakespeare-mamba2").load(), Mamba2LM)
    assert bundled("shakespeare-mamba2").tokenizer().alphabet == CharTokenizer.load(CHARLM_DIR / "vocab.json").alphabet


def test_test_perplexity_is_the_training_record_and_beats_mamba1():
    spec = bundled("shakespeare-mamba2")
    record = json.loads((MAMBA2_CHARLM_DIR / "training.json").read_text())
    mamba1 = json.loads((CHARLM_DIR / "training.json").read_text())
    _, evaluation = spec.splits(None)
    model = spec.load()
    with torch.no_grad():
        logits = torch.cat([model(chunk) for chunk in evaluation.inputs.split(64)])
    perplexity = spec.metrics(logits, evaluation.labels, None)["perplexity"]
    assert perplexity == pytest.approx(record["test_perplexity"], rel=1e-4)
    assert perplexity < mamba1["test_perplexity"] < record["baselines_add_one"]["test"]["bigram"]
