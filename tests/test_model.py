import torch
import torch.nn.functional as F

from mq_export.models.mamba import LMConfig, MambaLMHeadModel, MambaMixer, MixerConfig
from mq_export.ops.selective_scan import selective_scan_reference


def mixer_by_hand(m: MambaMixer, hidden):
    """The Mamba-1 mixer written out step by step from the paper, against the module."""
    cfg = m.cfg
    length = hidden.shape[1]
    xz = hidden @ m.in_proj.weight.T
    x, z = xz[..., :cfg.d_inner], xz[..., cfg.d_inner:]
    xp = F.pad(x.transpose(1, 2), (cfg.d_conv - 1, 0))
    conv = sum(xp[..., k:k + length] * m.conv1d.weight[:, 0, k, None] for k in range(cfg.d_conv))
    x = F.silu(conv + m.conv1d.bias[:, None])
    dbc = x.transpose(1, 2) @ m.x_proj.weight.T
    dt, B, C = dbc.split([cfg.rank, cfg.d_state, cfg.d_state], -1)
    delta = F.softplus(dt @ m.dt_proj.weight.T + m.dt_proj.bias)
    y = selective_scan_reference(x, delta.transpose(1, 2), -torch.exp(m.A_log), B.transpose(1, 2),
                                 C.transpose(1, 2), m.D, z.transpose(1, 2))
    return y.transpose(1, 2) @ m.out_proj.weight.T


def test_mixer_matches_hand_written_math():
    m = MambaMixer(MixerConfig(d_model=16, d_state=4, expand=2)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        hidden = torch.randn(3, 11, 16)
        torch.testing.assert_close(m(hidden), mixer_by_hand(m, hidden), rtol=1e-4, atol=1e-5)


def test_mixer_is_causal():
    m = MambaMixer(MixerConfig(d_model=8, d_state=4)).eval()
    h = torch.randn(1, 10, 8)
    h2 = h.clone()
    h2[:, 6:] += 1.0
    with torch.no_grad():
        torch.testing.assert_close(m(h)[:, :6], m(h2)[:, :6])
        assert not torch.allclose(m(h)[:, 6:], m(h2)[:, 6:])


def test_lm_pads_vocab_and_ties_head():
    lm = MambaLMHeadModel(LMConfig(mixer=MixerConfig(d_model=16), n_layer=2, vocab_size=61))
    assert lm.backbone.embedding.weight.shape[0] == 64
    assert lm.lm_head.weight is lm.backbone.embedding.weight
    assert lm(torch.randint(0, 61, (2, 5))).shape == (2, 5, 64)
