"""Granite-4.0-H (HF transformers `model_type: granitemoehybrid`), dense (num_local_experts 0) and
MoE variants: Bamba's layout with Granite's names, a fused gated MLP (plus a mixture of experts
in the MoE variant) and μP-style multipliers:

    hidden = embed_tokens(input_ids) · embedding_multiplier; per layer:
        hidden = hidden + (mamba | self_attn)(input_layernorm(hidden)) · residual_multiplier
        normed = post_attention_layernorm(hidden)
        hidden = hidden + (shared_mlp(normed) [+ block_sparse_moe(normed)]) · residual_multiplier
    logits = lm_head(norm(hidden)) / logits_scaling

Attention scores are scaled by attention_multiplier (not head_dim^-½), with RoPE over whole heads
when position_embedding_type is "rope", else no positional encoding. Parameter names are
transformers' (model.embed_tokens, model.layers.{i}.mamba.* / .self_attn.*, .shared_mlp.input_linear /
.output_linear, .block_sparse_moe.router.layer / .input_linear / .output_linear, model.norm,
lm_head): the names save_pretrained writes, so its files load with no renaming.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import MQExportError
from .attention import Attention, AttentionConfig, FusedGatedMLP, MLPConfig
from .bamba import attention_head_dim, mamba_mixer_config, rope_parameters
from .hybrid import (ATTENTION, MAMBA, HybridLM, HybridLMConfig, HybridLMFamily, HybridStack, kv_heads, layer_kinds,
                     require_value)
from .mamba import RMSNorm

# layer_types by their config.json spellings (transformers 5's and their legacy names).
_LAYER_KINDS = {"linear_attention": MAMBA, "mamba": MAMBA, "full_attention": ATTENTION, "attention": ATTENTION}


@dataclass(frozen=True)
class GraniteMoeHybridConfig(HybridLMConfig):
    experts: int = 0                # num_local_experts: 0 in the dense variant
    experts_per_token: int = 0      # num_experts_per_tok
    expert_hidden: int = 0          # intermediate_size: each expert's gated width


class ParallelExperts(nn.Module):
    """One bias-free linear per expert, stacked: weight (experts, out_features, in_features), the
    layout of Granite's files."""

    def __init__(self, experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, out_features, in_features))


class TopKRouter(nn.Module):
    """The router's linear, under the name Granite's files give it (router.layer)."""

    def __init__(self, d_model: int, experts: int) -> None:
        super().__init__()
        self.layer = nn.Linear(d_model, experts, bias=False)


class GraniteMoE(nn.Module):
    """Granite's mixture of experts: the router's top `top_k` logits, softmaxed among themselves,
    weight their experts' SwiGLU outputs (input_linear's rows: gate then up)."""

    def __init__(self, cfg: GraniteMoeHybridConfig) -> None:
        super().__init__()
        self.experts, self.top_k, self.expert_hidden = cfg.experts, cfg.experts_per_token, cfg.expert_hidden
        self.router = TopKRouter(cfg.d_model, cfg.experts)
        self.input_linear = ParallelExperts(cfg.experts, cfg.d_model, 2 * cfg.expert_hidden)
        self.output_linear = ParallelExperts(cfg.experts, cfg.expert_hidden, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        """Every expert runs on every token, weighted 0 where the router did not pick it (as
        jamba.SparseMoE, for fixed-shape ops that export with dynamic batch and length). The weights
        scale each expert's down-projection input, the same sum by linearity, so both projections
        are one matmul over all experts."""
        logits = self.router.layer(x)
        top, picked = logits.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(logits).scatter(-1, picked, top.softmax(dim=-1))    # (b, l, experts)
        gate_up = x @ self.input_linear.weight.flatten(0, 1).T                          # (b, l, experts · 2 · hidden)
        gate, up = gate_up.unflatten(-1, (self.experts, 2, self.expert_hidden)).unbind(-2)
        hidden = nn.functional.silu(gate) * up * weights[..., None]                     # (b, l, experts, hidden)
        return hidden.flatten(-2) @ self.output_linear.weight.transpose(1, 2).flatten(0, 1)


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

    def forward(self, hidden: Tensor) -> Tensor:
        mixer = self.mamba if self.kind == MAMBA else self.self_attn
        hidden = hidden + mixer(self.input_layernorm(hidden)) * self.residual_multiplier
        normed = self.post_attention_layernorm(hidden)
        feed_forward = self.shared_mlp(normed)
        if self.block_sparse_moe is not None:
            feed_forward = feed_forward + self.block_sparse_moe(normed)
        return hidden + feed_forward * self.residual_multiplier


class GraniteMoeHybridLM(HybridLM):
    """model (embed_tokens, layers, norm) → lm_head."""

    def __init__(self, cfg: GraniteMoeHybridConfig) -> None:
        layers = (GraniteMoeHybridDecoderLayer(cfg, kind) for kind in cfg.layer_kinds)
        super().__init__(cfg, "model", HybridStack(cfg, layers, embedding="embed_tokens", final_norm="norm"))


class GraniteMoeHybridFamily(HybridLMFamily):
    name = "granite-hybrid"
    model_class = GraniteMoeHybridLM
    hf_model_types = ("granitemoehybrid",)

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
