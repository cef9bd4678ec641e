"""What the hybrid Mamba + attention families share (models/nemotron_h.py, bamba.py,
granitemoehybrid.py, falcon_h1.py with Mamba-2 layers; jamba.py with Mamba-1 layers): their
config, embedding → layers → norm stack and LM head, their family adapter's base, and the checks
of config settings common to them.

A hybrid LM reads `input_ids` (batch, length) int64 and writes `logits` (batch, length, vocab),
as the Mamba LMs do, and is exported with `--method none` as one graph: SSDScan (Mamba-2) or
SelectiveScan (Jamba's Mamba-1) nodes for its Mamba layers, standard ONNX ops for attention, MLPs
and MoE. Quantization: each family's `topology` (`hybrid_topology` over its residual steps).

Stateful decoding: `HybridLM.forward(input_ids, state)` continues a sequence from one state tuple
per state-carrying layer (`state_layout`, family.StateLayout): a Mamba layer's conv and SSM
states, an attention layer's key and value caches, both for a Falcon-H1 layer; MLP and MoE layers
carry none. The same code serves the full sequence, prefill and one-token steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn

from ..errors import MQExportError
from .attention import ACTIVATIONS, AttentionConfig, MLPConfig
from .family import KV_CACHE, MAMBA_STATE, StateLayout
from .mamba import ActivationSite, MambaLMFamily, MambaMixer, MixerConfig, RMSNorm
from .mamba2 import Mamba2Mixer, Mamba2MixerConfig
from .topology import BlockTopology, NormedReader, NormedStream, Stream

# The kinds of layer a hybrid stacks (MOE: a mixture of experts in place of an MLP; no decode state).
MAMBA, ATTENTION, MLP, MOE = "mamba", "attention", "mlp", "moe"
# The decode state a Mamba or attention mixer carries (a layer's `state_kinds`: its mixers', Mamba first).
MIXER_STATE = {MAMBA: MAMBA_STATE, ATTENTION: KV_CACHE}


@dataclass(frozen=True)
class HybridLMConfig:
    vocab_size: int
    layer_kinds: tuple[str, ...]    # MAMBA, ATTENTION, MLP or MOE per layer (what each family's layer holds)
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
    the family's checkpoints give them. Each layer declares `state_kinds` (() when it carries no
    decode state) and, where it has some, takes and returns it as `layer(hidden, state)` →
    (hidden, new state)."""

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

    def forward(self, input_ids: Tensor, state: list[tuple[Tensor, ...]] | None = None):
        """input_ids (b, l) → normalised hidden states; with `state` (one tuple per state-carrying
        layer) also the state after the last token."""
        hidden = self.input_embedding(input_ids)
        if self.embedding_multiplier != 1:
            hidden = hidden * self.embedding_multiplier
        past, present = iter(state or ()), []
        for layer in self.layers:
            if state is None or not layer.state_kinds:
                hidden = layer(hidden)
            else:
                hidden, layer_state = layer(hidden, next(past))
                present.append(layer_state)
        out = getattr(self, self.names[1])(hidden)
        return out if state is None else (out, present)


