"""What the hybrid Mamba + attention families share (models/nemotron_h.py, bamba.py,
granitemoehybrid.py, falcon_h1.py with Mamba-2 layers; jamba.py with Mamba-1 layers): their
config, embedding → layers → norm stack and LM head, their family adapter's base, and the checks
of config settings common to them.

A hybrid LM reads `input_ids` (batch, length) int64 and writes `logits` (batch, length, vocab),
as the Mamba LMs do, and is exported with `--method none` as one graph: SSDScan (Mamba-2) or
SelectiveScan (Jamba's Mamba-1) nodes for its Mamba layers, standard ONNX ops for attention, MLPs
and MoE. Quantization and stateful decoding (a KV cache beside the Mamba state) are not
implemented for hybrids yet (issue #20); both are refused with one line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import Tensor, nn

from ..errors import MQExportError
from .attention import ACTIVATIONS, AttentionConfig, MLPConfig
from .mamba import MambaLMFamily, MixerConfig, RMSNorm
from .mamba2 import Mamba2MixerConfig

# The kinds of layer a hybrid stacks.
MAMBA, ATTENTION, MLP = "mamba", "attention", "mlp"


@dataclass(frozen=True)
class HybridLMConfig:
    vocab_size: int
    layer_kinds: tuple[str, ...]    # MAMBA, ATTENTION or MLP per layer (what each family's layer holds)
    mamba: Mamba2MixerConfig | MixerConfig   # the Mamba layers' mixer (Mamba-1 in Jamba)
    attention: AttentionConfig
    mlp: MLPConfig
    norm_epsilon: float             # the RMSNorms'
    tie_embeddings: bool = False
    # Granite's μP-style multipliers: of the embedding output, of each residual branch, and the
    # divisor of the logits (1 in the families without them).
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0

    @property
    def d_model(self) -> int:
        return self.mamba.d_model


class HybridStack(nn.Module):
    """Embedding → layers → final RMSNorm, the embedding and the norm registered under the names
    the family's checkpoints give them."""

    def __init__(self, cfg: HybridLMConfig, layers: Iterable[nn.Module], embedding: str, final_norm: str) -> None:
        super().__init__()
        self.names = (embedding, final_norm)
        self.embedding_multiplier = cfg.embedding_multiplier
        self.add_module(embedding, nn.Embedding(cfg.vocab_size, cfg.d_model))
        self.layers = nn.ModuleList(layers)
        self.add_module(final_norm, RMSNorm(cfg.d_model, cfg.norm_epsilon))

    @property
    def input_embedding(self) -> nn.Embedding:
        return getattr(self, self.names[0])

    def forward(self, input_ids: Tensor) -> Tensor:
        hidden = self.input_embedding(input_ids)
        if self.embedding_multiplier != 1:
            hidden = hidden * self.embedding_multiplier
        for layer in self.layers:
            hidden = layer(hidden)
        return getattr(self, self.names[1])(hidden)


class HybridLM(nn.Module):
    """A hybrid LM: its HybridStack (registered as `stack_name`) → lm_head; input_ids (b, l) →
    logits (b, l, vocab). No decode state yet."""

    def __init__(self, cfg: HybridLMConfig, stack_name: str, stack: HybridStack) -> None:
        super().__init__()
        self.cfg = cfg
        self.stack_name = stack_name
        self.add_module(stack_name, stack)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = stack.input_embedding.weight

    def forward(self, input_ids: Tensor) -> Tensor:
        logits = self.lm_head(getattr(self, self.stack_name)(input_ids))
        return logits if self.cfg.logits_scaling == 1 else logits / self.cfg.logits_scaling

    def zero_state(self, batch: int):
        raise MQExportError(decode_unsupported(type(self).__name__))


def decode_unsupported(what: str) -> str:
    return (f"stateful decoding of hybrid Mamba + attention models ({what}) is not supported yet: "
            f"export without --decode")


class HybridLMFamily(MambaLMFamily):
    """A hybrid LM family: the Mamba LMs' inputs and outputs, HF names as they are (no renames).
    It keeps the Mamba LMs' `state_kinds`, so `export --decode` asks `state_layers`, which refuses
    with the one line that says why."""
    hf_renames = {}

    @property
    def quantization_unsupported(self) -> str:
        return f"quantizing {self.name} models (hybrid Mamba + attention) is not supported yet: use --method none"

    def state_layers(self, model: nn.Module) -> int:
        raise MQExportError(decode_unsupported(self.name))

    def topology(self, model: nn.Module):
        raise MQExportError(self.quantization_unsupported)


def activation(read, key: str, default: str, source) -> str:
    """An activation setting, one of ACTIVATIONS."""
    name = read.values.get(key, default)
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise MQExportError(f"{source}: {key} {name!r} is not supported (supported: "
                            f"{', '.join(repr(a) for a in ACTIVATIONS)})")
    return name


def require_value(read, source, key: str, supported, why: str) -> None:
    """A setting this package supports only at one value (absent: transformers' default, which is it)."""
    if key in read.values and read.values[key] != supported:
        raise MQExportError(f"{source}: {key} {read.values[key]!r} is not supported ({why})")


def layer_kinds(types, spellings: dict[str, str], key: str, source) -> tuple[str, ...]:
    """The config's layer types `types` (read from `key`) as MAMBA, ATTENTION or MLP, by the
    family's `spellings` of them; one it does not know is refused."""
    unknown = sorted({t for t in types if t not in spellings})
    if unknown:
        raise MQExportError(f"{source}: {key} has unknown layer types {unknown} (known: "
                            f"{', '.join(repr(t) for t in spellings)})")
    return tuple(spellings[t] for t in types)


def kv_heads(read, heads: int, source) -> int:
    """num_key_value_heads (null or absent: one per query head), dividing num_attention_heads."""
    kv = heads if read.values.get("num_key_value_heads") is None else read.integer("num_key_value_heads")
    if heads % kv:
        raise MQExportError(f"{source}: num_key_value_heads {kv} does not divide num_attention_heads {heads}")
    return kv


def check_ssm_heads(heads: int, groups: int, source, heads_key: str, groups_key: str) -> None:
    """The Mamba-2 B/C groups divide the heads (each group serves heads / groups of them)."""
    if heads % groups:
        raise MQExportError(f"{source}: {groups_key} {groups} does not divide {heads_key} {heads}")


def mamba_heads(read, d_inner: int, source, channels: str) -> tuple[int, int, int]:
    """(mamba_n_heads, mamba_d_head, mamba_n_groups) of a Mamba-2 mixer of `d_inner` channels (as
    `channels` names them): mamba_d_head "auto" is d_inner / mamba_n_heads, and the heads must fill
    the channels; the groups divide the heads."""
    heads = read.integer("mamba_n_heads", 128)
    head_dim = d_inner // heads if read.values.get("mamba_d_head", "auto") == "auto" else read.integer("mamba_d_head")
    if heads * head_dim != d_inner:
        raise MQExportError(f"{source}: mamba_n_heads × mamba_d_head = {heads} × {head_dim} is not {channels} = "
                            f"{d_inner}")
    groups = read.integer("mamba_n_groups", 1)
    check_ssm_heads(heads, groups, source, "mamba_n_heads", "mamba_n_groups")
    return heads, head_dim, groups
