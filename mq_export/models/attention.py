"""The attention and MLP blocks of the hybrid Mamba-2 + attention language models (Nemotron-H,
Bamba, Granite-4.0-H), with HF transformers' parameter names (q_proj, k_proj, v_proj, o_proj;
gate_proj, up_proj, down_proj; Granite's input_linear, output_linear).

Attention is causal grouped-query attention: `heads` query heads share `kv_heads` key/value
heads (query head i reads kv head i // (heads / kv_heads), as transformers' repeat_kv), scaled by
head_dim^-½ (or the config's multiplier), with rotary position embeddings on the leading channels
of each head where the config has them (transformers' default RoPE; Bamba rotates half of each
head) or no positional encoding at all (Nemotron-H). Written with plain matmuls, a softmax and a
mask built from the sequence length, so the ONNX exporter writes it as standard ops with dynamic
batch and length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mamba import ActivationSite
from .topology import BlockTopology, HeadStream, LinearStream

# The activations the hybrids' MLPs use, by transformers' ACT2FN names.
ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "relu2": lambda x: F.relu(x).square(), "gelu": F.gelu}


@dataclass(frozen=True)
class AttentionConfig:
    d_model: int
    heads: int
    kv_heads: int
    head_dim: int
    bias: bool = False              # q/k/v/o biases
    # RoPE: its frequencies are theta^(-j / rope_dim) for even j < rope_dim, each rotating a pair of
    # channels at the start of a head (transformers' default rope_type); rope_dim 0: no RoPE.
    rope_dim: int = 0
    rope_theta: float = 10000.0
    scale: float | None = None      # the scores' factor; None: head_dim^-½ (Granite: attention_multiplier)


# An attention layer's decode state: (keys, values), each (batch, kv_heads, past_length, head_dim), FP32.
KVCache = tuple[Tensor, Tensor]


class Attention(nn.Module):
    """Causal grouped-query self-attention; input and output (batch, length, d_model).

    Quantization: one ActivationSite at the input q, k and v share (`site_readers`), one at
    o_proj's input; scores, softmax and the KV cache stay floating point."""
    site_readers = {"input": ("q_proj", "k_proj", "v_proj")}

    def __init__(self, cfg: AttentionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        q_width, kv_width = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, q_width, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_width, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_width, bias=cfg.bias)
        self.o_proj = nn.Linear(q_width, cfg.d_model, bias=cfg.bias)
        self.sites = nn.ModuleDict({name: ActivationSite() for name in ("input", "o_proj")})

    def topology(self, name: str) -> BlockTopology:
        """q, k and v read the residual stream; v → o_proj per head (`HeadStream`); o_proj writes it."""
        cfg = self.cfg
        return BlockTopology(streams=(HeadStream(f"{name}.v_proj", f"{name}.o_proj", f"{name}.sites.o_proj", cfg.heads,
                                                 cfg.kv_heads, cfg.head_dim),),
                             readers=tuple(f"{name}.{linear}" for linear in self.site_readers["input"]),
                             sites=(f"{name}.sites.input",), writers=(f"{name}.o_proj",))

    def forward(self, hidden: Tensor, state: KVCache | None = None):
        """hidden (b, l, d_model) → (b, l, d_model). With `state` = (past keys (after RoPE), past
        values), each (b, kv_heads, past_length, head_dim), the new tokens sit at positions
        past_length… and attend to the past ones too, and (output, the caches with the new keys and
        values appended) is returned: the same code serves prefill and decode steps."""
        cfg = self.cfg
        batch, length, _ = hidden.shape
        groups = cfg.heads // cfg.kv_heads
        hidden = self.sites["input"](hidden)
        # (b, kv_heads, groups, l, head_dim): the query heads that share a kv head side by side, so
        # one broadcast matmul serves them all instead of repeating k and v.
        q = self.q_proj(hidden).view(batch, length, cfg.kv_heads, groups, cfg.head_dim).permute(0, 2, 3, 1, 4)
        k = self.k_proj(hidden).view(batch, length, cfg.kv_heads, 1, cfg.head_dim).permute(0, 2, 3, 1, 4)
        v = self.v_proj(hidden).view(batch, length, cfg.kv_heads, 1, cfg.head_dim).permute(0, 2, 3, 1, 4)
        positions = key_positions = torch.arange(length, device=hidden.device)
        if state is not None:
            past = state[0].shape[2]
            positions = positions + past
            key_positions = torch.arange(past + length, device=hidden.device)
        if cfg.rope_dim:
            q, k = self._rotate(q, positions), self._rotate(k, positions)
        if state is not None:
            k, v = (torch.cat([cache[:, :, None], new], dim=3) for cache, new in zip(state, (k, v)))
        scores = (q @ k.transpose(-1, -2)) * (cfg.head_dim ** -0.5 if cfg.scale is None else cfg.scale)
        future = key_positions[None, :] > positions[:, None]
        weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        out = (weights @ v).permute(0, 3, 1, 2, 4).reshape(batch, length, cfg.heads * cfg.head_dim)
        out = self.o_proj(self.sites["o_proj"](out))
        return out if state is None else (out, (k.squeeze(2), v.squeeze(2)))

    def _rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """RoPE on the leading channels of each head, two per frequency: channels j and j + half of
        that span turn together by position × frequency j (transformers' rotate_half pairing). The
        frequencies are computed here, not kept in a buffer: a model built on the meta device
        (sharded loading) gets only its weights filled in."""
        cfg = self.cfg
        inv_freq = cfg.rope_theta ** -(torch.arange(0, cfg.rope_dim, 2, dtype=torch.float32, device=x.device)
                                       / cfg.rope_dim)
        angles = positions[:, None].float() * inv_freq                          # (l, half)
        cos, sin = angles.cos(), angles.sin()
        half = inv_freq.numel()
        x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


