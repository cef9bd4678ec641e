"""Falcon-H1 (HF transformers `model_type: falcon_h1`; TII Falcon-H1): every decoder layer runs a
Mamba-2 mixer and attention (grouped-query, RoPE over whole heads) IN PARALLEL on the same normed
input and adds their outputs, then a SwiGLU MLP, both in pre-norm residual steps, with μP
multipliers throughout:

    hidden = embed_tokens(input_ids) · embedding_multiplier; per layer:
        x = input_layernorm(hidden)
        hidden = hidden + mamba(x · ssm_in_multiplier) · ssm_out_multiplier
                        + self_attn(x · attention_in_multiplier) · attention_out_multiplier
        hidden = hidden + feed_forward(pre_ff_layernorm(hidden))
    logits = lm_head(final_layernorm(hidden)) · lm_head_multiplier

The MLP is down_proj(up_proj(x) · silu(gate_proj(x) · m₀)) · m₁ (mlp_multipliers); keys are scaled
by key_multiplier (here: the attention scores, the same product); the Mamba-2 in_proj output is
scaled per section z, x, B, C, dt by ssm_multipliers (transformers' `mup_vector`, which it computes
from the config and never saves). The mixer has no gated RMSNorm by default (mamba_rms_norm false:
the scan output is gated by silu(z)) and may be sized by mamba_d_ssm instead of mamba_expand ×
hidden_size. Parameter names are transformers' (model.embed_tokens, model.layers.{i}.mamba.*,
.self_attn.*, .feed_forward.*, .input_layernorm, .pre_ff_layernorm, model.final_layernorm,
lm_head), so its files load with no renaming.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import MQExportError
from .attention import Attention, AttentionConfig, MLP as MLPBlock, MLPConfig
from .bamba import attention_head_dim, rope_parameters
from .hybrid import (ATTENTION, MAMBA, MIXER_STATE, HybridLM, HybridLMConfig, HybridLMFamily, HybridStack, kv_heads,
                     hybrid_topology, mamba_heads, mix, require_value)
from .mamba import RMSNorm
from .mamba2 import Mamba2Mixer, dt_limit_from_config
from .nemotron_h import NemotronHMixerConfig


class SectionScaledLinear(nn.Linear):
    """nn.Linear whose output is multiplied section by section (consecutive widths `sections`, one
    multiplier each). The multipliers are kept as numbers, not a buffer: a model built on the meta
    device (sharded loading) gets only its weights filled in. `scale_output` is the part after
    Linear's own forward, so the exporter can put its weight (quantized or not) in front of it."""

    def __init__(self, d_in: int, sections: tuple[int, ...], multipliers: tuple[float, ...], bias: bool) -> None:
        super().__init__(d_in, sum(sections), bias=bias)
        self.sections, self.multipliers = sections, multipliers

    def forward(self, x: Tensor) -> Tensor:
        return self.scale_output(super().forward(x))

    def scale_output(self, y: Tensor) -> Tensor:
        parts = y.split(self.sections, dim=-1)
        return torch.cat([part * m for part, m in zip(parts, self.multipliers)], dim=-1)


@dataclass(frozen=True)
class FalconH1MixerConfig(NemotronHMixerConfig):
    """Falcon-H1's Mamba-2 layer: sized by heads (mamba_d_ssm channels), `bias` the out_proj's
    (projectors_bias), in_proj's own bias (mamba_proj_bias) and its per-section multipliers."""
    in_proj_bias: bool = False
    in_proj_multipliers: tuple[float, ...] = (1.0,) * 5     # of z, x, B, C, dt

    def build(self) -> Mamba2Mixer:
        mixer = Mamba2Mixer(self)
        bc = self.ngroups * self.d_state
        mixer.in_proj = SectionScaledLinear(self.d_model, (self.d_inner, self.d_inner, bc, bc, self.nheads),
                                            self.in_proj_multipliers, self.in_proj_bias)
        return mixer


