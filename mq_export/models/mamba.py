"""Pure-PyTorch Mamba-1 (no CUDA, no triton, no mamba-ssm), laid out like mamba-ssm's modules.

Parameter names follow mamba-ssm's `Mamba` mixer and `MambaLMHeadModel`, so their state dicts
load with no renaming. Quantization hooks are `ActivationSite`s: identities until the quantize
stage attaches a fake quantizer, and the places the exporter puts Q/DQ nodes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.selective_scan import selective_scan


@dataclass(frozen=True)
class MixerConfig:
    d_model: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None      # None: ceil(d_model / 16), as mamba-ssm's "auto"
    conv_bias: bool = True
    bias: bool = False              # in_proj / out_proj bias

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)


# A Mamba-1 layer's whole memory: (conv_state (b, d_inner, d_conv − 1), ssm_state (b, d_inner, d_state)).
LayerState = tuple[Tensor, Tensor]


class ActivationSite(nn.Module):
    """A named point where an activation may be quantized; identity until a quantizer is set."""

    def __init__(self) -> None:
        super().__init__()
        self.quantizer: nn.Module | None = None

    def forward(self, x: Tensor) -> Tensor:
        return x if self.quantizer is None else self.quantizer(x)


class MambaMixer(nn.Module):
    """in_proj → causal depthwise conv1d → SiLU → x_proj → dt_proj → selective scan (D skip)
    → SiLU(z) gate → out_proj. Input and output (batch, length, d_model)."""

    def __init__(self, cfg: MixerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d_inner, n, r = cfg.d_inner, cfg.d_state, cfg.rank
        self.in_proj = nn.Linear(cfg.d_model, 2 * d_inner, bias=cfg.bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, cfg.d_conv, groups=d_inner, padding=cfg.d_conv - 1,
                                bias=cfg.conv_bias)
        self.x_proj = nn.Linear(d_inner, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=cfg.bias)
        # Online transforms the quantize stage may set (they cannot be folded into weights):
        # a rotation of the out_proj input, and the S-SiLU gate scale z·σ(s⊙z).
        self.register_buffer("out_proj_input_rotation", None)
        self.register_buffer("gate_scale", None)
        self.sites = nn.ModuleDict({name: ActivationSite() for name in
                                    ("in_proj", "x_proj", "dt_proj", "out_proj", "scan_B", "scan_C")})

    def forward(self, hidden: Tensor, state: tuple[Tensor, Tensor] | None = None):
        """hidden (b, l, d_model) → (b, l, d_model). With `state` = (conv_state (b, d_inner, d_conv − 1):
        the last conv inputs, ssm_state (b, d_inner, d_state)), the sequence continues from that
        state and (output, new state) is returned: the same code serves prefill and decode steps."""
        cfg = self.cfg
        length = hidden.shape[1]
        x, z = self.in_proj(self.sites["in_proj"](hidden)).chunk(2, dim=-1)      # (b, l, d_inner)
        x = x.transpose(1, 2)
        if state is None:
            x = F.silu(self.conv1d(x)[..., :length])                             # (b, d_inner, l)
        else:
            x = torch.cat([state[0], x], dim=-1)              # the causal conv's window starts in the past
            conv_state = x[..., x.shape[-1] - (cfg.d_conv - 1):]
            x = F.silu(self.conv1d(x)[..., cfg.d_conv - 1:cfg.d_conv - 1 + length])
        x = x.transpose(1, 2).contiguous()          # (b, l, d_inner): x_proj's input and the scan's u
        x_dbl = self.x_proj(self.sites["x_proj"](x))
        dt, B, C = torch.split(x_dbl, [cfg.rank, cfg.d_state, cfg.d_state], dim=-1)
        # dt_proj's bias is applied inside the scan as delta_bias, as mamba-ssm does.
        dt = F.linear(self.sites["dt_proj"](dt), self.dt_proj.weight)
        B = self.sites["scan_B"](B)
        C = self.sites["scan_C"](C)
        gate_in_scan = self.gate_scale is None
        y = selective_scan(x.transpose(1, 2), dt.transpose(1, 2), -torch.exp(self.A_log.float()),
                           B.transpose(1, 2), C.transpose(1, 2), self.D.float(),
                           z=z.transpose(1, 2) if gate_in_scan else None,
                           delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                           **({} if state is None else {"initial_state": state[1], "return_last_state": True}))
        if state is not None:
            y, ssm_state = y
        y = y.transpose(1, 2)                                                     # (b, l, d_inner)
        if not gate_in_scan:
            y = y * z * torch.sigmoid(self.gate_scale * z)
        if self.out_proj_input_rotation is not None:
            y = y @ self.out_proj_input_rotation
        out = self.out_proj(self.sites["out_proj"](y))
        return out if state is None else (out, (conv_state, ssm_state))


@dataclass(frozen=True)
class ClassifierConfig:
    """The bundled checkpoint's family: input_proj → Mamba mixers (no norms or residuals between
    them) → mean over time → LayerNorm → Linear."""
    mixer: MixerConfig
    n_layers: int
    d_input: int = 1
    n_classes: int = 10


class MambaSequenceClassifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.mixer.d_model
        self.input_proj = nn.Linear(cfg.d_input, d)
        self.layers = nn.ModuleList(MambaMixer(cfg.mixer) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d)
        self.classifier = nn.Linear(d, cfg.n_classes)
        self.sites = nn.ModuleDict({"classifier": ActivationSite()})

    def forward(self, x: Tensor) -> Tensor:
        """x: (batch, length, d_input) → logits (batch, n_classes)."""
        h = self.input_proj(x)
        for layer in self.layers:
            h = layer(h)
        return self.classifier(self.sites["classifier"](self.norm(h.mean(dim=1))))


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


@dataclass(frozen=True)
class LMConfig:
    """mamba-ssm's MambaConfig, Mamba-1 mixers only."""
    mixer: MixerConfig
    n_layer: int
    vocab_size: int
    rms_norm: bool = True
    norm_epsilon: float = 1e-5
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return self.vocab_size + (-self.vocab_size) % m


