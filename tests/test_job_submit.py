"""`ray job submit --working-dir` against a real single-node Ray head on 127.0.0.1 (the recipe of
cluster/README.md, with token auth off as for any local cluster).

The head runs as `ray start --head --block` in its own process group and is stopped by signalling that
group, not by `ray stop`: `ray stop` kills every Ray process of the user on the machine, including
clusters that other sessions or tests started.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from ray_nodes import stop_ray_start
from wiring.jobsubmit import DEFAULT_EXCLUDES, preflight

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_http(url: str, proc: subprocess.Popen, deadline_s: float) -> None:
    """Poll ``url`` until it answers 200 (the job server is up) or the head dies or the deadline passes."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"ray head exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)  # a readiness poll interval, not a synchronisation sleep
    raise TimeoutError(f"{url} did not answer within {deadline_s}s")


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, dict, int]]:
    """(dashboard URL, the environment clients need, the metrics agent's export port)."""
    if not Path(RAY).exists():
        pytest.skip("ray CLI not installed next to this Python")
    # Metrics reach the agent's export port every second (default 10 s): a 2-step job is short.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_metrics_report_interval_ms": "1000"}
    gcs, dash, client, agent_grpc, agent_http, metrics, rt_env, nm, om = free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rayj", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    cmd = [
        RAY, "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--dashboard-agent-listen-port={agent_http}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}", f"--node-manager-port={nm}",
        f"--object-manager-port={om}", "--object-store-memory=100000000", f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log = open(Path(temp_dir) / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_http(f"{address}/api/version", proc, deadline_s=120)
        yield address, env, metrics
    finally:
        stop_ray_start(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_with_working_dir(ray_head: tuple[str, dict, int], tmp_path: Path) -> None:
    address, env, _ = ray_head
    work = tmp_path / "job"
    work.mkdir()
    (work / "script.py").write_text(
        "import json, os\n"
        "print('dsmath-job-ok', 6 * 7, json.dumps(sorted(os.listdir('.'))))\n"
    )
    (work / "runs").mkdir()
    (work / "runs" / "old.bin").write_bytes(b"0" * 4096)  # excluded: must not reach the job
    report = preflight(work, DEFAULT_EXCLUDES)
    assert report.ok and report.num_files == 1

    out = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(work),
         "--runtime-env-json", '{"excludes": ["/runs/"]}', "--", "python", "script.py"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert 'dsmath-job-ok 42 ["script.py"]' in out.stdout
    assert "succeeded" in out.stdout


def scrape(url: str) -> str:
    """The text a Prometheus endpoint serves now, or "" when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()
    except OSError:
        return ""


class Scraper(threading.Thread):
    """Scrapes ``url()`` every 0.3 s until stopped, keeping the last answer that holds a ``name`` series: a tiny
    run's figures exist for a few seconds only, too short for the main loop's slower subprocess polls."""

    def __init__(self, url: Callable[[], str | None], name: str) -> None:
        super().__init__(daemon=True)
        self.url, self.name, self.text = url, name, ""
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.3):
            url = self.url()
            text = scrape(url) if url else ""
            if sample_values(text, self.name, run="run"):
                self.text = text


def sample_values(text: str, name: str, **labels: str) -> list[float]:
    """Values of the series ``name`` carrying ``labels`` (Ray's agent exports ``ray.util.metrics`` gauges as
    ``ray_<name>``)."""
    import re

    out = []
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}{{(.*)}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            out.append(float(m.group(2)))
    return out


class LiveViews(threading.Thread):
    """Asks `dsmath status` about a live run the moment its status server is up (a 0.1 s file poll: the tiny run is
    live for only its few steps): a wrong token, `dsmath status RUN_DIR --json` and `dsmath status --job ID --json`,
    all three at once, each until it has its answer."""

    def __init__(self, run_dir: Path, status: Callable, job_id: str, dashboard: str) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.status, self.job_id, self.dashboard = run_dir, status, job_id, dashboard
        self.stop = threading.Event()
        self.seen_live = self.seen_job = self.wrong_token = self.last_job = None

    def run(self) -> None:
        import json

        with ThreadPoolExecutor(3) as pool:
            while not self.stop.is_set() and (self.seen_live is None or self.seen_job is None):
                try:
                    token = (self.run_dir / "status_token").read_text().strip()
                    address = json.loads((self.run_dir / "status_endpoint.json").read_text())["address"]
                    up = (self.run_dir / "status_address").exists()
                except (OSError, ValueError, KeyError):
                    up = False
                if not up:
                    time.sleep(0.1)  # a poll interval, not a synchronisation sleep
                    continue
                calls = {"live": pool.submit(self.status, [str(self.run_dir), "--json"])}
                if self.wrong_token is None:
                    calls["wrong"] = pool.submit(self.status, ["--address", address, "--token", "wrong"])
                if self.seen_job is None:  # --wait rides out the job log's lag behind the run
                    calls["job"] = pool.submit(self.status, ["--job", self.job_id, "--address", self.dashboard,
                                                             "--json", "--wait", "30", "--interval", "0.5"], token)
                if "wrong" in calls:
                    self.wrong_token = calls["wrong"].result()
                live = _json_view(calls["live"].result())
                if self.seen_live is None and live is not None and live["state"] == "running":
                    self.seen_live = live
                if "job" in calls:
                    self.last_job = calls["job"].result()
                    self.seen_job = _json_view(self.last_job)


def _json_view(view: subprocess.CompletedProcess) -> dict | None:
    import json

    return json.loads(view.stdout) if view.returncode == 0 and view.stdout.lstrip().startswith("{") else None


@dataclass
class Watched:
    """What a tiny submitted job showed while it ran and after: its final state, its log, the live views, the last
    scrape of each metrics endpoint that carried the run's series."""

    state: str
    logs: str
    live: LiveViews
    prom: str
    ray_metrics: str


def _watch_job(address: str, env: dict, job_id: str, run_dir: Path, status: Callable, metrics_port: int) -> Watched:
    """Scrapers and live views run while ``ray job status`` is polled until the job ends."""
    import json

    def prometheus_url() -> str | None:
        try:
            return json.loads((run_dir / "status_endpoint.json").read_text())["prometheus"]
        except (OSError, ValueError, KeyError):
            return None

    scrapers = [Scraper(prometheus_url, "dsmath_reward_mean"),
                Scraper(lambda: f"http://127.0.0.1:{metrics_port}/metrics", "ray_dsmath_reward_mean")]
    for scraper in scrapers:
        scraper.start()
    from ray.job_submission import JobSubmissionClient

    live = LiveViews(run_dir, lambda argv, token=None: status(*argv, token=token), job_id, address)
    live.start()
    # The Jobs API in this process, not `ray job status`: each CLI poll is a Python start that imports Ray (about a
    # CPU-second on the 2-core machine), and the live views and scrapers above need the cores.
    jobs = JobSubmissionClient(address)
    deadline, state = time.monotonic() + 600, ""
    while time.monotonic() < deadline:
        state = jobs.get_job_status(job_id).value.lower()
        if state in ("succeeded", "failed", "stopped"):
            break
        time.sleep(1.0)  # a status poll interval, not a synchronisation sleep
    live.stop.set()
    live.join(timeout=120)
    for scraper in scrapers:
        scraper.stop.set()
        scraper.join(timeout=30)
    logs = subprocess.run([RAY, "job", "logs", "--address", address, job_id], capture_output=True, text=True,
                          env=env, timeout=60).stdout
    return Watched(state, logs, live, scrapers[0].text, scrapers[1].text)


def _check_live_views(live: LiveViews, steps: int) -> None:
    seen_live, seen_job, wrong_token = live.seen_live, live.seen_job, live.wrong_token
    assert seen_live is not None, "dsmath status never saw the live job"
    assert seen_live["run_name"] == "run" and seen_live["state"] == "running" and seen_live["total_steps"] == steps
    assert seen_job is not None, f"dsmath status --job never found the live job through the Jobs API: {live.last_job}"
    assert seen_job["run_name"] == "run" and seen_job["total_steps"] == steps
    assert wrong_token is not None and wrong_token.returncode == 2 and wrong_token.stdout == ""
    assert wrong_token.stderr.strip().count("\n") == 0 and "rejected the request (wrong token)" in wrong_token.stderr


def _check_exported_metrics(prom: str, ray_metrics: str, rewards: set, steps: int) -> None:
    assert sample_values(prom, "dsmath_total_steps", run="run") == [float(steps)], prom[-2000:]
    assert sample_values(prom, "dsmath_reward_mean", run="run")[0] in rewards, prom[-2000:]
    ray_reward = sample_values(ray_metrics, "ray_dsmath_reward_mean", run="run")
    assert ray_reward and ray_reward[0] in rewards, ray_metrics[-3000:]
    versions = sample_values(ray_metrics, "ray_dsmath_generator_weight_version", run="run", generator="0")
    assert versions and versions[0] in {float(v) for v in range(steps + 1)}, ray_metrics[-3000:]
    assert sample_values(ray_metrics, "ray_dsmath_stage_seconds", run="run", stage="update"), ray_metrics[-3000:]


def test_ray_job_submit_runs_dsmath_train_and_status_shows_it(ray_head: tuple[str, dict, int], tmp_path: Path) -> None:
    """`ray job submit -- dsmath train ...` on the head: the job joins that cluster (RAY_ADDRESS), trains, and
    - `dsmath status RUN_DIR` shows the run while it is live (reading the generated RUN_DIR/status_token itself)
      and after it finished;
    - `dsmath status --job ID --address DASHBOARD` finds the live run through the Ray Jobs API; a wrong token is
      one line; once the job ended it answers one line;
    - the run's Prometheus exporter (status.prometheus_port) and Ray's metrics agent (ray.util.metrics) both
      serve the step figures while it runs, equal to the metrics.jsonl rows."""
    import json

    from test_train_loop import TINY

    address, env, metrics_port = ray_head
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    dsmath = str(Path(sys.executable).with_name("dsmath"))
    # 2 CPUs on this head: shrink the actors' CPU requests so generator, learner and reward worker all fit.
    # A tiny step takes ~0.3 s: 24 of them keep the run live long enough for `dsmath status --job` (which imports
    # Ray and reads the job's log) to answer on a loaded 2-core machine; 2 steps were too short for it.
    steps = 24
    args = TINY + [f"run_dir={run_dir}", f"bootstrap.data_dir={cache}", f"steps={steps}", f"checkpoint_every={steps}",
                   "rollout.num_generators=1", "rollout.cpus_per_generator=0.5", "learner.cpus_per_rank=0.5",
                   "status.token=generate", "status.prometheus_port=0"]
    out = subprocess.run([RAY, "job", "submit", "--address", address, "--no-wait", "--", dsmath, "train",
                          "--no-progress", *args], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job_id = next(line.split("'")[1] for line in out.stdout.splitlines() if "submitted successfully" in line)

    def status(*argv: str, token: str | None = None) -> subprocess.CompletedProcess:
        e = {k: v for k, v in env.items() if k != "DSMATH_STATUS_TOKEN"}
        if token:
            e["DSMATH_STATUS_TOKEN"] = token
        return subprocess.run([dsmath, "status", *argv], capture_output=True, text=True, env=e, timeout=120)

    seen = _watch_job(address, env, job_id, run_dir, status, metrics_port)
    assert "succeeded" in seen.state, seen.state[-500:] + seen.logs[-3000:]
    assert "joining Ray cluster" in seen.logs and "[dsmath] status endpoint: {" in seen.logs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["samples_trained"] == steps * 4 * 4
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    _check_live_views(seen.live, steps)
    _check_exported_metrics(seen.prom, seen.ray_metrics, {row["reward/mean"] for row in rows}, steps)

    snap = json.loads(status(str(run_dir), "--json").stdout)
    assert snap["state"] == "finished" and snap["step"] == steps
    ended = status("--job", job_id, "--address", address)
    assert ended.returncode == 0, ended.stderr
    assert ended.stdout.strip() == (f"Ray job {job_id} is succeeded: its status server is gone; `dsmath status "
                                    f"RUN_DIR` on the driver's node shows the final figures")
