"""The ``dsmath`` command line.

Each subcommand lives in its own module of :mod:`wiring.commands` exposing ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``, registered in :data:`COMMANDS` (a new command: one new module plus its line there). The
command modules import Ray, vLLM and DeepSpeed only inside ``run``, so ``dsmath --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> module implementing it (wiring layer; may import everything).
COMMANDS: dict[str, str] = {
    "train": "wiring.commands.train",
    "sft": "wiring.commands.sft",
    "eval": "wiring.commands.eval",
    "grade": "wiring.commands.grade",
    "corpus": "wiring.commands.corpus",
    "sandbox": "wiring.commands.sandbox",
    "status": "wiring.commands.status",
    "pretrain": "wiring.commands.pretrain",
    "compare": "wiring.commands.compare",
    "rm": "wiring.commands.rm",
    "iterate": "wiring.commands.iterate",
    "samples": "wiring.commands.samples",
}


def _available() -> dict[str, object]:
    """Every registered command's module (a missing one is a packaging bug: it raises, never skipped)."""
    return {name: importlib.import_module(module) for name, module in COMMANDS.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsmath",
        description="DeepSeekMath on Ray: math-corpus mining and online GRPO (vLLM generators, DeepSpeed learner).",
        epilog="Run 'dsmath COMMAND --help' for a command's options. Config overrides are dotted: algorithm.beta=0.04",
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