@dataclass(frozen=True)
class FalconH1Multipliers:
    """The scalars of a decoder layer's branches (transformers' config names without `_multiplier`)."""
    ssm_in: float = 1.0
    ssm_out: float = 1.0
    attention_in: float = 1.0
    attention_out: float = 1.0
    mlp_down: float = 1.0


@dataclass(frozen=True)
class FalconH1Config(HybridLMConfig):
    """A hybrid config (every layer both Mamba-2 and attention) plus the layers' branch multipliers."""
    multipliers: FalconH1Multipliers = FalconH1Multipliers()


class FalconH1DecoderLayer(nn.Module):
    def __init__(self, cfg: FalconH1Config) -> None:
        super().__init__()
        self.multipliers = cfg.multipliers
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_epsilon)
        self.mamba = cfg.mamba.build()
        self.self_attn = Attention(cfg.attention)
        self.pre_ff_layernorm = RMSNorm(cfg.d_model, cfg.norm_epsilon)
        self.feed_forward = MLPBlock(cfg.mlp)
        self.state_kinds = MIXER_STATE[MAMBA] + MIXER_STATE[ATTENTION]

    def forward(self, hidden: Tensor, state: tuple[Tensor, ...] | None = None):
        """hidden → hidden; with the decode `state` (the Mamba mixer's conv and SSM states, then
        the attention's key and value caches) → (hidden, new state)."""
        m = self.multipliers
        x = self.input_layernorm(hidden)
        split = len(MIXER_STATE[MAMBA])
        mamba_out, mamba_state = mix(self.mamba, x * m.ssm_in, None if state is None else state[:split])
        attention_out, attention_state = mix(self.self_attn, x * m.attention_in,
                                             None if state is None else state[split:])
        hidden = hidden + mamba_out * m.ssm_out + attention_out * m.attention_out
        hidden = hidden + self.feed_forward(self.pre_ff_layernorm(hidden)) * m.mlp_down
        return hidden if state is None else (hidden, mamba_state + attention_state)


class FalconH1LM(HybridLM):
    """model (embed_tokens, layers, final_layernorm) → lm_head."""

    def __init__(self, cfg: FalconH1Config) -> None:
        layers = (FalconH1DecoderLayer(cfg) for _ in cfg.layer_kinds)
        super().__init__(cfg, "model", HybridStack(cfg, layers, embedding="embed_tokens", final_norm="final_layernorm"))


class FalconH1Family(HybridLMFamily):
    name = "falcon-h1"
    model_class = FalconH1LM
    hf_model_types = ("falcon_h1",)

    def topology(self, model):
        """input_layernorm read by the Mamba mixer and attention side by side (each through its own
        scalar multiplier), pre_ff_layernorm by the MLP."""
        def steps():
            for i in range(len(model.model.layers)):
                name = f"model.layers.{i}"
                yield f"{name}.input_layernorm", (f"{name}.mamba", f"{name}.self_attn")
                yield f"{name}.pre_ff_layernorm", (f"{name}.feed_forward",)
        return hybrid_topology(model, steps())

    def config_from_hf(self, read, source) -> FalconH1Config:
        """HF transformers' FalconH1Config. Settings without effect on an FP32 forward are not read:
        mamba_chunk_size (grouping only), max_position_embeddings (RoPE needs no table),
        num_logits_to_keep, the initializer, dropout, cache and generation settings."""
        require_value(read, source, "hidden_act", "silu", "only silu: it is also the Mamba-2 conv's activation")
        d_model, n_layers = read.integer("hidden_size"), read.integer("num_hidden_layers", 32)
        heads = read.integer("num_attention_heads", 32)
        head_dim = attention_head_dim(read, d_model, heads, source)
        if head_dim % 2:
            raise MQExportError(f"{source}: RoPE over heads of an odd head_dim {head_dim} is not supported")
        key_multiplier = _multiplier(read, "key_multiplier", source)
        attention = AttentionConfig(d_model=d_model, heads=heads, kv_heads=kv_heads(read, heads, source),
                                    head_dim=head_dim, bias=read.boolean("attention_bias", False),
                                    rope_dim=head_dim, rope_theta=rope_parameters(read, source)[2],
                                    scale=head_dim ** -0.5 * key_multiplier)
        gate_multiplier, down_multiplier = _multipliers(read, "mlp_multipliers", 2, source)
        mlp = MLPConfig(d_model=d_model, hidden=read.integer("intermediate_size", 14336), activation="silu",
                        gated=True, bias=read.boolean("mlp_bias", False), gate_multiplier=gate_multiplier)
        eps = read.positive_float("rms_norm_eps", 1e-5)
        branches = {name: _multiplier(read, f"{name}_multiplier", source)
                    for name in ("ssm_in", "ssm_out", "attention_in", "attention_out")}
        # layer_kinds: every layer holds a Mamba-2 mixer (and attention beside it).
        return FalconH1Config(vocab_size=read.integer("vocab_size"), layer_kinds=(MAMBA,) * n_layers,
                              mamba=_mixer_config(read, d_model, eps, source), attention=attention, mlp=mlp,
                              norm_epsilon=eps, tie_embeddings=read.boolean("tie_word_embeddings", False),
                              embedding_multiplier=_multiplier(read, "embedding_multiplier", source),
                              logits_scaling=1 / _multiplier(read, "lm_head_multiplier", source),
                              multipliers=FalconH1Multipliers(**branches, mlp_down=down_multiplier))


