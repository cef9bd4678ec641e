"""`mq-export` command line. Parses arguments and wires the API stages; no logic of its own."""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from .. import checks
from ..errors import MQExportError

if TYPE_CHECKING:
    from ..quant.methods import QuantConfig


class _ArgumentParser(argparse.ArgumentParser):
    """Usage errors as one line `mq-export: error: …`, exit status 2, like every other input error
    (argparse's default is the usage text and a `PROG: error:` line). Subparsers are built from
    this class too (add_subparsers defaults to the parent's class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"mq-export: error: {message}\n")


def _option(convert, check):
    """An argparse `type`: the text converted by `convert` (int or float), then checked by a shared
    `checks` function; a complaint becomes argparse's one-line "argument --X: must be …"."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if convert is int else 'a number'}, "
                                             f"got {text!r}") from None
        try:
            return check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


POSITIVE_INT = _option(int, checks.positive_int)
SEED = _option(int, checks.seed)


def add_quantization_options(parser: argparse.ArgumentParser, seed_option: str = "--seed",
                             description: str | None = None) -> None:
    """The options of every command that quantizes (demo, export, generate), as one argument group;
    `quant_config` turns them into the validated QuantConfig. `seed_option`: generate's --seed
    seeds sampling, so there the rotation seed is --quant-seed."""
    from ..quant.methods import A_BITS, CALIBRATOR_CHOICES, METHODS, W_BITS

    group = parser.add_argument_group("quantization", description)
    group.add_argument("--method", default="none", choices=tuple(METHODS),
                       help="; ".join(f"{name}: {method.label}" for name, method in METHODS.items()))
    group.add_argument("--w-bits", type=int, default=8, choices=W_BITS)
    group.add_argument("--a-bits", type=int, default=8, choices=A_BITS)
    group.add_argument("--w-group-size", type=POSITIVE_INT, default=None, metavar="G",
                       help="weight blocks of G along the input dimension (e.g. 64, 128 for TensorRT INT4)")
    group.add_argument("--calibrator", default="auto", choices=CALIBRATOR_CHOICES,
                       help="activation range calibrator; auto picks by KL to FP32 on calibration data")
    group.add_argument("--alpha", type=_option(float, checks.fraction), default=0.5,
                       help="smoothing strength α in [0, 1] (default 0.5)")
    group.add_argument(seed_option, dest="quant_seed", type=SEED, default=0, metavar="SEED",
                       help="seed of every random Hadamard sign, in [0, 2**64) (default 0)")
    group.add_argument("--asymmetric", action="store_true",
                       help="asymmetric activations (zero point ≠ 0: ONNX Runtime only, not TensorRT)")
    group.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=None,
                       help="GPTQ weight rounding (default: on for --w-bits 4, off for 8)")


def quant_config(args: argparse.Namespace) -> QuantConfig | None:
    """The QuantConfig of the parsed quantization options; None for --method none."""
    from ..quant.methods import METHODS, QuantConfig

    if not METHODS[args.method].quantizes:
        return None
    return QuantConfig(method=args.method, w_bits=args.w_bits, a_bits=args.a_bits, calibrator=args.calibrator,
                       asymmetric=args.asymmetric, w_group_size=args.w_group_size, gptq=args.gptq,
                       alpha=args.alpha, seed=args.quant_seed)


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo
    report = run_demo(DemoConfig(out=Path(args.output), model=args.model, quant=quant_config(args),
                                 limit=args.limit, force=args.force, quiet=args.json, plot=args.plot))
    print(report.to_json() if args.json else report.table(), end="" if args.json else "\n")
    return 0


def _build_ort_ops(args: argparse.Namespace) -> int:
    from ..runtime import ort_native
    path = ort_native.build(force=args.force)
    print(f"{path} (ONNX Runtime headers: {ort_native.find_headers()})")
    return 0


