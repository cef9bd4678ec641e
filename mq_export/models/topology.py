"""A model's transform topology: the streams between its Linears, as data.

A family's adapter lists its streams (modules by their qualified names in the model); the
quantize stage's transforms (quant/transforms.py) read the list and fold smoothing and
rotations into the weights. A stream says what writes it, what reads it, which activation site
measures it, and which transforms are legal on it. Streams are applied in list order, which also
fixes the order in which random signs are drawn.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    norm: str                  # the norm in front of the reader (RMSNorm or LayerNorm)
    reader: str
    site: str                  # the ActivationSite at the reader's input (after the norm)


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


Stream = LinearStream | StateStream | OnlineStateStream | GatedStream | NormedStream
