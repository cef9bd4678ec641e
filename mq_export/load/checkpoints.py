"""Checkpoint loaders: the bundled classifier family, mamba-ssm (`config.json` + weights) and
HF `transformers` MambaForCausalLM directories, all into this package's pure-PyTorch modules.

Every failure is raised as an `MQExportError` naming the file and what is wrong with it.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import warnings
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

from ..errors import MQExportError, error_reason
from ..models.mamba import (ClassifierConfig, LMConfig, MambaLMHeadModel, MambaSequenceClassifier,
                            mixer_config_from_state, state_dims)
from ..models.family import ModelFamily
from ..models.registry import MAMBA_LM, family_for_config
from ..models.vim import VisionMamba, vim_config_from_state

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BUNDLED_CLASSIFIER = ASSETS / "mnist" / "Mamba_best.pth"


def _check_checkpoint_file(path: Path) -> None:
    """A checkpoint must be a regular file; say what `path` is when it is not."""
    if path.is_file():
        return
    if path.is_dir():
        raise MQExportError(f"checkpoint {path} is a directory; pass the checkpoint file, or for a language "
                            f"model the directory with config.json to load_checkpoint/load_lm")
    if path.exists():
        raise MQExportError(f"checkpoint {path} is not a regular file (a device, pipe or socket); pass a "
                            f".pth/.bin/.safetensors file")
    raise MQExportError(f"checkpoint {path} does not exist")


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """A state dict from a .safetensors or torch file (`weights_only=True`: no pickled code)."""
    _check_checkpoint_file(path)
    try:
        # Our error line says what is wrong; torch's own warnings about the file would only precede it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                obj = load_file(str(path))
            else:
                # hustvl/Vim's (DeiT's) training checkpoints keep their argparse settings next to the weights
                with torch.serialization.safe_globals([argparse.Namespace]):
                    obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a file that is not a checkpoint
        raise MQExportError(f"{path} is not a readable PyTorch/safetensors checkpoint ({error_reason(exc)}); "
                            f"pass a .pth/.bin/.safetensors state dict") from None
    if isinstance(obj, dict):
        obj = next((obj[k] for k in ("model_state_dict", "model") if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise MQExportError(f"{path} holds no state dict of tensors (expected a dict of tensors, "
                            f"or one under 'model_state_dict' or 'model')")
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
        _check_tensor(source, key, value, tuple(expected[key].shape))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)


def load_classifier(path: str | Path = BUNDLED_CLASSIFIER) -> MambaSequenceClassifier:
    """A checkpoint of the bundled classifier's family; layers and sizes inferred from the weights."""
    path = Path(path)
    return _classifier_from_state(_read_tensors(path), path)


