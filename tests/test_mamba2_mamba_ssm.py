"""Mamba-2 LMs loaded from mamba-ssm directories (config.json with ssm_cfg.layer "Mamba2"), against
niverel-mamba's pure-PyTorch `Mamba2` mixer (mamba-ssm's parameter names; a test-only dependency)
wired the way mamba-ssm's MixerModel wires its blocks: pre-norm residual steps, the optional gated
MLP after each mixer, final norm, LM head."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import mq_export
from mq_export import MQExportError
from mq_export.export.onnx import export_onnx
from mq_export.load.checkpoints import _ConfigReader, save_mamba_ssm
from mq_export.models.mamba2 import Mamba2LM, Mamba2LMFamily
from mq_export.models.registry import family_for_config
from mq_export.runtime.ort import session

niverel = pytest.importorskip("niverel_mamba.torch", reason="niverel-mamba (dev extra) is not installed")

# Odd sizes: headdim not a power of two, ngroups > 1, a vocabulary padded to a multiple of 8.
BASE = dict(d_model=24, n_layer=2, vocab_size=37, pad_vocab_size_multiple=8)
SSM = dict(d_state=6, d_conv=3, expand=2, headdim=12, ngroups=2)
VARIANTS = {
    "defaults": ({}, {}),
    "D_has_hdim-no_rmsnorm-dt_limit": ({"tie_embeddings": False},
                                       {"D_has_hdim": True, "rmsnorm": False, "dt_limit": [0.02, 0.4], "bias": True}),
    "mlp-layernorm": ({"d_intermediate": 40, "rms_norm": False, "norm_epsilon": 1e-6}, {"conv_bias": False}),
}


def mamba_ssm_config(top: dict, ssm: dict) -> dict:
    """config.json as mamba-ssm's MambaConfig writes it."""
    return {**BASE, "d_intermediate": 0, "ssm_cfg": {"layer": "Mamba2", **SSM, **ssm}, "attn_layer_idx": [],
            "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
            "tie_embeddings": True, **top}


