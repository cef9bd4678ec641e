"""Stateful decoding of a `MambaLMHeadModel`: PyTorch, its ONNX export, and text generation.

A Mamba-1 layer's whole memory is two tensors, so a decoder carries per layer
    conv_state (batch, d_inner, d_conv − 1): the last inputs of the causal depthwise conv,
    ssm_state  (batch, d_inner, d_state):    the selective-scan state h,
and `MambaMixer.forward(hidden, state)` continues a sequence from them (the same code as the
full-sequence forward; the scan runs with `initial_state` and `return_last_state`).

ONNX (`export_decode`), in the style of ORT GenAI / optimum past-state inputs:
    inputs   input_ids (batch, length) int64, past_conv_state.{i}, past_ssm_state.{i}
    outputs  logits (batch, length, vocab), present_conv_state.{i}, present_ssm_state.{i}
Two files from the same module: `decode_step.onnx` with length fixed to 1 (the scan function
body unrolled for one step), and `prefill.onnx` with dynamic length (scan body in chunks), which
takes the prompt with zero past states. Both hold the same custom SelectiveScan node as the
full-sequence graph, with has_initial_state=1 and return_last_state=1, and the same Q/DQ sites
and scales (they are exported from the same quantized module).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from . import checks
from .errors import MQExportError
from .model import MambaLMHeadModel

LayerState = tuple[Tensor, Tensor]          # (conv_state, ssm_state)
STEP_FILE, PREFILL_FILE = "decode_step.onnx", "prefill.onnx"


def zero_state(model: MambaLMHeadModel, batch: int) -> list[LayerState]:
    m = model.cfg.mixer
    return [(torch.zeros(batch, m.d_inner, m.d_conv - 1), torch.zeros(batch, m.d_inner, m.d_state))
            for _ in range(model.cfg.n_layer)]


def forward_with_state(model: MambaLMHeadModel, input_ids: Tensor,
                       state: list[LayerState]) -> tuple[Tensor, list[LayerState]]:
    """`model(input_ids)` continued from `state`: (logits (b, l, vocab), the state after the last token).
    The backbone's residual wiring (model.Block / MambaBackbone), passing each mixer its state."""
    backbone = model.backbone
    hidden, residual, new_state = backbone.embedding(input_ids), None, []
    for block, layer_state in zip(backbone.layers, state):
        residual = hidden if residual is None else hidden + residual
        hidden, layer_state = block.mixer(block.norm(residual), layer_state)
        new_state.append(layer_state)
    logits = model.lm_head(model.sites["lm_head"](backbone.norm_f(hidden + residual)))
    return logits, new_state


def state_names(n_layer: int, prefix: str) -> list[str]:
    """Flat state names in feed order: {prefix}_conv_state.0, {prefix}_ssm_state.0, …"""
    return [f"{prefix}_{kind}_state.{i}" for i in range(n_layer) for kind in ("conv", "ssm")]


