"""Bamba (HF transformers `model_type: bamba`; IBM Bamba-9B): decoder layers of a Mamba-2 mixer,
or attention at `attn_layer_indices` (grouped-query, RoPE on part of each head), each followed by a
SwiGLU MLP, both in pre-norm residual steps:

    hidden = embed_tokens(input_ids); per layer:
        hidden = hidden + (mamba | self_attn)(input_layernorm(hidden))
        hidden = hidden + feed_forward(pre_ff_layernorm(hidden))
    logits = lm_head(final_layernorm(hidden))

Parameter names are transformers' (model.embed_tokens, model.layers.{i}.mamba.* / .self_attn.*,
.feed_forward.*, model.final_layernorm, lm_head), so its files load with no renaming. The Mamba-2
mixer is models/mamba2.py's (its gated RMSNorm over mamba_n_groups groups, Δ clamped to
time_step_limit).
"""
from __future__ import annotations

from torch import Tensor, nn

from ..errors import MQExportError
from .attention import Attention, AttentionConfig, MLP as MLPBlock, MLPConfig
from .hybrid import (ATTENTION, MAMBA, MIXER_STATE, HybridLM, HybridLMConfig, HybridLMFamily, HybridStack,
                     hybrid_topology, kv_heads, mamba_heads, mix, require_value)
from .mamba import RMSNorm
from .mamba2 import Mamba2MixerConfig, dt_limit_from_config


class BambaDecoderLayer(nn.Module):
    def __init__(self, cfg: HybridLMConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_epsilon)
        if kind == MAMBA:
            self.mamba = cfg.mamba.build()
        else:
            self.self_attn = Attention(cfg.attention)
        self.pre_ff_layernorm = RMSNorm(cfg.d_model, cfg.norm_epsilon)
        self.feed_forward = MLPBlock(cfg.mlp)
        self.state_kinds = MIXER_STATE[kind]

    def forward(self, hidden: Tensor, state: tuple[Tensor, ...] | None = None):
        """hidden → hidden; with the mixer's decode `state` → (hidden, new state)."""
        mixed, state = mix(self.mamba if self.kind == MAMBA else self.self_attn, self.input_layernorm(hidden), state)
        hidden = hidden + mixed
        hidden = hidden + self.feed_forward(self.pre_ff_layernorm(hidden))
        return hidden if state is None else (hidden, state)


class BambaLM(HybridLM):
    """model (embed_tokens, layers, final_layernorm) → lm_head."""

    def __init__(self, cfg: HybridLMConfig) -> None:
        super().__init__(cfg, "model", HybridStack(cfg, (BambaDecoderLayer(cfg, kind) for kind in cfg.layer_kinds),
                                                   embedding="embed_tokens", final_norm="final_layernorm"))


class BambaFamily(HybridLMFamily):
    name = "bamba"
    model_class = BambaLM
    hf_model_types = ("bamba",)

    def topology(self, model):
        return hybrid_topology(model, decoder_steps(model))

    def config_from_hf(self, read, source) -> HybridLMConfig:
        """HF transformers' BambaConfig. Settings without effect on an FP32 forward are not read:
        mamba_chunk_size (grouping only), z_loss_coefficient (training), max_position_embeddings
        (RoPE needs no table), the initializer, dropout, cache and generation settings."""
        require_value(read, source, "hidden_act", "silu", "only silu: it is also the Mamba-2 conv's activation")
        d_model, n_layers = read.integer("hidden_size"), read.integer("num_hidden_layers", 32)
        attention_layers = _attention_layers(read, n_layers, source)
        kinds = tuple(ATTENTION if i in attention_layers else MAMBA for i in range(n_layers))
        heads = read.integer("num_attention_heads", 32)
        head_dim = attention_head_dim(read, d_model, heads, source)
        rope, key, theta = rope_parameters(read, source)
        factor = rope.positive_float("partial_rotary_factor", 0.5)
        rope_dim = int(head_dim * factor)
        if factor > 1 or rope_dim % 2 and rope_dim == head_dim:
            raise MQExportError(f"{source}: {key}.partial_rotary_factor {factor} rotates {rope_dim} of a head's "
                                f"{head_dim} channels; RoPE needs an even count of at most head_dim")
        attention = AttentionConfig(d_model=d_model, heads=heads, kv_heads=kv_heads(read, heads, source),
                                    head_dim=head_dim, bias=read.boolean("attention_bias", False),
                                    rope_dim=rope_dim, rope_theta=theta)
        mlp = MLPConfig(d_model=d_model, hidden=read.integer("intermediate_size", 14336), activation="silu",
                        gated=True, bias=read.boolean("mlp_bias", False))
        eps = read.positive_float("rms_norm_eps", 1e-5)
        mamba = mamba_mixer_config(read, d_model, eps, source)
        return HybridLMConfig(vocab_size=read.integer("vocab_size"), layer_kinds=kinds, mamba=mamba,
                              attention=attention, mlp=mlp, norm_epsilon=eps,
                              tie_embeddings=read.boolean("tie_word_embeddings", False))


