"""ONNX stages of the pipeline: export + ONNX Runtime evaluation for `demo`/`export`, and the
`validate` command (ONNX Runtime vs PyTorch, through Polygraphy's comparator)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .errors import MQExportError
from .evaluate import batched_logits, progress_enabled

ONNX_NAME = "model.onnx"


def logits_errors(logits: Tensor, reference: Tensor) -> dict:
    """Max abs / max rel (to the reference's max magnitude) error and argmax agreement."""
    diff = (logits.double() - reference.double()).abs()
    return {"max_abs_error_vs_pytorch": float(diff.max()),
            "max_rel_error_vs_pytorch": float(diff.max() / reference.double().abs().max().clamp_min(1e-30)),
            "argmax_agreement_vs_pytorch": float((logits.argmax(-1) == reference.argmax(-1)).double().mean())}


def polygraphy_compare(session, feeds: list[dict[str, np.ndarray]], reference: list[dict[str, np.ndarray]],
                       rtol: float = 1e-4, atol: float = 1e-4) -> bool:
    """Polygraphy's accuracy comparison of our ORT session (wrapped in OnnxrtRunner, so a session
    with the custom-op kernel works too) against PyTorch outputs for the same feeds."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult, RunResults
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL
    runner = OnnxrtRunner(session, name="onnxruntime")
    results = Comparator.run([runner], data_loader=feeds)
    ref = RunResults()
    ref.append(("pytorch", [IterationResult(outputs=dict(r), runner_name="pytorch") for r in reference]))
    results.extend(ref)
    # atol relative to the reference's magnitude: logits near zero would fail any pure rtol test.
    scale = max(float(np.abs(r[k]).max()) for r in reference for k in r)
    accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(rtol=rtol, atol=atol * scale))
    return bool(accuracy)


def ort_logits(sess, inputs: Tensor, batch_size: int, desc: str, quiet: bool) -> Tensor:
    """Logits of an ORT session, with as many batches in flight as the session's intra-op threads
    leave cores free. Callers build it with one thread (`session(..., threads=1)`): on the shared
    2-core machine one batch per core ran 1.3–2× faster than one 2-thread session, which
    synchronises its threads at every node of the scan's function body."""
    from .ort import OrtForward

    session_threads = max(sess.get_session_options().intra_op_num_threads, 1)
    return batched_logits(OrtForward(sess), inputs, batch_size=batch_size, desc=desc, quiet=quiet,
                          workers=max(torch.get_num_threads() // session_threads, 1))


def onnx_stage(model: nn.Module, inputs: Tensor, staging: Path, reference_logits: Tensor, *,
               labels: Tensor | None = None, metrics=None, fp32_logits: Tensor | None = None,
               batch_size: int = 64, quiet: bool = False, opset: int | None = None,
               desc: str = "onnxruntime") -> tuple[dict, dict, dict]:
    """Export `model` to staging/model.onnx and run it in ONNX Runtime over `inputs`.

    Returns (onnxruntime metrics block, export info, seconds). `reference_logits` are PyTorch's for
    the same model (fp32 or fake-quant); `metrics(logits, labels, fp32_logits)` scores when given.
    """
    from .export import export_onnx
    from .ort import session

    seconds = {}
    t0 = time.perf_counter()
    _, info = export_onnx(model, staging / ONNX_NAME, opset=opset)
    seconds["export_onnx"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = ort_logits(session(staging / ONNX_NAME, threads=1), inputs, batch_size, desc, quiet)
    seconds["onnxruntime"] = time.perf_counter() - t0
    block = dict(metrics(logits, labels, fp32_logits)) if metrics is not None and labels is not None else {}
    block.update(logits_errors(logits, reference_logits))
    return block, info.to_dict(), seconds


# ------------------------------------------------------------------ `mq-export validate`

def validate_engine_file(engine_path: str | Path, plugin_path: str | Path, onnx_path: str | Path,
                         model: str = "mnist", batch: int = 64) -> dict:
    """`mq-export validate --engine`: the TensorRT engine against ONNX Runtime on one batch of the
    bundled model's evaluation data (needs TensorRT and a GPU; a clear error otherwise)."""
    import dataclasses

    import onnx

    from .bundled import bundled
    from .engine import validate_engine

    _, evaluation = bundled(model).splits(batch)
    input_name = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].name
    comparisons = validate_engine(engine_path, plugin_path, onnx_path, {input_name: evaluation.inputs.numpy()})
    return {"engine": str(engine_path), "onnx": str(onnx_path), "samples": len(evaluation),
            "outputs": [dataclasses.asdict(c) for c in comparisons],
            "passed": all(c.passed for c in comparisons)}


def validate_onnx_file(onnx_path: str | Path, model: str = "mnist", limit: int | None = 2000,
                       batch_size: int = 64, scan_kernel: bool = False, quiet: bool = False) -> dict:
    """ONNX Runtime on the evaluation data vs the FP32 PyTorch model (`model`: a bundled name or a
    checkpoint of the exported family). Errors, argmax agreement, accuracy, Polygraphy's verdict."""
    from .api import load
    from .bundled import BUNDLED, bundled
    from .model import MambaLMHeadModel
    from .ort import session

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise MQExportError(f"{onnx_path} does not exist; pass the model.onnx that export/demo wrote")
    sess = session(onnx_path, scan_kernel=scan_kernel, threads=1)
    torch_model = load(model)
    labels = None
    if model in BUNDLED:
        spec = bundled(model)
        _, evaluation = spec.splits(limit)
        inputs, labels, metrics = evaluation.inputs, evaluation.labels, spec.metrics
    elif isinstance(torch_model, MambaLMHeadModel):
        g = torch.Generator().manual_seed(0)
        inputs, metrics = torch.randint(0, torch_model.cfg.vocab_size, (8, 128), generator=g), None
        batch_size = 2
    else:
        raise MQExportError(f"no evaluation data for {model}; validate bundled models or language models")
    name = sess.get_inputs()[0].name
    t0 = time.perf_counter()
    ort_out = ort_logits(sess, inputs, batch_size, "onnxruntime", quiet)
    ort_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref_logits = batched_logits(torch_model, inputs, batch_size=batch_size, desc="pytorch", quiet=quiet)
    torch_seconds = time.perf_counter() - t0
    result = {"model": str(model), "onnx": str(onnx_path), "samples": len(inputs),
              "scan": "registered kernel" if scan_kernel else "function body"}
    if metrics is not None:
        result["onnxruntime"] = metrics(ort_out, labels, ref_logits)
        result["pytorch"] = metrics(ref_logits, labels, None)
    result.update(logits_errors(ort_out, ref_logits))
    n = min(2, (len(inputs) + batch_size - 1) // batch_size)
    feeds = [{name: inputs[i * batch_size:(i + 1) * batch_size].numpy()} for i in range(n)]
    out_name = sess.get_outputs()[0].name
    refs = [{out_name: ref_logits[i * batch_size:(i + 1) * batch_size].numpy()} for i in range(n)]
    result["polygraphy_match_1e-4"] = polygraphy_compare(sess, feeds, refs)
    result["seconds"] = {"onnxruntime": ort_seconds, "pytorch": torch_seconds}
    return result


# ------------------------------------------------------------------ `mq-export export`

def load_calibration_file(path: str | Path, model: nn.Module) -> Tensor:
    """Calibration inputs for a user's model: .pt (a tensor, or a dict with one) or .npy.
    LMs: int token ids (n, L); classifiers: float inputs (n, L, d_input)."""
    from .model import MambaLMHeadModel, MambaSequenceClassifier

    path = Path(path)
    if not path.is_file():
        raise MQExportError(f"calibration file {path} does not exist")
    try:
        if path.suffix == ".npy":
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix in (".pt", ".pth"):
            data = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(data, dict):
                tensors = [v for v in data.values() if isinstance(v, Tensor)]
                if len(tensors) != 1:
                    raise MQExportError(f"{path} holds a dict with {len(tensors)} tensors; save one tensor")
                data = tensors[0]
        else:
            raise MQExportError(f"calibration file {path}: use .pt or .npy (token ids (n, L) for language "
                                f"models, float inputs (n, L, d_input) for classifiers)")
    except MQExportError:
        raise
    except Exception as exc:
        raise MQExportError(f"cannot read calibration file {path} ({type(exc).__name__})") from None
    if not isinstance(data, Tensor):
        raise MQExportError(f"{path} does not hold a tensor")
    if isinstance(model, MambaLMHeadModel):
        if data.dim() != 2 or data.is_floating_point():
            raise MQExportError(f"{path}: a language model calibrates on int token ids (n, L), got "
                                f"{data.dtype} {tuple(data.shape)}")
        if data.numel() and (data.min() < 0 or data.max() >= model.cfg.vocab_size):
            raise MQExportError(f"{path}: token ids outside [0, {model.cfg.vocab_size})")
        return data.long()
    if isinstance(model, MambaSequenceClassifier):
        if data.dim() != 3 or data.shape[-1] != model.cfg.d_input or not data.is_floating_point():
            raise MQExportError(f"{path}: this classifier calibrates on float inputs (n, L, "
                                f"{model.cfg.d_input}), got {data.dtype} {tuple(data.shape)}")
        return data.float()
    raise MQExportError(f"no calibration format for {type(model).__name__}")


def run_export(checkpoint: str | Path, out: str | Path, method: str = "none", calib: str | Path | None = None,
               w_bits: int = 8, a_bits: int = 8, opset: int | None = None, limit: int | None = None,
               force: bool = False, quiet: bool = False, w_group_size: int | None = None, decode: bool = False):
    """`mq-export export`: a user's checkpoint → DIR/model.onnx + DIR/report.json (`decode`: also the
    stateful prefill.onnx and decode_step.onnx of a language model, see decode.py)."""
    from .data import mnist_splits
    from .evaluate import classification_metrics
    from .loaders import load_checkpoint
    from .model import MambaLMHeadModel
    from .output import staged_output_dir
    from .report import Report

    if method != "none" and calib is None:
        raise MQExportError(f"--method {method} calibrates: pass --calib FILE (.pt/.npy: token ids (n, L) "
                            f"for language models, float inputs (n, L, d_input) for classifiers)")
    if opset is not None and not 18 <= opset <= 21:
        raise MQExportError(f"opset {opset} is not supported; choose 18–21 (21 for INT4 weights)")
    t0 = time.perf_counter()
    model = load_checkpoint(checkpoint)   # rejects bad checkpoints before anything is written
    calib_inputs = load_calibration_file(calib, model) if calib is not None else None
    is_lm = isinstance(model, MambaLMHeadModel)
    if decode and not is_lm:
        raise MQExportError(f"--decode exports a language model's step graph; {checkpoint} is a classifier")
    with staged_output_dir(out, force) as staging:
        labels, metrics, exclude = None, None, ()
        if is_lm:
            g = torch.Generator().manual_seed(0)
            inputs = calib_inputs[:8] if calib_inputs is not None else \
                torch.randint(0, model.cfg.vocab_size, (4, 64), generator=g)
            eval_info, batch = {"samples": len(inputs), "split": "calibration sample" if calib else "random ids"}, 2
        elif model.cfg.d_input == 1 and model.cfg.n_classes == 10:
            _, evaluation = mnist_splits(limit)
            inputs, labels, metrics = evaluation.inputs, evaluation.labels, classification_metrics
            exclude = (evaluation,)   # a user's calibration file must not overlap the images scored here
            eval_info, batch = {"samples": len(evaluation), "split": evaluation.name}, 64
        else:
            if calib_inputs is None:
                raise MQExportError("this classifier has no bundled evaluation data; pass --calib FILE to "
                                    "compare ONNX Runtime with PyTorch on its inputs")
            inputs = calib_inputs[:256]
            eval_info, batch = {"samples": len(inputs), "split": "calibration sample"}, 64
        report = Report(model=str(checkpoint), method=method, w_bits=w_bits if method != "none" else 32,
                        a_bits=a_bits if method != "none" else 32,
                        calibration={"samples": 0 if calib_inputs is None else len(calib_inputs),
                                     "split": str(calib) if calib else "none"}, eval=eval_info)
        report.seconds["load"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fp32_logits = batched_logits(model, inputs, batch_size=batch, desc="fp32", quiet=quiet)
        report.seconds["fp32"] = time.perf_counter() - t0
        report.backends["fp32"] = metrics(fp32_logits, labels, None) if metrics else {}
        reference = fp32_logits
        if method != "none":
            from .quantize import QuantConfig
            from .stages import quantize_stage
            model, reference, _ = quantize_stage(
                model, calib_inputs, inputs, QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits,
                                                         w_group_size=w_group_size), report,
                labels=labels, metrics=metrics, fp32_logits=fp32_logits, exclude=exclude, batch_size=batch,
                quiet=quiet)
        block, info, seconds = onnx_stage(model, inputs, staging, reference, labels=labels, metrics=metrics,
                                          fp32_logits=fp32_logits if method != "none" else None,
                                          batch_size=batch, quiet=quiet, opset=opset)
        report.backends["onnxruntime"] = block
        report.settings["onnx"] = info
        report.seconds.update(seconds)
        report.artifacts["onnx"] = ONNX_NAME
        if decode:
            from .decode import check_decode, export_decode
            t0 = time.perf_counter()
            ex = export_decode(model, staging, opset=opset)
            report.settings["decode"] = {**ex.info, "check": check_decode(model, ex, inputs[:2, :32])}
            report.seconds["export_decode"] = time.perf_counter() - t0
            report.artifacts["decode_step"], report.artifacts["prefill"] = ex.step.name, ex.prefill.name
        report.artifacts["report"] = "report.json"
        (staging / "report.json").write_text(report.to_json())
    return report
