"""Pure-PyTorch Mamba-2 (SSD) language models, with mamba-ssm's `Mamba2` parameter names.

The mixer is mamba-ssm's `Mamba2`: in_proj → (z, xBC, dt); a depthwise causal conv1d + SiLU over
xBC = (x, B, C); the SSD scan over heads of `headdim` channels, B and C shared by `ngroups`
groups of heads, one scalar decay A per head; a gated RMSNorm (`norm`: normalise y ⊙ SiLU(z) per
group of d_inner / ngroups channels) → out_proj. The blocks, embedding, final norm and LM head are
the Mamba-1 LM's (mamba-ssm's MambaLMHeadModel layout), so HF `Mamba2ForCausalLM` checkpoints
load through the same renaming as HF Mamba-1 ones.

Not yet: the transform topology, quantization sites, decode state and ONNX export; they land
with the SSDScan op's exporter (issue #17), and each says so in one line until then.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MQExportError
from ..ops.ssd_scan import NO_DT_LIMIT, SSDScanOp
from .mamba import LMConfig, MambaLMFamily, MambaLMHeadModel, rms_normalize

NOT_YET = "lands with the SSDScan op (issue #17)"
NO_DECODE = f"decoding Mamba-2 models with a state {NOT_YET}"


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
        self.D = nn.Parameter(torch.ones(heads))
        self.scan = SSDScanOp()
        self.norm = GatedRMSNorm(d_inner, d_inner // cfg.ngroups, cfg.norm_eps)
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=cfg.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        cfg = self.cfg
        batch, length, _ = hidden.shape
        bc = cfg.ngroups * cfg.d_state
        z, xBC, dt = torch.split(self.in_proj(hidden), [cfg.d_inner, cfg.conv_dim, cfg.nheads], dim=-1)
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :length]).transpose(1, 2)
        x, B, C = torch.split(xBC, [cfg.d_inner, bc, bc], dim=-1)
        y = self.scan(x.unflatten(-1, (cfg.nheads, cfg.headdim)), dt, -torch.exp(self.A_log.float()),
                      B.unflatten(-1, (cfg.ngroups, cfg.d_state)), C.unflatten(-1, (cfg.ngroups, cfg.d_state)),
                      self.D.float(), dt_bias=self.dt_bias.float(), dt_softplus=True, dt_limit=cfg.dt_limit)
        return self.out_proj(self.norm(y.flatten(-2), z))


class Mamba2LM(MambaLMHeadModel):
    """A causal LM with Mamba-2 mixers (`cfg.mixer` a Mamba2MixerConfig)."""

    def zero_state(self, batch: int):
        raise MQExportError(NO_DECODE)

    def forward(self, input_ids: Tensor, state=None):
        if state is not None:
            raise MQExportError(NO_DECODE)
        return super().forward(input_ids)


class Mamba2LMFamily(MambaLMFamily):
    """HF `Mamba2ForCausalLM` (Mamba-2, Codestral Mamba): `input_ids` (batch, length) int64 →
    `logits` (batch, length, vocab), with the Mamba-1 LM's input and output names."""
    name = "mamba2-lm"
    model_class = Mamba2LM
    hf_model_types = ("mamba2",)
    state_kinds = ()
    # Refused before any work: RTN needs no topology and would quantize every weight but only
    # lm_head's input (the mixer has no activation sites yet).
    quantization_unsupported = f"quantizing Mamba-2 models {NOT_YET}"

    def topology(self, model):
        raise MQExportError(f"quantizing Mamba-2 models {NOT_YET}")

    def state_layers(self, model):
        raise MQExportError(NO_DECODE)

    def config_from_hf(self, read, source) -> LMConfig:
        """HF transformers' Mamba2Config. chunk_size only groups the computation (the scan here is
        sequential); time_step_rank and the time_step_min/max/floor settings only initialise."""
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
        mixer = Mamba2MixerConfig(d_model=d_model, d_state=read.integer("state_size", 128),
                                  d_conv=read.integer("conv_kernel", 4), expand=expand, headdim=headdim,
                                  ngroups=groups, conv_bias=read.boolean("use_conv_bias", True),
                                  bias=read.boolean("use_bias", False), dt_limit=_dt_limit(read, source),
                                  norm_eps=eps)
        return LMConfig(mixer=mixer, n_layer=read.integer("num_hidden_layers"), vocab_size=read.integer("vocab_size"),
                        rms_norm=True, norm_epsilon=eps, pad_vocab_size_multiple=1,
                        tie_embeddings=read.boolean("tie_word_embeddings", False))


def _dt_limit(read, source) -> tuple[float, float]:
    """time_step_limit: [low, high] with 0 ≤ low < high; high may be infinite (no upper limit),
    written as JSON's Infinity or as transformers writes it, {"__float__": "Infinity"}."""
    value = read.values.get("time_step_limit", list(NO_DT_LIMIT))
    bounds = [_json_number(v) for v in value] if isinstance(value, list) and len(value) == 2 else None
    if bounds is None or None in bounds or not 0 <= bounds[0] < bounds[1]:
        raise MQExportError(f"{source}: time_step_limit is {json.dumps(value)}; expected [low, high] with "
                            f"0 ≤ low < high")
    return bounds[0], bounds[1]


def _json_number(value) -> float | None:
    if value == {"__float__": "Infinity"}:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)
