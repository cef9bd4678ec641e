"""The one list of model families; every stage finds a model's family here."""
from __future__ import annotations

from torch import nn

from ..errors import MQExportError
from .bamba import BambaFamily
from .convert import CustomModelFamily, contains_mixers
from .falcon_h1 import FalconH1Family
from .falcon_mamba import FalconMambaFamily
from .family import LANGUAGE_MODEL, ModelFamily
from .granitemoehybrid import GraniteMoeHybridFamily
from .jamba import JambaFamily
from .mamba import MambaLMFamily, SequenceClassifierFamily
from .mamba2 import Mamba2LMFamily
from .nemotron_h import NemotronHFamily
from .vim import VisionMambaFamily

FAMILIES: tuple[ModelFamily, ...] = (SequenceClassifierFamily(), MambaLMFamily(), FalconMambaFamily(),
                                     Mamba2LMFamily(), VisionMambaFamily(), NemotronHFamily(), BambaFamily(),
                                     GraniteMoeHybridFamily(), JambaFamily(), FalconH1Family())
_BY_CLASS = {family.model_class: family for family in FAMILIES}
HF_MODEL_TYPES = {model_type: family for family in FAMILIES for model_type in family.hf_model_types}
MAMBA_LM = _BY_CLASS[MambaLMFamily.model_class]
# mamba-ssm's config.json names its mixer in ssm_cfg.layer (default Mamba1).
MAMBA_SSM_LAYERS = {"Mamba1": MAMBA_LM, "Mamba2": _BY_CLASS[Mamba2LMFamily.model_class]}
CUSTOM_MODEL = CustomModelFamily()


def family_of(model: nn.Module, required: bool = True) -> ModelFamily | None:
    """The family of `model` (its exact class), else the custom family when it contains this package's
    mixers (`convert_mamba_mixers`); None, or with `required` an error, for any other module."""
    family = _BY_CLASS.get(type(model)) or (CUSTOM_MODEL if contains_mixers(model) else None)
    if family is None and required:
        known = ", ".join(f.model_class.__name__ for f in FAMILIES)
        raise MQExportError(f"{type(model).__name__} is not a model family mq-export knows ({known})")
    return family


def family_for_config(config: dict, source) -> tuple[ModelFamily, bool]:
    """The family of a checkpoint directory's config.json and whether it is in HF's layout
    (`model_type`, `hidden_size`: HF transformers; `d_model` and no model_type: mamba-ssm's)."""
    model_type = config.get("model_type")
    if model_type is None:
        layer = config["ssm_cfg"].get("layer", "Mamba1") if isinstance(config.get("ssm_cfg"), dict) else "Mamba1"
        if not isinstance(layer, str) or layer not in MAMBA_SSM_LAYERS:
            raise MQExportError(f"{source}: ssm_cfg.layer {layer!r} is not supported (supported: "
                                f"{', '.join(repr(t) for t in MAMBA_SSM_LAYERS)})")
        return MAMBA_SSM_LAYERS[layer], "hidden_size" in config
    if model_type not in HF_MODEL_TYPES:
        raise MQExportError(f"{source}: model_type {model_type!r} is not supported (supported: "
                            f"{', '.join(repr(t) for t in HF_MODEL_TYPES)})")
    return HF_MODEL_TYPES[model_type], True


def is_language_model(model: nn.Module) -> bool:
    """Whether `model` is of a language-model family (token ids in, logits per position out)."""
    return family_of(model).task == LANGUAGE_MODEL
