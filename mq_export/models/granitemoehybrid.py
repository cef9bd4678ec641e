"""Granite-4.0-H (HF transformers `model_type: granitemoehybrid`), dense (num_local_experts 0) and
MoE variants: Bamba's layout with Granite's names, a fused gated MLP (plus a mixture of experts
in the MoE variant) and μP-style multipliers:

    hidden = embed_tokens(input_ids) · embedding_multiplier; per layer:
        hidden = hidden + (mamba | self_attn)(input_layernorm(hidden)) · residual_multiplier
        normed = post_attention_layernorm(hidden)
        hidden = hidden + (shared_mlp(normed) [+ block_sparse_moe(normed)]) · residual_multiplier
    logits = lm_head(norm(hidden)) / logits_scaling

Attention scores are scaled by attention_multiplier (not head_dim^-½), with RoPE over whole heads
when position_embedding_type is "rope", else no positional encoding. State-dict names are
transformers' (model.embed_tokens, model.layers.{i}.mamba.* / .self_attn.*, .shared_mlp.input_linear /
.output_linear, .block_sparse_moe.router.layer / .input_linear / .output_linear, model.norm,
lm_head): the names save_pretrained writes, so its files load with no renaming (a MoE's stacked
input_linear / output_linear weights are its experts' Linears, split and stacked by GraniteMoE).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import MQExportError
from .attention import Attention, AttentionConfig, FusedGatedMLP, MLPConfig
from .bamba import attention_head_dim, mamba_mixer_config, rope_parameters
from .hybrid import (ATTENTION, MAMBA, MIXER_STATE, HybridLM, HybridLMConfig, HybridLMFamily, HybridStack, kv_heads,
                     hybrid_topology, layer_kinds, mix, require_value)
from .mamba import RMSNorm
from .moe import mix_experts
from .topology import BlockTopology, FloatingPointLinear

# layer_types by their config.json spellings (transformers 5's and their legacy names).
_LAYER_KINDS = {"linear_attention": MAMBA, "mamba": MAMBA, "full_attention": ATTENTION, "attention": ATTENTION}


@dataclass(frozen=True)
class GraniteMoeHybridConfig(HybridLMConfig):
    experts: int = 0                # num_local_experts: 0 in the dense variant
    experts_per_token: int = 0      # num_experts_per_tok
    expert_hidden: int = 0          # intermediate_size: each expert's gated width


class TopKRouter(nn.Module):
    """The router's linear, under the name Granite's files give it (router.layer); never quantized."""

    def __init__(self, d_model: int, experts: int) -> None:
        super().__init__()
        self.layer = FloatingPointLinear(d_model, experts, bias=False)


# The experts' Linears whose weights Granite's files stack, one (out_features, in_features) slice
# per expert: input_linear.weight (experts, 2 · hidden, d_model), output_linear.weight (experts,
# d_model, hidden).
_STACKED_LINEARS = ("input_linear", "output_linear")


class GraniteMoE(nn.Module):
    """Granite's mixture of experts: the router's top `top_k` logits, softmaxed among themselves,
    weight their experts' SwiGLU outputs. Each expert is a FusedGatedMLP (experts.{e}.input_linear,
    rows gate then up, and .output_linear), so that it is quantized as its own MLP; the state dict
    keeps the stacked layout of Granite's files (state_dict() stacks the experts' weights, loading
    splits them), so those files load, one or sharded, with no renaming."""

    def __init__(self, cfg: GraniteMoeHybridConfig) -> None:
        super().__init__()
        self.top_k = cfg.experts_per_token
        self.router = TopKRouter(cfg.d_model, cfg.experts)
        expert = MLPConfig(d_model=cfg.d_model, hidden=cfg.expert_hidden, activation="silu", gated=True)
        self.experts = nn.ModuleList(FusedGatedMLP(expert, width="intermediate_size")
                                     for _ in range(cfg.experts))
        self.register_state_dict_post_hook(_stack_expert_weights)
        self.register_load_state_dict_pre_hook(_split_expert_weights)

    def topology(self, name: str) -> BlockTopology:
        """Each expert quantized as its own MLP (its own weight scales and sites); the router floating point."""
        return BlockTopology.experts(f"{name}.router.layer", (expert.topology(f"{name}.experts.{e}")
                                                              for e, expert in enumerate(self.experts)))

    def forward(self, x: Tensor) -> Tensor:
        """Computed densely (moe.mix_experts), as fixed-shape ops."""
        top, picked = self.router.layer(x).topk(self.top_k, dim=-1)
        return mix_experts(self.experts, x, picked, top.softmax(dim=-1))


def _stack_expert_weights(moe: GraniteMoE, state: dict, prefix: str, *_) -> None:
    """state_dict hook: the experts' weights under the stacked names of Granite's files."""
    for linear in _STACKED_LINEARS:
        state[f"{prefix}{linear}.weight"] = torch.stack([state.pop(f"{prefix}experts.{e}.{linear}.weight")
                                                         for e in range(len(moe.experts))])


def _split_expert_weights(moe: GraniteMoE, state: dict, prefix: str, *_) -> None:
    """load_state_dict pre-hook: the stacked weights of Granite's files as each expert's (views,
    so a sharded load that assigns them keeps one copy)."""
    for linear in _STACKED_LINEARS:
        stacked = state.pop(f"{prefix}{linear}.weight", None)
        if stacked is not None:
            state.update({f"{prefix}experts.{e}.{linear}.weight": weight for e, weight in enumerate(stacked)})


class GraniteMoeHybridDecoderLayer(nn.Module):
    def __init__(self, cfg: GraniteMoeHybridConfig, kind: str) -> None:
        super().__init__()
        self.kind, self.residual_multiplier = kind, cfg.residual_multiplier
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_epsilon)
        if kind == MAMBA:
            self.mamba = cfg.mamba.build()
        else:
            self.self_attn = Attention(cfg.attention)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_epsilon)
        self.shared_mlp = FusedGatedMLP(cfg.mlp)
        self.block_sparse_moe = GraniteMoE(cfg) if cfg.experts else None
        self.state_kinds = MIXER_STATE[kind]

    def forward(self, hidden: Tensor, state: tuple[Tensor, ...] | None = None):
        """hidden → hidden; with the mixer's decode `state` → (hidden, new state)."""
        mixed, state = mix(self.mamba if self.kind == MAMBA else self.self_attn, self.input_layernorm(hidden), state)
        hidden = hidden + mixed * self.residual_multiplier
        normed = self.post_attention_layernorm(hidden)
        feed_forward = self.shared_mlp(normed)
        if self.block_sparse_moe is not None:
            feed_forward = feed_forward + self.block_sparse_moe(normed)
        hidden = hidden + feed_forward * self.residual_multiplier
        return hidden if state is None else (hidden, state)


