"""Jamba (HF transformers `model_type: jamba`; AI21 Jamba): decoder layers of a Mamba-1 mixer, or
attention once every `attn_layer_period` layers from `attn_layer_offset` (grouped-query, no
positional encoding, no biases), each followed by a SwiGLU MLP, or by a mixture of experts once
every `expert_layer_period` layers from `expert_layer_offset` when `num_experts` > 1:

    hidden = embed_tokens(input_ids); per layer:
        hidden = hidden + (mamba | self_attn)(input_layernorm(hidden))
        hidden = hidden + feed_forward(pre_ff_layernorm(hidden))
    logits = lm_head(final_layernorm(hidden))

This is Bamba's layer layout (models/bamba.py) with a Mamba-1 mixer: models/mamba.py's, whose
x_proj outputs dt, B and C pass through weighted RMSNorms (dt_layernorm, b_layernorm,
c_layernorm) before dt_proj and the scan. Parameter names are transformers' (model.embed_tokens,
model.layers.{i}.mamba.* / .self_attn.*, .feed_forward.* with MoE's router and
experts.{e}.*, model.final_layernorm, lm_head), so its files load
with no renaming.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor, nn

from ..errors import MQExportError
from .attention import MLP, AttentionConfig, MLPConfig
from .bamba import BambaDecoderLayer, attention_head_dim, decoder_steps
from .hybrid import (ATTENTION, MAMBA, HybridLM, HybridLMConfig, HybridLMFamily, HybridStack, hybrid_topology,
                     kv_heads, require_value)
from .mamba import MambaMixer, MixerConfig, RMSNorm
from .moe import mix_experts
from .topology import BlockTopology, FloatingPointLinear, Stream


@dataclass(frozen=True)
class JambaMixerConfig(MixerConfig):
    rms_eps: float = 1e-6           # the dt/B/C norms' (Jamba's rms_norm_eps)

    def build(self) -> JambaMambaMixer:
        return JambaMambaMixer(self)


class JambaMambaMixer(MambaMixer):
    """The Mamba-1 mixer with weighted RMSNorms on x_proj's dt (over dt_rank), B and C (each over
    d_state)."""

    def __init__(self, cfg: JambaMixerConfig) -> None:
        super().__init__(cfg)
        self.dt_layernorm = RMSNorm(cfg.rank, cfg.rms_eps)
        self.b_layernorm = RMSNorm(cfg.d_state, cfg.rms_eps)
        self.c_layernorm = RMSNorm(cfg.d_state, cfg.rms_eps)

    def selection(self, dt: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)

    def streams(self, name: str) -> list[Stream]:
        """The base's, with the norms: dt's (between x_proj and dt_proj) takes the smoothing or gives
        its weight to dt_proj for a rotation; B and C are normalised over the state dimension, so no
        state smoothing passes their norms."""
        dt, state, gated = super().streams(name)
        return [replace(dt, norm=f"{name}.dt_layernorm"), replace(state, smoothable=False), gated]


@dataclass(frozen=True)
class JambaConfig(HybridLMConfig):
    layer_experts: tuple[int, ...] = ()     # per layer: num_experts in MoE layers, else 1 (the plain MLP)
    experts_per_token: int = 2              # num_experts_per_tok


class SparseMoE(nn.Module):
    """Jamba's MoE block: router softmax → the top `top_k` probabilities (not renormalised) weight
    their experts' outputs; the experts are SwiGLU MLPs (experts.{e}.gate_proj / up_proj /
    down_proj, the names in Jamba's files)."""

    def __init__(self, cfg: MLPConfig, count: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = FloatingPointLinear(cfg.d_model, count, bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(count))

    def topology(self, name: str) -> BlockTopology:
        """Each expert quantized as its own MLP (its own weight scales and sites); the router floating point."""
        return BlockTopology.experts(f"{name}.router", (expert.topology(f"{name}.experts.{e}")
                                                        for e, expert in enumerate(self.experts)))

    def forward(self, x: Tensor) -> Tensor:
        """Computed densely (moe.mix_experts), as fixed-shape ops."""
        top, picked = self.router(x).softmax(dim=-1).topk(self.top_k, dim=-1)
        return mix_experts(self.experts, x, picked, top)


class JambaDecoderLayer(BambaDecoderLayer):
    """Bamba's decoder layer (Jamba's Mamba-1 mixer from cfg.mamba) whose feed_forward is a
    SparseMoE where the layer has experts. The replaced MLP costs nothing when a large model is
    built on the meta device (sharded loading)."""

    def __init__(self, cfg: JambaConfig, kind: str, experts: int) -> None:
        super().__init__(cfg, kind)
        if experts > 1:
            self.feed_forward = SparseMoE(cfg.mlp, experts, cfg.experts_per_token)


class JambaLM(HybridLM):
    """model (embed_tokens, layers, final_layernorm) → lm_head."""

    def __init__(self, cfg: JambaConfig) -> None:
        layers = (JambaDecoderLayer(cfg, kind, experts) for kind, experts in zip(cfg.layer_kinds, cfg.layer_experts))
        super().__init__(cfg, "model", HybridStack(cfg, layers, embedding="embed_tokens", final_norm="final_layernorm"))


class JambaFamily(HybridLMFamily):
    name = "jamba"
    model_class = JambaLM
    hf_model_types = ("jamba",)

    def topology(self, model):
        return hybrid_topology(model, decoder_steps(model))

    def config_from_hf(self, read, source) -> JambaConfig:
        """HF transformers' JambaConfig. Settings without effect on an FP32 forward are not read:
        use_mamba_kernels, use_mambapy, use_associative_scan (which scan code runs),
        max_position_embeddings (no positional encoding), router_aux_loss_coef and
        output_router_logits (training), the initializer, dropout, cache and generation settings."""
        require_value(read, source, "hidden_act", "silu", "only silu: it is also the Mamba conv's activation")
        require_value(read, source, "sliding_window", None, "attention over the whole sequence only")
        d_model, n_layers = read.integer("hidden_size", 4096), read.integer("num_hidden_layers", 32)
        attention_period, attention_offset = _period(read, "attn_layer", 8, 4, source)
        kinds = tuple(ATTENTION if i % attention_period == attention_offset else MAMBA for i in range(n_layers))
        experts = read.integer("num_experts", 16)
        expert_period, expert_offset = _period(read, "expert_layer", 2, 1, source)
        layer_experts = tuple(experts if i % expert_period == expert_offset else 1 for i in range(n_layers))
        top_k = read.integer("num_experts_per_tok", 2)
        if experts > 1 and top_k > experts:
            raise MQExportError(f"{source}: num_experts_per_tok {top_k} is more than num_experts {experts}")
        heads = read.integer("num_attention_heads", 32)
        attention = AttentionConfig(d_model=d_model, heads=heads, kv_heads=kv_heads(read, heads, source),
                                    head_dim=attention_head_dim(read, d_model, heads, source))
        mlp = MLPConfig(d_model=d_model, hidden=read.integer("intermediate_size", 14336), activation="silu",
                        gated=True)
        eps = read.positive_float("rms_norm_eps", 1e-6)
        mamba = JambaMixerConfig(d_model=d_model, d_state=read.integer("mamba_d_state", 16),
                                 d_conv=read.integer("mamba_d_conv", 4), expand=read.integer("mamba_expand", 2),
                                 dt_rank=read.integer_or_auto("mamba_dt_rank"),
                                 conv_bias=read.boolean("mamba_conv_bias", True),
                                 bias=read.boolean("mamba_proj_bias", False), rms_eps=eps)
        return JambaConfig(vocab_size=read.integer("vocab_size", 65536), layer_kinds=kinds, mamba=mamba,
                           attention=attention, mlp=mlp, norm_epsilon=eps,
                           tie_embeddings=read.boolean("tie_word_embeddings", False), layer_experts=layer_experts,
                           experts_per_token=top_k)


def _period(read, prefix: str, period_default: int, offset_default: int, source) -> tuple[int, int]:
    """({prefix}_period, {prefix}_offset): the layers i with i % period == offset are of that kind."""
    period = read.integer(f"{prefix}_period", period_default)
    offset = read.integer(f"{prefix}_offset", offset_default, minimum=0)
    if offset >= period:
        raise MQExportError(f"{source}: {prefix}_offset {offset} is not below {prefix}_period {period}")
    return period, offset
