"""Decoding a language model with a decode state (the Mamba LMs, the hybrids) token by token, in
PyTorch or in ONNX Runtime over the graphs of `export.decode`, behind one interface (`prefill`,
then `step`), and text generation over it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import MQExportError
from ..export.decode import BATCH, DecodeExport


class TorchDecoder:
    """PyTorch decoding: `prefill(prompt ids (b, l))` then `step(ids (b, 1))`; each returns logits
    (b, l, vocab) and keeps the state."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self.state: list[tuple[Tensor, ...]] = []

    @torch.inference_mode()
    def prefill(self, input_ids: Tensor) -> Tensor:
        logits, self.state = self.model(input_ids, self.model.zero_state(len(input_ids)))
        return logits

    @torch.inference_mode()
    def step(self, input_ids: Tensor) -> Tensor:
        logits, self.state = self.model(input_ids, self.state)
        return logits


class OrtDecoder:
    """ONNX Runtime decoding over `prefill.onnx` and `decode_step.onnx` (same interface as TorchDecoder)."""

    def __init__(self, step: str | Path, prefill: str | Path, threads: int | None = None) -> None:
        from .ort import session

        self.step_session = session(step, threads=threads)
        self.prefill_session = session(prefill, threads=threads)
        self.past = [i.name for i in self.step_session.get_inputs()[1:]]
        self.present = [o.name for o in self.step_session.get_outputs()[1:]]
        self.state: list[np.ndarray] = []

    def _run(self, sess, input_ids: Tensor, state: list[np.ndarray]) -> Tensor:
        feed = {"input_ids": input_ids.numpy().astype(np.int64), **dict(zip(self.past, state))}
        logits, *self.state = sess.run(["logits", *self.present], feed)
        return torch.from_numpy(logits)

    def prefill(self, input_ids: Tensor) -> Tensor:
        """The prompt from zero states: the batch dimension the prompt's, every other named
        dimension (a cache's past_length) 0."""
        batch = len(input_ids)
        zeros = [np.zeros([batch if d == BATCH else 0 if isinstance(d, str) else d for d in i.shape], np.float32)
                 for i in self.prefill_session.get_inputs()[1:]]
        return self._run(self.prefill_session, input_ids, zeros)

    def step(self, input_ids: Tensor) -> Tensor:
        return self._run(self.step_session, input_ids, self.state)


def generate(decoder, prompt_ids: Tensor, tokens: int, vocab_size: int, greedy: bool = True,
             temperature: float = 1.0, seed: int = 0) -> tuple[list[int], Tensor]:
    """Continue `prompt_ids` (1-D) by `tokens` tokens: (new token ids, the logits each was chosen
    from (tokens, vocab_size)). Logits of padded vocabulary rows are ignored."""
    if len(prompt_ids) == 0:
        raise MQExportError("the prompt is empty; generation needs at least one token to start from")
    gen = torch.Generator().manual_seed(seed)
    logits = decoder.prefill(prompt_ids[None])[0, -1, :vocab_size]
    out, chosen_from = [], []
    for _ in range(tokens):
        chosen_from.append(logits)
        if greedy:
            token = int(logits.argmax())
        else:
            token = int(torch.multinomial(torch.softmax(logits.double() / temperature, -1), 1, generator=gen))
        out.append(token)
        logits = decoder.step(torch.tensor([[token]]))[0, -1, :vocab_size]
    return out, torch.stack(chosen_from) if chosen_from else torch.empty(0, vocab_size)


def teacher_forced_logits(decoder, prompt_ids: Tensor, tokens: list[int], vocab_size: int) -> Tensor:
    """The logits `decoder` gives before each of `tokens` when fed exactly that sequence: compares
    two backends along one path even where their choices would diverge."""
    logits = [decoder.prefill(prompt_ids[None])[0, -1, :vocab_size]]
    for token in tokens[:-1]:
        logits.append(decoder.step(torch.tensor([[token]]))[0, -1, :vocab_size])
    return torch.stack(logits)


def check_decode(model: nn.Module, ex: DecodeExport, input_ids: Tensor, prefix: int = 8) -> dict:
    """Prefill `prefix` tokens of `input_ids` (b, l) with prefill.onnx, step through the rest with
    decode_step.onnx, and compare every logit with the PyTorch full-sequence forward."""
    with torch.inference_mode():
        reference = model(input_ids)
    decoder = OrtDecoder(ex.step, ex.prefill)
    pieces = [decoder.prefill(input_ids[:, :prefix])]
    pieces += [decoder.step(input_ids[:, t:t + 1]) for t in range(prefix, input_ids.shape[1])]
    error = (torch.cat(pieces, 1) - reference).abs()
    return {"tokens": int(input_ids.numel()), "prefill_tokens": prefix,
            "max_abs_error_vs_pytorch": float(error.max()),
            "argmax_agreement_vs_pytorch": float((torch.cat(pieces, 1).argmax(-1) == reference.argmax(-1))
                                                 .double().mean())}
