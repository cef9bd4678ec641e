"""Checkpoint loaders: the bundled classifier family, mamba-ssm (`config.json` + weights) and
HF `transformers` MambaForCausalLM directories, all into this package's pure-PyTorch modules.

Every failure is raised as an `MQExportError` naming the file and what is wrong with it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import MQExportError
from .model import ClassifierConfig, LMConfig, MambaLMHeadModel, MambaSequenceClassifier, MixerConfig

ASSETS = Path(__file__).parent / "assets"
BUNDLED_CLASSIFIER = ASSETS / "mnist" / "Mamba_best.pth"


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """A state dict from a .safetensors or torch file (`weights_only=True`: no pickled code)."""
    if not path.is_file():
        raise MQExportError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a file that is not a checkpoint
        raise MQExportError(f"{path} is not a readable PyTorch/safetensors checkpoint "
                            f"({type(exc).__name__}); pass a .pth/.bin/.safetensors state dict") from None
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise MQExportError(f"{path} holds no state dict of tensors (expected a dict of tensors, "
                            f"or one under 'model_state_dict')")
    return obj


def _load_strict(model: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """load_state_dict with every mismatch reported in one line."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:4]}{' …' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:4]}{' …' if len(unexpected) > 4 else ''}")
        raise MQExportError(f"{source} does not match the model: {'; '.join(parts)}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise MQExportError(f"{source}: {key} has shape {tuple(value.shape)}, the model expects "
                                f"{tuple(expected[key].shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)


def _mixer_config_from_state(state: dict[str, Tensor], prefix: str, source: Path) -> MixerConfig:
    """Infer a mixer's sizes from its weights (mamba-ssm stores none of them for the classifier)."""
    try:
        d_inner2, d_model = state[f"{prefix}in_proj.weight"].shape
        d_inner, d_state = state[f"{prefix}A_log"].shape
        d_conv = state[f"{prefix}conv1d.weight"].shape[-1]
        rank = state[f"{prefix}dt_proj.weight"].shape[1]
    except KeyError as exc:
        raise MQExportError(f"{source} is not a Mamba checkpoint: no {exc.args[0]}") from None
    if d_inner2 != 2 * d_inner or d_inner % d_model:
        raise MQExportError(f"{source}: in_proj {d_inner2}x{d_model} and A_log {d_inner}x{d_state} "
                            f"do not describe a Mamba-1 mixer")
    return MixerConfig(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=d_inner // d_model,
                       dt_rank=rank, conv_bias=f"{prefix}conv1d.bias" in state,
                       bias=f"{prefix}in_proj.bias" in state)


def load_classifier(path: str | Path = BUNDLED_CLASSIFIER) -> MambaSequenceClassifier:
    """A checkpoint of the bundled classifier's family; layers and sizes inferred from the weights."""
    path = Path(path)
    state = _read_tensors(path)
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))}
    if "input_proj.weight" not in state or not layer_ids:
        raise MQExportError(f"{path} is not a Mamba sequence-classifier checkpoint "
                            f"(no input_proj/layers.N weights); for a language model pass its directory")
    cls_w = state.get("classifier.weight")
    if cls_w is None:
        raise MQExportError(f"{path} is not a Mamba sequence-classifier checkpoint: no classifier.weight")
    cfg = ClassifierConfig(mixer=_mixer_config_from_state(state, "layers.0.", path), n_layers=len(layer_ids),
                           d_input=state["input_proj.weight"].shape[1], n_classes=cls_w.shape[0])
    model = MambaSequenceClassifier(cfg)
    _load_strict(model, state, path)
    return model.eval()


# ---------------------------------------------------------------- language models

