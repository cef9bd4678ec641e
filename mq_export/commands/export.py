"""`mq-export export`: a user's checkpoint → DIR/model.onnx + DIR/report.json, through the pipeline."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import MQExportError
from ..quant.methods import QUANTIZING_METHODS, QuantConfig
from .pipeline import Calibration, Evaluation, Job, run_pipeline
from .report import Report
from .validate import _mnist_shaped, load_calibration_file


def run_export(checkpoint: str | Path, out: str | Path, quant: QuantConfig | None = None,
               calib: str | Path | None = None, opset: int | None = None, limit: int | None = None,
               force: bool = False, quiet: bool = False, decode: bool = False,
               image_size: int | None = None) -> Report:
    """`mq-export export`: `checkpoint` exported (FP32, or quantized by `quant` after calibrating on
    the `calib` file) into `out` (`decode`: also the stateful prefill.onnx and decode_step.onnx of
    a language model, see export/decode.py; `image_size`: a Vision Mamba's, where its pos_embed
    does not say it)."""
    from ..evaluate import classification_metrics
    from ..load.checkpoints import load_checkpoint
    from ..load.data import mnist_splits
    from ..models.registry import family_of, is_language_model
    from .output import staged_output_dir

    if quant is not None and calib is None:
        raise MQExportError(f"--method {quant.method} calibrates: pass --calib FILE (.pt/.npy: token ids (n, L) "
                            f"for language models, float inputs (n, L, d_input) for classifiers)")
    if opset is not None and not 18 <= opset <= 21:
        raise MQExportError(f"opset {opset} is not supported; choose 18–21 (21 for INT4 weights)")
    t0 = time.perf_counter()
    model = load_checkpoint(checkpoint, image_size)   # rejects bad checkpoints before anything is written
    is_lm = is_language_model(model)
    # Without a method the file only stands in for evaluation data, which a classifier of MNIST's
    # shape has bundled: there it would be read for nothing, most likely a forgotten --method.
    if quant is None and calib is not None and not is_lm and _mnist_shaped(model):
        raise MQExportError(f"--calib is only used to calibrate a quantization method and this classifier is "
                            f"evaluated on the bundled MNIST split: add --method ({', '.join(QUANTIZING_METHODS)}) "
                            f"or drop --calib")
    calib_inputs = load_calibration_file(calib, model) if calib is not None else None
    if decode and not is_lm:
        raise MQExportError(f"--decode exports a language model's step graph; {checkpoint} is a classifier")
    if decode:
        family_of(model).state_layout(model)   # a family without decode state refuses here, before any work
    with staged_output_dir(out, force, inputs=(checkpoint, calib)) as staging:
        if is_lm:
            g = torch.Generator().manual_seed(0)
            inputs = calib_inputs[:8] if calib_inputs is not None else \
                torch.randint(0, model.cfg.vocab_size, (4, 64), generator=g)
            evaluation = Evaluation(inputs, "calibration sample" if calib else "random ids", batch_size=2)
        elif _mnist_shaped(model):
            _, split = mnist_splits(limit)
            # exclude: a user's calibration file must not overlap the images scored here
            evaluation = Evaluation(split.inputs, split.name, 64, split.labels, classification_metrics,
                                    exclude=(split,))
        else:
            if calib_inputs is None:
                raise MQExportError("this classifier has no bundled evaluation data; pass --calib FILE to "
                                    "compare ONNX Runtime with PyTorch on its inputs")
            evaluation = Evaluation(calib_inputs[:256], "calibration sample", batch_size=64)
        return run_pipeline(Job(
            model=model, name=str(checkpoint), evaluation=evaluation, config=quant,
            calibration=Calibration(calib_inputs, str(calib)) if quant is not None else None,
            load_seconds=time.perf_counter() - t0, opset=opset, decode=decode, quiet=quiet), staging)
