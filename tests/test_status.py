"""Live status: snapshot schema, a real gRPC StatusServer on 127.0.0.1, the `dsmath status` CLI (as a real
subprocess), token auth, rendering a finished run from its files, and the Prometheus endpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from dsmath.errors import UserError
from dsmath.status import RunSnapshot, StatusServer, fetch_snapshot, snapshot_from_run_dir
from dsmath.status.snapshot import TREND_LENGTH, estimate_eta
from dsmath.status.view import render, sparkline, time_split_bar

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch: pytest.MonkeyPatch) -> None:
    # StatusServer(token=None) falls back to $DSMATH_STATUS_TOKEN; tests choose their token explicitly.
    monkeypatch.delenv("DSMATH_STATUS_TOKEN", raising=False)


def example(step: int = 12, **over: object) -> dict:
    d = {
        "run_name": "demo",
        "step": step,
        "total_steps": 100,
        "started_at": 1_700_000_000.0,
        "updated_at": 1_700_000_120.0,
        "reward_trend": [0.1, 0.2, 0.15, 0.3, 0.35, 0.5],
        "accuracy_trend": [0.2, 0.3, 0.3, 0.4],
        "tokens_per_s": 12345.5,
        "generators": [
            {"id": 0, "alive": True, "weight_version": 12, "requests": 40, "tokens": 123456},
            {"id": 1, "alive": False, "weight_version": 11, "requests": 38, "tokens": 100000},
        ],
        "queues": {"reward": {"depth": 3, "timeout_rate": 0.01}, "sandbox": {"depth": 0, "timeout_rate": 0.25}},
        "time_split": {"generate_s": 6.0, "reward_s": 1.0, "train_s": 3.0, "sync_s": 0.5},
        "last_checkpoint": {"step": 10, "path": "runs/demo/ckpt/step_10"},
        "last_eval": {"step": 10, "accuracy": 0.42},
        "metrics": {"kl": 0.01, "clip_frac": 0.05},
    }
    d.update(over)
    return d


def dsmath_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "DSMATH_STATUS_TOKEN"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "wiring.cli", "status", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=full_env,
    )


# ---------------------------------------------------------------------------------------------- schema
def test_snapshot_roundtrips_through_dict_json_and_proto() -> None:
    snap = RunSnapshot.from_dict(example())
    assert snap.eta_s == pytest.approx(88 * 120 / 12)  # estimated: 88 steps left at 10 s/step
    assert RunSnapshot.from_dict(json.loads(snap.to_json())) == snap
    assert RunSnapshot.from_proto(snap.to_proto()) == snap
    assert snap.queues[1].name == "sandbox" and snap.queues[1].timeout_rate == 0.25
    # no checkpoint/eval yet survives the proto's optional fields as None, not as step 0
    bare = RunSnapshot.from_dict({"run_name": "x", "updated_at": 5.0})
    assert RunSnapshot.from_proto(bare.to_proto()) == bare and bare.last_eval is None


def test_snapshot_rejects_unknown_keys_and_bad_types() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['reward'\]"):
        RunSnapshot.from_dict({"reward": 0.5})
    with pytest.raises(ValueError, match="step must be an integer"):
        RunSnapshot.from_dict({"step": "3"})
    with pytest.raises(ValueError, match=r"generators\[0\]: unknown key\(s\) \['healthy'\]"):
        RunSnapshot.from_dict({"generators": [{"id": 0, "healthy": True}]})
    with pytest.raises(ValueError, match="state must be one of"):
        RunSnapshot.from_dict({"state": "paused"})


def test_trends_keep_the_last_n_values() -> None:
    snap = RunSnapshot.from_dict({"reward_trend": list(range(200))})
    assert snap.reward_trend == tuple(float(x) for x in range(200 - TREND_LENGTH, 200))


def test_eta_estimate() -> None:
    assert estimate_eta(25, 100, 1000.0, 1100.0, "running") == pytest.approx(300.0)
    assert estimate_eta(0, 100, 1000.0, 1100.0, "running") == -1.0
    assert estimate_eta(25, 100, 1000.0, 1100.0, "finished") == 0.0


# ---------------------------------------------------------------------------------------------- rendering
def test_sparkline_and_time_bar() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([2.0, 2.0, 2.0]) == "▄▄▄"  # flat is mid-height, not "zero"
    assert sparkline([]) == ""
    snap = RunSnapshot.from_dict(example())
    bar = time_split_bar(snap, width=21)
    assert len(bar) == 23  # brackets + exactly `width` cells
    # 6 / 1 / 3 / 0.5 of 10.5 s over 21 cells -> 12 / 2 / 6 / 1
    assert bar == "[" + "█" * 12 + "▓" * 2 + "▒" * 6 + "░" + "]"


def test_render_shows_the_figures() -> None:
    text = render(RunSnapshot.from_dict(example()), now=1_700_000_130.0)
    assert "demo  [running]  step 12/100 (12.0%)  ETA 14m40s" in text
    assert "updated 10.0s ago" in text
    assert "reward    ▁▃▂▄▅█" in text and "last 0.500" in text
    assert "accuracy  ▁▄▄█" in text and "last 0.400" in text
    assert "tokens/s  12.3k" in text
    assert "generators 1/2 alive  (weight versions differ)" not in text  # only alive ones count
    assert "generators 1/2 alive" in text and "NO" in text
    assert "reward: depth 3, timeouts 1.0%" in text and "sandbox: depth 0, timeouts 25.0%" in text
    assert "checkpoint step 10  runs/demo/ckpt/step_10" in text
    assert "eval       step 10  accuracy 0.420" in text
    assert "generate 57%" in text
    assert "restarts" not in text and "off-policy" not in text  # nothing to report: no line


def test_render_shows_restarts_and_staleness_when_there_are_any() -> None:
    metrics = {"faults/generator_restarts": 1, "faults/reward_worker_restarts": 2, "faults/reissued_samples": 16,
               "staleness/mean": 0.75, "staleness/max": 1, "dynamic_sampling/dropped_groups": 3}
    text = render(RunSnapshot.from_dict(example(metrics=metrics)), now=1_700_000_130.0)
    assert "restarts   generators 1, reward workers 2; samples reissued 16" in text
    assert "off-policy staleness mean 0.75 max 1; dynamic sampling dropped 3 groups" in text


# ---------------------------------------------------------------------------------------------- gRPC
def test_cli_prints_a_live_snapshot_as_json() -> None:
    with StatusServer(host="127.0.0.1", port=0) as server:
        served = server.update(example())
        assert server.address == f"127.0.0.1:{server.port}" and server.port > 0
        out = dsmath_cli("--address", server.address, "--json")
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert got == served.to_dict()
        assert got["step"] == 12 and got["generators"][1]["alive"] is False
        # and the human view, from the same server
        out = dsmath_cli("--address", server.address)
        assert out.returncode == 0 and "step 12/100" in out.stdout and f"from live {server.address}" in out.stdout


def test_token_required_when_set() -> None:
    with StatusServer(host="127.0.0.1", port=0, token="s3cret") as server:
        server.update(example())
        out = dsmath_cli("--address", server.address, "--json")
        assert out.returncode == 2
        assert out.stdout == ""
        assert out.stderr.strip().count("\n") == 0  # one line, no stack trace
        assert "rejected the request (the job requires a token)" in out.stderr
        out = dsmath_cli("--address", server.address, "--json", "--token", "wrong")
        assert out.returncode == 2 and "wrong token" in out.stderr
        out = dsmath_cli("--address", server.address, "--json", "--token", "s3cret")
        assert out.returncode == 0 and json.loads(out.stdout)["run_name"] == "demo"
        out = dsmath_cli("--address", server.address, "--json", env={"DSMATH_STATUS_TOKEN": "s3cret"})
        assert out.returncode == 0 and json.loads(out.stdout)["step"] == 12
        assert fetch_snapshot(server.address, "s3cret").step == 12


def test_no_token_configured_accepts_any_call() -> None:
    with StatusServer(host="127.0.0.1", port=0, token=None) as server:
        server.update(example(step=3))
        assert fetch_snapshot(server.address, None).step == 3
        assert fetch_snapshot(server.address, "anything").step == 3


def test_server_takes_its_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSMATH_STATUS_TOKEN", "from-env")
    with StatusServer(host="127.0.0.1", port=0) as server:
        server.update(example(step=9))
        with pytest.raises(UserError, match="requires a token"):
            fetch_snapshot(server.address, None)
        assert fetch_snapshot(server.address, "from-env").step == 9


def test_updates_from_threads_are_never_torn() -> None:
    # Writers publish snapshots whose step equals the length of their reward trend; a reader must never see
    # a mix of two of them.
    with StatusServer(host="127.0.0.1", port=0) as server:
        server.update({"step": 1, "reward_trend": [0.0]})
        stop = threading.Event()
        errors: list[str] = []

        def writer(offset: int) -> None:
            i = 0
            while not stop.is_set():
                n = 1 + (i * 7 + offset) % 40
                server.update({"step": n, "reward_trend": [float(n)] * n})
                i += 1

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        try:
            for _ in range(30):
                snap = fetch_snapshot(server.address)
                if len(snap.reward_trend) != snap.step or set(snap.reward_trend) != {float(snap.step)}:
                    errors.append(f"torn: step {snap.step}, trend {snap.reward_trend[:3]}...")
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert errors == []


def test_bad_update_raises_and_keeps_serving_the_last_good_snapshot() -> None:
    with StatusServer(host="127.0.0.1", port=0) as server:
        server.update(example(step=5))
        with pytest.raises(ValueError, match="unknown key"):
            server.update({"stepp": 6})
        assert fetch_snapshot(server.address).step == 5


def test_unreachable_address_is_one_line_error() -> None:
    with StatusServer(host="127.0.0.1", port=0) as server:
        address = server.address
    out = dsmath_cli("--address", address, "--timeout", "1")
    assert out.returncode == 2 and f"no status server answers at {address}" in out.stderr
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------- run directories
def _write_metrics(run_dir: Path, n: int) -> None:
    with (run_dir / "metrics.jsonl").open("w") as fh:
        for step in range(1, n + 1):
            row = {"step": step, "time": 1_700_000_000.0 + 10 * step, "reward/mean": 0.1 * step,
                   "accuracy": 0.05 * step, "time/rollout": 4.0, "time/reward": 1.0, "time/update": 4.0,
                   "time/weight_sync": 1.0, "tokens_per_s": 1000.0 + step, "kl": 0.001 * step}
            fh.write(json.dumps(row) + "\n")


def test_server_with_run_dir_writes_address_and_status_then_cli_renders_the_finished_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    server = StatusServer(host="127.0.0.1", port=0, run_dir=run_dir)
    try:
        assert (run_dir / "status_address").read_text().strip() == server.address
        server.update(example(step=4, total_steps=5))
        assert json.loads((run_dir / "status.json").read_text())["step"] == 4
        _write_metrics(run_dir, 4)
        live = dsmath_cli(str(run_dir))
        assert live.returncode == 0 and f"from live {server.address}" in live.stdout
        server.update(example(step=5, total_steps=5, state="finished", last_eval={"step": 5, "accuracy": 0.61}))
    finally:
        server.stop()
    assert not (run_dir / "status_address").exists()
    _write_metrics(run_dir, 5)

    out = dsmath_cli(str(run_dir))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "demo  [finished]  step 5/5 (100.0%)" in text and "ETA" not in text
    assert f"from files {run_dir}" in text
    # trends come from metrics.jsonl: rewards 0.1..0.5, accuracies 0.05..0.25
    assert "reward    ▁▃▅▆█" in text and "last 0.500" in text and "(n=5)" in text
    assert "last 0.250" in text
    assert "tokens/s  1k" in text or "tokens/s  1.0" in text
    assert "step time 10.0s" in text and "generate 40%" in text and "sync 10%" in text
    assert "eval       step 5  accuracy 0.610" in text

    js = json.loads(dsmath_cli(str(run_dir), "--json").stdout)
    assert js["state"] == "finished" and js["reward_trend"] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert js["time_split"] == {"generate_s": 4.0, "reward_s": 1.0, "train_s": 4.0, "sync_s": 1.0}


def test_stale_address_falls_back_to_files(tmp_path: Path) -> None:
    # A crashed job leaves status_address behind; nothing listens there any more.
    with StatusServer(host="127.0.0.1", port=0) as server:
        dead = server.address
    (tmp_path / "status_address").write_text(dead + "\n")
    (tmp_path / "status.json").write_text(json.dumps(example(step=7)))
    out = dsmath_cli(str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "step 7/100" in out.stdout and f"status server {dead} not answering" in out.stdout


def test_run_from_metrics_only_and_torn_last_line(tmp_path: Path) -> None:
    _write_metrics(tmp_path, 3)
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 4, "reward/m')  # killed mid-write
    snap = snapshot_from_run_dir(tmp_path)
    assert snap.step == 3 and snap.reward_trend == pytest.approx((0.1, 0.2, 0.3))
    assert dict(snap.metrics)["kl"] == pytest.approx(0.003)
    assert snap.started_at == 1_700_000_010.0


def test_missing_run_dir_is_one_line_error(tmp_path: Path) -> None:
    out = dsmath_cli(str(tmp_path / "nope"))
    assert out.returncode == 2 and "no such run directory" in out.stderr and "Traceback" not in out.stderr
    out = dsmath_cli(str(tmp_path))
    assert out.returncode == 2 and "neither status.json nor metrics.jsonl" in out.stderr


def test_watch_refreshes_in_place_until_the_run_ends() -> None:
    with StatusServer(host="127.0.0.1", port=0) as server:
        server.update(example(step=1))
        proc = subprocess.Popen(
            [sys.executable, "-m", "wiring.cli", "status", "--address", server.address, "--watch", "--interval", "0.05"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        try:
            assert proc.stdout is not None
            frames = 0
            for line in proc.stdout:  # synchronise on output: finish the run once two frames were drawn
                if "\x1b[2J\x1b[H" in line:
                    frames += 1
                    if frames == 2:
                        server.update(example(step=100, state="finished"))
            rc = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert rc == 0 and frames >= 3


# ---------------------------------------------------------------------------------------------- Prometheus
def test_prometheus_endpoint_exposes_the_gauges() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    with StatusServer(host="127.0.0.1", port=0, prometheus_port=0) as server:
        assert server.prometheus_port and server.prometheus_port != server.port
        server.update(example())
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.prometheus_port}/metrics", timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert all(f.type == "gauge" for f in families.values())

    def value(family: str, /, **labels: str) -> float:
        (s,) = [s for s in families[family].samples if all(s.labels.get(k) == v for k, v in labels.items())]
        assert s.labels["run"] == "demo"
        return s.value

    assert value("dsmath_step") == 12 and value("dsmath_total_steps") == 100
    assert value("dsmath_reward_mean") == 0.5 and value("dsmath_accuracy") == 0.4
    assert value("dsmath_tokens_per_second") == 12345.5
    assert value("dsmath_eta_seconds") == pytest.approx(880.0)
    assert value("dsmath_run_state", state="running") == 1 and value("dsmath_run_state", state="failed") == 0
    assert value("dsmath_generator_alive", generator="1") == 0 and value("dsmath_generator_tokens", generator="0") == 123456
    assert value("dsmath_queue_depth", queue="reward") == 3 and value("dsmath_queue_timeout_rate", queue="sandbox") == 0.25
    assert value("dsmath_step_time_seconds", stage="train") == 3.0
    assert value("dsmath_last_checkpoint_step") == 10 and value("dsmath_last_eval_accuracy") == 0.42
    assert value("dsmath_metric", name="kl") == 0.01


def test_status_package_import_is_light() -> None:
    code = "import sys, dsmath.status; print(sorted(m for m in ('grpc', 'prometheus_client', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    # the server, client and preflight never pull in Ray (the driver may run them before ray.init)
    code = (
        "import sys, dsmath.status.server, dsmath.status.client, wiring.jobsubmit, wiring.commands.status\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch', 'vllm', 'deepspeed')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_snapshot_builder_turns_metric_rows_into_snapshots() -> None:
    from dsmath.status.snapshot import SnapshotBuilder

    b = SnapshotBuilder("tiny", total_steps=60, started_at=1000.0)
    for step in range(1, 56):
        row = {"step": step, "reward/mean": step / 100, "accuracy": 0.5, "tokens_per_s": 321.0,
               "time/rollout": 2.0, "time/reward": 0.5, "time/update": 1.0, "time/weight_sync": 0.25,
               "kl": 0.002, "note": "text is skipped"}
        ckpt = {"step": 50, "path": "runs/tiny/ckpt/50"} if step == 50 else None
        snap = b.step(step, row, queues={"reward": {"depth": 1, "timeout_rate": 0.0}}, last_checkpoint=ckpt,
                      now=1000.0 + 2 * step)
    assert snap.step == 55 and len(snap.reward_trend) == TREND_LENGTH
    assert snap.reward_trend[0] == pytest.approx(0.06) and snap.reward_trend[-1] == pytest.approx(0.55)
    assert snap.eta_s == pytest.approx(5 * 2.0)  # 5 steps left at 2 s/step
    assert snap.time_split.total_s == pytest.approx(3.75) and snap.tokens_per_s == 321.0
    assert dict(snap.metrics) == {"kl": 0.002}
    assert snap.last_checkpoint is not None and snap.last_checkpoint.step == 50  # carried over
    done = b.finish(failed="generator 1 died")
    assert done.state == "failed" and done.message == "generator 1 died" and done.eta_s == 0.0
    assert done.step == 55


# The lines of generated code that stamp the versions of the tools that generated it (and that the code then
# requires at import): everything else must match the .proto whichever grpcio-tools release regenerates it.
_VERSION_STAMPS = (
    (re.compile(r"^GRPC_GENERATED_VERSION = '(?P<v>[0-9.]+)'$", re.M), "GRPC_GENERATED_VERSION = <v>"),
    (re.compile(r"^# Protobuf Python Version: (?P<v>[0-9.]+)$", re.M), "# Protobuf Python Version: <v>"),
    (re.compile(r"(?<=ValidateProtobufRuntimeVersion\(\n    _runtime_version\.Domain\.PUBLIC,\n)"
                r"    \d+,\n    \d+,\n    \d+,\n", re.M), "    <v>\n"),
)


def _without_version_stamps(code: str) -> str:
    for pattern, placeholder in _VERSION_STAMPS:
        code = pattern.sub(placeholder, code)
    return code


PROTOS = sorted(p.stem for p in (ROOT / "dsmath" / "proto").glob("*.proto"))


@pytest.mark.parametrize("proto", PROTOS)
def test_committed_generated_code_matches_the_proto(tmp_path: Path, proto: str) -> None:
    """Regenerated with whatever grpcio-tools is installed, the code equals the committed code but for the tools'
    version stamps (a fresh clone failed on 2026-12-06 when grpcio-tools 1.85.4 came out: only GRPC_GENERATED_VERSION
    differed)."""
    pytest.importorskip("grpc_tools")
    (tmp_path / "dsmath" / "proto").mkdir(parents=True)
    (tmp_path / "dsmath" / "proto" / f"{proto}.proto").write_bytes((ROOT / f"dsmath/proto/{proto}.proto").read_bytes())
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.", "--grpc_python_out=.",
         f"dsmath/proto/{proto}.proto"],
        cwd=tmp_path, check=True, capture_output=True,
    )
    for name in (f"{proto}_pb2.py", f"{proto}_pb2.pyi", f"{proto}_pb2_grpc.py"):
        fresh = _without_version_stamps((tmp_path / "dsmath" / "proto" / name).read_text())
        committed = _without_version_stamps((ROOT / "dsmath" / "proto" / name).read_text())
        assert fresh == committed, f"{name} is stale: regenerate (see proto/__init__)"


def test_the_declared_dependencies_satisfy_the_generated_codes_version_checks() -> None:
    """The committed code refuses, at import, a grpcio or protobuf older than the tools that generated it: the
    floors in pyproject.toml are at least those versions, so an install that pip accepts can import it."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    floors = {}
    for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(spec)
        floors[req.name] = max((Version(s.version) for s in req.specifier if s.operator == ">="), default=None)
    needs = {}
    for proto in PROTOS:
        for package, stamp, name in (("grpcio", 0, f"{proto}_pb2_grpc.py"), ("protobuf", 1, f"{proto}_pb2.py")):
            version = Version(_VERSION_STAMPS[stamp][0].search((ROOT / "dsmath" / "proto" / name).read_text())["v"])
            needs[package] = max(version, needs.get(package, version))
    assert sorted(needs) == ["grpcio", "protobuf"] and len(PROTOS) >= 2, (needs, PROTOS)
    short = {name: (str(floors.get(name)), str(version)) for name, version in needs.items()
             if floors.get(name) is None or floors[name] < version}
    assert short == {}, f"pyproject floor below what the generated code needs: {short}"


