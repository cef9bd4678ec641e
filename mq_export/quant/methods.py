"""The quantization methods, in one registry, and the validated configuration that names one.

`METHODS` maps each `--method` to a `Method`: the transforms it applies before quantizing (the
rest, weight rounding and activation ranges, is the same for every method). `QuantConfig` checks
every field when it is built, so a bad option fails before calibration or any transform runs;
`check_model` adds the checks that need the model (block sizes that must divide its Linears).
`QuantSettings` is what a quantization did, as report.json's `settings` block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .. import checks
from ..errors import MQExportError
from ..models.attention import Attention
from ..models.registry import family_of
from ..models.topology import FloatingPointLinear
from .calibrate import CALIBRATORS
from .transforms import TransformConfig

W_BITS = (8, 4)
A_BITS = (8, 16)


@dataclass(frozen=True)
class Method:
    """One `--method`: which of the function-preserving transforms run before quantizing."""
    name: str
    label: str                     # how tables and help text name it
    quantizes: bool = True
    smooth_inputs: bool = False    # SmoothQuant smoothing folded before each Linear input
    smooth_gate: bool = False      # S-SiLU smoothing of the out_proj input (an online gate scale)
    smooth_state: bool = False     # h·C smoothing along the state dimension
    rotation: str | None = None    # "hadamard" (random Hadamard) or "klt" (K·H; Hadamard when klt=False)

    @property
    def smooths(self) -> bool:
        return self.smooth_inputs or self.smooth_gate or self.smooth_state

    @property
    def randomised(self) -> bool:
        """Whether the seed changes the result (random Hadamard signs)."""
        return self.rotation is not None

    def transforms(self, alpha: float, seed: int, klt: bool = True) -> TransformConfig:
        """klt=False: a KLT method with plain Hadamard rotations (MambaQuant's ablation)."""
        rotation = "hadamard" if self.rotation == "klt" and not klt else self.rotation
        return TransformConfig(smooth_inputs=self.smooth_inputs, smooth_gate=self.smooth_gate,
                               smooth_state=self.smooth_state, rotation=rotation, alpha=alpha, seed=seed)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("none", "FP32 (not quantized)", quantizes=False),
    Method("rtn", "RTN"),
    Method("smoothquant", "SmoothQuant", smooth_inputs=True),
    Method("hadamard", "Hadamard (QuaRot-style)", rotation="hadamard"),
    Method("mambaquant", "MambaQuant (KLT + smoothing)", smooth_inputs=True, smooth_gate=True, smooth_state=True,
           rotation="klt"),
)}
QUANTIZING_METHODS = tuple(name for name, m in METHODS.items() if m.quantizes)
CALIBRATOR_CHOICES = ("auto", *CALIBRATORS)
# What no method quantizes (see quantize.py's quant-site table).
FLOATING_POINT_OPS = ("selective-scan recurrence (Δ softplus, exp(ΔA), D skip)", "conv1d", "norms", "biases",
                      "model input")
H_C_PRODUCT = "quantized through its operands outside the scan op: C (scan_C) and the scan output y (out_proj input)"


def floating_point_parts(model: nn.Module) -> tuple[str, ...]:
    """The parts of `model` beyond FLOATING_POINT_OPS that no method quantizes."""
    parts = []
    if any(isinstance(m, Attention) for m in model.modules()):
        parts.append("attention scores, softmax and KV cache")
    if any(isinstance(m, FloatingPointLinear) for m in model.modules()):
        parts.append("MoE routers")
    return tuple(parts)


def _choice(option: str, value, choices) -> None:
    if value not in choices:
        raise MQExportError(f"unknown {option} {value!r}; choose from {', '.join(map(str, choices))}")


def _bits(option: str, value, choices) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in choices:
        raise MQExportError(f"{option} must be {' or '.join(map(str, choices))}, got {value!r}")


def _optional(option: str, check, value) -> None:
    if value is not None:
        checks.require(option, check, value)


def _flag(option: str, value, optional: bool = False) -> None:
    if not isinstance(value, bool) and not (optional and value is None):
        raise MQExportError(f"{option} must be True or False{' or None' if optional else ''}, got {value!r}")


