"""Nemotron-H (HF transformers `model_type: nemotron_h`; NVIDIA Nemotron-H, Nemotron-Nano-v2): a
stack of pre-norm residual layers, each ONE mixer chosen by the config's layer pattern:
Mamba-2 (`M`, "linear_attention"), attention (`*`, "full_attention": grouped-query, no
positional encoding), an MLP (`-`, "mlp": up_proj → activation, relu² by default → down_proj) or
a mixture of such MLPs (`E`, "moe": NemotronHMoE; NVIDIA Nemotron-3-Nano).

    hidden = embeddings(input_ids); per layer: hidden = hidden + mixer(norm(hidden));
    logits = lm_head(norm_f(hidden))

Parameter names are the checkpoints' (backbone.embeddings, backbone.layers.{i}.norm / .mixer.*,
backbone.norm_f, lm_head; a MoE layer's mixer.gate, .experts.{e}.up_proj / down_proj,
.shared_experts.*), so files load with no renaming. The Mamba-2 mixer is models/mamba2.py's,
sized by mamba_num_heads × mamba_head_dim (which need not be expand × hidden_size) and with Δ
clamped below at time_step_min, as transformers' NemotronHMamba2Mixer does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import MQExportError
from .attention import Attention, AttentionConfig, MLP as MLPBlock, MLPConfig
from .hybrid import (ATTENTION, MAMBA, MIXER_STATE, MLP, MOE, HybridLM, HybridLMConfig, HybridLMFamily, HybridStack,
                     activation, check_ssm_heads, hybrid_topology, kv_heads, layer_kinds, mix, require_value)
from .mamba import RMSNorm
from .mamba2 import Mamba2MixerConfig
from .moe import mix_experts
from .topology import BlockTopology, FloatingPointLinear

# Layer types by their config.json spellings: layers_block_type (transformers 5; "mamba" and
# "attention" are its legacy names) and hybrid_override_pattern's characters.
_LAYER_KINDS = {"linear_attention": MAMBA, "mamba": MAMBA, "M": MAMBA,
                "full_attention": ATTENTION, "attention": ATTENTION, "*": ATTENTION,
                "mlp": MLP, "-": MLP, "moe": MOE, "E": MOE}
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


@dataclass(frozen=True)
class NemotronHMoEConfig:
    """A MoE layer's settings, transformers' names in the comments."""
    d_model: int
    experts: int                    # n_routed_experts
    experts_per_token: int          # num_experts_per_tok
    expert_hidden: int              # moe_intermediate_size: each routed expert's up_proj width
    shared_hidden: int              # moe_shared_expert_intermediate_size: the shared expert's
    activation: str                 # mlp_hidden_act, the experts' as the MLP layers'
    bias: bool                      # mlp_bias: of the shared expert and latent projections (routed experts have none)
    latent_size: int | None = None  # moe_latent_size: the routed experts' width, projected to and from; None: d_model
    groups: int = 1                 # n_group: the routed experts in this many equal groups, …
    groups_kept: int = 1            # topk_group: … of which a token's experts come from its best this many
    normalize: bool = True          # norm_topk_prob: the picked experts' weights divided by their sum
    scaling: float = 1.0            # routed_scaling_factor: of the routed experts' weights


@dataclass(frozen=True)
class NemotronHLMConfig(HybridLMConfig):
    moe: NemotronHMoEConfig | None = None     # the MoE layers' (None: the pattern has none)


class NemotronHRouter(FloatingPointLinear):
    """The router: a bias-free linear to one logit per routed expert (gate.weight, experts ×
    d_model), never quantized, and e_score_correction_bias, a per-expert offset of the sigmoid
    scores that steers which experts are picked but not their weights (DeepSeek-V3's
    auxiliary-loss-free balancing)."""

    def __init__(self, d_model: int, experts: int) -> None:
        super().__init__(d_model, experts, bias=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(experts))


class NemotronHMoE(nn.Module):
    """Nemotron-H's mixture of experts (transformers' NemotronHMoE): the router picks
    experts_per_token non-gated MLP experts per token (route), whose outputs, weighted, are added
    to the shared expert's; with moe_latent_size the routed experts work on a projection of the
    input (fc1_latent_proj) whose weighted sum is projected back (fc2_latent_proj). The experts are
    computed densely (moe.mix_experts), as fixed-shape ops."""

    def __init__(self, cfg: NemotronHMoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = NemotronHRouter(cfg.d_model, cfg.experts)
        expert = MLPConfig(d_model=cfg.latent_size or cfg.d_model, hidden=cfg.expert_hidden,
                           activation=cfg.activation, gated=False)
        self.experts = nn.ModuleList(MLPBlock(expert) for _ in range(cfg.experts))
        self.shared_experts = MLPBlock(MLPConfig(d_model=cfg.d_model, hidden=cfg.shared_hidden,
                                                 activation=cfg.activation, gated=False, bias=cfg.bias))
        if cfg.latent_size:
            self.fc1_latent_proj = nn.Linear(cfg.d_model, cfg.latent_size, bias=cfg.bias)
            self.fc2_latent_proj = nn.Linear(cfg.latent_size, cfg.d_model, bias=cfg.bias)

    def topology(self, name: str) -> BlockTopology:
        """Every expert, the shared one too, quantized as its own MLP (its own weight scales and
        sites); the router floating point. With moe_latent_size the routed experts read and write a
        latent stream between fc1_latent_proj and fc2_latent_proj, which no topology covers yet."""
        if self.cfg.latent_size:
            raise MQExportError(f"quantizing Nemotron-H MoE layers with moe_latent_size ({name}) is not supported "
                                f"yet: use --method none")
        experts = (expert.topology(f"{name}.experts.{e}") for e, expert in enumerate(self.experts))
        return BlockTopology.experts(f"{name}.gate", (*experts, self.shared_experts.topology(f"{name}.shared_experts")))

    def forward(self, x: Tensor) -> Tensor:
        picked, weights = self.route(x)
        if not self.cfg.latent_size:
            return mix_experts(self.experts, x, picked, weights) + self.shared_experts(x)
        routed = mix_experts(self.experts, self.fc1_latent_proj(x), picked, weights)
        return self.fc2_latent_proj(routed) + self.shared_experts(x)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Each token's picked experts (…, experts_per_token) and their weights. Scores are the
        router logits' sigmoids; the experts are picked by score + e_score_correction_bias, among
        the groups_kept groups whose best two such values sum highest when the experts are grouped,
        and weighted by their scores (over the picked scores' sum with norm_topk_prob) ×
        routed_scaling_factor."""
        cfg = self.cfg
        scores = self.gate(x).sigmoid()
        choice = scores + self.gate.e_score_correction_bias
        if cfg.groups_kept < cfg.groups:
            grouped = choice.unflatten(-1, (cfg.groups, -1))                           # (…, groups, group size)
            kept = grouped.topk(2, dim=-1).values.sum(dim=-1).topk(cfg.groups_kept, dim=-1).indices
            in_kept = torch.zeros_like(grouped[..., 0]).scatter(-1, kept, 1.0)        # (…, groups)
            choice = grouped.masked_fill(in_kept[..., None] == 0, float("-inf")).flatten(-2)
        picked = choice.topk(cfg.experts_per_token, dim=-1).indices
        weights = scores.gather(-1, picked)
        if cfg.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return picked, weights * cfg.scaling


