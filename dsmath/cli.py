"""The ``dsmath`` command line.

Each subcommand lives in its own module exposing ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when listed or invoked, so ``dsmath --help``
stays fast and never imports Ray, vLLM or DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

# name -> module implementing it (wiring layer; may import everything).
COMMANDS: dict[str, str] = {
    "train": "dsmath.commands.train",
    "sft": "dsmath.commands.sft",
    "bootstrap": "dsmath.commands.bootstrap",
    "eval": "dsmath.commands.eval",
    "grade": "dsmath.commands.grade",
    "corpus": "dsmath.commands.corpus",
    "sandbox": "dsmath.commands.sandbox",
    "status": "dsmath.commands.status",
    "pretrain": "dsmath.commands.pretrain",
    "compare": "dsmath.commands.compare",
    "rm": "dsmath.commands.rm",
    "iterate": "dsmath.commands.iterate",
}


def _available() -> dict[str, object]:
    mods = {}
    for name, module in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            mods[name] = importlib.import_module(module)
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsmath",
        description="DeepSeekMath on Ray: math-corpus mining and online GRPO (vLLM generators, DeepSpeed learner).",
        epilog="Run 'dsmath COMMAND --help' for a command's options. Config overrides are dotted: grpo.beta=0.04",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in _available().items():
        p = sub.add_parser(
            name,
            help=mod.HELP,
            description=getattr(mod, "DESCRIPTION", mod.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # One OpenMP thread per process: with 2 cores, two busy processes at 2 threads each run 20-30x slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from dsmath.config import ConfigError
    from dsmath.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ConfigError, UserError) as exc:
        print(f"dsmath {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dsmath {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
