"""ONNX export of stateful decoding for a language model (a family with `state_kinds`:
`MambaLMHeadModel`, `Mamba2LM`): prefill and step graphs.

A Mamba layer's whole memory is two FP32 tensors, so a decoder carries per layer
    conv_state: the last inputs of the causal depthwise conv,
        (batch, d_inner, d_conv − 1) for Mamba-1, (batch, conv_dim, d_conv − 1) for Mamba-2 (x, B, C),
    ssm_state: the scan state h,
        (batch, d_inner, d_state) for Mamba-1, (batch, heads, headdim, d_state) for Mamba-2,
and `model.forward(input_ids, state)` continues a sequence from them (the same code as the
full-sequence forward; the scan runs with an initial state and returns its final state).

ONNX (`export_decode`), in the style of ORT GenAI / optimum past-state inputs:
    inputs   input_ids (batch, length) int64, past_conv_state.{i}, past_ssm_state.{i}
    outputs  logits (batch, length, vocab), present_conv_state.{i}, present_ssm_state.{i}
Two files from the same module: `decode_step.onnx` with length fixed to 1 (the scan function
body unrolled for one step), and `prefill.onnx` with dynamic length (scan body in chunks), which
takes the prompt with zero past states. Both hold the same custom scan node as the
full-sequence graph (SelectiveScan or SSDScan), taking the initial state and returning the final
one, and the same Q/DQ sites and scales (they are exported from the same quantized module).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import MQExportError
from ..models.mamba import MambaLMHeadModel
from ..models.registry import family_of

STEP_FILE, PREFILL_FILE = "decode_step.onnx", "prefill.onnx"


def state_names(n_layer: int, prefix: str, kinds: tuple[str, ...] = ("conv", "ssm")) -> list[str]:
    """Flat state names in feed order: {prefix}_conv_state.0, {prefix}_ssm_state.0, …"""
    return [f"{prefix}_{kind}_state.{i}" for i in range(n_layer) for kind in kinds]


def model_state_names(model: nn.Module, prefix: str) -> list[str]:
    """The state names of `model`'s family (an error for a family without decode state)."""
    family = family_of(model)
    if not family.state_kinds:
        raise MQExportError(f"--decode needs a language model with a decode state, not a {family.name} model "
                            f"({type(model).__name__})")
    return state_names(family.state_layers(model), prefix, family.state_kinds)


class StatefulLM(nn.Module):
    """The stateful `MambaLMHeadModel.forward` over flat tensors, the form an ONNX graph's inputs
    and outputs take."""

    def __init__(self, model: MambaLMHeadModel) -> None:
        super().__init__()
        self.model = model
        # torch.export matches dynamic shapes to forward's parameters, so they are named one by
        # one (input_ids, past_conv_state_0, …) instead of a *past that would count as one.
        names = ["input_ids", *(n.replace(".", "_") for n in model_state_names(model, "past"))]

        def forward(*args: Tensor) -> tuple[Tensor, ...]:
            return self.forward_flat(*args)
        forward.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY) for n in names])
        self.forward = forward

    def forward_flat(self, input_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        state = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, present = self.model(input_ids, state)
        return (logits, *(t for layer in present for t in layer))


@dataclass(frozen=True)
class DecodeExport:
    step: Path
    prefill: Path
    info: dict


def export_decode(model: MambaLMHeadModel, directory: str | Path, opset: int | None = None) -> DecodeExport:
    """Write `decode_step.onnx` and `prefill.onnx` for `model` (FP32 or fake-quantized) into `directory`."""
    from .onnx import export_module

    past, present = model_state_names(model, "past"), model_state_names(model, "present")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    batch = 2
    # Example states drawn at random: zeros would let the tracer treat them as constants.
    state = [t.normal_(generator=gen) for layer in model.zero_state(batch) for t in layer]
    module = StatefulLM(model).eval()
    info = {}
    # The step graph's scan body is one unrolled step; prefill keeps the default chunking.
    for path, length, chunk in ((directory / STEP_FILE, 1, 1), (directory / PREFILL_FILE, 37, None)):
        ids, = family_of(model).example_inputs(model, batch, length, gen)
        axes = {name: {0: "batch"} for name in past + present}
        axes["input_ids"] = {0: "batch"} if length == 1 else {0: "batch", 1: "length"}
        axes["logits"] = axes["input_ids"]
        kwargs = {} if chunk is None else {"chunk": chunk}
        _, export_info = export_module(module, (ids, *state), path, input_names=["input_ids", *past],
                                       output_names=["logits", *present], dynamic_axes=axes, opset=opset,
                                       **kwargs)
        info[path.name] = export_info.to_dict()
    return DecodeExport(directory / STEP_FILE, directory / PREFILL_FILE, info)
