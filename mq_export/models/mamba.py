"""Pure-PyTorch Mamba-1 (no CUDA, no triton, no mamba-ssm), laid out like mamba-ssm's modules.

Parameter names follow mamba-ssm's `Mamba` mixer and `MambaLMHeadModel`, so their state dicts
load with no renaming. Quantization hooks are `ActivationSite`s: identities until the quantize
stage attaches a fake quantizer, and the places the exporter puts Q/DQ nodes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.selective_scan import DeltaProjection, SelectiveScanOp
from ..errors import MQExportError
from .family import CLASSIFICATION, LANGUAGE_MODEL, MAMBA_STATE, ModelFamily
from .topology import GatedStream, LinearStream, NormedReader, NormedStream, StateStream, Stream


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

    def build(self) -> MambaMixer:
        """The mixer this config describes (a family's mixer config subclass builds its own)."""
        return MambaMixer(self)

    def zero_state(self, batch: int) -> LayerState:
        """The mixer's decode state before any token: (conv_state (b, d_inner, d_conv − 1),
        ssm_state (b, d_inner, d_state)), zeros."""
        return (torch.zeros(batch, self.d_inner, self.d_conv - 1), torch.zeros(batch, self.d_inner, self.d_state))


def state_dims(state: dict[str, Tensor], key: str, layout: tuple[str, ...], source) -> tuple[int, ...]:
    """The shape of `state[key]`, checked to have one non-empty dimension per name in `layout`."""
    if key not in state:
        raise MQExportError(f"{source} is not a Mamba checkpoint: no {key}")
    shape = tuple(state[key].shape)
    if len(shape) != len(layout) or 0 in shape:
        raise MQExportError(f"{source}: {key} has shape {shape}; expected a {len(layout)}-D tensor "
                            f"({', '.join(layout)}) with no empty dimension")
    return shape


def mixer_config_from_state(state: dict[str, Tensor], prefix: str, source) -> MixerConfig:
    """A Mamba-1 mixer's sizes inferred from its weights under `prefix` (mamba-ssm's parameter names;
    neither the classifier checkpoints nor a mamba-ssm `Mamba` module record them otherwise).
    `source` names the weights in errors (a file, a module)."""
    d_inner2, d_model = state_dims(state, f"{prefix}in_proj.weight", ("2·d_inner", "d_model"), source)
    d_inner, d_state = state_dims(state, f"{prefix}A_log", ("d_inner", "d_state"), source)
    d_conv = state_dims(state, f"{prefix}conv1d.weight", ("d_inner", "1", "d_conv"), source)[-1]
    rank = state_dims(state, f"{prefix}dt_proj.weight", ("d_inner", "dt_rank"), source)[1]
    if d_inner2 != 2 * d_inner or d_inner % d_model:
        raise MQExportError(f"{source}: in_proj {d_inner2}x{d_model} and A_log {d_inner}x{d_state} "
                            f"do not describe a Mamba-1 mixer")
    return MixerConfig(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=d_inner // d_model,
                       dt_rank=rank, conv_bias=f"{prefix}conv1d.bias" in state,
                       bias=f"{prefix}in_proj.bias" in state)


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
        self.dt_proj = DeltaProjection(r, d_inner, bias=True)     # its bias is the scan's delta_bias
        self.scan = SelectiveScanOp()
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
        state and (output, new state) is returned: the same code serves prefill and decode steps.

        From in_proj's output to the scan's the tensors are channel-major (b, channels, l): the
        layout of the depthwise conv and of the scan's inputs. The Linears, the sites (whose
        statistics are per channel of the last axis) and `selection` see channels-last views; the
        exporter writes a float Linear whose output is transposed like this as one MatMul with the
        weight on the left and moves Q/DQ across transposes, so its FP32 graph copies no layouts
        here (export/onnx.py)."""
        cfg = self.cfg
        x, z = self.in_proj(self.sites["in_proj"](hidden)).transpose(1, 2).chunk(2, dim=1)   # (b, d_inner, l)
        # The causal conv's window starts d_conv − 1 steps back: in the past state, or in zeros.
        window = F.pad(x, (cfg.d_conv - 1, 0)) if state is None else torch.cat([state[0], x], dim=-1)
        x = F.silu(F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=cfg.d_inner))   # the scan's u
        x_dbl = self.x_proj(self.sites["x_proj"](x.transpose(1, 2))).transpose(1, 2)          # (b, r + 2n, l)
        dt, B, C = self.selection(*(t.transpose(1, 2) for t in
                                    torch.split(x_dbl, [cfg.rank, cfg.d_state, cfg.d_state], dim=1)))
        # No bias: the scan adds it (delta_bias), as mamba-ssm does.
        dt = self.dt_proj(self.sites["dt_proj"](dt)).transpose(1, 2)                          # (b, d_inner, l)
        B = self.sites["scan_B"](B).transpose(1, 2)                                          # (b, d_state, l)
        C = self.sites["scan_C"](C).transpose(1, 2)
        gate_in_scan = self.gate_scale is None
        y = self.scan(x, dt, -torch.exp(self.A_log.float()), B, C, self.D.float(), z=z if gate_in_scan else None,
                      delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                      **({} if state is None else {"initial_state": state[1], "return_last_state": True}))
        if state is not None:
            y, ssm_state = y
        if not gate_in_scan:
            y = y * z * torch.sigmoid(self.gate_scale[:, None] * z)
        y = y.transpose(1, 2)                                                                # (b, l, d_inner)
        if self.out_proj_input_rotation is not None:
            y = y @ self.out_proj_input_rotation
        out = self.out_proj(self.sites["out_proj"](y))
        if state is None:
            return out
        return out, (window[..., window.shape[-1] - (cfg.d_conv - 1):], ssm_state)

    def selection(self, dt: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x_proj's dt, B, C as dt_proj and the scan read them (a subclass may normalise them)."""
        return dt, B, C

    def streams(self, name: str) -> list[Stream]:
        """The transform topology inside the mixer; `name`: its qualified name in the model."""
        r, n = self.cfg.rank, self.cfg.d_state
        return [LinearStream(((f"{name}.x_proj", slice(0, r)),), f"{name}.dt_proj", f"{name}.sites.dt_proj",
                             "dt_rank"),
                StateStream(f"{name}.x_proj", slice(r, r + n), slice(r + n, None), f"{name}.sites.scan_B",
                            f"{name}.sites.scan_C"),
                GatedStream(name)]


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
        return rms_normalize(x, self.eps) * self.weight


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x / RMS(x) over the last dimension: a weight-free RMSNorm."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


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

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return self.vocab_size + (-self.vocab_size) % m

    def build_block(self) -> Block:
        """One residual block of this config (a family's LM config subclass builds its own)."""
        return Block(self)

    def mamba_ssm_layers(self) -> dict:
        """The layer settings of mamba-ssm's config.json: `d_intermediate` and `ssm_cfg`."""
        m = self.mixer
        return {"d_intermediate": 0,
                "ssm_cfg": {"layer": "Mamba1", "d_state": m.d_state, "d_conv": m.d_conv, "expand": m.expand,
                            "dt_rank": m.dt_rank if m.dt_rank is not None else "auto",
                            "conv_bias": m.conv_bias, "bias": m.bias}}


