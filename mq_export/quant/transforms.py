"""Function-preserving transforms that make Mamba activations easier to quantize (MambaQuant).

Every transform changes how a tensor is represented between a *writer* (the op producing it) and
its *readers*, and compensates exactly: the stream x becomes x' = x·M, writers are multiplied by M
and readers by M⁻¹, so the FP model's outputs do not change. M is a smoothing diag(1/s), a
rotation R, or both (diag(1/s)·R: smoothing first, as in MambaQuant's Smooth-Fused rotation).

Where the math lets M be folded into weights it is; what cannot be folded stays online:
  * the out_proj input rotation (after the SiLU gate): `MambaMixer.out_proj_input_rotation`;
  * the out_proj input smoothing, folded into the gate as S-SiLU z·σ(s⊙z) with z-rows of in_proj
    divided by s: `MambaMixer.gate_scale` (one elementwise multiply, the gate leaves the scan op).
    Mamba-2 folds it into its gated RMSNorm's weight instead;
  * Mamba-2's h·C smoothing and state rotation (B/s·R, C·s·R: conv1d + SiLU lie between in_proj
    and B, C): `Mamba2Mixer.state_scale`, `Mamba2Mixer.state_rotation`;
  * an MLP's down-projection input rotation (behind its activation; QuaRot's online Hadamard):
    `MLP.down_proj_input_rotation`, `FusedGatedMLP.output_linear_input_rotation`. Its smoothing
    folds into the up rows (s^(-1/k) through a ReLU^k, s through a gate's value half).
Attention's o_proj input folds both per kv head into v_proj's rows and o_proj's columns
(`HeadStream`); q, k, the scores and the KV cache are left as they are.
Rotations: `random_hadamard` (QuaRot) or `klt_rotation` R = K·H (K = eigenvectors of the
calibration covariance at the site). All math is fp64; every random sign comes from one
`torch.Generator` seeded by `seed`, so a seed gives bit-identical weights.

Which Linear writes and reads which stream, and which transforms each stream allows, is the
model family's topology (models/topology.py, declared by each family's adapter); this module is
the folding algebra that walks it.

The classifier's final LayerNorm: its input is made zero-mean by centring out_proj's output rows
(the mean over time keeps it zero-mean), so LayerNorm equals RMSNorm; γ and β fold into the
classifier and the norm becomes a weight-free RMSNorm, which commutes with any rotation (as in
QuaRot/SliceGPT). Smoothing cannot pass a norm in the rotated basis, so the classifier input and
the LM's shared residual stream are rotated but not smoothed when a rotation is used.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .calibrate import CalibrationStats, SiteStats
from ..errors import MQExportError
from .hadamard import SUPPORTED_ORDERS, has_hadamard_matrix, random_hadamard
from ..models.mamba import RMSNorm
from ..models.registry import family_of
from ..models.topology import (GatedStream, HeadStream, LinearStream, NormedStream, OnlineStateStream, StateStream,
                               Stream)

ROTATIONS = ("hadamard", "klt")


@dataclass(frozen=True)
class TransformConfig:
    smooth_inputs: bool = False    # SmoothQuant: smoothing folded into the op before each Linear input
    smooth_gate: bool = False      # S-SiLU smoothing of the out_proj input
    smooth_state: bool = False     # h·C smoothing along the state dimension (C·s, B/s)
    rotation: str | None = None    # None, "hadamard" (random Hadamard) or "klt" (K·H)
    alpha: float = 0.5
    seed: int = 0


# --- small pure functions on weights -------------------------------------------------------

def smoothing_scales(act_absmax: Tensor, weight_absmax: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's s = max|X|^α / max|W|^(1−α) per input channel (fp64)."""
    a = act_absmax.double().clamp_min(1e-5)
    w = weight_absmax.double().clamp_min(1e-5)
    return (a ** alpha / w ** (1 - alpha)).clamp_min(1e-5)


def klt_rotation(covariance: Tensor, generator: torch.Generator) -> Tensor:
    """R = K·H: the eigenbasis of the activations' covariance, then a random-sign Hadamard that
    spreads the (now decorrelated) channel energies evenly. Centred, as MambaQuant defines it: with
    the uncentred second moment a mean offset takes an eigenvector of its own, and on the bundled
    model the W8A8 KL to FP32 was 0.0028 instead of 0.0021 (mean over seeds 0–2)."""
    _, eigvecs = torch.linalg.eigh(covariance.double())
    return eigvecs.flip(-1) @ random_hadamard(covariance.shape[0], generator)


