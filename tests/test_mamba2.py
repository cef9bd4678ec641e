"""Mamba-2 LMs loaded from HF `Mamba2ForCausalLM` directories, against transformers' own CPU forward."""
from __future__ import annotations

import json

import pytest
import torch

import mq_export
from mq_export import MQExportError
from mq_export.models.mamba2 import Mamba2LM
from mq_export.ops.ssd_scan import ssd_scan

transformers = pytest.importorskip("transformers")

# Odd sizes: head_dim not a power of two, n_groups > 1, a length not a multiple of chunk_size.
GROUPED = dict(hidden_size=48, num_heads=6, head_dim=16, expand=2, n_groups=2, state_size=10, conv_kernel=4,
               vocab_size=53, num_hidden_layers=2, chunk_size=8)
ONE_GROUP = dict(hidden_size=40, num_heads=4, head_dim=20, expand=2, n_groups=1, state_size=12, conv_kernel=3,
                 vocab_size=37, num_hidden_layers=2, chunk_size=8, use_bias=True, tie_word_embeddings=True,
                 time_step_limit=(0.01, 0.5))


def save_hf_mamba2(directory, seed: int, **config):
    torch.manual_seed(seed)
    reference = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**config)).eval()
    with torch.no_grad():   # HF initialises D to ones, dt_bias and the norms plainly: perturb them all
        for param in reference.parameters():
            param.add_(0.1 * torch.randn_like(param))
    reference.save_pretrained(directory)
    return reference


@pytest.mark.parametrize("config, length", [(GROUPED, 13), (ONE_GROUP, 21)], ids=["ngroups2", "ngroups1"])
def test_logits_match_transformers(tmp_path, config, length):
    reference = save_hf_mamba2(tmp_path, 0, **config)
    model = mq_export.load(tmp_path)
    assert isinstance(model, Mamba2LM)
    ids = torch.randint(0, config["vocab_size"], (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids, use_cache=False).logits
        logits = model(ids)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_scan_final_state_continues_the_sequence():
    gen = torch.Generator().manual_seed(0)
    b, l, h, p, g, n = 2, 9, 4, 3, 2, 5
    x, z = torch.randn(b, l, h, p, generator=gen), torch.randn(b, l, h, p, generator=gen)
    dt = torch.randn(b, l, h, generator=gen)
    A = -torch.rand(h, generator=gen)
    B, C = torch.randn(b, l, g, n, generator=gen), torch.randn(b, l, g, n, generator=gen)
    D = torch.randn(h, p, generator=gen)
    kw = dict(D=D, dt_softplus=True, dt_limit=(0.0, 1.5))
    whole = ssd_scan(x, dt, A, B, C, z=z, **kw)
    first, state = ssd_scan(x[:, :4], dt[:, :4], A, B[:, :4], C[:, :4], z=z[:, :4], return_final_state=True, **kw)
    rest = ssd_scan(x[:, 4:], dt[:, 4:], A, B[:, 4:], C[:, 4:], z=z[:, 4:], initial_state=state, **kw)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), whole)


@pytest.mark.parametrize("setting, value", [("hidden_act", "gelu"), ("n_groups", 4),
                                             ("time_step_limit", [0.5, 0.1])])
def test_unsupported_setting_is_one_line_naming_it(tmp_path, setting, value):
    save_hf_mamba2(tmp_path, 0, **GROUPED)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config[setting] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(MQExportError, match=setting) as info:
        mq_export.load(tmp_path)
    assert "\n" not in str(info.value)


def test_export_and_quantization_say_they_are_not_there_yet(tmp_path):
    save_hf_mamba2(tmp_path, 0, **GROUPED)
    model = mq_export.load(tmp_path)
    with pytest.raises(MQExportError, match="ONNX export of Mamba-2 models is not supported yet"):
        mq_export.export_onnx(model, tmp_path / "model.onnx")
    stats = mq_export.calibrate(model, torch.randint(0, GROUPED["vocab_size"], (4, 9)), quiet=True)
    for method in ("rtn", "mambaquant"):   # refused before any work, even RTN (no topology needed)
        with pytest.raises(MQExportError, match="quantizing Mamba-2 models lands with the SSDScan op"):
            mq_export.quantize(model, stats, mq_export.QuantConfig(method=method))
    from mq_export.models.registry import family_of
    with pytest.raises(MQExportError, match="quantizing Mamba-2 models lands with the SSDScan op"):
        family_of(model).topology(model)
