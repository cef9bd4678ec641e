"""Vision Mamba (Vim, hustvl/Vim's `VisionMamba` with `bimamba_type="v2"`) in pure PyTorch.

An image is cut into patches by a strided Conv2d, a class token joins the patch sequence (in its
middle for the released models), an absolute position embedding is added, and pre-norm residual
blocks of bidirectional Mamba mixers follow; the final norm's output at the class token goes to the
head. Parameter names are hustvl's, so its checkpoints (weights under "model") load unchanged.

The bidirectional mixer shares in_proj and out_proj between two branches. The forward branch is a
Mamba-1 mixer's; the backward branch (`conv1d_b`, `x_proj_b`, `dt_proj_b`, `A_b_log`, `D_b`) is the
same computation on the time-reversed sequence, which hustvl writes as flips around a causal
branch. Here it runs in input order without flips: its causal conv on the reversed sequence is an
anti-causal conv (the kernel reversed, padding on the right) and its scan is the SelectiveScan op
with `reverse` set. The two outputs are summed (halved with `if_divide_out`), as hustvl does.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MQExportError
from ..ops.selective_scan import DeltaProjection, SelectiveScanOp
from .family import CLASSIFICATION, ModelFamily
from .mamba import ActivationSite, Block, MambaMixer, MixerConfig, RMSNorm, mixer_config_from_state, state_dims
from .topology import LinearStream, NormedReader, NormedStream, StateStream, Stream

# Where the head reads the final norm's output: the class token in the middle of the patches (all
# released Vim models), before them, the mean of a head and a tail token (use_double_cls_token),
# or, without a class token, the mean over tokens or the last token (final_pool_type mean / none).
READOUTS = ("middle", "head", "double", "mean", "last")
CLASS_TOKENS = {"middle": 1, "head": 1, "double": 2}    # per readout; the pooled ones have none


@dataclass(frozen=True)
class BiMixerConfig(MixerConfig):
    divide_out: bool = True         # hustvl's if_divide_out: (forward + backward) / 2

    def build(self) -> BiMambaMixer:
        return BiMambaMixer(self)


@dataclass(frozen=True)
class VimConfig:
    mixer: BiMixerConfig
    depth: int
    image_size: int                 # square images, as hustvl's img_size
    patch_size: int
    stride: int
    in_chans: int = 3
    n_classes: int = 1000
    readout: str = "middle"
    abs_pos_embed: bool = True
    rms_norm: bool = True
    norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.readout not in READOUTS:
            raise MQExportError(f"Vim readout {self.readout!r} is not one of {', '.join(READOUTS)}")
        if self.image_size < self.patch_size or self.stride < 1:
            raise MQExportError(f"Vim image size {self.image_size} with patch {self.patch_size} and stride "
                                f"{self.stride} makes no patch")

    @property
    def grid(self) -> int:
        return (self.image_size - self.patch_size) // self.stride + 1

    @property
    def n_tokens(self) -> int:
        """Class tokens: 2 (head and tail), 1, or 0."""
        return CLASS_TOKENS.get(self.readout, 0)

    @property
    def length(self) -> int:
        return self.grid ** 2 + self.n_tokens

    def build_block(self) -> Block:
        return Block(self)          # mamba-ssm's (and hustvl's) pre-norm block: reads mixer, rms_norm, norm_epsilon


class BiMambaMixer(MambaMixer):
    """hustvl's `Mamba` with `bimamba_type="v2"`: the Mamba-1 mixer's parameters (the forward branch)
    plus the backward branch's. Input and output (batch, length, d_model)."""

    def __init__(self, cfg: BiMixerConfig) -> None:
        super().__init__(cfg)
        d_inner, n, r = cfg.d_inner, cfg.d_state, cfg.rank
        self.conv1d_b = nn.Conv1d(d_inner, d_inner, cfg.d_conv, groups=d_inner, padding=cfg.d_conv - 1,
                                  bias=cfg.conv_bias)
        self.x_proj_b = nn.Linear(d_inner, r + 2 * n, bias=False)
        self.dt_proj_b = DeltaProjection(r, d_inner, bias=True)
        self.scan_b = SelectiveScanOp()
        self.A_b_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D_b = nn.Parameter(torch.ones(d_inner))
        self.sites.update({name: ActivationSite() for name in ("x_proj_b", "dt_proj_b", "scan_B_b", "scan_C_b")})

    def forward(self, hidden: Tensor, state=None) -> Tensor:
        if state is not None:
            raise MQExportError("a bidirectional Vim mixer reads the whole sequence; it has no decode state")
        x, z = self.in_proj(self.sites["in_proj"](hidden)).chunk(2, dim=-1)      # (b, l, d_inner)
        # The shared gate SiLU(z) runs inside both scans, unless S-SiLU smoothing took it out.
        gate = z.transpose(1, 2) if self.gate_scale is None else None
        x = x.transpose(1, 2)
        y = (self.branch(x, gate, backward=False) + self.branch(x, gate, backward=True)).transpose(1, 2)
        if self.cfg.divide_out:
            y = y / 2
        if gate is None:
            y = y * z * torch.sigmoid(self.gate_scale * z)
        if self.out_proj_input_rotation is not None:
            y = y @ self.out_proj_input_rotation
        return self.out_proj(self.sites["out_proj"](y))

    def branch(self, x: Tensor, z: Tensor | None, backward: bool) -> Tensor:
        """One direction on x (b, d_inner, l): conv1d → SiLU → x_proj → dt_proj → scan, gated by
        SiLU(z) inside the scan when z is given; returns (b, d_inner, l) in input order."""
        cfg, suffix = self.cfg, "_b" if backward else ""
        conv, x_proj = (self.conv1d_b, self.x_proj_b) if backward else (self.conv1d, self.x_proj)
        dt_proj, scan = (self.dt_proj_b, self.scan_b) if backward else (self.dt_proj, self.scan)
        A_log, D = (self.A_b_log, self.D_b) if backward else (self.A_log, self.D)
        length, width = x.shape[-1], cfg.d_conv - 1
        if backward:   # the causal conv of the reversed sequence, reversed: taps on the next steps
            x = F.conv1d(x, conv.weight.flip(-1), conv.bias, padding=width, groups=cfg.d_inner)[..., width:]
        else:
            x = conv(x)[..., :length]
        x = F.silu(x).transpose(1, 2).contiguous()           # (b, l, d_inner): x_proj's input, the scan's u
        dt, B, C = torch.split(x_proj(self.sites["x_proj" + suffix](x)), [cfg.rank, cfg.d_state, cfg.d_state], dim=-1)
        dt = dt_proj(self.sites["dt_proj" + suffix](dt))
        B, C = self.sites["scan_B" + suffix](B), self.sites["scan_C" + suffix](C)
        return scan(x.transpose(1, 2), dt.transpose(1, 2), -torch.exp(A_log.float()), B.transpose(1, 2),
                    C.transpose(1, 2), D.float(), z=z, delta_bias=dt_proj.bias.float(), delta_softplus=True,
                    reverse=backward)

    def streams(self, name: str) -> list[Stream]:
        """Both branches' dt and state streams, then the shared gated out_proj input."""
        r, n = self.cfg.rank, self.cfg.d_state
        streams = super().streams(name)
        return streams[:-1] + [
            LinearStream(((f"{name}.x_proj_b", slice(0, r)),), f"{name}.dt_proj_b", f"{name}.sites.dt_proj_b",
                         "dt_rank"),
            StateStream(f"{name}.x_proj_b", slice(r, r + n), slice(r + n, None), f"{name}.sites.scan_B_b",
                        f"{name}.sites.scan_C_b")] + streams[-1:]