class HybridLM(nn.Module):
    """A hybrid LM: its HybridStack (registered as `stack_name`) → lm_head; input_ids (b, l) →
    logits (b, l, vocab)."""

    def __init__(self, cfg: HybridLMConfig, stack_name: str, stack: HybridStack) -> None:
        super().__init__()
        self.cfg = cfg
        self.stack_name = stack_name
        self.add_module(stack_name, stack)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = stack.input_embedding.weight
        self.sites = nn.ModuleDict({"lm_head": ActivationSite()})

    def forward(self, input_ids: Tensor, state: list[tuple[Tensor, ...]] | None = None):
        """input_ids (b, l) → logits (b, l, vocab); with `state` (`zero_state` for a new sequence)
        the sequence continues from it and (logits, state after the last token) is returned."""
        hidden = getattr(self, self.stack_name)(input_ids, state)
        if state is not None:
            hidden, state = hidden
        logits = self.lm_head(self.sites["lm_head"](hidden))
        logits = logits if self.cfg.logits_scaling == 1 else logits / self.cfg.logits_scaling
        return logits if state is None else (logits, state)

    def state_layout(self) -> StateLayout:
        """(layer index, its state kinds) for each layer that carries decode state."""
        return tuple((i, layer.state_kinds) for i, layer in enumerate(getattr(self, self.stack_name).layers)
                     if layer.state_kinds)

    def zero_state(self, batch: int) -> list[tuple[Tensor, ...]]:
        """The state before any token, one tuple per state-carrying layer: a Mamba mixer's zero conv
        and SSM states, an attention layer's empty key and value caches (past_length 0)."""
        attention = self.cfg.attention

        def zeros(kinds: tuple[str, ...]) -> tuple[Tensor, ...]:
            mamba = self.cfg.mamba.zero_state(batch) if MAMBA_STATE[0] in kinds else ()
            caches = tuple(torch.zeros(batch, attention.kv_heads, 0, attention.head_dim)
                           for kind in kinds if kind in KV_CACHE)
            return mamba + caches
        return [zeros(kinds) for _, kinds in self.state_layout()]


def mix(mixer: nn.Module, x: Tensor, state: tuple[Tensor, ...] | None) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """A layer's Mamba or attention `mixer` on x: (output, None) without a decode state, (output,
    new state) with one."""
    return (mixer(x), None) if state is None else mixer(x, state)


class HybridLMFamily(MambaLMFamily):
    """A hybrid LM family: the Mamba LMs' inputs and outputs, HF names as they are (no renames),
    decode state per layer as the model's layers carry it."""
    hf_renames = {}

    def state_layout(self, model: nn.Module) -> StateLayout:
        return model.state_layout()

    def topology(self, model: nn.Module) -> list[Stream]:
        """`hybrid_topology` over the family's residual steps (each family lists them)."""
        raise NotImplementedError


def hybrid_topology(model: nn.Module, steps: Iterable[tuple[str, tuple[str, ...]]]) -> list[Stream]:
    """The transform topology of a hybrid LM whose pre-norm residual steps are `steps`: (the norm,
    the parts reading it — Mamba mixers, attention, MLPs, MoEs), by qualified name. Each part's inner
    streams, then the residual stream: written by the embedding and each part's output Linears,
    read through each norm by the parts' input Linears and through the final norm by lm_head. The
    scalar multipliers on the way (Granite's embedding and residual multipliers, Falcon-H1's branch
    multipliers, logits scaling) commute with every smoothing and rotation."""
    streams, writers, readers = [], [], []
    for norm, parts in steps:
        linears, sites = [], []
        for name in parts:
            part = _part_topology(model, name)
            streams += part.streams
            linears += part.readers
            sites += part.sites
            writers += part.writers
        readers.append(NormedReader(norm, tuple(linears), tuple(sites)))
    stack = model.stack_name
    embedding, final_norm = getattr(model, stack).names
    readers.append(NormedReader(f"{stack}.{final_norm}", "lm_head", "sites.lm_head"))
    return [*streams, NormedStream(tuple(writers), tuple(readers), embeddings=(f"{stack}.{embedding}",),
                                   what="a language model's residual stream")]


def _part_topology(model: nn.Module, name: str) -> BlockTopology:
    """A part's `topology`, or a Mamba mixer's: its own streams, in_proj reading, out_proj writing."""
    part = model.get_submodule(name)
    if isinstance(part, (Mamba2Mixer, MambaMixer)):
        return BlockTopology(tuple(part.streams(name)), (f"{name}.in_proj",), (f"{name}.sites.in_proj",),
                             (f"{name}.out_proj",))
    if not hasattr(part, "topology"):
        raise MQExportError(f"quantizing {type(part).__name__} layers ({name}) is not supported yet: use --method "
                            f"none")
    return part.topology(name)


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
    """The config's layer types `types` (read from `key`) as MAMBA, ATTENTION, MLP or MOE, by the
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