class Block(nn.Module):
    """mamba-ssm's pre-norm residual block: residual += hidden; hidden = mixer(norm(residual))."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        d = cfg.mixer.d_model
        self.norm = RMSNorm(d, cfg.norm_epsilon) if cfg.rms_norm else nn.LayerNorm(d, eps=cfg.norm_epsilon)
        self.mixer = MambaMixer(cfg.mixer)

    def forward(self, hidden: Tensor, residual: Tensor | None, state: LayerState | None = None):
        """(hidden, residual) → (hidden, residual), or with the mixer's `state` → (hidden, residual,
        new state): the same wiring for a whole sequence and for decoding."""
        residual = hidden if residual is None else hidden + residual
        if state is None:
            return self.mixer(self.norm(residual)), residual
        hidden, state = self.mixer(self.norm(residual), state)
        return hidden, residual, state


class MambaBackbone(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        d = cfg.mixer.d_model
        self.embedding = nn.Embedding(cfg.padded_vocab_size, d)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(d, cfg.norm_epsilon) if cfg.rms_norm else nn.LayerNorm(d, eps=cfg.norm_epsilon)

    def forward(self, input_ids: Tensor, state: list[LayerState] | None = None):
        """input_ids (b, l) → normalised hidden states; with `state` (one per layer) also the state
        after the last token."""
        hidden, residual, new_state = self.embedding(input_ids), None, []
        for i, layer in enumerate(self.layers):
            if state is None:
                hidden, residual = layer(hidden, residual)
            else:
                hidden, residual, layer_state = layer(hidden, residual, state[i])
                new_state.append(layer_state)
        out = self.norm_f(hidden + residual)
        return out if state is None else (out, new_state)


class MambaLMHeadModel(nn.Module):
    """Causal LM in mamba-ssm's MambaLMHeadModel layout; input_ids (b, l) → logits (b, l, vocab)."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = MambaBackbone(cfg)
        self.lm_head = nn.Linear(cfg.mixer.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self.sites = nn.ModuleDict({"lm_head": ActivationSite()})

    def zero_state(self, batch: int) -> list[LayerState]:
        """The state before any token: per layer (conv_state (b, d_inner, d_conv − 1), ssm_state
        (b, d_inner, d_state)), all zeros."""
        m = self.cfg.mixer
        return [(torch.zeros(batch, m.d_inner, m.d_conv - 1), torch.zeros(batch, m.d_inner, m.d_state))
                for _ in range(self.cfg.n_layer)]

    def forward(self, input_ids: Tensor, state: list[LayerState] | None = None):
        """input_ids (b, l) → logits (b, l, vocab); with `state` (`zero_state` for a new sequence)
        the sequence continues from it and (logits, state after the last token) is returned."""
        if state is None:
            return self.lm_head(self.sites["lm_head"](self.backbone(input_ids)))
        hidden, state = self.backbone(input_ids, state)
        return self.lm_head(self.sites["lm_head"](hidden)), state