def _read_config(directory: Path) -> dict:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise MQExportError(f"{directory} has no config.json; a mamba-ssm or HF Mamba checkpoint "
                            f"directory needs one")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise MQExportError(f"{cfg_path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None


def _weights_file(directory: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    raise MQExportError(f"{directory} has no model.safetensors or pytorch_model.bin")


def lm_config_from_mamba_ssm(cfg: dict, source: Path) -> LMConfig:
    ssm = dict(cfg.get("ssm_cfg") or {})
    if ssm.pop("layer", "Mamba1") != "Mamba1" or cfg.get("attn_layer_idx") or cfg.get("d_intermediate", 0):
        raise MQExportError(f"{source}: only Mamba-1 layers without attention or MLP blocks are supported "
                            f"(ssm_cfg.layer, attn_layer_idx, d_intermediate)")
    known = {"d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias"}
    # Initialisation-only settings do not change inference.
    ignored = {"dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "use_fast_path"}
    unknown = set(ssm) - known - ignored
    if unknown:
        raise MQExportError(f"{source}: ssm_cfg settings {sorted(unknown)} are not supported")
    try:
        rank = ssm.get("dt_rank", "auto")
        mixer = MixerConfig(d_model=int(cfg["d_model"]), d_state=int(ssm.get("d_state", 16)),
                            d_conv=int(ssm.get("d_conv", 4)), expand=int(ssm.get("expand", 2)),
                            dt_rank=None if rank == "auto" else int(rank),
                            conv_bias=bool(ssm.get("conv_bias", True)), bias=bool(ssm.get("bias", False)))
        return LMConfig(mixer=mixer, n_layer=int(cfg["n_layer"]), vocab_size=int(cfg["vocab_size"]),
                        rms_norm=bool(cfg.get("rms_norm", True)),
                        norm_epsilon=float(cfg.get("norm_epsilon", 1e-5)),
                        pad_vocab_size_multiple=int(cfg.get("pad_vocab_size_multiple", 8)),
                        tie_embeddings=bool(cfg.get("tie_embeddings", True)))
    except KeyError as exc:
        raise MQExportError(f"{source}: config.json lacks {exc.args[0]!r}") from None


def lm_config_from_hf(cfg: dict, source: Path) -> LMConfig:
    if cfg.get("hidden_act", "silu") != "silu":
        raise MQExportError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    try:
        d_model = int(cfg["hidden_size"])
        rank = cfg.get("time_step_rank", "auto")
        mixer = MixerConfig(d_model=d_model, d_state=int(cfg.get("state_size", 16)),
                            d_conv=int(cfg.get("conv_kernel", 4)), expand=int(cfg.get("expand", 2)),
                            dt_rank=None if rank == "auto" else int(rank),
                            conv_bias=bool(cfg.get("use_conv_bias", True)), bias=bool(cfg.get("use_bias", False)))
        if int(cfg.get("intermediate_size", mixer.d_inner)) != mixer.d_inner:
            raise MQExportError(f"{source}: intermediate_size {cfg['intermediate_size']} is not expand × "
                                f"hidden_size = {mixer.d_inner}")
        return LMConfig(mixer=mixer, n_layer=int(cfg["num_hidden_layers"]), vocab_size=int(cfg["vocab_size"]),
                        rms_norm=True, norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)),
                        pad_vocab_size_multiple=1, tie_embeddings=bool(cfg.get("tie_word_embeddings", True)))
    except KeyError as exc:
        raise MQExportError(f"{source}: config.json lacks {exc.args[0]!r}") from None


def hf_to_mamba_ssm_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF names → mamba-ssm names (they differ only in the embedding's name)."""
    return {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in state.items()}


def mamba_ssm_to_hf_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in state.items()}


def load_lm(directory: str | Path) -> MambaLMHeadModel:
    """A mamba-ssm (`MambaLMHeadModel.save_pretrained`) or HF `MambaForCausalLM` directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MQExportError(f"{directory} is not a directory; a language model is loaded from a directory "
                            f"with config.json and its weights")
    raw = _read_config(directory)
    is_hf = raw.get("model_type") == "mamba" or "hidden_size" in raw
    if raw.get("model_type") not in (None, "mamba"):
        raise MQExportError(f"{directory}: model_type {raw['model_type']!r} is not supported (only Mamba-1, "
                            f"'mamba')")
    cfg = lm_config_from_hf(raw, directory) if is_hf else lm_config_from_mamba_ssm(raw, directory)
    weights = _weights_file(directory)
    state = _read_tensors(weights)
    if is_hf:
        state = hf_to_mamba_ssm_keys(state)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding is the one copy
        state["lm_head.weight"] = state.get("backbone.embedding.weight", torch.empty(0))
    model = MambaLMHeadModel(cfg)
    _load_strict(model, state, weights)
    return model.eval()


def save_mamba_ssm(model: MambaLMHeadModel, directory: str | Path) -> None:
    """Write `config.json` + `pytorch_model.bin` in mamba-ssm's `save_pretrained` layout."""
    cfg = model.cfg
    m = cfg.mixer
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"d_model": m.d_model, "d_intermediate": 0, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size,
              "ssm_cfg": {"layer": "Mamba1", "d_state": m.d_state, "d_conv": m.d_conv, "expand": m.expand,
                          "dt_rank": m.dt_rank if m.dt_rank is not None else "auto",
                          "conv_bias": m.conv_bias, "bias": m.bias},
              "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": cfg.rms_norm, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": cfg.pad_vocab_size_multiple,
              "tie_embeddings": cfg.tie_embeddings, "norm_epsilon": cfg.norm_epsilon}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Tied weights stay under both names, as mamba-ssm saves them (its loader is strict).
    torch.save(model.state_dict(), directory / "pytorch_model.bin")


def load_checkpoint(path: str | Path) -> nn.Module:
    """Dispatch on what `path` is: a directory → language model, a file → classifier family."""
    path = Path(path)
    if path.is_dir():
        return load_lm(path)
    if not path.exists():
        raise MQExportError(f"checkpoint {path} does not exist")
    return load_classifier(path)
