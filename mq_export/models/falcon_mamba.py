"""FalconMamba (HF transformers `model_type: falcon_mamba`, Falcon-Mamba-7B's architecture): a
Mamba-1 language model whose mixers normalise x_proj's dt, B and C with weight-free RMSNorms
(eps `mixer_rms_eps`) before dt_proj and the scan. Everything else, the state-dict names
included, is HF's Mamba layout, so this file adds only the mixer's normalisation, what that
means for the transforms, and the config.json mapping.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor

from .mamba import LMConfig, MambaLMFamily, MambaLMHeadModel, MambaMixer, MixerConfig, rms_normalize
from .topology import LinearStream, StateStream, Stream


@dataclass(frozen=True)
class FalconMambaMixerConfig(MixerConfig):
    rms_eps: float = 1e-6           # mixer_rms_eps

    def build(self) -> FalconMambaMixer:
        return FalconMambaMixer(self)


class FalconMambaMixer(MambaMixer):
    def selection(self, dt: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        eps = self.cfg.rms_eps
        return rms_normalize(dt, eps), rms_normalize(B, eps), rms_normalize(C, eps)

    def streams(self, name: str) -> list[Stream]:
        """A rotation of dt commutes with its weight-free RMSNorm (‖x·R‖ = ‖x‖), a smoothing does
        not; B and C are each normalised over the state dimension, which C·s, B/s would change,
        and the scan's decay differs per state channel, so no rotation passes the scan either."""
        return [replace(s, smoothable=False) if isinstance(s, (LinearStream, StateStream)) else s
                for s in super().streams(name)]


class FalconMambaLM(MambaLMHeadModel):
    """A causal LM with FalconMamba mixers (`cfg.mixer` a FalconMambaMixerConfig)."""


class FalconMambaFamily(MambaLMFamily):
    name = "falcon-mamba"
    model_class = FalconMambaLM
    hf_model_types = ("falcon_mamba",)

    def config_from_hf(self, read, source) -> LMConfig:
        """HF transformers' FalconMambaConfig: MambaConfig's keys and `mixer_rms_eps`."""
        return self.hf_lm_config(read, source, FalconMambaMixerConfig,
                                 rms_eps=read.positive_float("mixer_rms_eps", 1e-6))