def fold_stream_transform(m: Tensor, m_inv: Tensor, writers=(), readers=(), embeddings=()) -> None:
    """Make a stream x become x·M: writers (Linear, or a Conv writing the stream as its output
    channels; output-row slice) produce x·M, readers (Linear) take x·M and give the original
    outputs, embeddings (tables whose last dimension is the stream) become rows·M."""
    for linear, rows in writers:
        weight = linear.weight.data[rows]
        linear.weight.data[rows] = (m.T @ weight.flatten(1)).view_as(weight)
        if linear.bias is not None:
            linear.bias.data[rows] = linear.bias.data[rows] @ m
    for linear in readers:
        linear.weight.data = linear.weight.data @ m_inv.T
    for table in embeddings:
        table.data = table.data @ m


def smooth_then_rotate(s: Tensor | None, r: Tensor | None, d: int) -> tuple[Tensor, Tensor]:
    """M = diag(1/s)·R and its inverse Rᵀ·diag(s) (missing parts are identities)."""
    eye = torch.eye(d, dtype=torch.float64)
    s = torch.ones(d, dtype=torch.float64) if s is None else s
    r = eye if r is None else r
    return (1 / s)[:, None] * r, r.T * s[None, :]


def layernorm_to_rmsnorm(norm: nn.LayerNorm, writer: nn.Linear, reader: nn.Linear) -> RMSNorm:
    """Centre the writer's output rows, so the LayerNorm's mean subtraction does nothing and it
    equals RMSNorm; fold γ and β into the reader. Returns the weight-free RMSNorm to use instead."""
    w = writer.weight.data
    writer.weight.data = w - w.mean(0, keepdim=True)
    if writer.bias is not None:
        writer.bias.data = writer.bias.data - writer.bias.data.mean()
    if norm.bias is not None:
        reader.bias.data = reader.bias.data + reader.weight.data @ norm.bias.data
    if norm.weight is not None:
        reader.weight.data = reader.weight.data * norm.weight.data[None, :]
    return RMSNorm(writer.out_features, norm.eps).to(w.dtype)


def _scaled_covariance(stats: SiteStats, s: Tensor | None) -> Tensor:
    """The covariance of the site's input after smoothing by s (x / s)."""
    c = stats.covariance
    return c if s is None else c / (s[:, None] * s[None, :])


