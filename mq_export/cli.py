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
                                 force=args.force, quiet=args.json))
    print(report.to_json() if args.json else report.table(), end="" if args.json else "\n")
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
                      help="evaluate on the first N images of the evaluation split")
    demo.add_argument("--json", action="store_true", help="print report.json to stdout (no progress bars)")
    demo.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    demo.set_defaults(func=_demo)
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