class Block(nn.Module):
    """mamba-ssm's pre-norm residual block: residual += hidden; hidden = mixer(norm(residual))."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        d = cfg.mixer.d_model
        self.norm = RMSNorm(d, cfg.norm_epsilon) if cfg.rms_norm else nn.LayerNorm(d, eps=cfg.norm_epsilon)
        self.mixer = cfg.mixer.build()

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
        self.layers = nn.ModuleList(cfg.build_block() for _ in range(cfg.n_layer))
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
        """The state before any token: per layer its mixer's zero state (conv_state, ssm_state)."""
        return [self.cfg.mixer.zero_state(batch) for _ in range(self.cfg.n_layer)]

    def forward(self, input_ids: Tensor, state: list[LayerState] | None = None):
        """input_ids (b, l) → logits (b, l, vocab); with `state` (`zero_state` for a new sequence)
        the sequence continues from it and (logits, state after the last token) is returned."""
        if state is None:
            return self.lm_head(self.sites["lm_head"](self.backbone(input_ids)))
        hidden, state = self.backbone(input_ids, state)
        return self.lm_head(self.sites["lm_head"](hidden)), state


# ------------------------------------------------------------------ family adapters

class SequenceClassifierFamily(ModelFamily):
    """The bundled classifier's family: `x` (batch, length, d_input) floats → `logits` (batch, classes)."""
    name = "mamba-classifier"
    model_class = MambaSequenceClassifier
    task = CLASSIFICATION
    input_names = ("x",)
    dynamic_axes = {"x": {0: "batch", 1: "length"}, "logits": {0: "batch"}}

    def example_inputs(self, model, batch, length, generator):
        return (torch.randn(batch, length, model.cfg.d_input, generator=generator),)

    def check_inputs(self, model, inputs, what):
        if inputs.dim() != 3 or inputs.shape[-1] != model.cfg.d_input or not inputs.is_floating_point():
            raise MQExportError(f"{what}: this classifier reads real floats (n, L, {model.cfg.d_input}), got "
                                f"{inputs.dtype} {tuple(inputs.shape)}")
        return inputs.to(model.input_proj.weight.dtype)

    def topology(self, model):
        """Each mixer's streams; the d_model stream into each layer (input_proj or the previous
        out_proj → in_proj); the last out_proj → mean over time → LayerNorm → classifier."""
        n = len(model.layers)
        streams = [s for i, layer in enumerate(model.layers) for s in layer.streams(f"layers.{i}")]
        streams += [LinearStream((("input_proj" if i == 0 else f"layers.{i - 1}.out_proj", slice(None)),),
                                 f"layers.{i}.in_proj", f"layers.{i}.sites.in_proj", "d_model") for i in range(n)]
        # The mean over time keeps a centred out_proj's output zero-mean: the LayerNorm can become an RMSNorm.
        streams.append(NormedStream((f"layers.{n - 1}.out_proj",), (NormedReader("norm", "classifier", "sites.classifier"),),
                                    centrable=True, what="the classifier input"))
        return streams


