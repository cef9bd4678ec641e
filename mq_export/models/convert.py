"""Bring your own model: Mamba mixers inside a user's own `nn.Module`.

`convert_mamba_mixers` swaps, in place, every submodule that is a mamba-ssm `Mamba` mixer (or any
module with its parameter names: in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj) for this
package's `MambaMixer`, with the same weights; nothing else in the model changes. The converted
model then belongs to `CustomModelFamily`: its transform topology is each mixer's own streams
(dt path, B/C state, gated out_proj input), the only ones the pipeline can know without knowing
the surrounding model; everything outside the mixers is left as the user wrote it.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import MQExportError
from .family import CUSTOM, ModelFamily
from .mamba import MambaMixer, mixer_config_from_state
from .topology import Stream

MAMBA_LINEARS = ("in_proj", "x_proj", "dt_proj", "out_proj")
MAMBA_PARAMETERS = ("A_log", "D")
# How far a converted mixer's output may be from the original's on a random input, relative to its
# largest value (fp32/fp64; fp16/bf16): rounding differs (another scan order), another computation does not.
CONVERSION_RTOL, LOW_PRECISION_RTOL = 1e-4, 3e-2


def is_mamba_mixer(module: nn.Module) -> bool:
    """Whether `module` has mamba-ssm `Mamba`'s layers and parameters under its names (and is not
    already one of this package's mixers)."""
    children = dict(module.named_children())
    params = dict(module.named_parameters(recurse=False))
    return (not isinstance(module, MambaMixer)
            and all(isinstance(children.get(name), nn.Linear) for name in MAMBA_LINEARS)
            and isinstance(children.get("conv1d"), nn.Conv1d)
            and all(name in params for name in MAMBA_PARAMETERS))


@torch.no_grad()
def _check_same_function(original: nn.Module, converted: MambaMixer, name: str) -> None:
    """Refuse a module that has Mamba's names but computes something else (a mixer that also
    normalises dt, B and C, another activation): compare both on one random input."""
    weight = converted.in_proj.weight
    x = torch.randn(2, 7, converted.cfg.d_model, generator=torch.Generator().manual_seed(0)).to(weight)
    expected, got = original(x), converted(x)
    expected = expected[0] if isinstance(expected, tuple) else expected
    rtol = CONVERSION_RTOL if weight.dtype in (torch.float32, torch.float64) else LOW_PRECISION_RTOL
    err = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    if not err <= rtol:
        raise MQExportError(f"module {name!r} ({type(original).__name__}) has mamba-ssm Mamba's parameter names but "
                            f"not its computation (relative difference {err:.2g} after conversion); only Mamba-1 "
                            f"mixers without extra norms convert")


def convert_mamba_mixers(model: nn.Module, check: bool = True) -> list[str]:
    """Replace, in place, every mamba-ssm `Mamba`-like submodule of `model` by a `MambaMixer` with
    its weights (sizes inferred from them; same dtype and device). `check`: run both on a random
    input first and refuse a module whose output differs. Returns the converted modules' names."""
    names = [name for name, module in model.named_modules() if name and is_mamba_mixer(module)]
    if not names:
        raise MQExportError(f"{type(model).__name__} has no Mamba mixer to convert (a submodule with mamba-ssm "
                            f"Mamba's in_proj, conv1d, x_proj, dt_proj, A_log, D and out_proj)")
    for name in names:
        original = model.get_submodule(name)
        state = original.state_dict()
        weight = original.in_proj.weight
        mixer = mixer_config_from_state(state, "", f"module {name!r}").build().to(weight.device, weight.dtype)
        mixer.load_state_dict(state)
        mixer.train(original.training)
        if check:
            _check_same_function(original, mixer, name)
        model.set_submodule(name, mixer)
    return names


class CustomModelFamily(ModelFamily):
    """A user's own module with this package's mixers in it (see `convert_mamba_mixers`): only the
    mixers' internal streams are transformed; its inputs, outputs and data are the user's to give."""
    name = "custom"
    model_class = nn.Module
    task = CUSTOM
    input_names = ()
    dynamic_axes = {}

    def example_inputs(self, model, batch, length, generator):
        raise MQExportError(f"{type(model).__name__} is the user's own model: export it with export_module(model, "
                            f"args, path, input_names=..., output_names=..., dynamic_axes=...)")

    def check_inputs(self, model, inputs, what):
        return inputs

    def topology(self, model) -> list[Stream]:
        return [stream for name, module in model.named_modules() if isinstance(module, MambaMixer)
                for stream in module.streams(name)]


def contains_mixers(model: nn.Module) -> bool:
    return any(isinstance(module, MambaMixer) for module in model.modules())
