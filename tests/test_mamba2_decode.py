"""Stateful decoding of Mamba-2 LMs: per layer conv_state (b, conv_dim, d_conv − 1) and ssm_state
(b, heads, headdim, d_state); prefill + steps equal the full-sequence forward in PyTorch, and the
exported prefill/step graphs in ONNX Runtime equal PyTorch."""
from __future__ import annotations

import pytest
import torch

from mq_export.export.decode import export_decode, model_state_names
from mq_export.models.mamba2 import Mamba2LM, Mamba2LMConfig, Mamba2MixerConfig
from mq_export.models.registry import family_of
from mq_export.runtime.decode import OrtDecoder, TorchDecoder, check_decode, generate

VOCAB = 13


def random_mamba2_lm(seed: int = 0, d_intermediate: int = 0, n_layer: int = 2, **mixer) -> Mamba2LM:
    """Odd sizes (headdim 6, 2 groups of B/C, 4 heads) and random non-trivial weights."""
    torch.manual_seed(seed)
    settings = dict(d_model=12, d_state=5, d_conv=3, headdim=6, ngroups=2) | mixer
    model = Mamba2LM(Mamba2LMConfig(Mamba2MixerConfig(**settings), n_layer=n_layer, vocab_size=VOCAB,
                                    d_intermediate=d_intermediate))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(0.3 * torch.randn_like(param) if "A_log" not in name else torch.rand_like(param))
    return model.eval()


VARIANTS = {"gated-norm": {}, "z-in-scan-D-per-channel": {"rmsnorm": False, "D_has_hdim": True},
            "mlp-dt-limit": {"d_intermediate": 20, "dt_limit": (0.05, 0.6), "d_conv": 2}}


@pytest.mark.parametrize("prefix", [1, 2, 5])
@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_then_steps_equals_full_sequence(variant, prefix):
    """Prefill `prefix` tokens, then one token per step: the logits equal the full-sequence
    forward's, including prefixes shorter than the conv window."""
    model = random_mamba2_lm(**VARIANTS[variant])
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(prefix))
    decoder = TorchDecoder(model)
    pieces = [decoder.prefill(ids[:, :prefix])] + [decoder.step(ids[:, t:t + 1]) for t in range(prefix, 11)]
    with torch.no_grad():
        full = model(ids)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_state_shapes_and_names():
    model = random_mamba2_lm()
    m = model.cfg.mixer
    _, state = model(torch.zeros(2, 4, dtype=torch.long), model.zero_state(2))
    assert len(state) == 2
    assert [tuple(t.shape) for t in state[0]] == [(2, m.conv_dim, m.d_conv - 1), (2, 4, 6, 5)]
    assert all(t.dtype == torch.float32 for layer in state for t in layer)
    assert family_of(model).state_layout(model) == ((0, ("conv_state", "ssm_state")), (1, ("conv_state", "ssm_state")))
    assert model_state_names(model, "past")[:2] == ["past_conv_state.0", "past_ssm_state.0"]


def test_torch_generation_is_the_argmax_path():
    model = random_mamba2_lm(seed=2)
    prompt = torch.randint(0, VOCAB, (4,))
    tokens, chosen_from = generate(TorchDecoder(model), prompt, 6, VOCAB)
    with torch.no_grad():
        logits = model(torch.cat([prompt, torch.tensor(tokens)])[None])[0, len(prompt) - 1:-1, :VOCAB]
    assert tokens == logits.argmax(-1).tolist()
    torch.testing.assert_close(chosen_from, logits, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = random_mamba2_lm(seed=1, n_layer=1, rmsnorm=False, D_has_hdim=True)   # one layer: a faster export
    return model, export_decode(model, tmp_path_factory.mktemp("mamba2-decode"))


def test_ort_prefill_then_steps_equals_pytorch(exported):
    model, ex = exported
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(3))
    result = check_decode(model, ex, ids, prefix=7)
    with torch.no_grad():
        scale = model(ids).abs().max().item()
    assert result["max_abs_error_vs_pytorch"] <= 1e-4 * scale
    assert result["argmax_agreement_vs_pytorch"] == 1.0


def test_greedy_generation_ort_equals_torch_for_64_tokens(exported):
    model, ex = exported
    prompt = torch.randint(0, VOCAB, (5,), generator=torch.Generator().manual_seed(4))
    torch_tokens, _ = generate(TorchDecoder(model), prompt, 64, VOCAB)
    ort_tokens, _ = generate(OrtDecoder(ex.step, ex.prefill, threads=1), prompt, 64, VOCAB)
    assert ort_tokens == torch_tokens