class NemotronHBlock(nn.Module):
    def __init__(self, cfg: NemotronHLMConfig, kind: str) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_epsilon)
        self.mixer = (cfg.mamba.build() if kind == MAMBA else Attention(cfg.attention) if kind == ATTENTION
                      else NemotronHMoE(cfg.moe) if kind == MOE else MLPBlock(cfg.mlp))
        self.state_kinds = MIXER_STATE.get(kind, ())

    def forward(self, hidden: Tensor, state: tuple[Tensor, ...] | None = None):
        """hidden → hidden; with the mixer's decode `state` → (hidden, new state)."""
        mixed, state = mix(self.mixer, self.norm(hidden), state)
        return hidden + mixed if state is None else (hidden + mixed, state)


class NemotronHLM(HybridLM):
    """backbone (embeddings, layers, norm_f) → lm_head. transformers never ties Nemotron-H's lm_head
    to the embedding (tie_word_embeddings has no effect), so neither does this."""

    def __init__(self, cfg: NemotronHLMConfig) -> None:
        super().__init__(cfg, "backbone", HybridStack(cfg, (NemotronHBlock(cfg, kind) for kind in cfg.layer_kinds),
                                                      embedding="embeddings", final_norm="norm_f"))


class NemotronHFamily(HybridLMFamily):
    name = "nemotron-h"
    model_class = NemotronHLM
    hf_model_types = ("nemotron_h",)

    def topology(self, model):
        """Each layer's norm, read by its one mixer (a Mamba-2 mixer, attention, an MLP, a MoE)."""
        return hybrid_topology(model, ((f"backbone.layers.{i}.norm", (f"backbone.layers.{i}.mixer",))
                                       for i in range(len(model.backbone.layers))))

    def config_from_hf(self, read, source) -> NemotronHLMConfig:
        """HF transformers' NemotronHConfig. Settings without effect on an FP32 forward are not read:
        chunk_size (grouping only), expand (the mixer is sized by its heads), time_step_limit
        (transformers' mixer clamps Δ to [time_step_min, ∞) instead), the time_step_max/floor and
        initializer settings, residual_in_fp32, dropout, max_position_embeddings (no RoPE),
        the cache and generation settings, the MoE settings when no layer is MoE, and else
        n_shared_experts (transformers builds one shared expert whatever it says),
        moe_shared_expert_overlap (scheduling) and output_router_logits / router_aux_loss_coef
        (training)."""
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
        return NemotronHLMConfig(vocab_size=read.integer("vocab_size"), layer_kinds=kinds, mamba=mamba,
                                 attention=attention, mlp=mlp, norm_epsilon=eps,
                                 moe=_moe_config(read, mlp, source) if MOE in kinds else None)


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
                            f"string of M, *, -, E characters")
    return layer_kinds(types, _LAYER_KINDS, key, source)


