"""Vision Mamba: the model against a test-only forward written from hustvl/Vim's code, its
checkpoint loader, and its export."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mq_export.errors import MQExportError
from mq_export.models.registry import family_of
from mq_export.models.vim import BiMixerConfig, VimConfig, VisionMamba, vim_config_from_state
from mq_export.ops.selective_scan import selective_scan_reference

# ------------------------------------------------------------------ hustvl's forward, written from its code
# vim/models_mamba.py (VisionMamba.forward_features, Block with fused_add_norm, RMSNorm) and
# mamba-1p1p1/mamba_ssm/modules/mamba_simple.py (Mamba.forward, bimamba_type "v2", if_divide_out),
# mamba_inner_fn_no_out_proj: everything on the state dict, flips where hustvl flips.


def _rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _inner_no_out_proj(xz, conv_w, conv_b, x_proj_w, dt_proj_w, A, D, delta_bias):
    """mamba_inner_fn_no_out_proj: causal conv + SiLU, x_proj, dt_proj, the scan gated by SiLU(z)."""
    length = xz.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = F.silu(F.conv1d(x, conv_w, conv_b, padding=conv_w.shape[-1] - 1, groups=x.shape[1])[..., :length])
    b, d, _ = x.shape
    x_dbl = F.linear(x.permute(0, 2, 1).reshape(b * length, d), x_proj_w)          # (b l) d
    rank, n = dt_proj_w.shape[1], A.shape[1]
    dt, B, C = torch.split(x_dbl, [rank, n, n], dim=-1)
    delta = (dt_proj_w @ dt.t()).reshape(d, b, length).permute(1, 0, 2)            # d (b l) -> b d l
    B = B.reshape(b, length, n).permute(0, 2, 1)
    C = C.reshape(b, length, n).permute(0, 2, 1)
    return selective_scan_reference(x, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True)


def _hustvl_mixer(sd, p, hidden):
    b, length, d_model = hidden.shape
    xz = (sd[p + "in_proj.weight"] @ hidden.reshape(b * length, d_model).t()).reshape(-1, b, length).permute(1, 0, 2)
    A, A_b = -torch.exp(sd[p + "A_log"]), -torch.exp(sd[p + "A_b_log"])
    out = _inner_no_out_proj(xz, sd[p + "conv1d.weight"], sd[p + "conv1d.bias"], sd[p + "x_proj.weight"],
                             sd[p + "dt_proj.weight"], A, sd[p + "D"], sd[p + "dt_proj.bias"])
    out_b = _inner_no_out_proj(xz.flip([-1]), sd[p + "conv1d_b.weight"], sd[p + "conv1d_b.bias"],
                               sd[p + "x_proj_b.weight"], sd[p + "dt_proj_b.weight"], A_b, sd[p + "D_b"],
                               sd[p + "dt_proj_b.bias"])
    return F.linear((out + out_b.flip([-1])).permute(0, 2, 1) / 2, sd[p + "out_proj.weight"])


def hustvl_forward(sd, images, depth, patch):
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    b, m, _ = x.shape
    position = m // 2
    x = torch.cat((x[:, :position], sd["cls_token"].expand(b, -1, -1), x[:, position:]), dim=1)
    hidden, residual = x + sd["pos_embed"], None
    for i in range(depth):
        residual = hidden if residual is None else residual + hidden
        hidden = _hustvl_mixer(sd, f"layers.{i}.mixer.", _rms_norm(residual, sd[f"layers.{i}.norm.weight"]))
    hidden = _rms_norm(residual + hidden, sd["norm_f.weight"])
    return F.linear(hidden[:, position], sd["head.weight"], sd["head.bias"])


# hustvl's names for one Vim-T layer (bias=False in_proj/out_proj, conv_bias=True)
VIM_LAYER_KEYS = {f"layers.0.{k}" for k in (
    "mixer.A_log", "mixer.D", "mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias",
    "mixer.x_proj.weight", "mixer.dt_proj.weight", "mixer.dt_proj.bias", "mixer.A_b_log", "mixer.conv1d_b.weight",
    "mixer.conv1d_b.bias", "mixer.x_proj_b.weight", "mixer.dt_proj_b.weight", "mixer.dt_proj_b.bias",
    "mixer.D_b", "mixer.out_proj.weight", "norm.weight")}
VIM_TOP_KEYS = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "head.weight",
                "head.bias", "norm_f.weight"}


def vim_t_state(depth=2, image_size=224, seed=0):
    """Random weights with Vim-T's shapes (embed 192, d_state 16, patch 16, 1000 classes), `depth` layers."""
    cfg = VimConfig(mixer=BiMixerConfig(d_model=192), depth=depth, image_size=image_size, patch_size=16, stride=16)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in VisionMamba(cfg).state_dict().items():
        noise = torch.randn(value.shape, generator=g)
        if key.endswith(("A_log", "A_b_log")):
            state[key] = value + 0.1 * noise
        elif key.endswith(("norm.weight", "norm_f.weight", "D", "D_b")):
            state[key] = 1 + 0.1 * noise
        elif key.endswith("dt_proj.bias") or key.endswith("dt_proj_b.bias"):
            state[key] = torch.log(torch.expm1(torch.empty(value.shape).uniform_(1e-3, 0.1, generator=g)))
        else:
            state[key] = noise * (0.02 if value.dim() < 2 else value.shape[-1] ** -0.5 if value.dim() == 2
                                  else value[0].numel() ** -0.5)
    return state