def _mixer_config(read, d_model: int, eps: float, source) -> FalconH1MixerConfig:
    """The Mamba-2 layers: mamba_d_ssm channels (null: mamba_expand × hidden_size) in mamba_n_heads
    heads (mamba_d_head "auto": as many channels each as that leaves), Δ clamped to
    time_step_limit, the optional gated RMSNorm (only normalising after the gate, as mamba-ssm's)."""
    if read.values.get("mamba_d_ssm", 1024) is None:
        d_inner, channels = read.integer("mamba_expand", 2) * d_model, "mamba_expand × hidden_size"
    else:
        d_inner, channels = read.integer("mamba_d_ssm", 1024), "mamba_d_ssm"
    heads, head_dim, groups = mamba_heads(read, d_inner, source, channels)
    rmsnorm = read.boolean("mamba_rms_norm", False)
    if rmsnorm and read.boolean("mamba_norm_before_gate", True):
        raise MQExportError(f"{source}: mamba_norm_before_gate true with mamba_rms_norm is not supported (the "
                            f"Mamba-2 mixer's gated RMSNorm normalises after the gate)")
    read.integer("mamba_chunk_size", 256)
    return FalconH1MixerConfig(d_model=d_model, d_state=read.integer("mamba_d_state", 256),
                               d_conv=read.integer("mamba_d_conv", 4), headdim=head_dim, ngroups=groups,
                               conv_bias=read.boolean("mamba_conv_bias", True),
                               bias=read.boolean("projectors_bias", False),
                               dt_limit=dt_limit_from_config(read, "time_step_limit", source), norm_eps=eps,
                               rmsnorm=rmsnorm, mamba_heads=heads, in_proj_bias=read.boolean("mamba_proj_bias", False),
                               in_proj_multipliers=_multipliers(read, "ssm_multipliers", 5, source))


def _multiplier(read, key: str, source) -> float:
    """A scalar multiplier (null or absent: 1); any finite non-zero number."""
    value = read.values.get(key)
    if value is None:
        return 1.0
    return _finite_nonzero(value, key, source)


def _multipliers(read, key: str, count: int, source) -> tuple[float, ...]:
    """A list of `count` multipliers (null or absent: all 1)."""
    values = read.values.get(key)
    if values is None:
        return (1.0,) * count
    if not isinstance(values, list) or len(values) != count:
        raise MQExportError(f"{source}: {key} is {values!r}; expected a list of {count} numbers")
    return tuple(_finite_nonzero(v, key, source) for v in values)


def _finite_nonzero(value, key: str, source) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
        raise MQExportError(f"{source}: {key} has {value!r}; expected finite non-zero numbers")
    return float(value)