def decoder_steps(model: HybridLM):
    """The residual steps of Bamba's decoder layers (Jamba's too): input_layernorm read by the
    Mamba mixer or attention, pre_ff_layernorm by the feed-forward (an MLP or a MoE)."""
    for i, layer in enumerate(model.model.layers):
        name = f"model.layers.{i}"
        yield f"{name}.input_layernorm", (f"{name}.{'mamba' if layer.kind == MAMBA else 'self_attn'}",)
        yield f"{name}.pre_ff_layernorm", (f"{name}.feed_forward",)


def _attention_layers(read, n_layers: int, source) -> set[int]:
    """attn_layer_indices: the attention layers' indices (null or absent: none)."""
    indices = read.values.get("attn_layer_indices") or []
    if not isinstance(indices, list) or not all(type(i) is int and 0 <= i < n_layers for i in indices):
        raise MQExportError(f"{source}: attn_layer_indices is {indices!r}; expected a list of layer indices "
                            f"in [0, {n_layers})")
    return set(indices)


def attention_head_dim(read, d_model: int, heads: int, source) -> int:
    """head_dim, by default hidden_size // num_attention_heads (Bamba's and Granite's)."""
    if "head_dim" not in read.values and d_model < heads:
        raise MQExportError(f"{source}: hidden_size {d_model} leaves no channels for each of "
                            f"num_attention_heads {heads}")
    return read.integer("head_dim", d_model // heads)


def rope_parameters(read, source):
    """(settings, their key, rope_theta) of transformers' default RoPE: rope_parameters
    (transformers 5), or the older rope_scaling and top-level rope_theta; other RoPE types refused."""
    key = next((k for k in ("rope_parameters", "rope_scaling") if read.values.get(k) is not None), "rope_parameters")
    rope = read.section(key)
    rope_type = rope.values.get("rope_type", rope.values.get("type", "default"))
    if rope_type != "default":
        raise MQExportError(f"{source}: {key}.rope_type {rope_type!r} is not supported (only 'default' RoPE)")
    return rope, key, rope.positive_float("rope_theta", read.positive_float("rope_theta", 10000.0))


def mamba_mixer_config(read, d_model: int, eps: float, source) -> Mamba2MixerConfig:
    """The Mamba-2 layers as Bamba and Granite-4.0-H configure them: the mamba_* settings
    (mamba_d_head "auto": mamba_expand × hidden_size / mamba_n_heads), Δ clamped to
    time_step_limit, the gated RMSNorm's eps `eps`. mamba_chunk_size only groups the computation."""
    expand = read.integer("mamba_expand", 2)
    _, head_dim, groups = mamba_heads(read, expand * d_model, source, "mamba_expand × hidden_size")
    read.integer("mamba_chunk_size", 256)
    return Mamba2MixerConfig(d_model=d_model, d_state=read.integer("mamba_d_state", 256),
                             d_conv=read.integer("mamba_d_conv", 4), expand=expand, headdim=head_dim, ngroups=groups,
                             conv_bias=read.boolean("mamba_conv_bias", True),
                             bias=read.boolean("mamba_proj_bias", False),
                             dt_limit=dt_limit_from_config(read, "time_step_limit", source), norm_eps=eps)