@dataclass(frozen=True)
class QuantConfig:
    """A quantization method and its options, checked when built (errors name the CLI option)."""
    method: str = "mambaquant"
    w_bits: int = 8
    a_bits: int = 8
    calibrator: str = "auto"          # auto | absmax | percentile | mse | entropy
    percentile: float = 99.99
    asymmetric: bool = False          # asymmetric activations: ONNX Runtime only (TensorRT needs zp 0)
    w_group_size: int | None = None   # weight blocks along the input dimension (TensorRT INT4)
    gptq: bool | None = None          # None: GPTQ for 4-bit weights, clip-searched RTN for 8-bit
    alpha: float = 0.5
    seed: int = 0
    klt: bool = True                  # False: MambaQuant with plain Hadamard rotations (ablation)
    range_samples: int | None = None  # calibration inputs for the post-transform range pass (None: all)

    def __post_init__(self) -> None:
        _choice("method", self.method, QUANTIZING_METHODS)
        _bits("--w-bits", self.w_bits, W_BITS)
        _bits("--a-bits", self.a_bits, A_BITS)
        _choice("calibrator", self.calibrator, CALIBRATOR_CHOICES)
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) or not (
                math.isfinite(self.percentile) and 0 < self.percentile <= 100):
            raise MQExportError(f"percentile must be a number in (0, 100], got {self.percentile!r}")
        _optional("--w-group-size", checks.positive_int, self.w_group_size)
        checks.require("--alpha", checks.fraction, self.alpha)
        checks.require("--seed", checks.seed, self.seed)
        _optional("range_samples", checks.positive_int, self.range_samples)
        _flag("--asymmetric", self.asymmetric)
        _flag("--gptq", self.gptq, optional=True)
        _flag("klt", self.klt)

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    def transforms(self) -> TransformConfig:
        return self.spec.transforms(self.alpha, self.seed, self.klt)

    @property
    def use_gptq(self) -> bool:
        return self.w_bits <= 4 if self.gptq is None else self.gptq

    @property
    def needs_covariance(self) -> bool:
        """Whether calibration must keep the sites' d×d second moments: GPTQ's Hessians, and every
        transform (the KLT rotates by the covariance; the transforms also scale it at each site
        they touch). Only RTN without GPTQ does without them."""
        t = self.transforms()
        return self.use_gptq or bool(t.rotation or t.smooth_inputs or t.smooth_gate or t.smooth_state)

    def group_size_for(self, in_features: int) -> int | None:
        """The weight block size of a Linear with `in_features` inputs: None (per channel) when the
        row is no longer than a block; refused when blocks cannot tile it."""
        if self.w_group_size is None or in_features <= self.w_group_size:
            return None
        if in_features % self.w_group_size:
            raise MQExportError(f"--w-group-size {self.w_group_size} does not divide a Linear's {in_features} "
                                f"input features; use a size that divides every in_features larger than it")
        return self.w_group_size

    def check_model(self, model: nn.Module) -> None:
        """The checks that need the model, run before calibration: that its family can be
        quantized, that its transform topology can be built (a layer no topology covers is refused
        here), and every Linear's block size."""
        family = family_of(model, required=False)
        if family is not None and family.quantization_unsupported:
            raise MQExportError(family.quantization_unsupported)
        if family is not None:
            family.topology(model)
        for module in model.modules():
            if isinstance(module, nn.Linear):
                self.group_size_for(module.in_features)


@dataclass(frozen=True)
class QuantSettings:
    """What one quantization did: report.json's `settings` block (`to_dict`; keys are a contract)."""
    config: QuantConfig
    calibrator: str                               # the one used (`auto`: the selection's choice)
    calibrator_selection_kl: dict[str, float] | None
    calibrator_selection_samples: int
    online: list[str]                             # transforms left as online ops, per layer
    quantized_activation_sites: list[str]
    quantized_weights: list[str]
    calibration_split: str
    # The kinds of online op the transforms inserted ("gate scale", "rotation", "state scale", …);
    # None: those this method inserts in a Mamba-1 model.
    online_kinds: tuple[str, ...] | None = None
    # What else this model keeps in floating point (a hybrid's attention scores and KV cache, its
    # MoE routers): `floating_point_parts`.
    model_floating_point: tuple[str, ...] = ()

    @property
    def floating_point(self) -> list[str]:
        """What stays in floating point: the fixed ops, plus this method's online transforms."""
        method = self.config.spec
        online = (list(self.online_kinds) if self.online_kinds is not None else
                  [part for part, used in (("gate scale", method.smooth_gate), ("rotation", method.rotation)) if used])
        listed = ", ".join(online[:-1]) + " and " + online[-1] if len(online) > 1 else "".join(online)
        return [*FLOATING_POINT_OPS, *self.model_floating_point, *([f"online {listed}"] if online else [])]

    @property
    def activations(self) -> str:
        a_bits = self.config.a_bits
        return (f"static per-tensor asymmetric uint{a_bits} (ONNX Runtime only)" if self.config.asymmetric
                else f"static per-tensor symmetric int{a_bits}")

    @property
    def weights(self) -> str:
        cfg = self.config
        return (f"symmetric int{cfg.w_bits} per output channel"
                + (f", blocks of {cfg.w_group_size} along the input" if cfg.w_group_size else "")
                + (", GPTQ" if cfg.use_gptq else ", RTN with clipping search"))

    def to_dict(self) -> dict:
        cfg, method = self.config, self.config.spec
        rotation = cfg.transforms().rotation
        return {
            "method": cfg.method, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "seed": cfg.seed,
            "alpha": cfg.alpha if method.smooths else None,
            "rotation": rotation, "klt": rotation == "klt",
            "smoothing": {"smooth_inputs": method.smooth_inputs, "smooth_gate": method.smooth_gate,
                          "smooth_state": method.smooth_state},
            "calibrator": self.calibrator, "calibrator_requested": cfg.calibrator,
            "calibrator_selection_kl": self.calibrator_selection_kl,
            "calibrator_selection_samples": self.calibrator_selection_samples,
            "percentile": cfg.percentile if self.calibrator == "percentile" else None,
            "activations": self.activations,
            "weights": self.weights,
            "w_group_size": cfg.w_group_size,
            "online": self.online,
            "quantized_activation_sites": self.quantized_activation_sites,
            "quantized_weights": self.quantized_weights,
            "floating_point": self.floating_point,
            "h_c_product": H_C_PRODUCT,
            "calibration_split": self.calibration_split,
        }
