"""The bundled Nemotron-H character LM (`shakespeare-hybrid`): a transformers `save_pretrained`-style
directory within the size budget that this package's HF loader reads from its own config.json,
with transformers' own NemotronHForCausalLM on the same files as the independent reference; its
perplexity against the training record, the Mamba-2 char LM and the baselines; FP32 = ONNX
Runtime through `demo`."""
from __future__ import annotations

import json

import pytest
import torch

from mq_export.api import validate
from mq_export.commands.cli import main
from mq_export.load.bundled import HYBRID_CHARLM_DIR, MAMBA2_CHARLM_DIR, bundled
from mq_export.load.charlm import CHARLM_DIR, CharTokenizer
from mq_export.models.hybrid import ATTENTION, MAMBA, MLP
from mq_export.models.nemotron_h import NemotronHLM

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is not installed")

SLICE_WINDOWS = 8     # the test split's first windows (2,048 characters): perplexity 3.884 when shipped
SLICE_PERPLEXITY_BAND = (3.5, 4.5)


def test_shipped_checkpoint_is_a_small_nemotron_h_directory_with_charlm_tokenizer():
    config = json.loads((HYBRID_CHARLM_DIR / "config.json").read_text())
    assert config["model_type"] == "nemotron_h"
    assert sorted(p.name for p in HYBRID_CHARLM_DIR.iterdir()) == ["config.json", "model.safetensors", "training.json"]
    assert sum(p.stat().st_size for p in HYBRID_CHARLM_DIR.iterdir()) <= 8 * 2**20
    spec = bundled("shakespeare-hybrid")
    model = spec.load()
    assert isinstance(model, NemotronHLM)
    assert set(model.cfg.layer_kinds) == {MAMBA, ATTENTION, MLP}
    alphabet = CharTokenizer.load(CHARLM_DIR / "vocab.json").alphabet
    assert spec.tokenizer().alphabet == alphabet and config["vocab_size"] == len(alphabet)


def test_transformers_reads_the_same_directory_and_gives_the_same_logits():
    reference, info = transformers.NemotronHForCausalLM.from_pretrained(HYBRID_CHARLM_DIR, output_loading_info=True)
    assert not any(info.values()), info    # every tensor read, none missing, none left over
    tok = CharTokenizer.load()
    ids = tok.encode((CHARLM_DIR / "test.txt").read_text(encoding="utf-8")[:300]).reshape(2, 150)
    with torch.no_grad():
        expected = reference.eval()(ids).logits
        ours = bundled("shakespeare-hybrid").load()(ids)
    assert float((ours - expected).abs().max() / expected.abs().max()) <= 1e-4


def test_perplexity_is_the_training_record_and_well_below_the_baselines():
    spec = bundled("shakespeare-hybrid")
    record = json.loads((HYBRID_CHARLM_DIR / "training.json").read_text())
    mamba2 = json.loads((MAMBA2_CHARLM_DIR / "training.json").read_text())
    metrics, logits = validate(spec.load(), spec.splits(None)[1], spec.metrics, batch_size=64, quiet=True)
    assert metrics["perplexity"] == pytest.approx(record["test_perplexity"], rel=1e-4)
    assert metrics["perplexity"] < mamba2["test_perplexity"] < 0.5 * record["baselines_add_one"]["test"]["bigram"]
    _, first_windows = spec.splits(SLICE_WINDOWS)
    low, high = SLICE_PERPLEXITY_BAND
    assert low <= spec.metrics(logits[:SLICE_WINDOWS], first_windows.labels, None)["perplexity"] <= high


def test_demo_without_quantization_onnx_runtime_equals_fp32(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "shakespeare-hybrid", "--method", "none", "--limit", "2", "-o", str(out),
                 "--json"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["eval"]["samples"] == 2
    assert report["onnxruntime"]["perplexity"] == pytest.approx(report["fp32"]["perplexity"], rel=1e-5)


def test_quantized_decode_graphs_generate_what_the_fake_quant_model_generates():
    """W8A8 prefill and step graphs (Q/DQ on every Linear input, including attention's and the
    MLPs'; KV cache and Mamba states FP32) in ONNX Runtime give PyTorch's fake-quant tokens and
    logits. RTN: no online rotation, so no int8 code sits on a rounding boundary that float
    summation order could flip (with MambaQuant the tokens agree too, but single flips reach
    ~0.1 in a logit)."""
    from mq_export.commands.generate import run_generate
    from mq_export.quant.methods import QuantConfig

    result = run_generate("shakespeare-hybrid", "ROMEO:", 32, backend="onnxruntime", quant=QuantConfig(method="rtn"),
                          compare=True)
    assert result["compare_torch"]["tokens_equal"], result["compare_torch"]
    assert result["compare_torch"]["max_abs_logit_deviation"] <= 1e-4
