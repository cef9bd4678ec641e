"""Pure-PyTorch Mamba-2 (SSD) language models, with mamba-ssm's `Mamba2` parameter names.

The mixer is mamba-ssm's `Mamba2`: in_proj → (z, xBC, dt); a depthwise causal conv1d + SiLU over
xBC = (x, B, C); the SSD scan over heads of `headdim` channels, B and C shared by `ngroups`
groups of heads, one scalar decay A per head, D per head (or per channel: D_has_hdim); a gated
RMSNorm (`norm`: normalise y ⊙ SiLU(z) per group of d_inner / ngroups channels) → out_proj, or
with rmsnorm=False no norm and the scan itself gates its output with SiLU(z). The blocks,
embedding, final norm and LM head are the Mamba-1 LM's (mamba-ssm's MambaLMHeadModel layout), plus
mamba-ssm's optional gated MLP after each mixer (d_intermediate > 0), so HF `Mamba2ForCausalLM`
checkpoints load through the same renaming as HF Mamba-1 ones and mamba-ssm Mamba2 checkpoints
(mamba2-130m … 2.7b) with none.

Decoding carries per layer conv_state (b, conv_dim, d_conv − 1) and ssm_state (b, heads, headdim,
d_state), FP32; `Mamba2LM.forward(input_ids, state)` continues a sequence from them.

Quantization: `ActivationSite`s at in_proj's and out_proj's inputs (fc1's and fc2's in the MLP) and
at the scan's B and C; the transform topology (`Mamba2Mixer.streams`, `Mamba2LMFamily.topology`)
and the online transforms it needs (`out_proj_input_rotation`, `state_scale`, `state_rotation`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MQExportError
from ..ops.ssd_scan import NO_DT_LIMIT, SSDScanOp
from .mamba import ActivationSite, Block, LayerState, LMConfig, MambaLMFamily, MambaLMHeadModel, rms_normalize
from .topology import GatedStream, LinearStream, NormedReader, OnlineStateStream, Stream


@dataclass(frozen=True)
class Mamba2MixerConfig:
    d_model: int
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    conv_bias: bool = True
    bias: bool = False              # in_proj / out_proj bias
    dt_limit: tuple[float, float] = NO_DT_LIMIT
    norm_eps: float = 1e-5          # the gated RMSNorm's
    D_has_hdim: bool = False        # D per channel (d_inner) instead of per head
    rmsnorm: bool = True            # False: no gated RMSNorm; SiLU(z) gates the scan output (SSDScan has_z)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        """The conv's channels: x (d_inner), then B and C (ngroups · d_state each)."""
        return self.d_inner + 2 * self.ngroups * self.d_state

    def build(self) -> Mamba2Mixer:
        return Mamba2Mixer(self)

    def zero_state(self, batch: int) -> LayerState:
        """The mixer's decode state before any token: (conv_state (b, conv_dim, d_conv − 1),
        ssm_state (b, heads, headdim, d_state)), zeros."""
        return (torch.zeros(batch, self.conv_dim, self.d_conv - 1),
                torch.zeros(batch, self.nheads, self.headdim, self.d_state))