@pytest.fixture(scope="module")
def vim_t():
    state = vim_t_state()
    return state, vim_config_from_state(state, "test")


def test_vim_t_state_dict_has_hustvl_names(vim_t):
    state, _ = vim_t
    assert set(state) == VIM_TOP_KEYS | VIM_LAYER_KEYS | {k.replace("layers.0.", "layers.1.") for k in VIM_LAYER_KEYS}


def test_config_inferred_from_the_weights(vim_t):
    _, cfg = vim_t
    assert (cfg.mixer.d_model, cfg.mixer.d_state, cfg.mixer.expand, cfg.mixer.rank, cfg.depth) == (192, 16, 2, 12, 2)
    assert (cfg.patch_size, cfg.stride, cfg.image_size, cfg.in_chans, cfg.n_classes) == (16, 16, 224, 3, 1000)
    assert cfg.readout == "middle" and cfg.rms_norm and cfg.mixer.divide_out and cfg.length == 197


def test_forward_equals_hustvl_reference(vim_t):
    state, cfg = vim_t
    model = VisionMamba(cfg).eval()
    model.load_state_dict(state)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(images), hustvl_forward(state, images, cfg.depth, cfg.patch_size)
    assert ours.shape == (2, 1000)
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_other_readouts_and_layernorm():
    """Head/double class tokens and mean/last pooling read the right tokens; each changes the logits."""
    logits = {}
    for readout in ("middle", "head", "double", "mean", "last"):
        cfg = VimConfig(mixer=BiMixerConfig(d_model=16, d_state=4), depth=1, image_size=8, patch_size=4, stride=4,
                        in_chans=1, n_classes=3, readout=readout, rms_norm=False)
        torch.manual_seed(0)
        model = VisionMamba(cfg).eval()
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 3)
        loaded = vim_config_from_state(model.state_dict(), "test")
        # a checkpoint cannot say where a single class token sits, nor how tokens are pooled without one
        assert loaded.readout == {"head": "middle", "last": "mean"}.get(readout, readout)
        assert not loaded.rms_norm and loaded.n_tokens == cfg.n_tokens
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
            logits[readout] = model(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)))
    outs = list(logits.values())
    assert all(not torch.allclose(a, b) for i, a in enumerate(outs) for b in outs[i + 1:])


def test_backward_branch_sees_the_future_only():
    """Changing the last patch changes the backward branch at every token, the forward branch only at the last."""
    cfg = VimConfig(mixer=BiMixerConfig(d_model=16, d_state=4), depth=1, image_size=8, patch_size=4, stride=4,
                    in_chans=1, n_classes=3, readout="mean")
    torch.manual_seed(0)
    mixer = VisionMamba(cfg).layers[0].mixer.eval()
    x = torch.randn(1, cfg.mixer.d_inner, 6)
    changed = x.clone()
    changed[..., -1] += 1.0
    with torch.no_grad():
        fwd = mixer.branch(changed, None, backward=False) - mixer.branch(x, None, backward=False)
        bwd = mixer.branch(changed, None, backward=True) - mixer.branch(x, None, backward=True)
    assert fwd[..., :-1].abs().max() == 0 and fwd[..., -1].abs().max() > 0
    assert (bwd.abs().amax(dim=1) > 0).all()


def test_image_size_override_gives_the_stride(vim_t):
    state, _ = vim_t
    # 14×14 patches of 16 pixels: 224 with stride 16, or 120 with overlapping patches at stride 8
    assert (vim_config_from_state(state, "t", image_size=120).stride, vim_config_from_state(state, "t", 224).stride) == (8, 16)
    with pytest.raises(MQExportError, match="makes no 14×14 grid"):
        vim_config_from_state(state, "t", image_size=260)


@pytest.mark.parametrize("extra, match", [("rope.freqs_cos", "rope.freqs_cos is RoPE"),
                                          ("layers.1.mixer.gamma", "layers.1.mixer.gamma is a layer scale")])
def test_unsupported_configs_name_the_key(vim_t, extra, match):
    state, _ = vim_t
    with pytest.raises(MQExportError, match=match):
        vim_config_from_state({**state, extra: torch.zeros(3)}, "ckpt.pth")


def test_bimamba_v1_and_plain_mixers_are_refused(vim_t):
    state, _ = vim_t
    v1 = {k: v for k, v in state.items() if "_b." not in k and not k.endswith("D_b")}
    with pytest.raises(MQExportError, match="conv1d_b.weight"):
        vim_config_from_state(v1, "ckpt.pth")
    with pytest.raises(MQExportError, match="A_b_log"):
        vim_config_from_state({k: v for k, v in v1.items() if "A_b_log" not in k}, "ckpt.pth")


def test_family_adapter(vim_t):
    _, cfg = vim_t
    model = VisionMamba(cfg)
    family = family_of(model)
    assert family.input_names == ("images",) and family.dynamic_axes["images"] == {0: "batch"}
    (example,) = family.example_inputs(model, 2, 37, torch.Generator().manual_seed(0))
    assert example.shape == (2, 3, 224, 224)
    assert family.check_inputs(model, example.double(), "data").dtype == torch.float32
    with pytest.raises(MQExportError, match=r"reads float images \(n, 3, 224, 224\)"):
        family.check_inputs(model, torch.zeros(2, 3, 32, 32), "data")
