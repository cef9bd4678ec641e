"""Function-preserving transforms that make Mamba activations easier to quantize (MambaQuant).

Every transform changes how a tensor is represented between a *writer* (the op producing it) and
its *readers*, and compensates exactly: the stream x becomes x' = x·M, writers are multiplied by M
and readers by M⁻¹, so the FP model's outputs do not change. M is a smoothing diag(1/s), a
rotation R, or both (diag(1/s)·R: smoothing first, as in MambaQuant's Smooth-Fused rotation).

Where the math lets M be folded into weights it is; what cannot be folded stays online:
  * the out_proj input rotation (after the SiLU gate): `MambaMixer.out_proj_input_rotation`;
  * the out_proj input smoothing, folded into the gate as S-SiLU z·σ(s⊙z) with z-rows of in_proj
    divided by s: `MambaMixer.gate_scale` (one elementwise multiply, the gate leaves the scan op).
Rotations: `random_hadamard` (QuaRot) or `klt_rotation` R = K·H (K = eigenvectors of the
calibration covariance at the site). All math is fp64; every random sign comes from one
`torch.Generator` seeded by `seed`, so a seed gives bit-identical weights.

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
from ..models.mamba import MambaLMHeadModel, MambaMixer, MambaSequenceClassifier, RMSNorm

ROTATIONS = ("hadamard", "klt")


@dataclass(frozen=True)
class TransformConfig:
    smooth_inputs: bool = False    # SmoothQuant: smoothing folded into the op before each Linear input
    smooth_gate: bool = False      # S-SiLU smoothing of the out_proj input
    smooth_state: bool = False     # h·C smoothing along the state dimension (C·s, B/s)
    rotation: str | None = None    # None, "hadamard" (random Hadamard) or "klt" (K·H)
    alpha: float = 0.5
    seed: int = 0


def method_transforms(method: str, alpha: float = 0.5, seed: int = 0, klt: bool = True) -> TransformConfig:
    """The transforms of each `--method` (klt=False: MambaQuant with plain Hadamard, an ablation)."""
    if method in ("none", "rtn"):
        return TransformConfig(alpha=alpha, seed=seed)
    if method == "smoothquant":
        return TransformConfig(smooth_inputs=True, alpha=alpha, seed=seed)
    if method == "hadamard":
        return TransformConfig(rotation="hadamard", alpha=alpha, seed=seed)
    if method == "mambaquant":
        return TransformConfig(smooth_inputs=True, smooth_gate=True, smooth_state=True,
                               rotation="klt" if klt else "hadamard", alpha=alpha, seed=seed)
    raise MQExportError(f"unknown method {method!r}")


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
    """Make a stream x become x·M: writers (Linear, output-row slice) produce x·M, readers
    (Linear) take x·M and give the original outputs, embeddings' rows become rows·M."""
    for linear, rows in writers:
        linear.weight.data[rows] = m.T @ linear.weight.data[rows]
        if linear.bias is not None:
            linear.bias.data[rows] = linear.bias.data[rows] @ m
    for linear in readers:
        linear.weight.data = linear.weight.data @ m_inv.T
    for embedding in embeddings:
        embedding.weight.data = embedding.weight.data @ m


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
    """Applies one TransformConfig to a (deep-copied, fp64) model, recording what stays online."""

    def __init__(self, stats: CalibrationStats, cfg: TransformConfig) -> None:
        self.stats, self.cfg = stats, cfg
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.online: list[str] = []

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

    def smoothing(self, site: SiteStats, reader: nn.Linear) -> Tensor:
        return smoothing_scales(site.absmax, reader.weight.data.abs().amax(0), self.cfg.alpha)

    def mixer(self, mixer: MambaMixer, prefix: str) -> None:
        cfg, r, n, d_inner = self.cfg, mixer.cfg.rank, mixer.cfg.d_state, mixer.cfg.d_inner
        # dt path: x_proj's dt rows → dt_proj, folded offline.
        site = self.site(prefix + "sites.dt_proj")
        s = self.smoothing(site, mixer.dt_proj) if cfg.smooth_inputs else None
        m, m_inv = smooth_then_rotate(s, self.rotation(_scaled_covariance(site, s), "dt_rank"), r)
        fold_stream_transform(m, m_inv, writers=[(mixer.x_proj, slice(0, r))], readers=[mixer.dt_proj])
        # h·C along the state dimension: C·s and B/s leave Σ_n h_n C_n unchanged (the decay is
        # elementwise in n), folded into x_proj's B and C rows.
        if cfg.smooth_state:
            b_max, c_max = self.site(prefix + "sites.scan_B").absmax, self.site(prefix + "sites.scan_C").absmax
            s = smoothing_scales(b_max, c_max, cfg.alpha)
            mixer.x_proj.weight.data[r:r + n] /= s[:, None]
            mixer.x_proj.weight.data[r + n:] *= s[:, None]
        # out_proj input: S-SiLU smoothing (z-rows of in_proj / s, gate σ(s⊙z)), then an online rotation.
        site = self.site(prefix + "sites.out_proj")
        s = self.smoothing(site, mixer.out_proj) if cfg.smooth_gate else None
        rot = self.rotation(_scaled_covariance(site, s), "d_inner")
        if s is not None:
            if mixer.gate_scale is not None:
                raise MQExportError("model already has an S-SiLU gate scale; transform the original model")
            mixer.in_proj.weight.data[d_inner:] /= s[:, None]
            if mixer.in_proj.bias is not None:
                mixer.in_proj.bias.data[d_inner:] /= s
            mixer.gate_scale = s.clone()
            self.online.append(f"{prefix}gate_scale (S-SiLU z·σ(s⊙z), elementwise, outside the scan)")
        if rot is not None:
            mixer.out_proj_input_rotation = rot.clone()
            self.online.append(f"{prefix}out_proj_input_rotation ({d_inner}×{d_inner} matmul before out_proj)")
        m, m_inv = smooth_then_rotate(s, rot, d_inner)
        fold_stream_transform(m, m_inv, readers=[mixer.out_proj])

    def classifier(self, model: MambaSequenceClassifier) -> None:
        cfg = self.cfg
        for i, layer in enumerate(model.layers):
            self.mixer(layer, f"layers.{i}.")
        # The d_model stream before each layer: input_proj / previous out_proj → in_proj.
        for i, layer in enumerate(model.layers):
            writer = model.input_proj if i == 0 else model.layers[i - 1].out_proj
            site = self.site(f"layers.{i}.sites.in_proj")
            s = self.smoothing(site, layer.in_proj) if cfg.smooth_inputs else None
            m, m_inv = smooth_then_rotate(s, self.rotation(_scaled_covariance(site, s), "d_model"), site.channels)
            fold_stream_transform(m, m_inv, writers=[(writer, slice(None))], readers=[layer.in_proj])
        # The classifier input, after mean → LayerNorm.
        site, last = self.site("sites.classifier"), model.layers[-1].out_proj
        if cfg.rotation is not None:
            norm = model.norm
            gamma = norm.weight.data if norm.weight is not None else torch.ones_like(site.mean)
            # Covariance of the affine-free normalised input (x − β)/γ, which the rotation sees
            # (the shift by β does not change it).
            rot = self.rotation(site.covariance / (gamma[:, None] * gamma[None, :]).clamp_min(1e-12), "d_model")
            model.norm = layernorm_to_rmsnorm(norm, last, model.classifier)
            fold_stream_transform(rot, rot.T, writers=[(last, slice(None))], readers=[model.classifier])
        elif cfg.smooth_inputs:
            s = self.smoothing(site, model.classifier)
            model.norm.weight.data /= s
            model.norm.bias.data /= s
            model.classifier.weight.data *= s[None, :]

    def language_model(self, model: MambaLMHeadModel) -> None:
        cfg, backbone = self.cfg, model.backbone
        prefixes = [f"backbone.layers.{i}.mixer." for i in range(len(backbone.layers))]
        for block, prefix in zip(backbone.layers, prefixes):
            self.mixer(block.mixer, prefix)
        norms = [(b.norm, b.mixer.in_proj, p + "sites.in_proj") for b, p in zip(backbone.layers, prefixes)]
        norms.append((backbone.norm_f, model.lm_head, "sites.lm_head"))
        if cfg.rotation is None and not cfg.smooth_inputs:
            return
        # Untie: the embedding and lm_head are transformed differently.
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        if cfg.rotation is None:
            for norm, reader, name in norms:   # smoothing folds into each norm's weight (and bias)
                s = self.smoothing(self.site(name), reader)
                norm.weight.data /= s
                if getattr(norm, "bias", None) is not None:
                    norm.bias.data /= s
                reader.weight.data *= s[None, :]
            return
        if not all(isinstance(norm, RMSNorm) for norm, _, _ in norms):
            raise MQExportError("rotating a language model needs RMSNorm (rms_norm=True); this one uses LayerNorm")
        # One rotation for the whole residual stream: fold each norm's weight into its reader, so
        # RMSNorm(x·R) = RMSNorm(x)·R; the KLT uses the normalised inputs of every reader.
        covariance = 0
        for norm, reader, name in norms:
            gamma = norm.weight.data
            covariance = covariance + self.site(name).covariance / (gamma[:, None] * gamma[None, :]).clamp_min(1e-12)
            reader.weight.data = reader.weight.data * gamma[None, :]
            norm.weight.data = torch.ones_like(gamma)
        rot = self.rotation(covariance, "d_model")
        fold_stream_transform(rot, rot.T, writers=[(b.mixer.out_proj, slice(None)) for b in backbone.layers],
                              readers=[reader for _, reader, _ in norms], embeddings=[backbone.embedding])


def apply_transforms(model: nn.Module, stats: CalibrationStats, cfg: TransformConfig) -> tuple[nn.Module, dict]:
    """A transformed deep copy of `model` (never mutated) and a description of what was done."""
    if cfg.rotation not in (None, *ROTATIONS):
        raise MQExportError(f"unknown rotation {cfg.rotation!r}; choose from {', '.join(ROTATIONS)}")
    out = copy.deepcopy(model).double()
    t = _Transformer(stats, cfg)
    with torch.no_grad():
        if isinstance(out, MambaSequenceClassifier):
            t.classifier(out)
        elif isinstance(out, MambaLMHeadModel):
            t.language_model(out)
        else:
            raise MQExportError(f"no transforms for model type {type(out).__name__}")
    info = {**asdict(cfg), "online": t.online}
    return out.float(), info