def _moe_config(read, mlp: MLPConfig, source) -> NemotronHMoEConfig:
    """The MoE layers' settings (transformers' defaults where absent); the experts take the MLP
    layers' activation and mlp_bias. Refused: experts that do not split into n_group groups of at
    least two (a group is scored by its best two), and more experts per token than the kept groups
    hold."""
    experts, groups = read.integer("n_routed_experts", 8), read.integer("n_group", 1)
    if experts % groups or (groups > 1 and experts // groups < 2):
        raise MQExportError(f"{source}: n_group {groups} does not split n_routed_experts {experts} into equal "
                            f"groups of at least two")
    groups_kept = read.integer("topk_group", 1)
    if groups_kept > groups:
        raise MQExportError(f"{source}: topk_group {groups_kept} is more than n_group {groups}")
    top_k = read.integer("num_experts_per_tok", 2)
    if top_k > groups_kept * experts // groups:
        raise MQExportError(f"{source}: num_experts_per_tok {top_k} is more than the {groups_kept * experts // groups} "
                            f"experts of topk_group {groups_kept} of n_group {groups} groups")
    latent = read.values.get("moe_latent_size")
    return NemotronHMoEConfig(d_model=mlp.d_model, experts=experts, experts_per_token=top_k,
                              expert_hidden=read.integer("moe_intermediate_size", 7688),
                              shared_hidden=read.integer("moe_shared_expert_intermediate_size", 7688),
                              activation=mlp.activation, bias=mlp.bias,
                              latent_size=None if latent is None else read.integer("moe_latent_size"),
                              groups=groups, groups_kept=groups_kept,
                              normalize=read.boolean("norm_topk_prob", True),
                              scaling=read.positive_float("routed_scaling_factor", 1.0))


def _dt_min(read, key: str, source) -> float:
    """time_step_min: the lower Δ limit, a finite number ≥ 0."""
    value = read.values.get(key, 1e-3)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise MQExportError(f"{source}: {key} is {value!r}; expected a finite number ≥ 0")
    return float(value)
