"""The model-family adapter: everything the pipeline knows about one family of models.

One `ModelFamily` object per family, listed in models/registry.py. Later stages ask the registry
(`family_of(model)`, `family_for_config(config)`) instead of testing model classes: the loader
for how a checkpoint maps to the model, calibration for what its inputs look like, the transforms
for its topology, the exporter for its example inputs and ONNX names, the decoder for its state.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..errors import MQExportError
from .topology import Stream

CLASSIFICATION, LANGUAGE_MODEL = "classification", "language-model"
CUSTOM = "custom"   # a user's own module with converted mixers: its data and metrics are the user's

# Decode state, per state-carrying layer: a Mamba layer's conv and SSM states (FP32), an attention
# layer's key and value cache (FP32, batch × kv_heads × past_length × head_dim); a layer running
# both (Falcon-H1) carries MAMBA_STATE + KV_CACHE. A kind names the layer's ONNX inputs and outputs:
# past_{kind}.{i} / present_{kind}.{i}, i the layer's index in the model.
MAMBA_STATE = ("conv_state", "ssm_state")
KV_CACHE = ("key", "value")
# (layer index, its kinds) per state-carrying layer, in layer order: the order of the state
# tensors in a model's state list and of the ONNX feeds (layer by layer, each layer's kinds in order).
StateLayout = tuple[tuple[int, tuple[str, ...]], ...]


class ModelFamily:
    name: str
    model_class: type[nn.Module]
    task: str                                   # CLASSIFICATION, LANGUAGE_MODEL or CUSTOM: its inputs and metrics
    input_names: tuple[str, ...]
    output_names: tuple[str, ...] = ("logits",)
    dynamic_axes: dict[str, dict[int, str]]     # ONNX name → {axis: dimension name}
    hf_model_types: tuple[str, ...] = ()        # config.json "model_type" values it loads
    # Why this family cannot be quantized yet (one line for the user); None when it can.
    quantization_unsupported: str | None = None

    def example_inputs(self, model: nn.Module, batch: int, length: int, generator) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def check_inputs(self, model: nn.Module, inputs: Tensor, what: str) -> Tensor:
        """`inputs` checked against what `model` reads (`what` names them in errors), in the
        dtype the model computes with."""
        raise NotImplementedError

    def topology(self, model: nn.Module) -> list[Stream]:
        raise MQExportError(f"{self.name} models have no transform topology")

    def state_layout(self, model: nn.Module) -> StateLayout:
        """Which layers of `model` carry decode state and which tensors each carries (see
        StateLayout); an error for a family without decode state."""
        raise MQExportError(f"decoding needs a language model with a decode state, not a {self.name} model "
                            f"({type(model).__name__})")

    # Loading from a config.json directory. `read` is the loader's typed reader of config.json
    # (integer / boolean / positive_float / integer_or_auto / section, .values: the raw dict);
    # `source` the checkpoint directory, for errors.
    hf_renames: dict[str, str] = {}             # HF state-dict name prefix → this package's

    def config_from_hf(self, read, source) -> object:
        raise MQExportError(f"{source}: {self.name} models do not load from an HF config.json")

    def build(self, cfg) -> nn.Module:
        return self.model_class(cfg)
