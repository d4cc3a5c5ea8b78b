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


VERBOSE_HELP = ("print the libraries' log lines (vLLM, Ray, Ray Data, transformers, DeepSpeed) and progress bars on the "
                "terminal; by default they go to a log file in the run or output folder, whose path is printed once")


def _available() -> dict[str, object]:
    """Every registered command's module (a missing one is a packaging bug: it raises, never skipped)."""
    return {name: importlib.import_module(module) for name, module in COMMANDS.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsmath",
        description="DeepSeekMath on Ray: math-corpus mining and online GRPO (vLLM generators, DeepSpeed learner).",
        epilog="Run 'dsmath COMMAND --help' for a command's options. Config overrides are dotted: algorithm.beta=0.04",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in _available().items():
        p = sub.add_parser(
            name,
            help=mod.HELP,
            description=getattr(mod, "DESCRIPTION", mod.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        _add_verbose(p)
        p.set_defaults(_run=mod.run)
    return parser


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """``--verbose`` on a command and on its own subcommands (``dsmath corpus run --verbose``); SUPPRESS keeps
    ``dsmath --verbose train`` from being undone by the subcommand's default."""
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_verbose(sub)


def main(argv: list[str] | None = None) -> int:
    # One OpenMP thread per process: with 2 cores, two busy processes at 2 threads each run 20-30x slower. One fp32
    # code path on every x86 CPU (dsmath.env.same_numbers_env). Both before anything loads torch; a set value wins.
    from dsmath.env import same_numbers_env

    for key, value in {"OMP_NUM_THREADS": "1", **same_numbers_env()}.items():
        os.environ.setdefault(key, value)
    from dsmath.config import ConfigError
    from dsmath.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from dsmath.logs import quiet

    try:
        with quiet(enabled=not args.verbose):
            return int(args._run(args) or 0)
    except (ConfigError, UserError) as exc:
        print(f"dsmath {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dsmath {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