# ---------------------------------------------------------------------------------------------- binding, tokens, TLS
def _lan_ip() -> str | None:
    """This machine's address on its first non-loopback interface, or None (a UDP connect sends nothing)."""
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.254.254.254", 1))
        ip = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if ip.startswith("127.") else ip


def test_non_loopback_bind_needs_a_token_and_a_wrong_token_is_one_line() -> None:
    with pytest.raises(UserError, match="binding 0.0.0.0 without a token"):
        StatusServer(host="0.0.0.0", port=0)
    ip = _lan_ip()
    host = ip or "0.0.0.0"
    with pytest.raises(UserError, match=f"binding {host} without a token"):
        StatusServer(host=host, port=0)
    with StatusServer(host="0.0.0.0", port=0, token="right", advertise_host=ip or "127.0.0.1") as server:
        server.update(example(step=5))
        assert server.address == f"{ip or '127.0.0.1'}:{server.port}"
        out = dsmath_cli("--address", server.address, "--token", "wrong", "--json")
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.strip() == (f"dsmath status: error: status server at {server.address} rejected the "
                                      "request (wrong token); pass --token or set DSMATH_STATUS_TOKEN"), out.stderr
        out = dsmath_cli("--address", server.address, "--json", env={"DSMATH_STATUS_TOKEN": "right"})
        assert out.returncode == 0 and json.loads(out.stdout)["step"] == 5