class GraniteMoeHybridLM(HybridLM):
    """model (embed_tokens, layers, norm) → lm_head."""

    def __init__(self, cfg: GraniteMoeHybridConfig) -> None:
        layers = (GraniteMoeHybridDecoderLayer(cfg, kind) for kind in cfg.layer_kinds)
        super().__init__(cfg, "model", HybridStack(cfg, layers, embedding="embed_tokens", final_norm="norm"))


class GraniteMoeHybridFamily(HybridLMFamily):
    name = "granite-hybrid"
    model_class = GraniteMoeHybridLM
    hf_model_types = ("granitemoehybrid",)

    def topology(self, model):
        """input_layernorm read by the Mamba mixer or attention, post_attention_layernorm by the
        shared MLP (and the MoE)."""
        def steps():
            for i, layer in enumerate(model.model.layers):
                name = f"model.layers.{i}"
                yield f"{name}.input_layernorm", (f"{name}.{'mamba' if layer.kind == MAMBA else 'self_attn'}",)
                yield f"{name}.post_attention_layernorm", (f"{name}.shared_mlp",) + (
                    (f"{name}.block_sparse_moe",) if layer.block_sparse_moe is not None else ())
        return hybrid_topology(model, steps())

    def config_from_hf(self, read, source) -> GraniteMoeHybridConfig:
        """HF transformers' GraniteMoeHybridConfig. Settings without effect on an FP32 forward are
        not read: output_router_logits and router_aux_loss_coef (training), mamba_chunk_size
        (grouping only), max_position_embeddings (RoPE needs no table), the initializer, dropout,
        cache and generation settings."""
        experts = read.integer("num_local_experts", 8, minimum=0)
        top_k = read.integer("num_experts_per_tok", 2) if experts else 0
        if top_k > experts:
            raise MQExportError(f"{source}: num_experts_per_tok {top_k} is more than num_local_experts {experts}")
        require_value(read, source, "hidden_act", "silu", "only silu: it is also the Mamba-2 conv's activation")
        d_model = read.integer("hidden_size")
        kinds = _layer_kinds(read, read.integer("num_hidden_layers", 32), source)
        heads = read.integer("num_attention_heads", 32)
        head_dim = attention_head_dim(read, d_model, heads, source)
        attention = AttentionConfig(d_model=d_model, heads=heads, kv_heads=kv_heads(read, heads, source),
                                    head_dim=head_dim, bias=read.boolean("attention_bias", False),
                                    scale=read.positive_float("attention_multiplier", 1.0),
                                    **_rope(read, head_dim, source))
        mlp = MLPConfig(d_model=d_model, hidden=read.integer("shared_intermediate_size", 1024), activation="silu",
                        gated=True)
        eps = read.positive_float("rms_norm_eps", 1e-6)
        return GraniteMoeHybridConfig(vocab_size=read.integer("vocab_size"), layer_kinds=kinds,
                                      mamba=mamba_mixer_config(read, d_model, eps, source), attention=attention,
                                      mlp=mlp, norm_epsilon=eps,
                                      tie_embeddings=read.boolean("tie_word_embeddings", False),
                                      embedding_multiplier=read.positive_float("embedding_multiplier", 1.0),
                                      residual_multiplier=read.positive_float("residual_multiplier", 1.0),
                                      logits_scaling=read.positive_float("logits_scaling", 1.0), experts=experts,
                                      experts_per_token=top_k,
                                      expert_hidden=read.integer("intermediate_size", 11008) if experts else 0)


def _layer_kinds(read, n_layers: int, source) -> tuple[str, ...]:
    """layer_types (null or absent: every layer Mamba-2)."""
    types = read.values.get("layer_types")
    if types is None:
        return (MAMBA,) * n_layers
    if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
        raise MQExportError(f"{source}: layer_types is {types!r}; expected a non-empty list of layer types")
    return layer_kinds(types, _LAYER_KINDS, "layer_types", source)


def _rope(read, head_dim: int, source) -> dict:
    """The AttentionConfig settings of RoPE over whole heads with position_embedding_type "rope";
    none when it is null or absent (no positional encoding)."""
    kind = read.values.get("position_embedding_type")
    if kind is None:
        return {}
    if kind != "rope":
        raise MQExportError(f"{source}: position_embedding_type {kind!r} is not supported (null or 'rope')")
    if head_dim % 2:
        raise MQExportError(f"{source}: RoPE over heads of an odd head_dim {head_dim} is not supported")
    return {"rope_dim": head_dim, "rope_theta": rope_parameters(read, source)[2]}
