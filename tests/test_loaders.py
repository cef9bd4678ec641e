import json

import pytest
import torch

from mq_export.errors import MQExportError
from mq_export.load.checkpoints import (BUNDLED_CLASSIFIER, hf_to_mamba_ssm_keys, load_checkpoint, load_classifier, load_lm,
                               mamba_ssm_to_hf_keys, save_mamba_ssm)
from mq_export.models.mamba import LMConfig, MambaLMHeadModel, MixerConfig


def small_lm(**kw) -> MambaLMHeadModel:
    cfg = LMConfig(mixer=MixerConfig(d_model=16, d_state=4, dt_rank=2), n_layer=2, vocab_size=30, **kw)
    lm = MambaLMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return lm


def test_bundled_classifier_architecture():
    m = load_classifier(BUNDLED_CLASSIFIER)
    assert m.cfg.n_layers == 2 and m.cfg.mixer.d_model == 64 and m.cfg.mixer.d_state == 16
    assert m.cfg.mixer.rank == 4 and m.cfg.mixer.d_inner == 128 and m.cfg.n_classes == 10
    assert m(torch.zeros(2, 30, 1)).shape == (2, 10)


def test_mamba_ssm_round_trip(tmp_path):
    lm = small_lm()
    save_mamba_ssm(lm, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["ssm_cfg"]["layer"] == "Mamba1" and cfg["n_layer"] == 2
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert "backbone.embedding.weight" in state and "lm_head.weight" in state
    loaded = load_lm(tmp_path)
    ids = torch.randint(0, 30, (2, 9))
    torch.testing.assert_close(loaded(ids), lm(ids))
    for key, value in lm.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_hf_key_mapping_round_trip():
    state = small_lm().state_dict()
    hf = mamba_ssm_to_hf_keys(state)
    assert "backbone.embeddings.weight" in hf and "backbone.embedding.weight" not in hf
    assert hf_to_mamba_ssm_keys(hf).keys() == state.keys()


def test_hf_transformers_checkpoint_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is not installed")
    cfg = transformers.MambaConfig(vocab_size=40, hidden_size=24, state_size=8, num_hidden_layers=2, expand=2,
                                   conv_kernel=4, time_step_rank=3)
    ref = transformers.MambaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ours = load_lm(tmp_path)
    ids = torch.randint(0, 40, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_layernorm_lm_loads(tmp_path):
    lm = small_lm(rms_norm=False)
    save_mamba_ssm(lm, tmp_path)
    ids = torch.randint(0, 30, (1, 5))
    torch.testing.assert_close(load_lm(tmp_path)(ids), lm(ids))


# ------------------------------------------------------------------- bad input

def _bundled_state():
    return torch.load(BUNDLED_CLASSIFIER, weights_only=True, map_location="cpu")["model_state_dict"]


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.pop("layers.1.D"), "missing keys"),
    (lambda s: s.__setitem__("extra.weight", torch.zeros(1)), "unexpected keys"),
    (lambda s: s.__setitem__("norm.weight", torch.zeros(65)), "has shape (65,)"),
    (lambda s: s.pop("classifier.weight"), "no classifier.weight"),
])
def test_bad_classifier_checkpoints(tmp_path, mutate, message):
    state = _bundled_state()
    mutate(state)
    path = tmp_path / "bad.pth"
    torch.save({"model_state_dict": state}, path)
    with pytest.raises(MQExportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_classifier(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(MQExportError, match="not a readable PyTorch"):
        load_checkpoint(path)
    with pytest.raises(MQExportError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pth")


def test_unsupported_lm_configs(tmp_path):
    save_mamba_ssm(small_lm(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["ssm_cfg"]["layer"] = "Mamba3"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MQExportError, match="ssm_cfg.layer 'Mamba3' is not supported"):
        load_lm(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "rwkv", "hidden_size": 8}))
    with pytest.raises(MQExportError, match="model_type 'rwkv' is not supported"):
        load_lm(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MQExportError, match="not valid JSON"):
        load_lm(tmp_path)


def test_model_types_dispatch_through_the_family_registry(tmp_path):
    from mq_export.models.registry import HF_MODEL_TYPES, family_of
    assert set(HF_MODEL_TYPES) == {"mamba", "falcon_mamba", "mamba2", "nemotron_h", "bamba",
                                   "granitemoehybrid", "jamba", "falcon_h1"}
    save_mamba_ssm(small_lm(), tmp_path)
    assert family_of(load_lm(tmp_path)).name == "mamba-lm"
    with pytest.raises(MQExportError, match="Linear is not a model family"):
        family_of(torch.nn.Linear(2, 2))


def test_falcon_mamba_config_errors_name_the_key(tmp_path):
    config = {"model_type": "falcon_mamba", "hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 10,
              "mixer_rms_eps": -1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MQExportError, match="mixer_rms_eps is -1; expected a positive number"):
        load_lm(tmp_path)