def test_server_token_modes_and_the_generated_token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stat

    from dsmath.errors import ConfigError
    from dsmath.status.auth import read_run_token, server_token

    assert server_token("auto", "127.0.0.1", tmp_path) == (None, None)
    assert not (tmp_path / "status_token").exists()
    token, path = server_token("auto", "0.0.0.0", tmp_path)
    assert path == tmp_path / "status_token" and len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == token + "\n"
    assert read_run_token(tmp_path) == token
    again, _ = server_token("generate", "127.0.0.1", tmp_path)  # a new run: a new token, still owner-only
    assert again != token and stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="status.token=none with status.host=10.0.0.5"):
        server_token("none", "10.0.0.5", tmp_path)
    with pytest.raises(ConfigError, match=r"\$DSMATH_STATUS_TOKEN is not set"):
        server_token("env", "0.0.0.0", tmp_path)
    monkeypatch.setenv("DSMATH_STATUS_TOKEN", "chosen")
    assert server_token("env", "0.0.0.0", tmp_path) == ("chosen", None)
    assert server_token("auto", "0.0.0.0", tmp_path) == ("chosen", None)


def test_status_config_keys_and_the_old_key_refused_in_one_line() -> None:
    from dsmath.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config("tiny_cpu", ["status_port=50051"])
    assert str(err.value) == "'status_port' is now 'status.port' (e.g. status.port=50051)"
    with pytest.raises(ConfigError, match="status.token=none with status.host=0.0.0.0"):
        load_config("tiny_cpu", ["status.host=0.0.0.0", "status.token=none"])
    with pytest.raises(ConfigError, match="give both PEM files or neither"):
        load_config("tiny_cpu", ["status.tls_cert=/x.pem"])
    with pytest.raises(ConfigError, match="status.prometheus_port"):
        load_config("tiny_cpu", ["status.prometheus_port=-2"])
    cfg = load_config("tiny_cpu", ["status.host=0.0.0.0", "status.port=50051", "status.prometheus_port=0"])
    assert (cfg.status.host, cfg.status.port, cfg.status.token, cfg.status.prometheus_port) == ("0.0.0.0", 50051,
                                                                                                 "auto", 0)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_status_server_with_token(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    cert, key = _self_signed(tmp_path)
    with StatusServer(host="localhost", port=0, token="t0k", tls_cert=cert, tls_key=key) as server:
        server.update(example(step=21))
        assert server.address == f"grpcs://localhost:{server.port}"
        assert fetch_snapshot(server.address, "t0k", tls_ca=str(cert)).step == 21
        out = dsmath_cli("--address", server.address, "--tls-ca", str(cert), "--json",
                         env={"DSMATH_STATUS_TOKEN": "t0k"})
        assert out.returncode == 0 and json.loads(out.stdout)["step"] == 21
        with pytest.raises(UserError):  # plaintext to a TLS port: refused, one line
            fetch_snapshot(f"localhost:{server.port}", "t0k", timeout_s=2)
        with pytest.raises(UserError, match="wrong token"):
            fetch_snapshot(server.address, "nope", tls_ca=str(cert))


def test_run_dir_status_uses_the_generated_token(tmp_path: Path) -> None:
    from dsmath.status.auth import server_token

    run_dir = tmp_path / "run"
    token, _ = server_token("generate", "127.0.0.1", run_dir)
    with StatusServer(host="127.0.0.1", port=0, token=token, run_dir=run_dir) as server:
        server.update(example(step=8))
        out = dsmath_cli(str(run_dir), "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["step"] == 8


def test_status_without_argument_shows_the_most_recent_run(tmp_path: Path) -> None:
    from dsmath.status.client import latest_run_dir

    runs = tmp_path / "runs"
    with pytest.raises(UserError, match="no run under"):
        latest_run_dir(runs)
    for name, step, mtime in (("old", 3, 1_700_000_000), ("new", 7, 1_700_000_500)):
        (runs / name).mkdir(parents=True)
        _write_metrics(runs / name, step)
        os.utime(runs / name / "metrics.jsonl", (mtime, mtime))
    (runs / "empty").mkdir()  # newest folder, but no run in it
    assert latest_run_dir(runs) == runs / "new"
    out = subprocess.run([sys.executable, "-m", "wiring.cli", "status", "--json"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["step"] == 7
    (runs / "latest").symlink_to("old")  # the link the driver maintains wins over modification times
    assert latest_run_dir(runs) == runs / "latest"
    out = subprocess.run([sys.executable, "-m", "wiring.cli", "status", "--json"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and json.loads(out.stdout)["step"] == 3


def test_job_lookup_with_no_dashboard_is_one_line() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    out = dsmath_cli("--job", "raysubmit_x", "--address", f"http://127.0.0.1:{port}", timeout=120)
    assert out.returncode == 2 and out.stdout == "", out.stdout
    line = out.stderr.strip()
    assert "\n" not in line, line
    assert line.startswith(f"dsmath status: error: no Ray job server answers at http://127.0.0.1:{port}"), line
    out = dsmath_cli("--job", "raysubmit_x")
    assert out.returncode == 2 and "--job needs --address" in out.stderr


def test_job_lookups_wait_for_a_job_that_is_not_up_yet_and_only_for_that() -> None:
    """``--wait``: a pending / still-setting-up job (JobNotReady) or a live job's silent server is retried until
    the deadline; any other error is raised at once; ``--wait`` without ``--job`` is a one-line error."""
    from dsmath.errors import UserError
    from dsmath.status.client import StatusUnreachable
    from wiring.commands.status import waiting
    from wiring.observability import JobNotReady

    failures = [JobNotReady("pending"), StatusUnreachable("not answering"), JobNotReady("no endpoint yet")]
    calls: list[float] = []

    def flaky():  # fault injection: the job comes up on the fourth lookup
        calls.append(time.monotonic())
        if failures:
            raise failures.pop(0)
        return "snapshot"

    assert waiting(flaky, 5.0, 0.05) == "snapshot" and len(calls) == 4
    assert all(b - a >= 0.05 for a, b in zip(calls, calls[1:]))  # retried every interval, not in a busy loop
    started = time.monotonic()
    with pytest.raises(JobNotReady, match="still pending"):
        waiting(lambda: (_ for _ in ()).throw(JobNotReady("still pending")), 0.3, 0.05)
    assert 0.2 <= time.monotonic() - started < 5.0
    with pytest.raises(JobNotReady):  # --wait 0: one lookup
        waiting(lambda: (_ for _ in ()).throw(JobNotReady("x")), 0.0, 0.05)
    calls.clear()

    def wrong_token():
        calls.append(0.0)
        raise UserError("rejected the request (wrong token)")

    with pytest.raises(UserError, match="wrong token"):
        waiting(wrong_token, 5.0, 0.05)
    assert len(calls) == 1  # not something waiting fixes
    out = dsmath_cli("--address", "127.0.0.1:1", "--wait", "10")
    assert out.returncode == 2 and out.stderr.strip() == "dsmath status: error: --wait S needs --job and S >= 0"


def test_a_reader_that_finds_the_address_is_served_the_named_run_from_the_first_answer(tmp_path: Path) -> None:
    """The driver's status service (``start_status``) serves the run's name and step count from its first answer:
    a reader polling for ``status_address`` (as `dsmath status` and the job-submit test do) never meets an unnamed,
    zero-step run, and ``status.json`` is already there when the address appears."""
    from dsmath.config import load_config
    from dsmath.status.snapshot import SnapshotBuilder
    from wiring.observability import start_status

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config("tiny_cpu", ["status.ray_metrics=false"])
    first: list = []

    def watch() -> None:
        while not (run_dir / "status_address").exists():
            time.sleep(0.0005)  # a poll interval, as tight as the reader can afford
        first.append(((run_dir / "status.json").exists(),
                      fetch_snapshot((run_dir / "status_address").read_text().strip(), timeout_s=10)))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    obs = start_status(cfg, run_dir, SnapshotBuilder("run", 24).step(3, {}))
    try:
        watcher.join(timeout=30)
        assert first, "the watcher never saw status_address"
        had_status_file, snap = first[0]
        assert had_status_file
        assert (snap.run_name, snap.state, snap.step, snap.total_steps) == ("run", "running", 3, 24)
    finally:
        obs.stop()