def _build_engine(args: argparse.Namespace) -> int:
    from ..runtime.engine import build_engine, equivalent_commands, parse_profile
    profiles = [parse_profile(text) for text in args.profile] or [{}]
    if args.print_commands:
        for name, line in equivalent_commands(args.model, args.plugin, args.output, args.fp16, profiles[0]).items():
            print(f"{name}: {line}")
        return 0
    out = build_engine(args.model, args.plugin, args.output, fp16=args.fp16, profiles=profiles,
                       workspace_bytes=args.workspace_mb * 2**20 if args.workspace_mb else None)
    print(f"wrote {out}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from .report import json_text
    from .validate import validate_engine_file, validate_onnx_file
    if args.engine:
        if not args.plugin:
            raise MQExportError("--engine needs --plugin PATH (libmq_trt_plugins.so from plugins/)")
        result = validate_engine_file(args.engine, args.plugin, args.onnx, model=args.model, data=args.data,
                                      limit=args.limit, quiet=args.json)
    else:
        result = validate_onnx_file(args.onnx, model=args.model, data=args.data, limit=args.limit,
                                    scan=args.scan, quiet=args.json,
                                    max_rel_error=args.max_rel_error, min_agreement=args.min_agreement)
    print(json_text(result, "validate result"))
    if result["passed"]:
        return 0
    # Exit 1, not 2: the input was fine, the model missed the tolerances; pipelines gate on it.
    print(f"mq-export: validation failed: {'; '.join(result['failed'])}", file=sys.stderr)
    return 1


def _export(args: argparse.Namespace) -> int:
    from .export import run_export
    report = run_export(args.checkpoint, Path(args.output), quant=quant_config(args), calib=args.calib,
                        opset=args.opset, limit=args.limit, force=args.force, quiet=args.json, decode=args.decode,
                        image_size=args.image_size)
    print(report.to_json() if args.json else report.table(), end="" if args.json else "\n")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .generate import run_generate
    from .report import json_text
    result = run_generate(args.model, args.prompt, args.tokens, backend=args.backend, greedy=args.greedy,
                          quant=quant_config(args), seed=args.seed,
                          temperature=args.temperature, onnx_dir=args.onnx_dir, compare=args.compare,
                          force=args.force)
    print(json_text(result, "generate result") if args.json else result["text"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    from ..load.bundled import BUNDLED
    from .validate import FP32_TOLERANCES, QDQ_TOLERANCES
    parser = _ArgumentParser(prog="mq-export", description="Post-training quantization and "
                             "deployment export for Mamba models (MambaQuant).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('mq-export')}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the pipeline on a bundled model and write DIR/report.json")
    demo.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    demo.add_argument("--model", default="mnist", help=f"bundled model ({', '.join(sorted(BUNDLED))})")
    demo.add_argument("--limit", type=POSITIVE_INT, default=None, metavar="N",
                      help="evaluate on the first N samples of the evaluation split (images or text windows)")
    demo.add_argument("--json", action="store_true", help="print report.json to stdout (no progress bars)")
    demo.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    demo.add_argument("--plot", action="store_true", help="write DIR/activation_ranges.png")
    add_quantization_options(demo)
    demo.set_defaults(func=_demo)

    export = sub.add_parser("export", help="export a checkpoint (a mamba-ssm or HF directory of a Mamba, Mamba-2 or "
                            "hybrid LM, a classifier state dict of the bundled family, a hustvl/Vim .pth) to "
                            "DIR/model.onnx with DIR/report.json")
    export.add_argument("checkpoint", metavar="CHECKPOINT")
    export.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    export.add_argument("--calib", default=None, metavar="FILE", help=".pt/.npy calibration inputs: int token "
                        "ids (n, L) for language models, float (n, L, d_input) for classifiers, float images "
                        "(n, C, H, W) for Vision Mamba")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset, 18-21 (default 18; 21 with INT4)")
    export.add_argument("--limit", type=POSITIVE_INT, default=None, metavar="N",
                        help="evaluate on N images (classifiers)")
    export.add_argument("--json", action="store_true", help="print report.json to stdout (no progress bars)")
    export.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    export.add_argument("--decode", action="store_true", help="language models: also write the stateful "
                        "DIR/prefill.onnx and DIR/decode_step.onnx (past/present conv and SSM states per Mamba "
                        "layer, key/value caches per attention layer)")
    export.add_argument("--image-size", type=POSITIVE_INT, default=None, metavar="PIXELS",
                        help="Vision Mamba: the (square) image size, where its pos_embed does not say it "
                             "(overlapping patches)")
    add_quantization_options(export)
    export.set_defaults(func=_export)

    validate = sub.add_parser("validate", help="run an exported model.onnx in ONNX Runtime on the evaluation "
                              "data and compare with PyTorch (errors, argmax agreement, Polygraphy)")
    validate.add_argument("onnx", metavar="MODEL.onnx")
    validate.add_argument("--model", default="mnist", help="the PyTorch model it was exported from: a bundled "
                          "name or a checkpoint (default mnist)")
    validate.add_argument("--data", default=None, metavar="FILE", help=".pt/.npy inputs to compare on: int token "
                          "ids (n, L) for language models, float (n, L, d_input) for classifiers, float images "
                          "(n, C, H, W) for Vision Mamba (needed for classifiers without bundled evaluation data)")
    validate.add_argument("--limit", type=POSITIVE_INT, default=2000, metavar="N",
                          help="evaluate on the first N samples (default 2000)")
    validate.add_argument("--max-rel-error", type=_option(float, checks.non_negative), default=None,
                          metavar="E", help="fail (exit 1) when max |ORT − PyTorch| / max |PyTorch| exceeds E "
                          f"(default {FP32_TOLERANCES.max_rel_error:g} for FP32 graphs, "
                          f"{QDQ_TOLERANCES.max_rel_error:g} for Q/DQ graphs, which are compared with FP32)")
    validate.add_argument("--min-agreement", type=_option(float, checks.fraction), default=None, metavar="A",
                          help="fail (exit 1) when a smaller fraction of argmaxes agrees with PyTorch "
                          f"(default {FP32_TOLERANCES.min_agreement:g} for FP32 graphs, "
                          f"{QDQ_TOLERANCES.min_agreement:g} for Q/DQ graphs)")
    validate.add_argument("--scan", choices=("auto", "native", "function_body"), default=None,
                          help="how ONNX Runtime runs the scan nodes: the native kernels (an error where they "
                          "cannot be built), the model's function body, or auto (default: $MQ_EXPORT_ORT_SCAN, "
                          "else native where available)")
    validate.add_argument("--json", action="store_true", help="no progress bars")
    validate.add_argument("--engine", metavar="ENGINE", help="score this TensorRT engine (built from MODEL.onnx) "
                          "over the same data instead, and compare its logits with ONNX Runtime's (needs "
                          "TensorRT and a GPU)")
    validate.add_argument("--plugin", metavar="PATH", help="plugin library for --engine")
    validate.set_defaults(func=_validate)

    ort_ops = sub.add_parser("build-ort-ops", help="build the native ONNX Runtime kernels of the scan ops (needs "
                             "ONNX Runtime's C++ headers: tools/fetch_ort_headers.sh or MQ_EXPORT_ORT_INCLUDE) and "
                             "print the library's path; sessions otherwise build it on first use")
    ort_ops.add_argument("--force", action="store_true", help="rebuild even when a cached build exists")
    ort_ops.set_defaults(func=_build_ort_ops)

    engine = sub.add_parser("build-engine", help="build a TensorRT engine from an exported ONNX file "
                            "(needs TensorRT and the plugin library from plugins/)")
    engine.add_argument("model", metavar="MODEL.onnx")
    engine.add_argument("--plugin", required=True, metavar="PATH", help="libmq_trt_plugins.so")
    engine.add_argument("-o", "--output", required=True, metavar="ENGINE")
    engine.add_argument("--fp16", action="store_true", help="allow FP16 kernels (FP32 graphs only; Q/DQ graphs "
                        "are built strongly typed)")
    engine.add_argument("--profile", action="append", default=[], metavar="DIM=MIN:OPT:MAX,...",
                        help="one optimization profile over dynamic dims, e.g. batch=1:8:32,length=1:784:784; "
                        "repeat for more profiles")
    engine.add_argument("--workspace-mb", type=POSITIVE_INT, default=None, metavar="MB",
                        help="TensorRT builder workspace limit in MiB (default: TensorRT's)")
    engine.add_argument("--print-commands", action="store_true",
                        help="print the equivalent trtexec/polygraphy command lines instead of building")
    engine.set_defaults(func=_build_engine)

    gen = sub.add_parser("generate", help="generate text with a language model (shakespeare-charlm, "
                         "shakespeare-mamba2, shakespeare-hybrid, or an LM directory with vocab.json), decoding "
                         "step by step in PyTorch or ONNX Runtime")
    gen.add_argument("--model", default="shakespeare-charlm", help="bundled LM, or an LM directory with vocab.json")
    gen.add_argument("--prompt", default="ROMEO:")
    gen.add_argument("--tokens", type=POSITIVE_INT, default=200, help="characters to generate (default 200)")
    gen.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"))
    gen.add_argument("--greedy", action="store_true", help="argmax decoding (default: sampling)")
    gen.add_argument("--temperature", type=_option(float, checks.temperature), default=1.0,
                     help=f"sampling temperature, >= {checks.MIN_TEMPERATURE:g} (default 1.0)")
    gen.add_argument("--seed", type=SEED, default=0,
                     help="sampling seed, in [0, 2**64) (default 0)")
    gen.add_argument("--onnx-dir", default=None, metavar="DIR", help="keep the exported prefill.onnx and "
                     "decode_step.onnx in DIR (onnxruntime backend)")
    gen.add_argument("--force", action="store_true", help="replace a non-empty --onnx-dir")
    gen.add_argument("--compare", action="store_true", help="onnxruntime backend: also decode with PyTorch and "
                     "report token equality and the largest per-step logit deviation")
    gen.add_argument("--json", action="store_true", help="print a JSON result instead of the text")
    add_quantization_options(gen, seed_option="--quant-seed", description="--method quantizes before decoding, "
                             "calibrated on the model's calibration split")
    gen.set_defaults(func=_generate)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so the same cleanup (staged outputs) runs."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises Terminated while the command runs; the previous handler comes back after.
    Only the main thread may set handlers, so elsewhere SIGTERM keeps its old meaning."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _sigterm_raises():
            return args.func(args)
    except MQExportError as exc:
        print(f"mq-export: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mq-export: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("mq-export: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
