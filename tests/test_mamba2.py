"""Mamba-2 LMs loaded from HF `Mamba2ForCausalLM` directories, against transformers' own CPU forward."""
from __future__ import annotations

import json

import pytest
import torch

import mq_export
from mq_export import MQExportError
from mq_export.models.mamba2 import Mamba2LM
from mq_export.ops.ssd_scan import ssd_scan
from mq_export.runtime.decode import TorchDecoder, teacher_forced_logits

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


@pytest.mark.parametrize("config", [GROUPED, ONE_GROUP], ids=["ngroups2", "ngroups1"])
def test_logits_match_transformers(tmp_path, config):
    reference = save_hf_mamba2(tmp_path, 0, **config)
    model = mq_export.load(tmp_path)
    assert isinstance(model, Mamba2LM)
    for length in (13, 70):     # multiples of neither transformers' chunk_size nor this package's scan chunk
        ids = torch.randint(0, config["vocab_size"], (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected = reference(ids, use_cache=False).logits
            logits = model(ids)
        assert logits.shape == expected.shape
        assert (logits - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_stateful_decoding_matches_transformers_cached_generation(tmp_path):
    """transformers' own decoding with its cache (conv and SSM states, one token per step) against
    ours (prefill, then one step per token) along transformers' greedy tokens."""
    reference = save_hf_mamba2(tmp_path, 0, **GROUPED)
    model = mq_export.load(tmp_path)
    prompt = torch.randint(0, GROUPED["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(0))
    out = reference.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    expected = torch.stack(out.logits)[:, 0]          # raw logits, before generate's processors
    logits = teacher_forced_logits(TorchDecoder(model), prompt[0], out.sequences[0, 6:].tolist(),
                                   GROUPED["vocab_size"])
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