class ReferenceLM:
    """mamba-ssm's MambaLMHeadModel forward with niverel-mamba's Mamba2 mixers, random weights."""

    def __init__(self, config: dict, seed: int) -> None:
        torch.manual_seed(seed)
        ssm = {k: v for k, v in config["ssm_cfg"].items() if k != "layer"}
        d, vocab = config["d_model"], config["vocab_size"]
        vocab += -vocab % config["pad_vocab_size_multiple"]
        self.config, self.d = config, d
        self.mixers = [niverel.Mamba2(niverel.Mamba2Config(d_model=d, chunk_size=5, **ssm), ssd_impl="sequential")
                       for _ in range(config["n_layer"])]
        state = {}
        for i, mixer in enumerate(self.mixers):
            with torch.no_grad():   # D ones, zero biases, unit norms at init: perturb everything
                for param in mixer.parameters():
                    param.add_(0.2 * torch.randn_like(param))
            state.update({f"backbone.layers.{i}.mixer.{k}": v for k, v in mixer.state_dict().items()})
            norms = ["norm"] + (["norm2"] if config["d_intermediate"] else [])
            for norm in norms:
                state[f"backbone.layers.{i}.{norm}.weight"] = 1 + 0.2 * torch.randn(d)
                if not config["rms_norm"]:
                    state[f"backbone.layers.{i}.{norm}.bias"] = 0.2 * torch.randn(d)
            if config["d_intermediate"]:
                hidden = -(-config["d_intermediate"] // 128) * 128   # GatedMLP's multiple_of=128
                state[f"backbone.layers.{i}.mlp.fc1.weight"] = torch.randn(2 * hidden, d) / d ** 0.5
                state[f"backbone.layers.{i}.mlp.fc2.weight"] = torch.randn(d, hidden) / hidden ** 0.5
        state["backbone.embedding.weight"] = torch.randn(vocab, d)
        state["backbone.norm_f.weight"] = 1 + 0.2 * torch.randn(d)
        if not config["rms_norm"]:
            state["backbone.norm_f.bias"] = 0.2 * torch.randn(d)
        state["lm_head.weight"] = (state["backbone.embedding.weight"] if config["tie_embeddings"]
                                   else torch.randn(vocab, d) / d ** 0.5)
        self.state = state

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        weight, eps = self.state[f"{name}.weight"], self.config.get("norm_epsilon", 1e-5)
        if self.config["rms_norm"]:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
        return F.layer_norm(x, (self.d,), weight, self.state[f"{name}.bias"], eps)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.state["backbone.embedding.weight"][ids], None
        for i, mixer in enumerate(self.mixers):
            block = f"backbone.layers.{i}"
            residual = hidden if residual is None else hidden + residual
            hidden = mixer(self.norm(residual, f"{block}.norm"))
            if self.config["d_intermediate"]:
                residual = hidden + residual
                value, gate = (self.norm(residual, f"{block}.norm2") @ self.state[f"{block}.mlp.fc1.weight"].T).chunk(2, -1)
                hidden = (value * F.silu(gate)) @ self.state[f"{block}.mlp.fc2.weight"].T
        return self.norm(hidden + residual, "backbone.norm_f") @ self.state["lm_head.weight"].T


def write_checkpoint(directory, config: dict, state: dict) -> None:
    (directory / "config.json").write_text(json.dumps(config))
    torch.save(state, directory / "pytorch_model.bin")


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_niverel_mamba2(tmp_path, variant):
    config = mamba_ssm_config(*VARIANTS[variant])
    reference = ReferenceLM(config, seed=0)
    write_checkpoint(tmp_path, config, reference.state)
    model = mq_export.load(tmp_path)
    assert isinstance(model, Mamba2LM)
    for length in (11, 70):     # neither a multiple of a chunk
        ids = torch.randint(0, config["vocab_size"], (2, length), generator=torch.Generator().manual_seed(length))
        expected = reference(ids)
        with torch.no_grad():
            logits = model(ids)
        assert logits.shape == expected.shape
        assert (logits - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_onnx_runtime_matches_niverel_mamba2(tmp_path):
    """z gated inside the scan (rmsnorm false) and D per channel: the SSDScan node's has_z and (h, p)
    D, in plain ONNX Runtime (the node's function body), at lengths that are not multiples of a chunk."""
    config = mamba_ssm_config(*VARIANTS["D_has_hdim-no_rmsnorm-dt_limit"])
    reference = ReferenceLM(config, seed=2)
    write_checkpoint(tmp_path, config, reference.state)
    export_onnx(mq_export.load(tmp_path), tmp_path / "model.onnx")
    sess = session(tmp_path / "model.onnx", threads=1)
    for length in (11, 70):
        ids = torch.randint(0, config["vocab_size"], (2, length), generator=torch.Generator().manual_seed(length))
        expected = reference(ids)
        (logits,) = sess.run(None, {"input_ids": ids.numpy()})
        assert abs(torch.from_numpy(logits) - expected).max() <= 1e-4 * expected.abs().max()


def test_save_mamba_ssm_round_trip(tmp_path):
    config = mamba_ssm_config(*VARIANTS["mlp-layernorm"])
    (tmp_path / "in").mkdir()
    write_checkpoint(tmp_path / "in", config, ReferenceLM(config, seed=1).state)
    model = mq_export.load(tmp_path / "in")
    save_mamba_ssm(model, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["ssm_cfg"]["layer"] == "Mamba2" and written["d_intermediate"] == 40
    again = mq_export.load(tmp_path / "out")
    ids = torch.randint(0, config["vocab_size"], (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)


def test_mamba2_130m_config_builds_mamba_ssm_shapes(tmp_path):
    """state-spaces/mamba2-130m's config.json (mamba-ssm's defaults fill ssm_cfg): the model built
    from it has the parameter names and shapes of niverel-mamba's Mamba2 with the same defaults."""
    config = {"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {"layer": "Mamba2"},
              "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": 16, "tie_embeddings": True}
    family, is_hf = family_for_config(config, tmp_path)
    assert isinstance(family, Mamba2LMFamily) and not is_hf
    cfg = family.config_from_mamba_ssm(_ConfigReader(config, tmp_path / "config.json"), tmp_path)
    with torch.device("meta"):
        model = Mamba2LM(cfg)
        reference = niverel.Mamba2(niverel.Mamba2Config(d_model=768))
    mixer = {k.removeprefix("backbone.layers.0.mixer."): tuple(v.shape) for k, v in model.state_dict().items()
             if k.startswith("backbone.layers.0.mixer.")}
    assert mixer == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert (cfg.mixer.nheads, cfg.mixer.headdim, cfg.mixer.d_state) == (24, 64, 128)
    assert model.lm_head.weight.shape == (50288, 768)


@pytest.mark.parametrize("where, setting, value", [
    ("ssm_cfg", "norm_before_gate", True),
    ("ssm_cfg", "d_ssm", 24),
    ("ssm_cfg", "headdim", 10),
    ("ssm_cfg", "ngroups", 3),
    ("ssm_cfg", "dt_limit", [0.5, 0.1]),
    ("ssm_cfg", "rope", True),
    ("top", "attn_layer_idx", [1]),
    ("top", "residual_in_fp32", "yes"),
])
def test_unsupported_setting_is_one_line_naming_it(tmp_path, where, setting, value):
    config = mamba_ssm_config({}, {})
    (config["ssm_cfg"] if where == "ssm_cfg" else config)[setting] = value
    write_checkpoint(tmp_path, config, {"backbone.embedding.weight": torch.zeros(40, 24)})
    with pytest.raises(MQExportError, match=setting) as info:
        mq_export.load(tmp_path)
    assert "\n" not in str(info.value)
