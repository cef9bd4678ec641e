"""Real-size checkpoints, at toy size: sharded HF checkpoints (safetensors and .bin) and ONNX
files with external data."""
import json

import numpy as np
import onnx
import pytest
import torch

from mq_export.runtime import ort as mq_ort
from mq_export.errors import MQExportError
from mq_export.export.onnx import EXTERNAL_MIN_TENSOR_BYTES, export_onnx
from mq_export.load.checkpoints import load_lm, mamba_ssm_to_hf_keys, save_mamba_ssm, save_sharded
from mq_export.models.mamba import LMConfig, MambaLMHeadModel, MixerConfig
from mq_export.quant.qspec import WeightQuant
from mq_export.quant.quantize import rtn_scales


def small_lm(tie: bool = True) -> MambaLMHeadModel:
    cfg = LMConfig(mixer=MixerConfig(d_model=16, d_state=4, dt_rank=2), n_layer=3, vocab_size=40,
                   tie_embeddings=tie)
    lm = MambaLMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return lm


def hf_dir(lm: MambaLMHeadModel, directory, safetensors: bool = True, shard_bytes: int = 6000):
    """`lm` as HF writes a large MambaForCausalLM: config.json + shards + index (tied lm_head left out)."""
    m = lm.cfg.mixer
    (directory / "config.json").write_text(json.dumps({
        "model_type": "mamba", "hidden_size": m.d_model, "num_hidden_layers": lm.cfg.n_layer,
        "vocab_size": lm.cfg.vocab_size, "state_size": m.d_state, "expand": m.expand, "conv_kernel": m.d_conv,
        "time_step_rank": m.rank, "tie_word_embeddings": lm.cfg.tie_embeddings}))
    state = {k: v for k, v in lm.state_dict().items() if not (lm.cfg.tie_embeddings and k == "lm_head.weight")}
    return save_sharded(mamba_ssm_to_hf_keys(state).items(), directory, shard_bytes, safetensors=safetensors)