class StatefulLM(nn.Module):
    """`forward_with_state` over flat tensors, the form an ONNX graph's inputs and outputs take."""

    def __init__(self, model: MambaLMHeadModel) -> None:
        super().__init__()
        self.model = model
        # torch.export matches dynamic shapes to forward's parameters, so they are named one by
        # one (input_ids, past_conv_state_0, …) instead of a *past that would count as one.
        names = ["input_ids", *(n.replace(".", "_") for n in state_names(model.cfg.n_layer, "past"))]

        def forward(*args: Tensor) -> tuple[Tensor, ...]:
            return self.forward_flat(*args)
        forward.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY) for n in names])
        self.forward = forward

    def forward_flat(self, input_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        state = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, present = forward_with_state(self.model, input_ids, state)
        return (logits, *(t for layer in present for t in layer))


@dataclass(frozen=True)
class DecodeExport:
    step: Path
    prefill: Path
    info: dict


def export_decode(model: MambaLMHeadModel, directory: str | Path, opset: int | None = None) -> DecodeExport:
    """Write `decode_step.onnx` and `prefill.onnx` for `model` (FP32 or fake-quantized) into `directory`."""
    from .export import export_module

    if not isinstance(model, MambaLMHeadModel):
        raise MQExportError(f"--decode needs a language model (MambaLMHeadModel), not {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n = model.cfg.n_layer
    past, present = state_names(n, "past"), state_names(n, "present")
    gen = torch.Generator().manual_seed(0)
    batch = 2
    # Example states drawn at random: zeros would let the tracer treat them as constants.
    state = [t.normal_(generator=gen) for layer in zero_state(model, batch) for t in layer]
    module = StatefulLM(model).eval()
    info = {}
    # The step graph's scan body is one unrolled step; prefill keeps the default chunking.
    for path, length, chunk in ((directory / STEP_FILE, 1, 1), (directory / PREFILL_FILE, 37, None)):
        ids = torch.randint(0, model.cfg.vocab_size, (batch, length), generator=gen)
        axes = {name: {0: "batch"} for name in past + present}
        axes["input_ids"] = {0: "batch"} if length == 1 else {0: "batch", 1: "length"}
        axes["logits"] = axes["input_ids"]
        kwargs = {} if chunk is None else {"chunk": chunk}
        _, export_info = export_module(module, (ids, *state), path, input_names=["input_ids", *past],
                                       output_names=["logits", *present], dynamic_axes=axes, opset=opset,
                                       **kwargs)
        info[path.name] = export_info.to_dict()
    return DecodeExport(directory / STEP_FILE, directory / PREFILL_FILE, info)


class TorchDecoder:
    """PyTorch decoding: `prefill(prompt ids (b, l))` then `step(ids (b, 1))`; each returns logits
    (b, l, vocab) and keeps the state."""

    def __init__(self, model: MambaLMHeadModel) -> None:
        self.model = model.eval()
        self.state: list[LayerState] = []

    @torch.inference_mode()
    def prefill(self, input_ids: Tensor) -> Tensor:
        logits, self.state = forward_with_state(self.model, input_ids, zero_state(self.model, len(input_ids)))
        return logits

    @torch.inference_mode()
    def step(self, input_ids: Tensor) -> Tensor:
        logits, self.state = forward_with_state(self.model, input_ids, self.state)
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
        batch = len(input_ids)
        zeros = [np.zeros([batch, *(d for d in i.shape[1:])], np.float32)
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


def run_generate(model: str | Path, prompt: str, tokens: int, backend: str = "torch", greedy: bool = True,
                 method: str = "none", w_bits: int = 8, a_bits: int = 8, seed: int = 0,
                 temperature: float = 1.0, onnx_dir: str | Path | None = None, compare: bool = False,
                 quiet: bool = True, force: bool = False) -> dict:
    """`mq-export generate`: text from a bundled character LM (or an LM directory with vocab.json),
    FP32 or quantized with `method` (calibrated on the model's calibration split), decoded by
    PyTorch or by ONNX Runtime on the exported prefill/step graphs. `compare` also decodes with
    PyTorch and reports whether the greedy tokens agree and the largest per-step logit deviation
    along the generated sequence. `onnx_dir` (onnxruntime backend) keeps the two graphs there,
    written all-or-nothing like every output directory (`force`: replace a non-empty one)."""
    import tempfile
    import time

    from .api import calibrate, load, quantize
    from .bundled import BUNDLED
    from .charlm import CharTokenizer
    from .output import staged_output_dir

    if backend not in ("torch", "onnxruntime"):
        raise MQExportError(f"unknown backend {backend!r}; choose torch or onnxruntime")
    checks.require("--tokens", checks.positive_int, tokens)
    checks.require("--seed", checks.seed, seed)
    checks.require("--temperature", checks.temperature, temperature)
    if backend != "onnxruntime" and (compare or onnx_dir is not None):
        option = "--compare" if compare else "--onnx-dir"
        raise MQExportError(f"{option} applies to ONNX Runtime decoding; add --backend onnxruntime")
    spec = BUNDLED.get(str(model))
    lm = load(model)
    if not isinstance(lm, MambaLMHeadModel):
        raise MQExportError(f"{model} is not a language model; generate needs a MambaLMHeadModel")
    if spec is not None and spec.tokenizer is not None:
        tok = spec.tokenizer()
    elif spec is None and (Path(model) / "vocab.json").is_file():
        tok = CharTokenizer.load(Path(model) / "vocab.json")
    else:
        raise MQExportError(f"{model} has no character vocabulary (vocab.json); generate needs one")
    prompt_ids = tok.encode(prompt)
    result = {"model": str(model), "backend": backend, "method": method, "greedy": greedy, "prompt": prompt}
    if method != "none":
        if spec is None:
            raise MQExportError("quantized generation calibrates on a bundled model's calibration split; "
                                "pass a bundled --model")
        calib, evaluation = spec.splits(None)
        stats = calibrate(lm, calib, exclude=(evaluation,), batch_size=spec.batch_size, quiet=quiet)
        lm, _ = quantize(lm, stats, method=method, w_bits=w_bits, a_bits=a_bits, quiet=quiet)
        result.update(w_bits=w_bits, a_bits=a_bits)
    torch_decoder = TorchDecoder(lm)
    if backend == "onnxruntime" and onnx_dir is not None:
        graphs = staged_output_dir(onnx_dir, force, inputs=() if spec is not None else (model,))
    else:
        graphs = tempfile.TemporaryDirectory()
    with graphs as graph_dir:
        if backend == "onnxruntime":
            ex = export_decode(lm, graph_dir)
            decoder = OrtDecoder(ex.step, ex.prefill)
        else:
            decoder = torch_decoder
        t0 = time.perf_counter()
        new, _ = generate(decoder, prompt_ids, tokens, len(tok), greedy, temperature, seed)
        result["seconds"] = time.perf_counter() - t0
        if compare and backend == "onnxruntime":
            ort_logits = teacher_forced_logits(decoder, prompt_ids, new, len(tok))
            ref_logits = teacher_forced_logits(torch_decoder, prompt_ids, new, len(tok))
            torch_tokens, _ = generate(torch_decoder, prompt_ids, tokens, len(tok), greedy, temperature, seed)
            result["compare_torch"] = {"tokens_equal": torch_tokens == new,
                                       "first_difference": next((i for i, (a, b) in enumerate(zip(torch_tokens, new))
                                                                 if a != b), None),
                                       "max_abs_logit_deviation": float((ort_logits - ref_logits).abs().max())}
    result["tokens"] = new
    result["text"] = prompt + tok.decode(new)
    return result


def check_decode(model: MambaLMHeadModel, ex: DecodeExport, input_ids: Tensor, prefix: int = 8) -> dict:
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