class _Transformer:
    """Applies one TransformConfig to a (deep-copied, fp64) model along its family's topology,
    recording what stays online and what the topology does not allow."""

    def __init__(self, model: nn.Module, stats: CalibrationStats, cfg: TransformConfig) -> None:
        self.model, self.stats, self.cfg = model, stats, cfg
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.online: list[str] = []
        self.online_kinds: list[str] = []   # what kinds stay online: "gate scale", "state rotation", …
        self.not_applied: list[str] = []

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def table(self, name: str) -> nn.Parameter:
        """An embedding's table: a parameter (a class token, a position embedding) or a module's weight."""
        try:
            return self.model.get_parameter(name)
        except AttributeError:      # a module, nn.Embedding
            return self.module(name).weight

    def site(self, name: str) -> SiteStats:
        if name not in self.stats.sites:
            raise MQExportError(f"calibration statistics have no site {name!r}: calibrate this model")
        return self.stats.sites[name]

    def rotation(self, covariance: Tensor, dimension: str) -> Tensor | None:
        """The rotation of a stream whose width is the model's `dimension` (named in the error)."""
        if self.cfg.rotation is None:
            return None
        n = covariance.shape[0]
        if not has_hadamard_matrix(n):
            raise MQExportError(f"{dimension} {n} has no Hadamard matrix here (orders {SUPPORTED_ORDERS}), and "
                                f"--method hadamard/mambaquant rotate the {dimension}-wide stream by one: use --method "
                                f"smoothquant or rtn, or a model whose {dimension} is such an order")
        if self.cfg.rotation == "klt":
            return klt_rotation(covariance, self.generator)
        return random_hadamard(covariance.shape[0], self.generator)

    def smoothing(self, sites: list[SiteStats], readers: list[nn.Linear]) -> Tensor:
        """One s for input channels that `sites` measure and `readers` read: from the maxima over
        all of them (a norm read by several Linears through several sites gets one s)."""
        return smoothing_scales(torch.stack([site.absmax for site in sites]).amax(0),
                                torch.stack([r.weight.data.abs().amax(0) for r in readers]).amax(0), self.cfg.alpha)

    def keep_online(self, kind: str, description: str) -> None:
        self.online.append(description)
        if kind not in self.online_kinds:
            self.online_kinds.append(kind)

    def apply(self, stream: Stream) -> None:
        {LinearStream: self.linear_stream, HeadStream: self.head_stream, StateStream: self.state_stream,
         OnlineStateStream: self.online_state_stream, GatedStream: self.gated_stream,
         NormedStream: self.normed_stream}[type(stream)](stream)

    def linear_stream(self, stream: LinearStream) -> None:
        """Smoothing and rotation both fold into the writers' rows and the reader; through a
        homogeneous activation of degree k the writers' rows take s^(-1/k); a rotation that cannot
        reach the writers stays online where the stream names a buffer for it; a weighted norm
        takes the smoothing (without a rotation) or gives its weight to the reader (with one)."""
        site, reader = self.site(stream.site), self.module(stream.reader)
        norm = self.module(stream.norm) if stream.norm else None
        rotates = self.cfg.rotation is not None and (stream.rotatable or stream.online_rotation is not None)
        smooth = self.cfg.smooth_inputs and stream.smoothable and not (norm is not None and rotates)
        if self.cfg.smooth_inputs and not smooth:
            why = (f"a rotation needs {stream.norm} weight-free" if stream.smoothable else
                   f"what precedes {stream.reader} does not pass it")
            self.not_applied.append(f"{stream.site}: smoothing ({why})")
        if self.cfg.rotation and not rotates:
            self.not_applied.append(f"{stream.site}: rotation (an elementwise gate precedes {stream.reader})")
        s = self.smoothing([site], [reader]) if smooth else None
        if norm is not None and s is not None:     # x·γ/s: the norm's output is the smoothed stream
            norm.weight.data /= s
            reader.weight.data *= s[None, :]
            return
        if norm is not None and rotates:           # weight-free, the norm commutes with the rotation
            reader.weight.data = reader.weight.data * norm.weight.data[None, :]
            norm.weight.data = torch.ones_like(norm.weight.data)
        rot = self.rotation(_scaled_covariance(site, s), stream.dimension) if rotates else None
        m, m_inv = smooth_then_rotate(s, rot, site.channels)
        if rot is not None and not stream.rotatable:
            owner, _, buffer = stream.online_rotation.rpartition(".")
            setattr(self.module(owner), buffer, rot.clone())
            self.keep_online("rotation", f"{stream.online_rotation} ({site.channels}×{site.channels} matmul before "
                                         f"{stream.reader})")
        writer_m = smooth_then_rotate(None if s is None else s ** (1 / stream.degree),
                                      rot if stream.rotatable else None, site.channels)[0]
        fold_stream_transform(writer_m, m_inv, writers=[(self.module(w), rows) for w, rows in stream.writers],
                              readers=[reader])

    def head_stream(self, stream: HeadStream) -> None:
        """v → o_proj per kv head: a smoothing s (per kv head and channel, from the maxima over the
        query heads reading it) and a rotation R (one per kv head, fitted to its query heads'
        outputs) fold into v_proj's rows of that head and o_proj's columns of each of its query
        heads. Nothing stays online."""
        cfg, n = self.cfg, stream.head_dim
        if not (cfg.smooth_inputs or cfg.rotation):
            return
        site, v_proj, o_proj = self.site(stream.site), self.module(stream.v_proj), self.module(stream.o_proj)
        group = stream.heads // stream.kv_heads

        def per_kv_head(channels: Tensor) -> Tensor:     # (heads · head_dim,) → (kv_heads, head_dim): group maxima
            return channels.view(stream.kv_heads, group, n).amax(1)
        s = None
        if cfg.smooth_inputs:
            s = smoothing_scales(per_kv_head(site.absmax), per_kv_head(o_proj.weight.data.abs().amax(0)), cfg.alpha)
        blocks = None
        if cfg.rotation:           # each query head's (head_dim × head_dim) block of the smoothed covariance
            covariance = _scaled_covariance(site, None if s is None else s.repeat_interleave(group, 0).flatten())
            blocks = covariance.view(stream.heads, n, stream.heads, n).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        per_head = [smooth_then_rotate(None if s is None else s[j], None if blocks is None else
                                       self.rotation(blocks[j * group:(j + 1) * group].mean(0), "head_dim"), n)
                    for j in range(stream.kv_heads)]
        m_v = torch.block_diag(*(m for m, _ in per_head))
        m_inv_o = torch.block_diag(*(m_inv for _, m_inv in per_head for _ in range(group)))
        fold_stream_transform(m_v, m_inv_o, writers=[(v_proj, slice(None))], readers=[o_proj])

    def state_stream(self, stream: StateStream) -> None:
        """h·C along the state dimension: C·s and B/s leave Σ_n h_n C_n unchanged (the decay is
        elementwise in n), folded into x_proj's B and C rows."""
        if not self.cfg.smooth_state:
            return
        if not stream.smoothable:
            self.not_applied.append(f"{stream.b_site}, {stream.c_site}: state smoothing (B and C are RMS-normalised)")
            return
        s = self.state_scales(self.site(stream.b_site), self.site(stream.c_site))
        x_proj = self.module(stream.x_proj)
        x_proj.weight.data[stream.b_rows] /= s[:, None]
        x_proj.weight.data[stream.c_rows] *= s[:, None]

    def online_state_stream(self, stream: OnlineStateStream) -> None:
        """h·C smoothing that no weight can hold: the mixer divides B by s and multiplies C by s;
        with a rotation method, then B·R and C·R, one R of the state dimension for every group
        (exact: the decay is one scalar per head, so the state becomes h·R and y = h·R·Rᵀ·Cᵀ),
        fitted to the smoothed B's and C's covariance over all groups."""
        if not self.cfg.smooth_state:
            return
        mixer = self.module(stream.mixer)
        if mixer.state_scale is not None:
            raise MQExportError("model already has a state scale; transform the original model")
        b_site, c_site = self.site(stream.b_site), self.site(stream.c_site)
        s = self.state_scales(b_site, c_site)
        mixer.state_scale = s
        self.keep_online("state scale", f"{stream.mixer}.state_scale (B/s and C·s, elementwise, before the scan)")
        if self.cfg.rotation is None:
            return
        groups, n = mixer.cfg.ngroups, mixer.cfg.d_state
        smoothed = _scaled_covariance(b_site, s) + _scaled_covariance(c_site, 1 / s)   # of B/s and of C·s
        per_group = smoothed.reshape(groups, n, groups, n).diagonal(dim1=0, dim2=2).sum(-1)
        mixer.state_rotation = self.rotation(per_group, "d_state")
        self.keep_online("state rotation", f"{stream.mixer}.state_rotation (B·R and C·R, {n}×{n} matmuls per group, "
                                           f"before the scan)")

    def state_scales(self, b_site: SiteStats, c_site: SiteStats) -> Tensor:
        """s per state channel balancing B's and C's ranges (B/s, C·s)."""
        return smoothing_scales(b_site.absmax, c_site.absmax, self.cfg.alpha)

    def gated_stream(self, stream: GatedStream) -> None:
        """out_proj input: smoothing into the gate (S-SiLU: z-rows of in_proj / s, gate σ(s⊙z)) or,
        behind a gated RMSNorm, into its weight (folded, so SmoothQuant's too); then an online rotation."""
        mixer, prefix = self.module(stream.mixer), stream.mixer + "."
        d_inner = mixer.cfg.d_inner
        site = self.site(prefix + "sites.out_proj")
        wanted = self.cfg.smooth_gate if stream.norm is None else self.cfg.smooth_inputs
        if wanted and not stream.smoothable:
            self.not_applied.append(f"{prefix}sites.out_proj: smoothing (the SiLU(z) gate is inside the scan op)")
        s = self.smoothing([site], [mixer.out_proj]) if wanted and stream.smoothable else None
        rot = self.rotation(_scaled_covariance(site, s), "d_inner")
        if s is not None and stream.norm is not None:
            self.module(stream.norm).weight.data /= s
        elif s is not None:
            if mixer.gate_scale is not None:
                raise MQExportError("model already has an S-SiLU gate scale; transform the original model")
            mixer.in_proj.weight.data[d_inner:] /= s[:, None]
            if mixer.in_proj.bias is not None:
                mixer.in_proj.bias.data[d_inner:] /= s
            mixer.gate_scale = s.clone()
            self.keep_online("gate scale", f"{prefix}gate_scale (S-SiLU z·σ(s⊙z), elementwise, outside the scan)")
        if rot is not None:
            mixer.out_proj_input_rotation = rot.clone()
            self.keep_online("rotation", f"{prefix}out_proj_input_rotation ({d_inner}×{d_inner} matmul before "
                                         f"out_proj)")
        m, m_inv = smooth_then_rotate(s, rot, d_inner)
        fold_stream_transform(m, m_inv, readers=[mixer.out_proj])

    def normed_stream(self, stream: NormedStream) -> None:
        """Smoothing folds into each norm's weight (and bias). A rotation turns every norm into a
        weight-free RMSNorm (γ into its reader; a centrable LayerNorm by centring the writer), which
        commutes with it: one rotation for the whole stream, fitted to every reader's normalised input."""
        cfg = self.cfg
        if cfg.rotation is None and not cfg.smooth_inputs:
            return
        readers = [(self.module(r.norm), [self.module(name) for name in r.linears], [self.site(x) for x in r.sites],
                    r.norm) for r in stream.readers]
        embeddings = [self.table(e) for e in stream.embeddings]
        for _, linears, _, _ in readers:   # untie: a reader sharing an embedding's weight is transformed differently
            for reader in linears:
                if any(reader.weight is e for e in embeddings):
                    reader.weight = nn.Parameter(reader.weight.detach().clone())
        if cfg.rotation is None:
            for norm, linears, sites, _ in readers:
                s = self.smoothing(sites, linears)
                norm.weight.data /= s
                if getattr(norm, "bias", None) is not None:
                    norm.bias.data /= s
                for reader in linears:
                    reader.weight.data *= s[None, :]
            return
        for norm, linears, _, name in readers:
            if not isinstance(norm, RMSNorm) and not (stream.centrable and len(stream.writers) == 1 and
                                                      len(linears) == 1):
                raise MQExportError(f"rotating {stream.what} needs RMSNorm; {name} is a {type(norm).__name__} "
                                    f"(a language model: rms_norm=True)")
        # Covariance of each site's affine-free normalised input (x − β)/γ, which the rotation sees
        # (the shift by β does not change it).
        covariance = 0
        for norm, _, sites, _ in readers:
            for site in sites:
                gamma = norm.weight.data if norm.weight is not None else torch.ones_like(site.mean)
                covariance = covariance + site.covariance / (gamma[:, None] * gamma[None, :]).clamp_min(1e-12)
        rot = self.rotation(covariance, stream.dimension)
        writers = [self.module(w) for w in stream.writers]
        for norm, linears, _, name in readers:
            if isinstance(norm, RMSNorm):
                for reader in linears:
                    reader.weight.data = reader.weight.data * norm.weight.data[None, :]
                norm.weight.data = torch.ones_like(norm.weight.data)
            else:
                self.model.set_submodule(name, layernorm_to_rmsnorm(norm, writers[0], linears[0]))
        fold_stream_transform(rot, rot.T, writers=[(w, slice(None)) for w in writers],
                              readers=[reader for _, linears, _, _ in readers for reader in linears],
                              embeddings=embeddings)


def apply_transforms(model: nn.Module, stats: CalibrationStats, cfg: TransformConfig) -> tuple[nn.Module, dict]:
    """A transformed deep copy of `model` (never mutated) and a description of what was done."""
    if cfg.rotation not in (None, *ROTATIONS):
        raise MQExportError(f"unknown rotation {cfg.rotation!r}; choose from {', '.join(ROTATIONS)}")
    streams = family_of(model).topology
    out = copy.deepcopy(model).double()
    t = _Transformer(out, stats, cfg)
    with torch.no_grad():
        for stream in streams(out):
            t.apply(stream)
    info = {**asdict(cfg), "online": t.online, "online_kinds": t.online_kinds}
    if t.not_applied:   # the family's topology forbids a transform the method asks for
        info["not_applied"] = t.not_applied
    return out.float(), info