@dataclass(frozen=True)
class MLPConfig:
    d_model: int
    hidden: int                     # transformers' intermediate_size
    activation: str                 # a key of ACTIVATIONS
    gated: bool                     # act(gate_proj(x)) · up_proj(x) (SwiGLU-style), else act(up_proj(x))
    bias: bool = False
    gate_multiplier: float = 1.0    # of gate_proj's output, before the activation (Falcon-H1's mlp_multipliers[0])


# Activations positively homogeneous of a degree k (act(x/s) = act(x)/s^k for s > 0): a smoothing
# of the down projection's input passes them into up_proj's rows as s^(-1/k).
_HOMOGENEOUS = {"relu": 1, "relu2": 2}


class MLP(nn.Module):
    """up_proj (and gate_proj) → activation → down_proj; input and output (batch, length, d_model).

    Quantization: one ActivationSite at the input up and gate share, one at down_proj's input,
    behind an online rotation the quantize stage may set (`down_proj_input_rotation`: no rotation
    passes the activation)."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.act = ACTIVATIONS[cfg.activation]
        if cfg.gated:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.hidden, cfg.d_model, bias=cfg.bias)
        self.site_readers = {"input": ("gate_proj", "up_proj") if cfg.gated else ("up_proj",)}
        self.register_buffer("down_proj_input_rotation", None)
        self.sites = nn.ModuleDict({name: ActivationSite() for name in ("input", "down_proj")})

    def topology(self, name: str) -> BlockTopology:
        """up (and gate) read the residual stream and down_proj writes it; down_proj's input: its
        smoothing folds into up_proj's rows where the activation lets it (a gate, or a homogeneous
        activation), its rotation stays online."""
        cfg = self.cfg
        degree = 1 if cfg.gated else _HOMOGENEOUS.get(cfg.activation)
        down = LinearStream(((f"{name}.up_proj", slice(None)),), f"{name}.down_proj", f"{name}.sites.down_proj",
                            "intermediate_size", smoothable=degree is not None, rotatable=False, degree=degree or 1,
                            online_rotation=f"{name}.down_proj_input_rotation")
        readers = tuple(f"{name}.{linear}" for linear in self.site_readers["input"])
        return BlockTopology(streams=(down,), readers=readers, sites=(f"{name}.sites.input",),
                             writers=(f"{name}.down_proj",))

    def forward(self, x: Tensor) -> Tensor:
        x = self.sites["input"](x)
        if not self.cfg.gated:
            hidden = self.act(self.up_proj(x))
        else:
            gate = self.gate_proj(x)
            if self.cfg.gate_multiplier != 1:
                gate = gate * self.cfg.gate_multiplier
            hidden = self.act(gate) * self.up_proj(x)
        if self.down_proj_input_rotation is not None:
            hidden = hidden @ self.down_proj_input_rotation
        return self.down_proj(self.sites["down_proj"](hidden))


class FusedGatedMLP(nn.Module):
    """Granite's shared_mlp and each of its MoE's experts: input_linear → (gate, up) halves →
    act(gate) · up → output_linear, no biases; input and output (batch, length, d_model). `width`:
    the config's name of the hidden width, for errors."""

    def __init__(self, cfg: MLPConfig, width: str = "shared_intermediate_size") -> None:
        super().__init__()
        self.act, self.width = ACTIVATIONS[cfg.activation], width
        self.input_linear = nn.Linear(cfg.d_model, 2 * cfg.hidden, bias=False)
        self.output_linear = nn.Linear(cfg.hidden, cfg.d_model, bias=False)
        self.register_buffer("output_linear_input_rotation", None)   # set by the quantize stage, as MLP's
        self.sites = nn.ModuleDict({name: ActivationSite() for name in ("input_linear", "output_linear")})

    def topology(self, name: str) -> BlockTopology:
        """As MLP's: output_linear's input smoothing folds into input_linear's up rows."""
        hidden = self.output_linear.in_features
        down = LinearStream(((f"{name}.input_linear", slice(hidden, 2 * hidden)),), f"{name}.output_linear",
                            f"{name}.sites.output_linear", self.width, rotatable=False,
                            online_rotation=f"{name}.output_linear_input_rotation")
        return BlockTopology(streams=(down,), readers=(f"{name}.input_linear",), sites=(f"{name}.sites.input_linear",),
                             writers=(f"{name}.output_linear",))

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.input_linear(self.sites["input_linear"](x)).chunk(2, dim=-1)
        hidden = self.act(gate) * up
        if self.output_linear_input_rotation is not None:
            hidden = hidden @ self.output_linear_input_rotation
        return self.output_linear(self.sites["output_linear"](hidden))
