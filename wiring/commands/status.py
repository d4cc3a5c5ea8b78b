"""``dsmath status``: the live view of a running job (gRPC), or the summary of a finished one (files)."""

from __future__ import annotations

import argparse

HELP = "show a training run's progress: live over gRPC, or from a finished run's files"
DESCRIPTION = """\
Show step/total and ETA, reward and accuracy trends, tokens/s, generator health, queue depths,
the time split per stage, and the last checkpoint and eval of a training run.

  dsmath status runs/latest               live if RUN_DIR/status_address answers, else from
                                          RUN_DIR/status.json + RUN_DIR/metrics.jsonl
  dsmath status --address HOST:PORT       ask a running job directly
  dsmath status runs/latest --watch       refresh in place every --interval seconds (Ctrl-C stops)
  dsmath status runs/latest --json        the snapshot as JSON, for scripts

If the job was started with a token, pass --token or set DSMATH_STATUS_TOKEN.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?", default=None, help="run directory (default: runs/latest)")
    parser.add_argument("--address", default=None, metavar="HOST:PORT", help="status server of a running job")
    parser.add_argument("--watch", action="store_true", help="refresh in place until interrupted")
    parser.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between refreshes (--watch)")
    parser.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    parser.add_argument("--token", default=None, help="bearer token (prefer $DSMATH_STATUS_TOKEN: argv is public)")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S", help="gRPC deadline per request")


def run(args: argparse.Namespace) -> int:
    import sys
    import time

    from dsmath.errors import UserError
    from dsmath.status.client import fetch_snapshot, load_status, resolve_token
    from dsmath.status.view import render

    if args.address and args.run_dir:
        raise UserError("give either RUN_DIR or --address, not both")
    if args.interval <= 0:
        raise UserError("--interval must be > 0")
    token = resolve_token(args.token)
    run_dir = args.run_dir or (None if args.address else "runs/latest")

    def load() -> tuple[object, str]:
        if args.address:
            return fetch_snapshot(args.address, token, args.timeout), f"live {args.address}"
        return load_status(run_dir, token, min(args.timeout, 2.0))

    def show(snap, source: str) -> str:  # type: ignore[no-untyped-def]
        return snap.to_json() if args.json else render(snap, source=source)

    if not args.watch:
        snap, source = load()
        print(show(snap, source))
        return 1 if snap.state == "failed" else 0

    # --watch: clear the screen and home the cursor before each frame (ANSI), so it refreshes in place.
    while True:
        snap, source = load()
        frame = show(snap, source)
        sys.stdout.write("\x1b[2J\x1b[H" + frame + f"\n\n(refreshing every {args.interval:g}s; Ctrl-C to stop)\n")
        sys.stdout.flush()
        if snap.state != "running":
            return 1 if snap.state == "failed" else 0
        time.sleep(args.interval)
