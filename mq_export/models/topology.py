"""A model's transform topology: the streams between its Linears, as data.

A family's adapter lists its streams (modules by their qualified names in the model); the
quantize stage's transforms (quant/transforms.py) read the list and fold smoothing and
rotations into the weights. A stream says what writes it, what reads it, which activation site
measures it, and which transforms are legal on it. Streams are applied in list order, which also
fixes the order in which random signs are drawn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import nn

Rows = tuple[str, slice]   # a Linear's name and the output rows it writes to the stream


@dataclass(frozen=True)
class LinearStream:
    """writers → one reader Linear, nothing in between that a transform must pass, except possibly
    a weight-free RMSNorm (`smoothable=False`): an orthogonal rotation commutes with it, a
    per-channel smoothing does not; or an elementwise gate (`rotatable=False`, a gated MLP's
    value ⊙ SiLU(gate)): a per-channel smoothing commutes with it, a rotation does not."""
    writers: tuple[Rows, ...]
    reader: str
    site: str                  # the ActivationSite at the reader's input
    dimension: str             # the width's name, for errors ("d_model", "dt_rank")
    smoothable: bool = True
    rotatable: bool = True
    # An elementwise activation between writers and reader that is positively homogeneous of this
    # degree (ReLU 1, ReLU² 2: act(x/s) = act(x)/s^degree for s > 0): smoothing by s scales the
    # writers' rows by s^(-1/degree). 1 also for no activation and for a gated MLP's value rows.
    degree: int = 1
    # Where no rotation reaches the writers (`rotatable=False`): the qualified name of a buffer
    # the reader's module multiplies the reader's input by (an online rotation, QuaRot's before an
    # MLP's down projection), or None: no rotation at all.
    online_rotation: str | None = None
    # A weighted RMSNorm between writers and reader (Jamba's dt_layernorm): smoothing folds into
    # its weight; a rotation needs it weight-free, so its weight folds into the reader first.
    norm: str | None = None


@dataclass(frozen=True)
class HeadStream:
    """Attention's v → o_proj input: each query head's output is softmax(scores)·v of its kv head,
    so a per-channel smoothing or a rotation of one kv head's v channels (v_proj's rows of that
    head) is undone in o_proj's columns of every query head reading it. The attention weights and
    the KV cache stay floating point."""
    v_proj: str
    o_proj: str
    site: str                  # the ActivationSite at o_proj's input
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class StateStream:
    """The scan's B and C, both rows of `x_proj`: y = Σ_n h_n·C_n with h_n driven by B_n and an
    elementwise decay, so C·s and B/s along the state dimension leave y unchanged."""
    x_proj: str
    b_rows: slice
    c_rows: slice
    b_site: str
    c_site: str
    smoothable: bool = True    # False: B and C are normalised over the state dimension


@dataclass(frozen=True)
class OnlineStateStream:
    """Mamba-2's B and C: rows of in_proj, but they reach the scan through conv1d + SiLU, which no
    per-channel scale passes, so C·s and B/s (exact for the scan, as in StateStream) are applied
    online by the mixer (its `state_scale`, s per group and state channel) in front of B's and
    C's sites. Its decay is one scalar per head, so a rotation of the state dimension, B·R and
    C·R, is exact too (`state_rotation`)."""
    mixer: str
    b_site: str
    c_site: str


@dataclass(frozen=True)
class GatedStream:
    """A Mamba mixer's out_proj input, after the SiLU(z) gate. A rotation stays online before
    out_proj (the gate is elementwise, so no rotation passes it). Smoothing goes into the gate
    (S-SiLU z·σ(s⊙z), z-rows of in_proj / s), or, where a gated RMSNorm (`norm`, Mamba-2's)
    follows the gate, into that norm's weight: exact, and nothing more stays online."""
    mixer: str                 # the mixer's name; its sites are `{mixer}.sites.*`
    norm: str | None = None
    smoothable: bool = True    # False: the gate is applied inside the scan op, where no S-SiLU reaches


@dataclass(frozen=True)
class NormedReader:
    """The Linears that read one norm's output (attention's q, k and v; a MoE's router and its
    experts' gate and up projections) and the ActivationSites at their inputs (Falcon-H1's Mamba
    and attention read one norm through two sites, each scaled by its own multiplier)."""
    norm: str                  # the norm in front of the readers (RMSNorm or LayerNorm)
    reader: str | tuple[str, ...]
    site: str | tuple[str, ...]

    @property
    def linears(self) -> tuple[str, ...]:
        return (self.reader,) if isinstance(self.reader, str) else self.reader

    @property
    def sites(self) -> tuple[str, ...]:
        return (self.site,) if isinstance(self.site, str) else self.site


@dataclass(frozen=True)
class BlockTopology:
    """What a residual block's part (a mixer, attention, an MLP, a MoE) contributes to a hybrid
    LM's topology: its inner streams, the Linears and sites that read the residual stream
    through the block's norm, and the Linears writing back to it."""
    streams: tuple[Stream, ...]
    readers: tuple[str, ...]
    sites: tuple[str, ...]
    writers: tuple[str, ...]

    @staticmethod
    def experts(router: str, experts: Iterable[BlockTopology]) -> BlockTopology:
        """A mixture of experts: every expert's topology, plus the router reading the residual
        stream beside them (a FloatingPointLinear, without a site of its own)."""
        experts = tuple(experts)
        return BlockTopology(streams=tuple(s for e in experts for s in e.streams),
                             readers=(router, *(r for e in experts for r in e.readers)),
                             sites=tuple(s for e in experts for s in e.sites),
                             writers=tuple(w for e in experts for w in e.writers))


@dataclass(frozen=True)
class NormedStream:
    """A stream each reader reads through its own norm (an LM's residual stream, a classifier's
    final LayerNorm). Smoothing folds into each norm's weight; a rotation of the whole stream
    needs weight-free RMSNorms (γ folds into the readers). A LayerNorm is made one only where
    `centrable`: its input is a linear function of one writer whose rows can be centred."""
    writers: tuple[str, ...]
    readers: tuple[NormedReader, ...]
    embeddings: tuple[str, ...] = ()
    dimension: str = "d_model"
    centrable: bool = False
    what: str = "this stream"  # for errors: "a language model's residual stream"


Stream = LinearStream | HeadStream | StateStream | OnlineStateStream | GatedStream | NormedStream


class FloatingPointLinear(nn.Linear):
    """A Linear that no method quantizes: a mixture of experts' router, whose top-k choice is
    discrete (rounding its logits can switch experts). Transforms still fold into it exactly."""