class MambaLMFamily(ModelFamily):
    """Mamba-1 language models (mamba-ssm's MambaLMHeadModel, HF MambaForCausalLM):
    `input_ids` (batch, length) int64 → `logits` (batch, length, vocab)."""
    name = "mamba-lm"
    model_class = MambaLMHeadModel
    task = LANGUAGE_MODEL
    input_names = ("input_ids",)
    dynamic_axes = {"input_ids": {0: "batch", 1: "length"}, "logits": {0: "batch", 1: "length"}}
    hf_model_types = ("mamba",)
    hf_renames = {"backbone.embeddings.": "backbone.embedding."}

    def example_inputs(self, model, batch, length, generator):
        return (torch.randint(0, model.cfg.vocab_size, (batch, length), generator=generator),)

    def check_inputs(self, model, inputs, what):
        if inputs.dim() != 2 or inputs.is_floating_point() or inputs.is_complex() or inputs.dtype == torch.bool:
            raise MQExportError(f"{what}: a language model reads integer token ids (n, L), got {inputs.dtype} "
                                f"{tuple(inputs.shape)}")
        if inputs.numel() and (inputs.min() < 0 or inputs.max() >= model.cfg.vocab_size):
            raise MQExportError(f"{what}: token ids outside [0, {model.cfg.vocab_size})")
        return inputs.long()

    def state_layout(self, model):
        """Every layer carries its mixer's conv and SSM state (LayerState)."""
        return tuple((i, MAMBA_STATE) for i in range(model.cfg.n_layer))

    def topology(self, model):
        """Each mixer's streams, then the residual stream: written by the embedding and every
        out_proj, read through each block's norm by in_proj and through norm_f by lm_head."""
        blocks = [f"backbone.layers.{i}" for i in range(len(model.backbone.layers))]
        streams = [s for name, block in zip(blocks, model.backbone.layers) for s in block.mixer.streams(f"{name}.mixer")]
        readers = [NormedReader(f"{b}.norm", f"{b}.mixer.in_proj", f"{b}.mixer.sites.in_proj") for b in blocks]
        readers.append(NormedReader("backbone.norm_f", "lm_head", "sites.lm_head"))
        streams.append(NormedStream(tuple(f"{b}.mixer.out_proj" for b in blocks), tuple(readers),
                                    embeddings=("backbone.embedding",), what="a language model's residual stream"))
        return streams

    def config_from_mamba_ssm(self, read, source) -> LMConfig:
        """mamba-ssm's MambaConfig."""
        ssm = read.section("ssm_cfg")
        if (ssm.values.get("layer", "Mamba1") != "Mamba1" or read.values.get("attn_layer_idx")
                or read.integer("d_intermediate", 0, minimum=0)):
            raise MQExportError(f"{source}: only Mamba-1 layers without attention or MLP blocks are supported "
                                f"(ssm_cfg.layer, attn_layer_idx, d_intermediate)")
        known = {"layer", "d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias"}
        # Initialisation-only settings do not change inference.
        ignored = {"dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "use_fast_path"}
        unknown = set(ssm.values) - known - ignored
        if unknown:
            raise MQExportError(f"{source}: ssm_cfg settings {sorted(unknown)} are not supported")
        mixer = MixerConfig(d_model=read.integer("d_model"), d_state=ssm.integer("d_state", 16),
                            d_conv=ssm.integer("d_conv", 4), expand=ssm.integer("expand", 2),
                            dt_rank=ssm.integer_or_auto("dt_rank"), conv_bias=ssm.boolean("conv_bias", True),
                            bias=ssm.boolean("bias", False))
        return LMConfig(mixer=mixer, n_layer=read.integer("n_layer"), vocab_size=read.integer("vocab_size"),
                        rms_norm=read.boolean("rms_norm", True),
                        norm_epsilon=read.positive_float("norm_epsilon", 1e-5),
                        pad_vocab_size_multiple=read.integer("pad_vocab_size_multiple", 8),
                        tie_embeddings=read.boolean("tie_embeddings", True))

    def config_from_hf(self, read, source) -> LMConfig:
        """HF transformers' MambaConfig."""
        return self.hf_lm_config(read, source, MixerConfig)

    @staticmethod
    def hf_lm_config(read, source, mixer_config: type[MixerConfig], **mixer_settings) -> LMConfig:
        """An LM config from HF's Mamba-style config.json keys, with mixers of `mixer_config`
        (given `mixer_settings` beyond Mamba-1's)."""
        if read.values.get("hidden_act", "silu") != "silu":
            raise MQExportError(f"{source}: hidden_act {read.values['hidden_act']!r} is not supported (only silu)")
        mixer = mixer_config(d_model=read.integer("hidden_size"), d_state=read.integer("state_size", 16),
                             d_conv=read.integer("conv_kernel", 4), expand=read.integer("expand", 2),
                             dt_rank=read.integer_or_auto("time_step_rank"),
                             conv_bias=read.boolean("use_conv_bias", True), bias=read.boolean("use_bias", False),
                             **mixer_settings)
        if read.integer("intermediate_size", mixer.d_inner) != mixer.d_inner:
            raise MQExportError(f"{source}: intermediate_size {read.values['intermediate_size']} is not expand × "
                                f"hidden_size = {mixer.d_inner}")
        return LMConfig(mixer=mixer, n_layer=read.integer("num_hidden_layers"), vocab_size=read.integer("vocab_size"),
                        rms_norm=True, norm_epsilon=read.positive_float("layer_norm_epsilon", 1e-5),
                        pad_vocab_size_multiple=1, tie_embeddings=read.boolean("tie_word_embeddings", True))