class GatedRMSNorm(nn.Module):
    """mamba-ssm's RMSNormGated with norm_before_gate=False: y ⊙ SiLU(z), RMS-normalised over
    each group of `group_size` channels, times `weight`."""

    def __init__(self, d: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        gated = y * F.silu(z)
        grouped = gated.unflatten(-1, (-1, self.group_size))
        return rms_normalize(grouped, self.eps).flatten(-2) * self.weight


class Mamba2Mixer(nn.Module):
    """Input and output (batch, length, d_model)."""

    def __init__(self, cfg: Mamba2MixerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d_inner, heads = cfg.d_inner, cfg.nheads
        self.in_proj = nn.Linear(cfg.d_model, d_inner + cfg.conv_dim + heads, bias=cfg.bias)   # z, xBC, dt
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim,
                                padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(d_inner if cfg.D_has_hdim else heads))
        self.scan = SSDScanOp()
        self.norm = GatedRMSNorm(d_inner, d_inner // cfg.ngroups, cfg.norm_eps) if cfg.rmsnorm else None
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=cfg.bias)
        # Online transforms the quantize stage may set: a rotation of the out_proj input, and the
        # h·C smoothing (B/s, C·s per group and state channel) and rotation of the state dimension
        # (B·R, C·R, one R for every group), which conv1d + SiLU keep out of in_proj.
        self.register_buffer("out_proj_input_rotation", None)
        self.register_buffer("state_scale", None)
        self.register_buffer("state_rotation", None)
        self.sites = nn.ModuleDict({name: ActivationSite() for name in ("in_proj", "out_proj", "scan_B", "scan_C")})

    def forward(self, hidden: Tensor, state: LayerState | None = None):
        """hidden (b, l, d_model) → (b, l, d_model). With `state` = (conv_state (b, conv_dim,
        d_conv − 1): the last conv inputs, ssm_state (b, heads, headdim, d_state)), the sequence
        continues from that state and (output, new state) is returned: the same code serves prefill
        and decode steps."""
        cfg = self.cfg
        length = hidden.shape[1]
        bc = cfg.ngroups * cfg.d_state
        z, xBC, dt = torch.split(self.in_proj(self.sites["in_proj"](hidden)), [cfg.d_inner, cfg.conv_dim, cfg.nheads],
                                 dim=-1)
        xBC = xBC.transpose(1, 2)
        if state is None:
            xBC = self.conv1d(xBC)[..., :length]
        else:
            xBC = torch.cat([state[0], xBC], dim=-1)          # the causal conv's window starts in the past
            conv_state = xBC[..., xBC.shape[-1] - (cfg.d_conv - 1):]
            xBC = self.conv1d(xBC)[..., cfg.d_conv - 1:cfg.d_conv - 1 + length]
        x, B, C = torch.split(F.silu(xBC).transpose(1, 2), [cfg.d_inner, bc, bc], dim=-1)
        if self.state_scale is not None:
            B, C = B / self.state_scale, C * self.state_scale
        if self.state_rotation is not None:
            B, C = ((t.unflatten(-1, (cfg.ngroups, cfg.d_state)) @ self.state_rotation).flatten(-2) for t in (B, C))
        B, C = self.sites["scan_B"](B), self.sites["scan_C"](C)
        heads = (cfg.nheads, cfg.headdim)
        y = self.scan(x.unflatten(-1, heads), dt, -torch.exp(self.A_log.float()),
                      B.unflatten(-1, (cfg.ngroups, cfg.d_state)), C.unflatten(-1, (cfg.ngroups, cfg.d_state)),
                      self.D.float().view(heads) if cfg.D_has_hdim else self.D.float(),
                      z=None if cfg.rmsnorm else z.unflatten(-1, heads), dt_bias=self.dt_bias.float(),
                      dt_softplus=True, dt_limit=cfg.dt_limit,
                      **({} if state is None else {"initial_state": state[1], "return_final_state": True}))
        if state is not None:
            y, ssm_state = y
        y = y.flatten(-2)
        if cfg.rmsnorm:
            y = self.norm(y, z)
        if self.out_proj_input_rotation is not None:
            y = y @ self.out_proj_input_rotation
        out = self.out_proj(self.sites["out_proj"](y))
        return out if state is None else (out, (conv_state, ssm_state))

    def streams(self, name: str) -> list[Stream]:
        """The transform topology inside the mixer (`name`: its qualified name in the model). B and C
        come out of conv1d + SiLU, so their state smoothing stays online; out_proj's input smoothing
        folds into the gated RMSNorm's weight, its rotation stays online (the gate is elementwise
        and the norm normalises groups, so no rotation reaches in_proj). Without the norm the gate
        is inside the scan op, where no smoothing reaches."""
        gated = (GatedStream(name, norm=f"{name}.norm") if self.cfg.rmsnorm else
                 GatedStream(name, smoothable=False))
        return [OnlineStateStream(name, f"{name}.sites.scan_B", f"{name}.sites.scan_C"), gated]


@dataclass(frozen=True)
class Mamba2LMConfig(LMConfig):
    """mamba-ssm's MambaConfig with Mamba-2 mixers (`mixer` a Mamba2MixerConfig)."""
    d_intermediate: int = 0         # > 0: a gated MLP after each mixer, in its own pre-norm residual step

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width: mamba-ssm's GatedMLP rounds d_intermediate up to a multiple of 128."""
        return -(-self.d_intermediate // 128) * 128

    def build_block(self) -> Mamba2Block:
        return Mamba2Block(self)

    def mamba_ssm_layers(self) -> dict:
        m = self.mixer
        ssm_cfg = {"layer": "Mamba2", "d_state": m.d_state, "d_conv": m.d_conv, "expand": m.expand,
                   "headdim": m.headdim, "ngroups": m.ngroups, "D_has_hdim": m.D_has_hdim, "rmsnorm": m.rmsnorm,
                   "bias": m.bias, "conv_bias": m.conv_bias}
        if tuple(m.dt_limit) != NO_DT_LIMIT:   # mamba-ssm's default; its infinity is not strict JSON
            ssm_cfg["dt_limit"] = list(m.dt_limit)
        return {"d_intermediate": self.d_intermediate, "ssm_cfg": ssm_cfg}


class GatedMLP(nn.Module):
    """mamba-ssm's GatedMLP: fc1 → (value, gate) halves → value ⊙ SiLU(gate) → fc2, no biases."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)
        self.sites = nn.ModuleDict({"fc1": ActivationSite(), "fc2": ActivationSite()})

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.fc1(self.sites["fc1"](x)).chunk(2, dim=-1)
        return self.fc2(self.sites["fc2"](value * F.silu(gate)))


class Mamba2Block(Block):
    """mamba-ssm's Block: the mixer's pre-norm residual step, then, with d_intermediate > 0, the
    MLP's (residual += hidden; hidden = mlp(norm2(residual)))."""

    def __init__(self, cfg: Mamba2LMConfig) -> None:
        super().__init__(cfg)
        self.mlp = None
        if cfg.d_intermediate:
            self.norm2 = type(self.norm)(cfg.mixer.d_model, eps=cfg.norm_epsilon)
            self.mlp = GatedMLP(cfg.mixer.d_model, cfg.mlp_hidden)

    def forward(self, hidden: Tensor, residual: Tensor | None, state: LayerState | None = None):
        out = super().forward(hidden, residual, state)
        if self.mlp is None:
            return out
        hidden, residual, *layer_state = out
        residual = hidden + residual
        return (self.mlp(self.norm2(residual)), residual, *layer_state)


class Mamba2LM(MambaLMHeadModel):
    """A causal LM with Mamba-2 mixers (`cfg` a Mamba2LMConfig; `zero_state` is its mixers')."""


class Mamba2LMFamily(MambaLMFamily):
    """mamba-ssm Mamba2 LMs (mamba2-130m … 2.7b) and HF `Mamba2ForCausalLM` (Mamba-2, Codestral Mamba):
    `input_ids` (batch, length) int64 → `logits` (batch, length, vocab), with the Mamba-1 LM's input
    and output names and decode state layout."""
    name = "mamba2-lm"
    model_class = Mamba2LM
    hf_model_types = ("mamba2",)

    def topology(self, model):
        """The Mamba-1 LM's (each mixer's streams, then the residual stream), plus per gated MLP:
        fc2's input, whose smoothing folds into fc1's value rows (the SiLU gate passes no rotation),
        and fc1 (behind norm2) and fc2 as one more reader and writer of the residual stream."""
        *streams, residual = super().topology(model)
        mlps = [f"backbone.layers.{i}" for i, block in enumerate(model.backbone.layers) if block.mlp is not None]
        hidden = model.cfg.mlp_hidden
        streams += [LinearStream(((f"{b}.mlp.fc1", slice(0, hidden)),), f"{b}.mlp.fc2", f"{b}.mlp.sites.fc2",
                                 "d_intermediate", rotatable=False) for b in mlps]
        readers = tuple(NormedReader(f"{b}.norm2", f"{b}.mlp.fc1", f"{b}.mlp.sites.fc1") for b in mlps)
        return [*streams, replace(residual, writers=residual.writers + tuple(f"{b}.mlp.fc2" for b in mlps),
                                  readers=residual.readers + readers)]

    def config_from_hf(self, read, source) -> Mamba2LMConfig:
        """HF transformers' Mamba2Config. chunk_size only groups the computation; time_step_rank and
        the time_step_min/max/floor settings only initialise; residual_in_fp32 changes nothing in an
        FP32 model; pad_token_id matters only with an attention mask, which this model does not
        take (a pad token is an ordinary token, as in transformers without a mask)."""
        act = read.values.get("hidden_act", "silu")
        if act != "silu":
            raise MQExportError(f"{source}: hidden_act {act!r} is not supported (only silu)")
        read.integer("chunk_size", 256)
        d_model, expand = read.integer("hidden_size"), read.integer("expand", 2)
        heads, headdim = read.integer("num_heads", 128), read.integer("head_dim", 64)
        groups = read.integer("n_groups", 8)
        if heads * headdim != expand * d_model:
            raise MQExportError(f"{source}: num_heads × head_dim = {heads * headdim} is not expand × hidden_size "
                                f"= {expand * d_model}")
        if heads % groups:
            raise MQExportError(f"{source}: n_groups {groups} does not divide num_heads {heads}")
        eps = read.positive_float("layer_norm_epsilon", 1e-5)
        read.boolean("residual_in_fp32", True)
        mixer = Mamba2MixerConfig(d_model=d_model, d_state=read.integer("state_size", 128),
                                  d_conv=read.integer("conv_kernel", 4), expand=expand, headdim=headdim,
                                  ngroups=groups, conv_bias=read.boolean("use_conv_bias", True),
                                  bias=read.boolean("use_bias", False),
                                  dt_limit=dt_limit_from_config(read, "time_step_limit", source), norm_eps=eps)
        return Mamba2LMConfig(mixer=mixer, n_layer=read.integer("num_hidden_layers"),
                              vocab_size=read.integer("vocab_size"), rms_norm=True, norm_epsilon=eps,
                              pad_vocab_size_multiple=1, tie_embeddings=read.boolean("tie_word_embeddings", False))

    def config_from_mamba_ssm(self, read, source) -> Mamba2LMConfig:
        """mamba-ssm's MambaConfig with `ssm_cfg.layer` "Mamba2" (the mamba2-130m … 2.7b layout).
        chunk_size and use_mem_eff_path only choose how the scan is computed, the A/dt/conv init
        settings only initialise; residual_in_fp32 and fused_add_norm change nothing in FP32."""
        ssm = read.section("ssm_cfg")
        if read.values.get("attn_layer_idx"):
            raise MQExportError(f"{source}: attention layers (attn_layer_idx) are not supported")
        known = {"layer", "d_state", "d_conv", "expand", "headdim", "ngroups", "D_has_hdim", "rmsnorm",
                 "norm_before_gate", "dt_limit", "bias", "conv_bias", "d_ssm"}
        ignored = {"chunk_size", "use_mem_eff_path", "A_init_range", "dt_min", "dt_max", "dt_init_floor", "conv_init"}
        unknown = set(ssm.values) - known - ignored
        if unknown:
            raise MQExportError(f"{source}: ssm_cfg settings {sorted(unknown)} are not supported")
        if ssm.boolean("norm_before_gate", False):
            raise MQExportError(f"{source}: ssm_cfg.norm_before_gate true is not supported (only mamba-ssm's "
                                f"default, false: normalise y ⊙ SiLU(z))")
        d_model, expand = read.integer("d_model"), ssm.integer("expand", 2)
        mixer = Mamba2MixerConfig(d_model=d_model, d_state=ssm.integer("d_state", 128), d_conv=ssm.integer("d_conv", 4),
                                  expand=expand, headdim=ssm.integer("headdim", 64), ngroups=ssm.integer("ngroups", 1),
                                  conv_bias=ssm.boolean("conv_bias", True), bias=ssm.boolean("bias", False),
                                  dt_limit=dt_limit_from_config(ssm, "dt_limit", source),
                                  D_has_hdim=ssm.boolean("D_has_hdim", False), rmsnorm=ssm.boolean("rmsnorm", True))
        if ssm.values.get("d_ssm") not in (None, mixer.d_inner):
            raise MQExportError(f"{source}: ssm_cfg.d_ssm {json.dumps(ssm.values['d_ssm'])} is not expand × d_model "
                                f"= {mixer.d_inner}: the mixer's extra MLP branch is not supported")
        if mixer.d_inner % mixer.headdim:
            raise MQExportError(f"{source}: ssm_cfg.headdim {mixer.headdim} does not divide expand × d_model "
                                f"= {mixer.d_inner}")
        if mixer.nheads % mixer.ngroups:
            raise MQExportError(f"{source}: ssm_cfg.ngroups {mixer.ngroups} does not divide the {mixer.nheads} heads")
        read.boolean("residual_in_fp32", True)
        read.boolean("fused_add_norm", True)
        return Mamba2LMConfig(mixer=mixer, n_layer=read.integer("n_layer"), vocab_size=read.integer("vocab_size"),
                              rms_norm=read.boolean("rms_norm", True),
                              norm_epsilon=read.positive_float("norm_epsilon", 1e-5),
                              pad_vocab_size_multiple=read.integer("pad_vocab_size_multiple", 8),
                              tie_embeddings=read.boolean("tie_embeddings", True),
                              d_intermediate=read.integer("d_intermediate", 0, minimum=0))


def dt_limit_from_config(read, key: str, source) -> tuple[float, float]:
    """A Δ limit: [low, high] with 0 ≤ low < high; high may be infinite (no upper limit), written as
    JSON's Infinity or as transformers writes it, {"__float__": "Infinity"}."""
    value = read.values.get(key, list(NO_DT_LIMIT))
    bounds = [_json_number(v) for v in value] if isinstance(value, list) and len(value) == 2 else None
    if bounds is None or None in bounds or not 0 <= bounds[0] < bounds[1]:
        raise MQExportError(f"{source}: {read.prefix}{key} is {json.dumps(value)}; expected [low, high] with "
                            f"0 ≤ low < high")
    return bounds[0], bounds[1]


def _json_number(value) -> float | None:
    if value == {"__float__": "Infinity"}:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)
