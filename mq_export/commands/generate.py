"""`mq-export generate`: text from a character language model, decoded by PyTorch or ONNX Runtime."""
from __future__ import annotations

from pathlib import Path

from .. import checks
from ..errors import MQExportError
from ..export.decode import export_decode
from ..models.registry import is_language_model
from ..quant.methods import QuantConfig
from ..runtime.decode import OrtDecoder, TorchDecoder, generate, teacher_forced_logits


def run_generate(model: str | Path, prompt: str, tokens: int, backend: str = "torch", greedy: bool = True,
                 quant: QuantConfig | None = None, seed: int = 0,
                 temperature: float = 1.0, onnx_dir: str | Path | None = None, compare: bool = False,
                 quiet: bool = True, force: bool = False) -> dict:
    """`mq-export generate`: text from a bundled character LM (or an LM directory with vocab.json),
    FP32 or quantized by `quant` (calibrated on the model's calibration split), decoded by
    PyTorch or by ONNX Runtime on the exported prefill/step graphs. `compare` also decodes with
    PyTorch and reports whether the greedy tokens agree and the largest per-step logit deviation
    along the generated sequence. `onnx_dir` (onnxruntime backend) keeps the two graphs there,
    written all-or-nothing like every output directory (`force`: replace a non-empty one)."""
    import tempfile
    import time

    from ..api import load
    from ..load.bundled import BUNDLED
    from ..load.charlm import CharTokenizer
    from .output import staged_output_dir
    from .pipeline import quantize_stage

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
    if not is_language_model(lm):
        raise MQExportError(f"{model} is not a language model; generate needs one")
    if spec is not None and spec.tokenizer is not None:
        tok = spec.tokenizer()
    elif spec is None and (Path(model) / "vocab.json").is_file():
        tok = CharTokenizer.load(Path(model) / "vocab.json")
    else:
        raise MQExportError(f"{model} has no character vocabulary (vocab.json); generate needs one")
    prompt_ids = tok.encode(prompt)
    result = {"model": str(model), "backend": backend, "method": quant.method if quant else "none",
              "greedy": greedy, "prompt": prompt}
    if quant is not None:
        if spec is None:
            raise MQExportError("quantized generation calibrates on a bundled model's calibration split; "
                                "pass a bundled --model")
        calib, evaluation = spec.splits(None)
        lm = quantize_stage(lm, calib, quant, exclude=(evaluation,), batch_size=spec.batch_size, quiet=quiet).model
        result.update(w_bits=quant.w_bits, a_bits=quant.a_bits)
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
