"""The `validate` command (ONNX Runtime vs PyTorch, through Polygraphy's comparator; a TensorRT
engine scored like every other backend) and what the pipeline shares with it: ONNX Runtime
logits, their errors against PyTorch, reading a user's input file."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import MQExportError, error_reason
from ..evaluate import batched_logits

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
    from ..runtime.ort import OrtForward

    session_threads = max(sess.get_session_options().intra_op_num_threads, 1)
    return batched_logits(OrtForward(sess), inputs, batch_size=batch_size, desc=desc, quiet=quiet,
                          workers=max(torch.get_num_threads() // session_threads, 1))


# ------------------------------------------------------------------ `mq-export validate`

@dataclass(frozen=True)
class Tolerances:
    """Pass criteria of `validate`: ONNX Runtime against the FP32 PyTorch model."""
    max_rel_error: float   # max |ORT − PyTorch| / max |PyTorch|
    min_agreement: float   # fraction of samples (positions, for LMs) whose argmax agrees


# An FP32 graph reproduces PyTorch up to float rounding (bundled model: rel. error 1.8e-5,
# agreement 1.0), so any real difference fails. A Q/DQ graph is compared with the FP32 model it was
# quantized from, so the bounds must admit quantization error. Measured on the bundled classifier
# (2000 images), rel. error / agreement: MambaQuant W8A8 0.17 / 0.992, W4A8 0.25 / 0.992, RTN W4A8
# 0.50 / 0.979; bundled LM, RTN W4A8, 32 windows: 0.11 / 0.962 (its README table goes down to
# 0.961, SmoothQuant W4A8). The relative error is the single worst logit, heavy-tailed under
# quantization: its bound only catches gross breakage (a wrong scale); agreement is the real gate
# (another model's graph agrees on about 1/classes of the samples).
FP32_TOLERANCES = Tolerances(max_rel_error=1e-3, min_agreement=0.999)
QDQ_TOLERANCES = Tolerances(max_rel_error=1.0, min_agreement=0.9)


def validate_engine_file(engine_path: str | Path, plugin_path: str | Path, onnx_path: str | Path,
                         model: str | Path = "mnist", data: str | Path | None = None, limit: int | None = 2000,
                         quiet: bool = False, rtol: float = 1e-2, atol: float = 1e-3) -> dict:
    """`mq-export validate --engine`: the TensorRT engine over the whole evaluation data (the same
    as `validate_onnx_file`'s), scored with the model's metrics against the FP32 PyTorch model like
    every other backend, and passed when its logits match ONNX Runtime's on the same graph within
    max |trt − ort| <= atol + rtol · max |ort| (needs TensorRT and a GPU; a clear error otherwise)."""
    import dataclasses

    from ..api import load
    from ..runtime.engine import EngineForward, OutputComparison, load_onnx
    from ..runtime.ort import int8_matmul_policy, session

    load_onnx(onnx_path)
    engine = EngineForward(engine_path, plugin_path)   # TensorRT and the GPU are checked first
    torch_model = load(model)
    inputs, labels, metrics, data_name, batch_size = _validation_data(torch_model, model, data, limit)
    batch_size = min(batch_size, engine.max_batch)
    sess = session(onnx_path, threads=1, int8_matmul=int8_matmul_policy())
    seconds = {}
    t0 = time.perf_counter()
    trt_out = batched_logits(engine, inputs, batch_size=batch_size, desc="tensorrt", quiet=quiet)
    seconds["tensorrt"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ort_out = ort_logits(sess, inputs, batch_size, "onnxruntime", quiet)
    seconds["onnxruntime"] = time.perf_counter() - t0
    comparison = OutputComparison.of(sess.get_outputs()[0].name, trt_out.numpy(), ort_out.numpy(), rtol, atol)
    result = {"engine": str(engine_path), "onnx": str(onnx_path), "model": str(model), "data": data_name,
              "samples": len(inputs)}
    if metrics is not None:
        fp32_logits = batched_logits(torch_model, inputs, batch_size=batch_size, desc="pytorch", quiet=quiet)
        result["tensorrt"] = metrics(trt_out, labels, fp32_logits)
        result["onnxruntime"] = metrics(ort_out, labels, fp32_logits)
        result["pytorch"] = metrics(fp32_logits, labels, None)
    result.update({
        "outputs": [dataclasses.asdict(comparison)],
        "passed": comparison.passed,
        "failed": [] if comparison.passed else [
            f"output {comparison.name}: max |TensorRT − ONNX Runtime| {comparison.max_abs_error:.3g} (reference max "
            f"{comparison.max_reference:.3g})"],
        "seconds": seconds})
    return result


def _validation_data(torch_model: nn.Module, model: str | Path, data: str | Path | None,
                     limit: int | None) -> tuple[Tensor, Tensor | None, object, str, int]:
    """(inputs, labels or None, metrics or None, what the inputs are, batch size) to validate on:
    `data` when given, else the bundled model's evaluation split, MNIST's for a classifier of its
    shape, random token ids for a language model."""
    from ..load.bundled import BUNDLED, bundled
    from ..load.data import mnist_splits
    from ..evaluate import classification_metrics
    from ..models.registry import is_language_model

    is_lm = is_language_model(torch_model)
    if data is not None:
        inputs = load_calibration_file(data, torch_model, role="--data")[:limit]
        return inputs, None, None, f"{Path(data).name}[0:{len(inputs)}]", 2 if is_lm else 64
    if isinstance(model, str) and model in BUNDLED:
        spec = bundled(model)
        _, evaluation = spec.splits(limit)
        return evaluation.inputs, evaluation.labels, spec.metrics, evaluation.name, spec.batch_size
    if is_lm:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, torch_model.cfg.vocab_size, (8, 128), generator=g), None, None, "random ids", 2
    if _mnist_shaped(torch_model):
        _, evaluation = mnist_splits(limit)
        return evaluation.inputs, evaluation.labels, classification_metrics, evaluation.name, 64
    cfg = torch_model.cfg
    if not hasattr(cfg, "d_input"):   # an image classifier (Vision Mamba)
        raise MQExportError(f"{model} has no bundled evaluation data; pass --data FILE: a .pt/.npy float tensor "
                            f"(n, {cfg.in_chans}, {cfg.image_size}, {cfg.image_size}) of its images")
    raise MQExportError(f"{model} has no bundled evaluation data (d_input {torch_model.cfg.d_input}, "
                        f"{torch_model.cfg.n_classes} classes); pass --data FILE: a .pt/.npy float tensor "
                        f"(n, L, {torch_model.cfg.d_input}) of its inputs")


def _mnist_shaped(model: nn.Module) -> bool:
    """A classifier that takes MNIST's pixel sequences: evaluated on the bundled MNIST split."""
    return getattr(model.cfg, "d_input", None) == 1 and model.cfg.n_classes == 10


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else str(d or "?") for d in shape) + ")"


