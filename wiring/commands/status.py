"""``dsmath status``: the live view of a running job (gRPC), or the summary of a finished one (files)."""

from __future__ import annotations

import argparse

HELP = "show a training run's progress: live over gRPC, or from a finished run's files"
DESCRIPTION = """\
Show step/total and ETA, reward and accuracy trends, tokens/s, generator health, queue depths,
the time split per stage, and the last checkpoint and eval of a training run.

  dsmath status                           the most recent run: runs/latest, else the newest under runs/
  dsmath status runs/latest               live if RUN_DIR/status_address answers, else from
                                          RUN_DIR/status.json + RUN_DIR/metrics.jsonl
  dsmath status --address HOST:PORT       ask a running job directly (grpcs://HOST:PORT: TLS)
  dsmath status --job JOB_ID --address http://HEAD:8265
                                          a job started with `ray job submit`: its status server is found
                                          through the Ray Jobs API (the endpoint line in the job's log)
  dsmath status --job JOB_ID --address http://HEAD:8265 --wait 600
                                          right after `ray job submit --no-wait`: wait for the run to come up
  dsmath status runs/latest --watch       refresh in place every --interval seconds (Ctrl-C stops)
  dsmath status runs/latest --json        the snapshot as JSON, for scripts

If the job was started with a token, pass --token or set DSMATH_STATUS_TOKEN (a run's generated token,
RUN_DIR/status_token, is read by itself when RUN_DIR is given and readable).
"""


WATCH_WAIT_S = 60.0  # --job --watch: how long one refresh waits for a job that is not up (yet, or any more)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?", default=None, help="run directory (default: runs/latest)")
    parser.add_argument("--address", default=None, metavar="HOST:PORT",
                        help="status server of a running job; with --job, the Ray dashboard (http://HEAD:8265)")
    parser.add_argument("--job", default=None, metavar="JOB_ID", help="a Ray job's submission id (or job id)")
    parser.add_argument("--tls-ca", default=None, metavar="PEM", help="CA certificate to trust for a TLS server")
    parser.add_argument("--watch", action="store_true", help="refresh in place until interrupted")
    parser.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between refreshes (--watch)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="S",
                        help="with --job: wait up to S seconds for the job to start and put up its status server "
                             "(e.g. right after `ray job submit --no-wait`), retrying every --interval; "
                             "--watch waits at least 60 s")
    parser.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    parser.add_argument("--token", default=None, help="bearer token (prefer $DSMATH_STATUS_TOKEN: argv is public)")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S", help="gRPC deadline per request")


def run(args: argparse.Namespace) -> int:
    from dsmath.errors import UserError
    from dsmath.status.client import StatusUnreachable, fetch_snapshot, latest_run_dir, load_status, resolve_token
    from dsmath.status.view import render

    if args.address and args.run_dir:
        raise UserError("give either RUN_DIR or --address, not both")
    if args.job and not args.address:
        raise UserError("--job needs --address http://HEAD:8265 (the Ray dashboard / job server)")
    if args.interval <= 0:
        raise UserError("--interval must be > 0")
    if args.wait < 0 or (args.wait and not args.job):
        raise UserError("--wait S needs --job and S >= 0")
    token = resolve_token(args.token)
    run_dir = args.run_dir or (None if args.address else str(latest_run_dir("runs")))

    found: dict[str, str] = {}  # --job: the endpoint, looked up once (the job's log is read whole)

    def load_job() -> tuple[object, str]:
        from wiring.observability import find_job_endpoint

        if "address" not in found:
            found["address"] = find_job_endpoint(args.job, args.address).address
        try:
            snap = fetch_snapshot(found["address"], token, args.timeout, args.tls_ca)
        except StatusUnreachable:
            found.clear()
            find_job_endpoint(args.job, args.address)  # the job ended meanwhile: JobNotRunning says so in one line
            raise
        return snap, f"live {found['address']} (Ray job {args.job})"

    def load() -> tuple[object, str]:
        if args.job:
            # --watch rides out the moments a live job's server does not answer (set-up, the run's end).
            return waiting(load_job, max(args.wait, WATCH_WAIT_S) if args.watch else args.wait, args.interval)
        if args.address:
            return fetch_snapshot(args.address, token, args.timeout, args.tls_ca), f"live {args.address}"
        return load_status(run_dir, token, min(args.timeout, 2.0), args.tls_ca)

    def show(snap, source: str) -> str:  # type: ignore[no-untyped-def]
        return snap.to_json() if args.json else render(snap, source=source)

    if args.job:
        from wiring.observability import JobNotRunning

        try:
            return _run_views(args, load, show)
        except JobNotRunning as exc:  # a finished job is an answer, not a mistake: one line, exit 0 (1 if it failed)
            print(str(exc))
            return 0 if exc.state == "succeeded" else 1
    return _run_views(args, load, show)


def waiting(load, wait_s: float, interval_s: float):  # type: ignore[no-untyped-def]
    """``load()``, retried every ``interval_s`` for up to ``wait_s`` seconds while the job is not up yet: pending,
    still setting up (:class:`JobNotReady`), or its status server not answering while Ray still reports the job
    running (between the run's end and the job's). Anything else, or the last failure, is raised."""
    import time

    from dsmath.status.client import StatusUnreachable
    from wiring.observability import JobNotReady

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return load()
        except (JobNotReady, StatusUnreachable):
            if time.monotonic() + interval_s > deadline:
                raise
        time.sleep(interval_s)


def _run_views(args: argparse.Namespace, load, show) -> int:  # type: ignore[no-untyped-def]
    import sys
    import time

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
