"""`mq-export` command line. Parses arguments and wires the API stages; no logic of its own."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import MQExportError


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo
    report = run_demo(DemoConfig(out=Path(args.output), model=args.model, method=args.method,
                                 w_bits=args.w_bits, a_bits=args.a_bits, limit=args.limit,
                                 force=args.force, quiet=args.json, seed=args.seed, calibrator=args.calibrator,
                                 alpha=args.alpha, w_group_size=args.w_group_size, asymmetric=args.asymmetric,
                                 gptq=args.gptq, plot=args.plot))
    print(report.to_json() if args.json else report.table(), end="" if args.json else "\n")
    return 0


def _build_engine(args: argparse.Namespace) -> int:
    from .engine import build_engine, equivalent_commands, parse_profile
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
    import json
    from .validate_onnx import validate_engine_file, validate_onnx_file
    if args.engine:
        if not args.plugin:
            raise MQExportError("--engine needs --plugin PATH (libmq_trt_plugins.so from plugins/)")
        result = validate_engine_file(args.engine, args.plugin, args.onnx, model=args.model)
        print(json.dumps(result, indent=2))
        return 0 if result["passed"] else 1
    result = validate_onnx_file(args.onnx, model=args.model, limit=args.limit, scan_kernel=args.scan_kernel,
                                quiet=args.json)
    print(json.dumps(result, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .validate_onnx import run_export
    report = run_export(args.checkpoint, Path(args.output), method=args.method, calib=args.calib,
                        w_bits=args.w_bits, a_bits=args.a_bits, opset=args.opset, limit=args.limit,
                        force=args.force, quiet=args.json, w_group_size=args.w_group_size, decode=args.decode)
    print(report.to_json() if args.json else report.table(), end="" if args.json else "\n")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import json
    from .decode import run_generate
    result = run_generate(args.model, args.prompt, args.tokens, backend=args.backend, greedy=args.greedy,
                          method=args.method, w_bits=args.w_bits, a_bits=args.a_bits, seed=args.seed,
                          temperature=args.temperature, onnx_dir=args.onnx_dir, compare=args.compare)
    print(json.dumps(result, indent=2) if args.json else result["text"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .bundled import BUNDLED
    from .demo import METHODS
    parser = argparse.ArgumentParser(prog="mq-export", description="Post-training quantization and "
                                     "deployment export for Mamba models (MambaQuant).")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the pipeline on a bundled model and write DIR/report.json")
    demo.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    demo.add_argument("--model", default="mnist", help=f"bundled model ({', '.join(sorted(BUNDLED))})")
    demo.add_argument("--method", default="none", choices=METHODS)
    demo.add_argument("--w-bits", type=int, default=8, choices=(8, 4))
    demo.add_argument("--a-bits", type=int, default=8, choices=(8, 16))
    demo.add_argument("--limit", type=int, default=None, metavar="N",
                      help="evaluate on the first N samples of the evaluation split (images or text windows)")
    demo.add_argument("--json", action="store_true", help="print report.json to stdout (no progress bars)")
    demo.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    demo.add_argument("--seed", type=int, default=0, help="seed of every random Hadamard sign (default 0)")
    demo.add_argument("--calibrator", default="auto", choices=("auto", "absmax", "percentile", "mse", "entropy"),
                      help="activation range calibrator; auto picks by KL to FP32 on calibration data")
    demo.add_argument("--alpha", type=float, default=0.5, help="smoothing strength α (default 0.5)")
    demo.add_argument("--w-group-size", type=int, default=None, metavar="G",
                      help="weight blocks of G along the input dimension (e.g. 64, 128 for TensorRT INT4)")
    demo.add_argument("--asymmetric", action="store_true",
                      help="asymmetric activations (zero point ≠ 0: ONNX Runtime only, not TensorRT)")
    demo.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=None,
                      help="GPTQ weight rounding (default: on for --w-bits 4, off for 8)")
    demo.add_argument("--plot", action="store_true", help="write DIR/activation_ranges.png")
    demo.set_defaults(func=_demo)

    export = sub.add_parser("export", help="export a checkpoint (mamba-ssm/HF Mamba LM directory or a classifier "
                            "of the bundled family) to DIR/model.onnx with DIR/report.json")
    export.add_argument("checkpoint", metavar="CHECKPOINT")
    export.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    export.add_argument("--method", default="none", choices=METHODS)
    export.add_argument("--calib", default=None, metavar="FILE", help=".pt/.npy calibration inputs: int token "
                        "ids (n, L) for language models, float (n, L, d_input) for classifiers")
    export.add_argument("--w-bits", type=int, default=8, choices=(8, 4))
    export.add_argument("--a-bits", type=int, default=8, choices=(8, 16))
    export.add_argument("--w-group-size", type=int, default=None, metavar="G", help="weight blocks of G along "
                        "the input dimension (64 or 128 for TensorRT INT4)")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset, 18-21 (default 18; 21 with INT4)")
    export.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate on N images (classifiers)")
    export.add_argument("--json", action="store_true", help="print report.json to stdout (no progress bars)")
    export.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    export.add_argument("--decode", action="store_true", help="language models: also write the stateful "
                        "DIR/prefill.onnx and DIR/decode_step.onnx (past/present conv and SSM states per layer)")
    export.set_defaults(func=_export)

    validate = sub.add_parser("validate", help="run an exported model.onnx in ONNX Runtime on the evaluation "
                              "data and compare with PyTorch (errors, argmax agreement, Polygraphy)")
    validate.add_argument("onnx", metavar="MODEL.onnx")
    validate.add_argument("--model", default="mnist", help="the PyTorch model it was exported from: a bundled "
                          "name or a checkpoint (default mnist)")
    validate.add_argument("--limit", type=int, default=2000, metavar="N", help="evaluation images (default 2000)")
    validate.add_argument("--scan-kernel", action="store_true", help="run SelectiveScan through the registered "
                          "onnxruntime-extensions kernel instead of the function body")
    validate.add_argument("--json", action="store_true", help="no progress bars")
    validate.add_argument("--engine", metavar="ENGINE", help="compare this TensorRT engine (built from MODEL.onnx) "
                          "with ONNX Runtime instead (needs TensorRT and a GPU)")
    validate.add_argument("--plugin", metavar="PATH", help="plugin library for --engine")
    validate.set_defaults(func=_validate)

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
    engine.add_argument("--workspace-mb", type=int, default=None)
    engine.add_argument("--print-commands", action="store_true",
                        help="print the equivalent trtexec/polygraphy command lines instead of building")
    engine.set_defaults(func=_build_engine)

    gen = sub.add_parser("generate", help="generate text with a bundled language model (shakespeare-charlm), "
                         "decoding step by step in PyTorch or ONNX Runtime")
    gen.add_argument("--model", default="shakespeare-charlm", help="bundled LM, or an LM directory with vocab.json")
    gen.add_argument("--prompt", default="ROMEO:")
    gen.add_argument("--tokens", type=int, default=200, help="characters to generate (default 200)")
    gen.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"))
    gen.add_argument("--greedy", action="store_true", help="argmax decoding (default: sampling)")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    gen.add_argument("--method", default="none", choices=METHODS, help="quantize first (calibrated on the "
                     "model's calibration split)")
    gen.add_argument("--w-bits", type=int, default=8, choices=(8, 4))
    gen.add_argument("--a-bits", type=int, default=8, choices=(8, 16))
    gen.add_argument("--onnx-dir", default=None, metavar="DIR", help="keep the exported prefill.onnx and "
                     "decode_step.onnx in DIR (onnxruntime backend)")
    gen.add_argument("--compare", action="store_true", help="onnxruntime backend: also decode with PyTorch and "
                     "report token equality and the largest per-step logit deviation")
    gen.add_argument("--json", action="store_true", help="print a JSON result instead of the text")
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MQExportError as exc:
        print(f"mq-export: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mq-export: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