def _check_graph_fits(sess, onnx_path: Path, model: str | Path, inputs: Tensor, reference: Tensor) -> None:
    """Refuse, before anything runs, a graph whose input or output cannot be the model's: another
    model's export, a decode graph, a different width. `reference`: PyTorch's output for inputs[:1]."""
    graph_inputs, graph_outputs = sess.get_inputs(), sess.get_outputs()
    if len(graph_inputs) != 1:
        names = ", ".join(i.name for i in graph_inputs)
        raise MQExportError(f"{onnx_path} takes {len(graph_inputs)} inputs ({names}); validate compares "
                            f"single-input graphs such as export's {ONNX_NAME}")
    takes, gives = graph_inputs[0], graph_outputs[0]

    def fits(graph_shape, shape) -> bool:   # dynamic dims fit anything; the batch dim must be dynamic
        return len(graph_shape) == len(shape) and not isinstance(graph_shape[0], int) and all(
            not isinstance(g, int) or g == d for g, d in zip(graph_shape[1:], shape[1:]))

    graph_type = takes.type.removeprefix("tensor(").removesuffix(")")   # ORT writes "tensor(float)"
    data_type = {torch.float32: "float", torch.int64: "int64"}[inputs.dtype]
    if graph_type != data_type or not fits(takes.shape, inputs.shape):
        raise MQExportError(f"{onnx_path} takes {graph_type} {_shape_text(takes.shape)} but {model}'s inputs are "
                            f"{data_type} {_shape_text(['batch', *inputs.shape[1:]])}: pass the --model it was "
                            f"exported from")
    if not fits(gives.shape, reference.shape):
        raise MQExportError(f"{onnx_path} outputs {_shape_text(gives.shape)} but {model} gives "
                            f"{_shape_text(['batch', *reference.shape[1:]])}: pass the --model it was exported from")