@pytest.mark.parametrize("safetensors", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_sharded_checkpoint_loads_equal_to_the_model(tmp_path, safetensors, tie):
    lm = small_lm(tie)
    index = hf_dir(lm, tmp_path, safetensors)
    suffix = ".safetensors" if safetensors else ".bin"
    shards = sorted(p.name for p in tmp_path.glob(f"*{suffix}"))
    assert index.name == ("model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json")
    stem = "model" if safetensors else "pytorch_model"
    assert len(shards) >= 3 and shards[0] == f"{stem}-00001-of-{len(shards):05d}{suffix}"
    meta = json.loads(index.read_text())
    assert set(meta["weight_map"].values()) == set(shards)
    assert meta["metadata"]["total_size"] == sum(v.numel() * 4 for k, v in lm.state_dict().items()
                                                 if not (tie and k == "lm_head.weight"))
    loaded = load_lm(tmp_path)
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight if tie else \
        loaded.lm_head.weight is not loaded.backbone.embedding.weight
    for key, value in lm.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not any(p.is_meta for p in loaded.parameters())
    ids = torch.randint(0, 40, (2, 9))
    torch.testing.assert_close(loaded(ids), lm(ids), rtol=0, atol=0)


def test_transformers_sharded_save_loads(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is not installed")
    cfg = transformers.MambaConfig(vocab_size=40, hidden_size=24, state_size=8, num_hidden_layers=3, expand=2,
                                   conv_kernel=4, time_step_rank=3)
    ref = transformers.MambaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, 40, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(load_lm(tmp_path)(ids), ref(ids).logits, rtol=1e-5, atol=1e-5)


def _break(directory, how: str) -> str:
    """Damage a sharded checkpoint; returns the text the error must contain."""
    index = directory / "model.safetensors.index.json"
    meta = json.loads(index.read_text())
    shard = sorted(set(meta["weight_map"].values()))[1]
    if how == "missing shard":
        (directory / shard).unlink()
        return f"lists shard '{shard}', which is not a file"
    if how == "key not in shard":
        meta["weight_map"]["backbone.layers.0.mixer.D"] = shard
        index.write_text(json.dumps(meta))
        return f"shard {directory / shard} lacks ['backbone.layers.0.mixer.D']"
    if how == "key missing from index":
        del meta["weight_map"]["backbone.layers.1.mixer.D"]
        index.write_text(json.dumps(meta))
        return "does not match the model: missing keys ['backbone.layers.1.mixer.D']"
    if how == "no weight_map":
        index.write_text(json.dumps({"metadata": {}}))
        return "is not a shard index"
    if how == "not json":
        index.write_text("{")
        return "is not a shard index"
    (directory / shard).write_bytes(b"garbage")
    return f"shard {directory / shard} is not a readable"


@pytest.mark.parametrize("how", ["missing shard", "key not in shard", "key missing from index", "no weight_map",
                                 "not json", "unreadable shard"])
def test_broken_shard_index_is_one_clear_error(tmp_path, how):
    hf_dir(small_lm(), tmp_path)
    expected = _break(tmp_path, how)
    with pytest.raises(MQExportError) as err:
        load_lm(tmp_path)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_single_file_wins_and_no_weights_is_an_error(tmp_path):
    lm = small_lm()
    save_mamba_ssm(lm, tmp_path)                  # config.json + pytorch_model.bin
    (tmp_path / "pytorch_model.bin.index.json").write_text("{}")   # ignored: the single file is there
    ids = torch.randint(0, 40, (1, 5))
    torch.testing.assert_close(load_lm(tmp_path)(ids), lm(ids))
    (tmp_path / "pytorch_model.bin").unlink()
    (tmp_path / "pytorch_model.bin.index.json").unlink()
    with pytest.raises(MQExportError, match="has no model.safetensors or pytorch_model.bin, nor the index.json"):
        load_lm(tmp_path)


# ------------------------------------------------------------------ ONNX external data

def _quantized(lm: MambaLMHeadModel, bits: int) -> MambaLMHeadModel:
    """`lm` with every Linear carrying a per-channel WeightQuant (the dequantized weights in place)."""
    for module in lm.modules():
        if isinstance(module, torch.nn.Linear):
            wq = WeightQuant(scale=rtn_scales(module.weight.data, bits, None), bits=bits)
            module.weight = torch.nn.Parameter(wq.dequantize(wq.quantize(module.weight.data)), requires_grad=False)
            module.weight_quant = wq
    return lm


@pytest.mark.parametrize("bits", [None, 4])
def test_external_data_export_runs_matches_and_is_deterministic(tmp_path, bits):
    lm = small_lm() if bits is None else _quantized(small_lm(tie=False), bits)
    ids = torch.randint(0, 40, (2, 13))
    paths = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        path = tmp_path / run / "model.onnx"
        _, info = export_onnx(lm, path, external_data=True)
        assert info.external_data == "model.onnx.data"
        assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
        paths.append(path)
    for name in ("model.onnx", "model.onnx.data"):
        assert (paths[0].parent / name).read_bytes() == (paths[1].parent / name).read_bytes(), name
    proto = onnx.load(str(paths[0]), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(len(t.raw_data) < EXTERNAL_MIN_TENSOR_BYTES for t in proto.graph.initializer
                            if t.data_location != onnx.TensorProto.EXTERNAL)
    locations = {e.value for t in external for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}          # relative: the pair can be moved together
    if bits is not None:
        assert any(t.data_type == onnx.TensorProto.INT4 for t in proto.graph.initializer)
    # Moved elsewhere, the pair still loads and gives the inline export's logits, at ORT's full
    # optimization (INT4 → MatMulNBits at fp32 accuracy, see ort.session) and at basic.
    moved = tmp_path / "moved"
    paths[0].parent.rename(moved)
    inline, _ = export_onnx(lm)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in inline.graph.initializer)
    with torch.no_grad():
        reference = lm(ids)
    for optimization in ("all", "basic"):
        logits = mq_ort.OrtForward(mq_ort.session(moved / "model.onnx", optimization=optimization))(ids)
        inline_logits = mq_ort.OrtForward(mq_ort.session(inline, optimization=optimization))(ids)
        np.testing.assert_array_equal(logits.numpy(), inline_logits.numpy())
        torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


def test_external_data_needs_a_path():
    with pytest.raises(MQExportError, match="pass a path"):
        export_onnx(small_lm(), external_data=True)


# ------------------------------------------------------------------ calibration memory

def test_rtn_calibrates_without_second_moment_matrices():
    from mq_export.api import calibrate, quantize
    from mq_export.quant.quantize import QuantConfig

    lm = small_lm()
    ids = torch.randint(0, 40, (6, 12))
    full = calibrate(lm, ids, batch_size=3, quiet=True)
    lean = calibrate(lm, ids, batch_size=3, quiet=True, covariance=False)
    assert not QuantConfig(method="rtn", w_bits=8).needs_covariance
    assert QuantConfig(method="rtn", w_bits=4).needs_covariance and QuantConfig(method="mambaquant").needs_covariance
    for name, site in lean.sites.items():
        assert site.sum_outer is None and full.sites[name].sum_outer is not None
        torch.testing.assert_close(site.mean_square, torch.diag(full.sites[name].second_moment))
    q_full, _ = quantize(lm, full, method="rtn", calibrator="absmax", quiet=True)
    q_lean, _ = quantize(lm, lean, method="rtn", calibrator="absmax", quiet=True)
    for (name, a), b in zip(q_full.named_parameters(), q_lean.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    with pytest.raises(MQExportError, match="calibrate with covariance=True"):
        quantize(lm, lean, method="mambaquant", quiet=True)
