"""Nemotron-H (HF transformers `model_type: nemotron_h`; NVIDIA Nemotron-H, Nemotron-Nano-v2): a
stack of pre-norm residual layers, each ONE mixer chosen by the config's layer pattern:
Mamba-2 (`M`, "linear_attention"), attention (`*`, "full_attention": grouped-query, no
positional encoding) or an MLP (`-`, "mlp": up_proj → activation, relu² by default → down_proj).

    hidden = embeddings(input_ids); per layer: hidden = hidden + mixer(norm(hidden));
    logits = lm_head(norm_f(hidden))

Parameter names are the checkpoints' (backbone.embeddings, backbone.layers.{i}.norm / .mixer.*,
backbone.norm_f, lm_head), so files load with no renaming. The Mamba-2 mixer is models/mamba2.py's,
sized by mamba_num_heads × mamba_head_dim (which need not be expand × hidden_size) and with Δ
clamped below at time_step_min, as transformers' NemotronHMamba2Mixer does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from ..errors import MQExportError
from .attention import Attention, AttentionConfig, MLP as MLPBlock, MLPConfig
from .hybrid import (ATTENTION, MAMBA, MLP, HybridLM, HybridLMConfig, HybridLMFamily, HybridStack, activation,
                     check_ssm_heads, kv_heads, layer_kinds, require_value)
from .mamba import RMSNorm
from .mamba2 import Mamba2MixerConfig

# Layer types by their config.json spellings: layers_block_type (transformers 5; "mamba" and
# "attention" are its legacy names) and hybrid_override_pattern's characters.
_LAYER_KINDS = {"linear_attention": MAMBA, "mamba": MAMBA, "M": MAMBA,
                "full_attention": ATTENTION, "attention": ATTENTION, "*": ATTENTION,
                "mlp": MLP, "-": MLP}
_MOE = ("moe", "E")
# transformers' older names of some settings; where present they win over the current name.
_ALIASES = {"n_groups": "mamba_n_groups", "conv_kernel": "mamba_d_conv", "time_step_min": "mamba_dt_min",
            "use_conv_bias": "mamba_conv_bias", "chunk_size": "mamba_chunk_size"}


@dataclass(frozen=True)
class NemotronHMixerConfig(Mamba2MixerConfig):
    """Nemotron-H's Mamba-2 layer: mamba_heads × headdim channels, whatever `expand` says
    (Nemotron-Nano-9B-v2: 128 × 80 = 10240, not 2 × 4480)."""
    mamba_heads: int = 1

    @property
    def d_inner(self) -> int:
        return self.mamba_heads * self.headdim


class NemotronHBlock(nn.Module):
    def __init__(self, cfg: HybridLMConfig, kind: str) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_epsilon)
        self.mixer = (cfg.mamba.build() if kind == MAMBA else Attention(cfg.attention) if kind == ATTENTION
                      else MLPBlock(cfg.mlp))

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + self.mixer(self.norm(hidden))


class NemotronHLM(HybridLM):
    """backbone (embeddings, layers, norm_f) → lm_head. transformers never ties Nemotron-H's lm_head
    to the embedding (tie_word_embeddings has no effect), so neither does this."""

    def __init__(self, cfg: HybridLMConfig) -> None:
        super().__init__(cfg, "backbone", HybridStack(cfg, (NemotronHBlock(cfg, kind) for kind in cfg.layer_kinds),
                                                      embedding="embeddings", final_norm="norm_f"))


class NemotronHFamily(HybridLMFamily):
    name = "nemotron-h"
    model_class = NemotronHLM
    hf_model_types = ("nemotron_h",)

    def config_from_hf(self, read, source) -> HybridLMConfig:
        """HF transformers' NemotronHConfig. Settings without effect on an FP32 forward are not read:
        chunk_size (grouping only), expand (the mixer is sized by its heads), time_step_limit
        (transformers' mixer clamps Δ to [time_step_min, ∞) instead), the time_step_max/floor and
        initializer settings, residual_in_fp32, dropout, max_position_embeddings (no RoPE),
        the cache and generation settings, and the MoE settings when no layer is MoE."""
        def key(name: str) -> str:
            return _ALIASES[name] if _ALIASES.get(name) in read.values else name

        d_model = read.integer("hidden_size")
        kinds = _layer_kinds(read, source)
        require_value(read, source, "attention_bias", False, "transformers' Nemotron-H attention has no biases")
        require_value(read, source, "sliding_window", None, "only full causal attention")
        require_value(read, source, "mamba_hidden_act", "silu", "only silu")
        if read.integer("num_nextn_predict_layers", 0, minimum=0):
            raise MQExportError(f"{source}: num_nextn_predict_layers {read.values['num_nextn_predict_layers']} is "
                                f"not supported (multi-token prediction layers)")
        heads = read.integer("num_attention_heads", 32)
        attention = AttentionConfig(d_model=d_model, heads=heads, kv_heads=kv_heads(read, heads, source),
                                    head_dim=read.integer("head_dim", 128))
        mlp = MLPConfig(d_model=d_model, hidden=read.integer("intermediate_size", 21504),
                        activation=activation(read, "mlp_hidden_act", "relu2", source), gated=False,
                        bias=read.boolean("mlp_bias", False))
        ssm_heads, groups = read.integer("mamba_num_heads", 128), read.integer(key("n_groups"), 8)
        check_ssm_heads(ssm_heads, groups, source, "mamba_num_heads", key("n_groups"))
        eps = read.positive_float("layer_norm_epsilon", 1e-5)
        read.integer(key("chunk_size"), 128)
        mamba = NemotronHMixerConfig(d_model=d_model, d_state=read.integer("ssm_state_size", 128),
                                     d_conv=read.integer(key("conv_kernel"), 4),
                                     headdim=read.integer("mamba_head_dim", 64), ngroups=groups,
                                     conv_bias=read.boolean(key("use_conv_bias"), True),
                                     bias=read.boolean("use_bias", False),
                                     dt_limit=(_dt_min(read, key("time_step_min"), source), math.inf), norm_eps=eps,
                                     mamba_heads=ssm_heads)
        return HybridLMConfig(vocab_size=read.integer("vocab_size"), layer_kinds=kinds, mamba=mamba,
                              attention=attention, mlp=mlp, norm_epsilon=eps)


def _layer_kinds(read, source) -> tuple[str, ...]:
    """The layer pattern: layers_block_type (a list of type names) or else hybrid_override_pattern
    (a string of their characters)."""
    if read.values.get("layers_block_type") is not None:
        key, types = "layers_block_type", read.values["layers_block_type"]
        valid = isinstance(types, list) and all(isinstance(t, str) for t in types)
    elif "hybrid_override_pattern" in read.values:
        key, types = "hybrid_override_pattern", read.values["hybrid_override_pattern"]
        valid = isinstance(types, str)
    else:
        raise MQExportError(f"{source} lacks 'layers_block_type' (or 'hybrid_override_pattern'): the layer pattern")
    if not valid or not types:
        raise MQExportError(f"{source}: {key} is {types!r}; expected a non-empty list of layer types or "
                            f"string of M, *, - characters")
    moe = next((t for t in types if t in _MOE), None)
    if moe is not None:
        raise MQExportError(f"{source}: {key} has MoE layers ({moe!r}), which are not supported yet")
    return layer_kinds(types, _LAYER_KINDS, key, source)


def _dt_min(read, key: str, source) -> float:
    """time_step_min: the lower Δ limit, a finite number ≥ 0."""
    value = read.values.get(key, 1e-3)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise MQExportError(f"{source}: {key} is {value!r}; expected a finite number ≥ 0")
    return float(value)