class VisionMamba(nn.Module):
    """hustvl/Vim's VisionMamba (bimamba v2, absolute position embedding): images (b, C, H, W) →
    logits (b, n_classes)."""

    def __init__(self, cfg: VimConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.mixer.d_model
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(cfg.in_chans, d, cfg.patch_size, stride=cfg.stride)
        if cfg.readout == "double":
            self.cls_token_head = nn.Parameter(torch.zeros(1, 1, d))
            self.cls_token_tail = nn.Parameter(torch.zeros(1, 1, d))
        elif cfg.n_tokens:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        if cfg.abs_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.length, d))
        self.layers = nn.ModuleList(cfg.build_block() for _ in range(cfg.depth))
        self.norm_f = RMSNorm(d, cfg.norm_epsilon) if cfg.rms_norm else nn.LayerNorm(d, eps=cfg.norm_epsilon)
        self.head = nn.Linear(d, cfg.n_classes)
        self.sites = nn.ModuleDict({"head": ActivationSite()})

    def tokens(self, images: Tensor) -> Tensor:
        """images (b, C, H, W) → the token sequence (b, length, d_model) the first block reads."""
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)             # (b, patches, d)
        b, readout = x.shape[0], self.cfg.readout
        if readout == "middle":
            middle = x.shape[1] // 2
            x = torch.cat([x[:, :middle], self.cls_token.expand(b, -1, -1), x[:, middle:]], dim=1)
        elif readout == "head":
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        elif readout == "double":
            x = torch.cat([self.cls_token_head.expand(b, -1, -1), x, self.cls_token_tail.expand(b, -1, -1)], dim=1)
        return x + self.pos_embed if self.cfg.abs_pos_embed else x

    def forward(self, images: Tensor) -> Tensor:
        hidden, residual = self.tokens(images), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        hidden = self.norm_f(hidden + residual)
        readout = self.cfg.readout
        if readout == "middle":
            features = hidden[:, (hidden.shape[1] - 1) // 2]
        elif readout == "head":
            features = hidden[:, 0]
        elif readout == "double":
            features = (hidden[:, 0] + hidden[:, -1]) / 2
        elif readout == "mean":
            features = hidden.mean(dim=1)
        else:
            features = hidden[:, -1]
        return self.head(self.sites["head"](features))


# ------------------------------------------------------------------ hustvl checkpoints

# Keys of hustvl configurations this model does not compute, and what each means.
_UNSUPPORTED_KEYS = (
    (r"rope\.", "RoPE (if_rope)"),
    (r"layers\.\d+\.mixer\.gamma$", "a layer scale (init_layer_scale)"),
    (r"patch_embed\.norm\.", "a patch-embedding norm"),
    (r"dist_token$", "a distillation token"),
)


def vim_config_from_state(state: dict[str, Tensor], source, image_size: int | None = None) -> VimConfig:
    """A hustvl/Vim model's settings inferred from its state dict: embed dim, patch size, input
    channels (patch_embed.proj), depth (layers.N), the mixer's sizes, classes (head), class tokens
    (cls_token: in the middle, as every released Vim; cls_token_head/_tail: both ends; none: mean
    pooling) and the image size from pos_embed's length (square grid, stride = patch size), or
    `image_size` given, from which the stride follows. `source` names the weights in errors."""
    for key in state:
        for pattern, what in _UNSUPPORTED_KEYS:
            if re.match(pattern, key):
                raise MQExportError(f"{source}: {key} is {what}, which mq-export's Vision Mamba does not support")
    d_model, in_chans, patch, patch_w = state_dims(state, "patch_embed.proj.weight",
                                                   ("embed_dim", "in_chans", "patch", "patch"), source)
    if patch != patch_w:
        raise MQExportError(f"{source}: patch_embed.proj.weight has a {patch}×{patch_w} patch; only square "
                            f"patches are supported")
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise MQExportError(f"{source} is not a Vision Mamba checkpoint: no layers.N weights")
    for key, what in (("layers.0.mixer.A_b_log", "a bidirectional mixer (bimamba v2)"),
                      ("layers.0.mixer.conv1d_b.weight", "bimamba v2's backward conv (v1 has none)")):
        if key not in state:
            raise MQExportError(f"{source}: no {key}; only {what} is supported")
    mixer = mixer_config_from_state(state, "layers.0.mixer.", source)
    n_classes = state_dims(state, "head.weight", ("n_classes", "embed_dim"), source)[0]
    readout = ("double" if "cls_token_head" in state else "middle" if "cls_token" in state else "mean")
    grid = None
    if "pos_embed" in state:
        patches = state_dims(state, "pos_embed", ("1", "tokens", "embed_dim"), source)[1] - CLASS_TOKENS.get(readout, 0)
        grid = math.isqrt(max(patches, 0))
        if grid < 1 or grid * grid != patches:
            raise MQExportError(f"{source}: pos_embed holds {patches} patch positions, not a square grid")
    size, stride = _image_geometry(grid, patch, image_size, source)
    return VimConfig(mixer=BiMixerConfig(**asdict(mixer)), depth=depth, image_size=size, patch_size=patch,
                     stride=stride, in_chans=in_chans, n_classes=n_classes, readout=readout,
                     abs_pos_embed="pos_embed" in state, rms_norm="layers.0.norm.bias" not in state)


def _image_geometry(grid: int | None, patch: int, image_size: int | None, source) -> tuple[int, int]:
    """(image size, stride) for a `grid`×`grid` position embedding (None: none): stride = patch
    unless a given `image_size` needs overlapping patches (hustvl's stride-8 models) to make `grid`."""
    if image_size is None:
        if grid is None:
            raise MQExportError(f"{source} has no pos_embed to infer the image size from; give --image-size")
        return grid * patch, patch
    if grid is None or (image_size - patch) // patch + 1 == grid:
        return image_size, patch
    if grid == 1 or image_size < patch or (image_size - patch) % (grid - 1):
        raise MQExportError(f"{source}: image size {image_size} with {patch}-pixel patches makes no "
                            f"{grid}×{grid} grid (pos_embed)")
    return image_size, (image_size - patch) // (grid - 1)


# ------------------------------------------------------------------ family adapter

class VisionMambaFamily(ModelFamily):
    """Vision Mamba classifiers: `images` (batch, C, H, W) floats → `logits` (batch, classes)."""
    name = "vision-mamba"
    model_class = VisionMamba
    task = CLASSIFICATION
    input_names = ("images",)
    dynamic_axes = {"images": {0: "batch"}, "logits": {0: "batch"}}

    def example_inputs(self, model, batch, length, generator):
        cfg = model.cfg    # `length` does not apply: the image size is fixed by the position embedding
        return (torch.randn(batch, cfg.in_chans, cfg.image_size, cfg.image_size, generator=generator),)

    def check_inputs(self, model, inputs, what):
        cfg = model.cfg
        expected = (cfg.in_chans, cfg.image_size, cfg.image_size)
        if inputs.dim() != 4 or tuple(inputs.shape[1:]) != expected or not inputs.is_floating_point():
            raise MQExportError(f"{what}: this Vision Mamba reads float images (n, {', '.join(map(str, expected))}), "
                                f"got {inputs.dtype} {tuple(inputs.shape)}")
        return inputs.to(model.head.weight.dtype)

    def topology(self, model):
        """Each mixer's streams (both branches); the residual stream, written by the patch
        embedding's conv (its output channels), the class tokens and position embedding (tables
        along it) and every out_proj, read through each block's norm by in_proj and through norm_f
        by the head."""
        blocks = [f"layers.{i}" for i in range(len(model.layers))]
        streams = [s for name, block in zip(blocks, model.layers) for s in block.mixer.streams(f"{name}.mixer")]
        readers = [NormedReader(f"{b}.norm", f"{b}.mixer.in_proj", f"{b}.mixer.sites.in_proj") for b in blocks]
        readers.append(NormedReader("norm_f", "head", "sites.head"))
        tables = tuple(name for name in ("cls_token", "cls_token_head", "cls_token_tail", "pos_embed")
                       if hasattr(model, name))
        streams.append(NormedStream(("patch_embed.proj", *(f"{b}.mixer.out_proj" for b in blocks)), tuple(readers),
                                    embeddings=tables, what="Vision Mamba's residual stream"))
        return streams