def validate_onnx_file(onnx_path: str | Path, model: str | Path = "mnist", limit: int | None = 2000,
                       batch_size: int | None = None, scan: str | None = None, quiet: bool = False,
                       data: str | Path | None = None, max_rel_error: float | None = None,
                       min_agreement: float | None = None) -> dict:
    """ONNX Runtime vs the FP32 PyTorch model (`model`: a bundled name or a checkpoint of the
    exported family) on `data` (.pt/.npy inputs) or the model's evaluation data: errors, argmax
    agreement, accuracy, Polygraphy's verdict, and `passed` against the tolerances (defaults
    FP32_TOLERANCES or QDQ_TOLERANCES by the graph's kind; `failed` says what missed)."""
    from ..api import load
    from ..runtime.engine import is_quantized, load_onnx
    from ..runtime.ort import int8_matmul_policy, scan_implementation, session

    onnx_path = Path(onnx_path)
    quantized = is_quantized(load_onnx(onnx_path))
    defaults = QDQ_TOLERANCES if quantized else FP32_TOLERANCES
    tolerances = Tolerances(defaults.max_rel_error if max_rel_error is None else max_rel_error,
                            defaults.min_agreement if min_agreement is None else min_agreement)
    torch_model = load(model)
    inputs, labels, metrics, data_name, default_batch = _validation_data(torch_model, model, data, limit)
    batch_size = batch_size or default_batch
    int8_matmul, scan_impl = int8_matmul_policy(), scan_implementation(scan)
    sess = session(onnx_path, scan=scan_impl, threads=1, int8_matmul=int8_matmul)
    with torch.inference_mode():
        _check_graph_fits(sess, onnx_path, model, inputs, torch_model(inputs[:1]))
    name = sess.get_inputs()[0].name
    t0 = time.perf_counter()
    ort_out = ort_logits(sess, inputs, batch_size, "onnxruntime", quiet)
    ort_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref_logits = batched_logits(torch_model, inputs, batch_size=batch_size, desc="pytorch", quiet=quiet)
    torch_seconds = time.perf_counter() - t0
    result = {"model": str(model), "onnx": str(onnx_path), "data": data_name, "samples": len(inputs),
              "graph": "Q/DQ" if quantized else "FP32",
              "scan": scan_impl.to_dict(),
              "int8_matmul": int8_matmul.to_dict()}
    if metrics is not None:
        result["onnxruntime"] = metrics(ort_out, labels, ref_logits)
        result["pytorch"] = metrics(ref_logits, labels, None)
    errors = logits_errors(ort_out, ref_logits)
    result.update(errors)
    n = min(2, (len(inputs) + batch_size - 1) // batch_size)
    feeds = [{name: inputs[i * batch_size:(i + 1) * batch_size].numpy()} for i in range(n)]
    out_name = sess.get_outputs()[0].name
    refs = [{out_name: ref_logits[i * batch_size:(i + 1) * batch_size].numpy()} for i in range(n)]
    result["polygraphy_match_1e-4"] = polygraphy_compare(sess, feeds, refs)
    rel_error, agreement = errors["max_rel_error_vs_pytorch"], errors["argmax_agreement_vs_pytorch"]
    result["checks"] = {
        "max_rel_error_vs_pytorch": {"value": rel_error, "max": tolerances.max_rel_error,
                                     "passed": rel_error <= tolerances.max_rel_error},
        "argmax_agreement_vs_pytorch": {"value": agreement, "min": tolerances.min_agreement,
                                        "passed": agreement >= tolerances.min_agreement}}
    result["failed"] = [f"{key} {check['value']:.3g} " + (f"> max {check['max']:g}" if "max" in check
                                                          else f"< min {check['min']:g}")
                        for key, check in result["checks"].items() if not check["passed"]]
    result["passed"] = not result["failed"]
    result["seconds"] = {"onnxruntime": ort_seconds, "pytorch": torch_seconds}
    return result


# ------------------------------------------------------------------ user input files

def load_calibration_file(path: str | Path, model: nn.Module, role: str = "calibration file") -> Tensor:
    """Inputs for a user's model from a file: .pt (a tensor, or a dict with one) or .npy.
    LMs: int token ids (n, L); classifiers: float inputs (n, L, d_input); at least one sample of
    length >= 1. `role` names the file in errors (export's calibration file, validate's --data)."""
    from ..quant.calibrate import model_inputs

    path = Path(path)
    if not path.is_file():
        raise MQExportError(f"{role} {path} does not exist")
    try:
        if path.suffix == ".npy":
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix in (".pt", ".pth"):
            # torch.load warns on its way to some failures; the one-line error below says it all.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(data, dict):
                tensors = [v for v in data.values() if isinstance(v, Tensor)]
                if len(tensors) != 1:
                    raise MQExportError(f"{role} {path} holds a dict with {len(tensors)} tensors; save one tensor")
                data = tensors[0]
        else:
            raise MQExportError(f"{role} {path}: use .pt or .npy (token ids (n, L) for language "
                                f"models, float inputs (n, L, d_input) for classifiers)")
    except MQExportError:
        raise
    except Exception as exc:
        raise MQExportError(f"cannot read {role} {path} ({error_reason(exc)})") from None
    if not isinstance(data, Tensor):
        raise MQExportError(f"{role} {path} does not hold a tensor")
    found = f"got {data.dtype} {tuple(data.shape)}"
    data = model_inputs(model, data, f"{role} {path}")    # the model's family says what it reads
    if data.numel() == 0:
        raise MQExportError(f"{role} {path} is empty ({found}); it needs n >= 1 and L >= 1 "
                            f"(a sample of one step at least)")
    return data