def _classifier_from_state(state: dict[str, Tensor], path: Path) -> MambaSequenceClassifier:
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))}
    if "input_proj.weight" not in state or not layer_ids:
        raise MQExportError(f"{path} is not a Mamba sequence-classifier checkpoint "
                            f"(no input_proj/layers.N weights); for a language model pass its directory")
    if "classifier.weight" not in state:
        raise MQExportError(f"{path} is not a Mamba sequence-classifier checkpoint: no classifier.weight")
    cfg = ClassifierConfig(mixer=mixer_config_from_state(state, "layers.0.", path), n_layers=len(layer_ids),
                           d_input=state_dims(state, "input_proj.weight", ("d_model", "d_input"), path)[1],
                           n_classes=state_dims(state, "classifier.weight", ("n_classes", "d_model"), path)[0])
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
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise MQExportError(f"{cfg_path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise MQExportError(f"{cfg_path} is not UTF-8 text; a config.json is a JSON object") from None
    if not isinstance(cfg, dict):
        raise MQExportError(f"{cfg_path} holds a JSON {type(cfg).__name__}, not an object of settings "
                            f"({{\"d_model\": …}} or {{\"hidden_size\": …}})")
    return cfg


def _weights_file(directory: Path) -> Path:
    """The one weights file, or the index of a sharded checkpoint (`*.index.json`)."""
    for name in ("model.safetensors", SHARD_INDEX["model.safetensors"], "pytorch_model.bin",
                 SHARD_INDEX["pytorch_model.bin"]):
        if (directory / name).is_file():
            return directory / name
    raise MQExportError(f"{directory} has no model.safetensors or pytorch_model.bin, nor the index.json of "
                        f"sharded ones")


_REQUIRED = object()


def _as_integer(value, minimum: int) -> int | None:
    """`value` as an int ≥ minimum, or None. JSON has one number type, so 128.0 is 128; 128.9,
    true and "128" are not integers."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        return None
    return value


class _ConfigReader:
    """Typed reads of config.json settings, taken as JSON wrote them (no string is parsed as a
    number or a bool, null is no value); each error names the file, key, value and what is expected."""

    def __init__(self, values: dict, source: Path, prefix: str = "") -> None:
        self.values, self.source, self.prefix = values, source, prefix

    def _value(self, key: str, default):
        if key in self.values:
            return self.values[key]
        if default is _REQUIRED:
            raise MQExportError(f"{self.source} lacks {self.prefix}{key!r}")
        return default

    def _invalid(self, key: str, value, expected: str) -> MQExportError:
        text = json.dumps(value)
        text = text if len(text) <= 40 else text[:37] + "..."
        return MQExportError(f"{self.source}: {self.prefix}{key} is {text}; expected {expected}")

    def integer(self, key: str, default=_REQUIRED, minimum: int = 1) -> int:
        value = self._value(key, default)
        number = _as_integer(value, minimum)
        if number is None:
            raise self._invalid(key, value, f"an integer ≥ {minimum}")
        return number

    def integer_or_auto(self, key: str) -> int | None:
        """A dt rank: "auto" (the default) → None, else an integer ≥ 1."""
        value = self._value(key, "auto")
        if value == "auto":
            return None
        number = _as_integer(value, 1)
        if number is None:
            raise self._invalid(key, value, '"auto" or an integer ≥ 1')
        return number

    def boolean(self, key: str, default: bool) -> bool:
        value = self._value(key, default)
        if not isinstance(value, bool):
            raise self._invalid(key, value, "true or false")
        return value

    def positive_float(self, key: str, default: float) -> float:
        value = self._value(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise self._invalid(key, value, "a positive number")
        return float(value)

    def section(self, key: str) -> _ConfigReader:
        value = self._value(key, {})
        if not isinstance(value, dict):
            raise self._invalid(key, value, "an object of settings")
        return _ConfigReader(value, self.source, f"{self.prefix}{key}.")


def _renamed(state: dict, renames: dict[str, str]) -> dict:
    """`state` with each name's first matching prefix replaced (old prefix → new)."""
    def rename(key: str) -> str:
        old = next((p for p in renames if key.startswith(p)), None)
        return key if old is None else renames[old] + key[len(old):]
    return {rename(k): v for k, v in state.items()}


def hf_to_mamba_ssm_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF names → mamba-ssm names (they differ only in the embedding's name)."""
    return _renamed(state, MAMBA_LM.hf_renames)


def mamba_ssm_to_hf_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return _renamed(state, {ours: hf for hf, ours in MAMBA_LM.hf_renames.items()})


def model_config(config: dict, directory: Path) -> tuple[ModelFamily, object, bool]:
    """(family, model config, whether in HF's layout) for a checkpoint directory's parsed
    config.json `config`: what `load_lm` builds the model from (a training script that writes a
    config.json builds its model through this too)."""
    family, is_hf = family_for_config(config, directory)
    read = _ConfigReader(config, directory / "config.json")
    cfg = family.config_from_hf(read, directory) if is_hf else family.config_from_mamba_ssm(read, directory)
    return family, cfg, is_hf


def load_lm(directory: str | Path) -> MambaLMHeadModel:
    """A mamba-ssm (`MambaLMHeadModel.save_pretrained`) or HF transformers (`MambaForCausalLM`,
    `FalconMambaForCausalLM`, …: any family registered for its `model_type`) directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MQExportError(f"{directory} is not a directory; a language model is loaded from a directory "
                            f"with config.json and its weights")
    family, cfg, is_hf = model_config(_read_config(directory), directory)
    weights = _weights_file(directory)
    if weights.name in SHARD_INDEX.values():
        return load_sharded(family, cfg, weights, hf_names=is_hf)
    state = _read_tensors(weights)
    if is_hf:
        state = _renamed(state, family.hf_renames)
    model = family.build(cfg)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding is the one copy
        state["lm_head.weight"] = state.get(_tied_embedding(model), torch.empty(0))
    _load_strict(model, state, weights)
    return model.eval()


def _tied_embedding(model: nn.Module) -> str:
    """The name of the embedding weight a tied lm_head shares (backbone.embedding.weight in
    mamba-ssm's layout, model.embed_tokens.weight in Bamba's)."""
    return next(name for name, p in model.named_parameters(remove_duplicate=False)
                if p is model.lm_head.weight and name != "lm_head.weight")


# ---------------------------------------------------------------- sharded checkpoints (HF layout)

# Single weights file → the index HF writes instead when it splits the weights into shards.
SHARD_INDEX = {"model.safetensors": "model.safetensors.index.json",
               "pytorch_model.bin": "pytorch_model.bin.index.json"}


def _read_shard_index(index: Path) -> dict[str, list[str]]:
    """Shard file name → the tensor names `index` (HF: {"metadata": …, "weight_map": {name: file}})
    puts in it. Every listed shard must exist next to the index."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(v, str) for v in weight_map.values()):
        raise MQExportError(f"{index} is not a shard index: it needs a JSON object with a \"weight_map\" of "
                            f"tensor name → shard file")
    shards: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        shards.setdefault(file, []).append(name)
    for file in shards:
        if Path(file).name != file or not (index.parent / file).is_file():
            raise MQExportError(f"{index} lists shard {file!r}, which is not a file in {index.parent}; "
                                f"download every shard the index names")
    return shards


def _read_shard(path: Path, names: list[str]) -> dict[str, Tensor]:
    """The tensors `names` from one shard; a safetensors shard reads only those."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if path.suffix == ".safetensors":
                from safetensors import safe_open
                with safe_open(str(path), framework="pt") as f:
                    present = set(f.keys())
                    tensors = {name: f.get_tensor(name) for name in names if name in present}
            else:
                tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a file that is not a checkpoint
        raise MQExportError(f"shard {path} is not a readable PyTorch/safetensors file ({error_reason(exc)})") from None
    if not isinstance(tensors, dict):
        raise MQExportError(f"shard {path} holds no state dict of tensors")
    absent = [name for name in names if not isinstance(tensors.get(name), Tensor)]
    if absent:
        raise MQExportError(f"shard {path} lacks {absent[:4]}{' …' if len(absent) > 4 else ''}, which the "
                            f"index puts in it; the shard or the index is from another checkpoint")
    return {name: tensors[name] for name in names}


def _check_tensor(source: Path, key: str, value: Tensor, expected_shape: tuple[int, ...]) -> None:
    """One checkpoint tensor against the model's parameter: shape, real floating point, finite."""
    if tuple(value.shape) != tuple(expected_shape):
        raise MQExportError(f"{source}: {key} has shape {tuple(value.shape)}, the model expects "
                            f"{tuple(expected_shape)}")
    if not value.is_floating_point():
        raise MQExportError(f"{source}: {key} has dtype {value.dtype}; the model's weights are real floating "
                            f"point (dequantize the checkpoint first)")
    if not torch.isfinite(value).all():
        raise MQExportError(f"{source}: {key} contains NaN or Inf values; the checkpoint is corrupt (or was "
                            f"saved after training diverged)")


def load_sharded(family: ModelFamily, cfg: LMConfig, index: Path, hf_names: bool) -> MambaLMHeadModel:
    """The model of `cfg` with the weights of a sharded checkpoint, read shard by shard into a model
    built on the meta device: the loaded tensors become the parameters (`assign=True`), so the peak
    is the weights once plus what one shard holds beyond them, not a second copy of the model."""
    shards = _read_shard_index(index)
    with torch.device("meta"):
        model = family.build(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        embedding = _tied_embedding(model)
        del expected["lm_head.weight"]   # tied: the embedding is the one copy (a listed lm_head is skipped)
    to_model = {file: dict(zip(names, _renamed(dict.fromkeys(names), family.hf_renames) if hf_names else names))
                for file, names in shards.items()}
    listed = {key for keys in to_model.values() for key in keys.values()}
    missing, unexpected = sorted(set(expected) - listed), sorted(listed - set(expected) - {"lm_head.weight"})
    if missing or unexpected:
        parts = [f"{what} keys {keys[:4]}{' …' if len(keys) > 4 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise MQExportError(f"{index} does not match the model: {'; '.join(parts)}")
    for file, keys in sorted(to_model.items()):
        path = index.parent / file
        wanted = {name: key for name, key in keys.items() if key in expected}   # not a tied lm_head
        state = {}
        for name, value in _read_shard(path, list(wanted)).items():
            _check_tensor(path, name, value, expected[wanted[name]])
            state[wanted[name]] = value.float()
        model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.get_parameter(embedding)
    return model.eval()


def save_sharded(tensors: Iterable[tuple[str, Tensor]], directory: str | Path, max_shard_bytes: int,
                 safetensors: bool = True) -> Path:
    """Write (name, tensor) pairs as HF writes a large checkpoint: shards of at most `max_shard_bytes`
    (a larger tensor gets a shard of its own), `model-0000k-of-0000n.safetensors` (or
    `pytorch_model-0000k-of-0000n.bin`) + the index. Tensors are consumed one at a time, so a
    generator keeps at most one shard in memory. Returns the index's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem, suffix = ("model", ".safetensors") if safetensors else ("pytorch_model", ".bin")
    written: list[tuple[Path, list[str]]] = []
    total = 0

    def write(shard: dict[str, Tensor]) -> None:
        path = directory / f".shard-{len(written)}.partial"   # renamed once the shard count is known
        if safetensors:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in shard.items()}, str(path), metadata={"format": "pt"})
        else:
            torch.save(shard, path)
        written.append((path, list(shard)))

    shard: dict[str, Tensor] = {}
    shard_bytes = 0
    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            write(shard)
            shard, shard_bytes = {}, 0
        shard[name] = tensor
        shard_bytes += size
        total += size
    if shard:
        write(shard)
    del shard
    weight_map = {}
    for k, (path, names) in enumerate(written, 1):
        final = f"{stem}-{k:05d}-of-{len(written):05d}{suffix}"
        path.replace(directory / final)
        weight_map.update(dict.fromkeys(names, final))
    index = directory / SHARD_INDEX[stem + suffix]
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return index


def save_mamba_ssm(model: MambaLMHeadModel, directory: str | Path) -> None:
    """Write `config.json` + `pytorch_model.bin` in mamba-ssm's `save_pretrained` layout."""
    cfg = model.cfg
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"d_model": cfg.mixer.d_model, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size,
              **cfg.mamba_ssm_layers(), "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": cfg.rms_norm,
              "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": cfg.pad_vocab_size_multiple,
              "tie_embeddings": cfg.tie_embeddings, "norm_epsilon": cfg.norm_epsilon}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Tied weights stay under both names, as mamba-ssm saves them (its loader is strict).
    torch.save(model.state_dict(), directory / "pytorch_model.bin")


def load_vim(path: str | Path, image_size: int | None = None) -> VisionMamba:
    """A hustvl/Vim checkpoint (its state dict, or a training checkpoint with it under "model");
    sizes inferred from the weights, `image_size` overriding the one its pos_embed implies."""
    path = Path(path)
    return _vim_from_state(_read_tensors(path), path, image_size)


def _vim_from_state(state: dict[str, Tensor], path: Path, image_size: int | None) -> VisionMamba:
    model = VisionMamba(vim_config_from_state(state, path, image_size))
    _load_strict(model, state, path)
    return model.eval()


def load_checkpoint(path: str | Path, image_size: int | None = None) -> nn.Module:
    """Dispatch on what `path` is: a directory → language model, a file → Vision Mamba (hustvl/Vim
    names; `image_size` as for `load_vim`) or the classifier family."""
    path = Path(path)
    state = None if path.is_dir() else _read_tensors(path)
    if state is not None and "patch_embed.proj.weight" in state:
        return _vim_from_state(state, path, image_size)
    if image_size is not None:
        raise MQExportError(f"an image size applies to Vision Mamba checkpoints (patch_embed.proj.weight); "
                            f"{path} is not one")
    return load_lm(path) if state is None else _classifier_from_state(state, path)
