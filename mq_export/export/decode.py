"""ONNX export of stateful decoding for a language model (a family with a `state_layout`: the
Mamba LMs `MambaLMHeadModel`, `Mamba2LM` and the hybrids): prefill and step graphs.

A decoder carries, per state-carrying layer i (family.StateLayout says which layers carry which):
    a Mamba layer's two FP32 tensors,
        conv_state: the last inputs of the causal depthwise conv,
            (batch, d_inner, d_conv − 1) for Mamba-1, (batch, conv_dim, d_conv − 1) for Mamba-2 (x, B, C),
        ssm_state: the scan state h,
            (batch, d_inner, d_state) for Mamba-1, (batch, heads, headdim, d_state) for Mamba-2;
    an attention layer's FP32 key and value caches (keys after RoPE), each
        (batch, kv_heads, past_length, head_dim);
    both for a layer running Mamba and attention side by side (Falcon-H1), Mamba's first.
`model.forward(input_ids, state)` continues a sequence from them (the same code as the
full-sequence forward; the scan runs with an initial state and returns its final state, the
attention appends the new keys and values to the caches).

ONNX (`export_decode`), in the style of ORT GenAI / optimum past-state inputs:
    inputs   input_ids (batch, length) int64, then per state-carrying layer i in layer order its
             past_conv_state.{i}, past_ssm_state.{i} and/or past_key.{i}, past_value.{i}
    outputs  logits (batch, length, vocab), then present_conv_state.{i}, … in the same order;
             present_key.{i} / present_value.{i} are (batch, kv_heads, past_length + length, head_dim)
Two files from the same module: `decode_step.onnx` with length fixed to 1 (the scan function
body unrolled for one step), and `prefill.onnx` with dynamic length (scan body in chunks), which
takes the prompt with zero past states and empty (past_length 0) caches. past_length is dynamic in
both. Both hold the same custom scan node as the full-sequence graph (SelectiveScan or SSDScan),
taking the initial state and returning the final one, and the same Q/DQ sites and scales (they
are exported from the same quantized module); the states and caches themselves stay FP32.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models.family import KV_CACHE, StateLayout
from ..models.registry import family_of

STEP_FILE, PREFILL_FILE = "decode_step.onnx", "prefill.onnx"


# The dimension names of the state inputs and outputs that vary between calls.
BATCH, PAST_LENGTH, PRESENT_LENGTH = "batch", "past_length", "present_length"
# The axis of a key or value cache that grows by each call's length.
CACHE_LENGTH_AXIS = 2
EXAMPLE_PAST_LENGTH = 3


def state_names(layout: StateLayout, prefix: str) -> list[str]:
    """Flat state names in feed order: {prefix}_{kind}.{i} per layer i of `layout` and each of its
    kinds (past_conv_state.0, past_ssm_state.0, past_key.1, …)."""
    return [f"{prefix}_{kind}.{i}" for i, kinds in layout for kind in kinds]


def model_state_names(model: nn.Module, prefix: str) -> list[str]:
    """The state names of `model` (an error for a family without decode state)."""
    return state_names(family_of(model).state_layout(model), prefix)


def state_axes(layout: StateLayout, prefix: str, length_name: str) -> dict[str, dict[int, str]]:
    """Each state tensor's dynamic axes: batch, and a cache's length (`length_name`)."""
    return {f"{prefix}_{kind}.{i}": {0: BATCH, **({CACHE_LENGTH_AXIS: length_name} if kind in KV_CACHE else {})}
            for i, kinds in layout for kind in kinds}


class StatefulLM(nn.Module):
    """The stateful `model.forward(input_ids, state)` over flat tensors (in `state_names` order),
    the form an ONNX graph's inputs and outputs take."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layout = family_of(model).state_layout(model)
        # torch.export matches dynamic shapes to forward's parameters, so they are named one by
        # one (input_ids, past_conv_state_0, …) instead of a *past that would count as one.
        names = ["input_ids", *(n.replace(".", "_") for n in state_names(self.layout, "past"))]

        def forward(*args: Tensor) -> tuple[Tensor, ...]:
            return self.forward_flat(*args)
        forward.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY) for n in names])
        self.forward = forward

    def forward_flat(self, input_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        flat = iter(past)
        state = [tuple(next(flat) for _ in kinds) for _, kinds in self.layout]
        logits, present = self.model(input_ids, state)
        return (logits, *(t for layer in present for t in layer))


@dataclass(frozen=True)
class DecodeExport:
    step: Path
    prefill: Path
    info: dict


def export_decode(model: nn.Module, directory: str | Path, opset: int | None = None) -> DecodeExport:
    """Write `decode_step.onnx` and `prefill.onnx` for `model` (FP32 or fake-quantized) into `directory`."""
    from .onnx import export_module

    module = StatefulLM(model).eval()
    past, present = state_names(module.layout, "past"), state_names(module.layout, "present")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    batch = 2
    state = _example_state(model, module.layout, batch, gen)
    info = {}
    # The step graph's scan body is one unrolled step; prefill keeps the default chunking.
    for path, length, chunk in ((directory / STEP_FILE, 1, 1), (directory / PREFILL_FILE, 37, None)):
        ids, = family_of(model).example_inputs(model, batch, length, gen)
        axes = {**state_axes(module.layout, "past", PAST_LENGTH),
                **state_axes(module.layout, "present", PRESENT_LENGTH)}
        axes["input_ids"] = {0: BATCH} if length == 1 else {0: BATCH, 1: "length"}
        axes["logits"] = axes["input_ids"]
        kwargs = {} if chunk is None else {"chunk": chunk}
        _, export_info = export_module(module, (ids, *state), path, input_names=["input_ids", *past],
                                       output_names=["logits", *present], dynamic_axes=axes, opset=opset,
                                       **kwargs)
        info[path.name] = export_info.to_dict()
    return DecodeExport(directory / STEP_FILE, directory / PREFILL_FILE, info)


def _example_state(model: nn.Module, layout: StateLayout, batch: int, gen: torch.Generator) -> list[Tensor]:
    """Flat example states of `model.zero_state(batch)`'s shapes, drawn at random (zeros would let
    the tracer treat them as constants), the caches EXAMPLE_PAST_LENGTH long (the exporter would
    fix a dimension it sees at size 0 or 1)."""
    def example(kind: str, zero: Tensor) -> Tensor:
        shape = list(zero.shape)
        if kind in KV_CACHE:
            shape[CACHE_LENGTH_AXIS] = EXAMPLE_PAST_LENGTH
        return zero.new_zeros(shape).normal_(generator=gen)
    return [example(kind, t) for (_, kinds), layer in zip(layout, model.zero_state(batch))
            for kind, t in zip(kinds, layer)]
