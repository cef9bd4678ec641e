"""The bundled character LM: tokenizer, position splits, metrics, n-gram baselines, shipped assets."""
from __future__ import annotations

import math

import pytest
import torch

from mq_export.load.bundled import bundled
from mq_export.load.charlm import (CHARLM_DIR, WINDOW, CharTokenizer, calibration_text, charlm_splits, lm_metrics,
                              ngram_baselines, split_text, windows)
from mq_export.errors import MQExportError
from mq_export.models.mamba import MambaLMHeadModel


def test_tokenizer_round_trip_and_unknown_characters(tmp_path) -> None:
    tok = CharTokenizer.from_text("to be, or not\nto be")
    assert tok.decode(tok.encode("not to be")) == "not to be"
    tok.save(tmp_path / "vocab.json")
    assert CharTokenizer.load(tmp_path / "vocab.json").alphabet == tok.alphabet
    with pytest.raises(MQExportError, match="'z'"):
        tok.encode("zoo")


def test_splits_are_consecutive_and_disjoint() -> None:
    text = "".join(chr(65 + i % 26) for i in range(1000))
    parts = split_text(text)
    assert [len(p) for p in parts.values()] == [900, 50, 50]
    assert parts["train"] + parts["validation"] + parts["test"] == text


def test_windows_pair_inputs_with_next_characters() -> None:
    ids = torch.arange(20)
    inputs, labels = windows(ids, 6)
    assert inputs.shape == (3, 6)
    assert torch.equal(labels, inputs + 1)


def test_calibration_text_comes_from_training_text() -> None:
    train = "".join(chr(65 + i % 26) for i in range(5000))
    calib = calibration_text(train, count=4, length=10)
    assert len(calib) == 4 * 11
    assert all(calib[i * 11:(i + 1) * 11] in train for i in range(4))


def test_lm_metrics_match_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 8), torch.randint(0, 8, (2, 5))
    m = lm_metrics(logits, labels)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 8), labels.reshape(-1))
    assert m["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert 0 <= m["next_char_accuracy"] <= 1
    same = lm_metrics(logits, labels, logits)
    assert same["kl_to_fp32"] == pytest.approx(0, abs=1e-9) and same["agreement_with_fp32"] == 1.0


def test_ngram_baselines() -> None:
    ids = torch.tensor([0, 1] * 500)       # a perfectly alternating text: the bigram model nails it
    b = ngram_baselines(ids, ids, vocab_size=3)
    assert b["bigram"] < 1.01 < b["unigram"]


def test_shipped_assets_and_bundled_registration() -> None:
    spec = bundled("shakespeare-charlm")
    assert (CHARLM_DIR / "config.json").is_file()
    size = sum(p.stat().st_size for p in CHARLM_DIR.iterdir())
    assert size <= 8 * 2**20
    model = spec.load()
    assert isinstance(model, MambaLMHeadModel)
    calib, evaluation = spec.splits(4)
    assert calib.inputs.shape == (64, WINDOW) and evaluation.inputs.shape == (4, WINDOW)
    test_text = (CHARLM_DIR / "test.txt").read_text(encoding="utf-8")
    tok = spec.tokenizer()
    calib_text = tok.decode(calib.inputs[0])
    assert calib_text not in test_text        # calibration never uses test text
    with torch.no_grad():
        metrics = spec.metrics(model(evaluation.inputs), evaluation.labels, None)
    assert metrics["perplexity"] < 8
    with pytest.raises(MQExportError):
        charlm_splits(0)
