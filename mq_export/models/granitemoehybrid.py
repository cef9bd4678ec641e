"""Granite-4.0-H, dense variant (HF transformers `model_type: granitemoehybrid` with
num_local_experts 0): Bamba's layout with Granite's names, a fused gated MLP and μP-style
multipliers:

    hidden = embed_tokens(input_ids) · embedding_multiplier; per layer:
        hidden = hidden + (mamba | self_attn)(input_layernorm(hidden)) · residual_multiplier
        hidden = hidden + shared_mlp(post_attention_layernorm(hidden)) · residual_multiplier
    logits = lm_head(norm(hidden)) / logits_scaling

Attention scores are scaled by attention_multiplier (not head_dim^-½), with RoPE over whole heads
when position_embedding_type is "rope", else no positional encoding. Parameter names are
transformers' (model.embed_tokens, model.layers.{i}.mamba.* / .self_attn.*, .shared_mlp.input_linear /
.output_linear, model.norm, lm_head). The MoE variant (block_sparse_moe experts) is refused.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..errors import MQExportError
from .attention import Attention, AttentionConfig, FusedGatedMLP, MLPConfig
from .bamba import attention_head_dim, mamba_mixer_config, rope_parameters
from .hybrid import (ATTENTION, MAMBA, HybridLM, HybridLMConfig, HybridLMFamily, HybridStack, kv_heads, layer_kinds,
                     require_value)
from .mamba import RMSNorm

# layer_types by their config.json spellings (transformers 5's and their legacy names).
_LAYER_KINDS = {"linear_attention": MAMBA, "mamba": MAMBA, "full_attention": ATTENTION, "attention": ATTENTION}


class GraniteMoeHybridDecoderLayer(nn.Module):
    def __init__(self, cfg: HybridLMConfig, kind: str) -> None:
        super().__init__()
        self.kind, self.residual_multiplier = kind, cfg.residual_multiplier
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_epsilon)
        if kind == MAMBA:
            self.mamba = cfg.mamba.build()
        else:
            self.self_attn = Attention(cfg.attention)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_epsilon)
        self.shared_mlp = FusedGatedMLP(cfg.mlp)

    def forward(self, hidden: Tensor) -> Tensor:
        mixer = self.mamba if self.kind == MAMBA else self.self_attn
        hidden = hidden + mixer(self.input_layernorm(hidden)) * self.residual_multiplier
        return hidden + self.shared_mlp(self.post_attention_layernorm(hidden)) * self.residual_multiplier


class GraniteMoeHybridLM(HybridLM):
    """model (embed_tokens, layers, norm) → lm_head."""

    def __init__(self, cfg: HybridLMConfig) -> None:
        layers = (GraniteMoeHybridDecoderLayer(cfg, kind) for kind in cfg.layer_kinds)
        super().__init__(cfg, "model", HybridStack(cfg, layers, embedding="embed_tokens", final_norm="norm"))


class GraniteMoeHybridFamily(HybridLMFamily):
    name = "granite-hybrid"
    model_class = GraniteMoeHybridLM
    hf_model_types = ("granitemoehybrid",)

    def config_from_hf(self, read, source) -> HybridLMConfig:
        """HF transformers' GraniteMoeHybridConfig with num_local_experts 0. Settings without effect
        on an FP32 forward are not read: intermediate_size and the router settings (experts only),
        mamba_chunk_size (grouping only), max_position_embeddings (RoPE needs no table), the
        initializer, dropout, cache and generation settings."""
        if read.integer("num_local_experts", 8, minimum=0):
            raise MQExportError(f"{source}: num_local_experts {read.values.get('num_local_experts', 8)} is not "
                                f"supported yet (MoE layers); only the dense variant, 0, loads")
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
        return HybridLMConfig(vocab_size=read.integer("vocab_size"), layer_kinds=kinds,
                              mamba=mamba_mixer_config(read, d_model, eps, source), attention=attention, mlp=mlp,
                              norm_epsilon=eps, tie_embeddings=read.boolean("tie_word_embeddings", False),
                              embedding_multiplier=read.positive_float("embedding_multiplier", 1.0),
                              residual_multiplier=read.positive_float("residual_multiplier", 1.0),
                              logits_scaling=read.positive_float("logits_scaling", 1.0))


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
