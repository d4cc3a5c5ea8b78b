"""Two Ray nodes on one machine, the second without the models or the run directory: generators, learner and
reward worker get the models through Ray, and the driver gets the learner's checkpoint back.

A head advertises the driver role; a second ``ray start --address`` node, with its own ports, advertises
``generator``, ``learner`` and ``reward`` and runs in a private mount namespace in which the bootstrap cache —
``model.path``, its data and a reward model — and the folder of run directories are hidden under empty tmpfs
mounts, as on a cluster without a shared filesystem (where ``unshare`` is not permitted the node sees them, and
the test says so). ``dsmath train rollout.weights_from=learner reward.model_path=...`` joins that cluster: the
learner finds no model folder on its node and is sent the whole folder through the object store; the generators
build their engine from the config and tokenizer files sent the same way, with vLLM's dummy weights, and sample
only after the learner pushed its weights; the reward worker writes the reward model it was sent to a temporary
folder and scores with it; the checkpoint the learner saves on its node is copied into the driver's run directory.
The run must equal, step for step, the same run on one node loading ``model.path`` from disk (the reward model's
weight is 0).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dsmath.utils.net import free_port
from learner.checkpoint import read_latest, verify
from ray_nodes import stop_ray_start
from tiny_loop import TINY_LOOP

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
DSMATH = str(Path(sys.executable).with_name("dsmath"))
SAME = ("reward/mean", "response_length/mean", "response_length/max", "train/loss", "train/kl", "samples_trained")


def _node_cmd(temp_dir: str, head: bool, gcs: int, num_cpus: int, resources: str) -> list[str]:
    ports = [free_port() for _ in range(6)]
    names = ("--dashboard-agent-grpc-port", "--dashboard-agent-listen-port", "--metrics-export-port",
             "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")
    cmd = [RAY, "start", "--block", f"--num-cpus={num_cpus}", "--num-gpus=0", "--node-ip-address=127.0.0.1",
           f"--resources={resources}", "--object-store-memory=100000000", "--disable-usage-stats"]
    cmd += [f"{n}={p}" for n, p in zip(names, ports)]
    if head:
        cmd += ["--head", f"--port={gcs}", "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                f"--temp-dir={temp_dir}"]
    else:
        cmd += [f"--address=127.0.0.1:{gcs}"]
    return cmd


def _hiding(*folders: Path) -> list[str]:
    """The command prefix that runs a command with each of ``folders`` hidden under an empty tmpfs of its own (a
    private mount namespace), or [] where this machine does not allow it."""
    mounts = " && ".join(f'mount -t tmpfs -o size=64m none "{f}"' for f in folders)
    prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$0" "$@"']
    empty = " && ".join(f'test -z "$(ls -A "{f}")"' for f in folders)
    probe = subprocess.run([*prefix, "sh", "-c", empty], capture_output=True, timeout=30)
    return prefix if probe.returncode == 0 else []


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """(GCS address, environment, the second node's Ray node id, the bootstrap cache, a folder for run directories,
    whether node 2 cannot see those two, a command prefix that runs a command in node 2's mount namespace, node 2's
    temp dir)."""
    if not Path(RAY).exists():
        pytest.skip("ray CLI not installed next to this Python")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "DSMATH_", "PYTEST"))}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    cache = tmp_path_factory.mktemp("cache")
    runs = tmp_path_factory.mktemp("runs")
    (cache / "probe").write_text("visible")
    hide = _hiding(cache, runs)
    if not hide:
        print("unshare/mount not permitted here: the second node sees the model folder")
    node2_tmp = tmp_path_factory.mktemp("node2_tmp")  # node 2's TMPDIR: what its actors leave behind is seen here
    temp_dir = tempfile.mkdtemp(prefix="ray2n", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    gcs = free_port()
    procs = []
    try:
        log = open(Path(temp_dir) / "head.log", "w")
        procs.append(subprocess.Popen(_node_cmd(temp_dir, True, gcs, 2, '{"driver": 1}'),
                                      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        address = f"127.0.0.1:{gcs}"
        _wait_nodes(address, env, 1, procs)
        log2 = open(Path(temp_dir) / "node2.log", "w")
        procs.append(subprocess.Popen(hide + _node_cmd(temp_dir, False, gcs, 3,
                                                       '{"generator": 1, "learner": 1, "reward": 2}'),
                                      env={**env, "TMPDIR": str(node2_tmp)}, stdout=log2, stderr=subprocess.STDOUT, start_new_session=True))
        nodes = _wait_nodes(address, env, 2, procs)
        (node2,) = [n["NodeID"] for n in nodes if "generator" in n["Resources"]]
        on_node2 = ["nsenter", "-t", str(procs[1].pid), "-m"] if hide else []  # unshare and sh exec'd ray start
        yield address, env, node2, cache, runs, bool(hide), on_node2, node2_tmp
    finally:
        for p in reversed(procs):
            stop_ray_start(p)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_nodes(address: str, env: dict, n: int, procs: list, deadline_s: float = 120) -> list[dict]:
    """The cluster's alive nodes once there are ``n`` (asked through a short-lived driver)."""
    probe = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
             "print('NODES', json.dumps([{'NodeID': x['NodeID'], 'Resources': x['Resources']} "
             "for x in ray.nodes() if x['Alive']]))" % address)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a `ray start` exited early; see its log")
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        line = [x for x in out.stdout.splitlines() if x.startswith("NODES ")]
        if line and len(nodes := json.loads(line[0][6:])) >= n:
            return nodes
        time.sleep(1.0)  # a readiness poll interval
    raise TimeoutError(f"{n} Ray nodes did not come up within {deadline_s} s")


def _train(run_dir: Path, cache: Path, env: dict, extra: list[str], how: str = "--overwrite"
           ) -> subprocess.CompletedProcess:
    args = TINY_LOOP + ["steps=2", "checkpoint_every=0", f"run_dir={run_dir}", f"bootstrap.data_dir={cache}"] + extra
    return subprocess.run([DSMATH, "train", how, *args], env=env, capture_output=True, text=True, timeout=900)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _reward_model(policy: Path, out: Path) -> Path:
    """A reward model beside the policy: its body, a seeded one-label head (the model kind `dsmath rm train` saves)."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForTokenClassification.from_pretrained(str(policy), num_labels=1).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(policy)).save_pretrained(str(out))
    return out


def _reasons(run_dir: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [r for f in sorted((run_dir / "samples").glob("*.parquet")) for r in pq.read_table(f)["reason"].to_pylist()]


def test_generators_learner_and_reward_model_on_a_node_without_them_get_them_through_ray(two_nodes,
                                                                                         tmp_path: Path) -> None:
    address, env, node2, cache, runs, hidden, on_node2, node2_tmp = two_nodes
    # The reference: one local node, generators and learner loading model.path from disk.
    ref = _train(tmp_path / "ref", cache, env, ["rollout.weights_from=path"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    # A reward model kept only on the head (under the hidden cache): scored with weight 0, so the rewards stay the
    # rule's and the run stays comparable, while every sample's reason carries the model's score.
    (ref_gen,) = json.loads((tmp_path / "ref" / "generators.json").read_text())
    rm = _reward_model(Path(ref_gen["model_dir"]), cache / "rm")
    rm_args = [f"reward.model_path={rm}", "reward.model_kind=outcome", "reward.model_weight=0.0"]

    # Its run directory is hidden from node 2 too: the learner's checkpoint lands on node 2 only, and is copied back.
    two = runs / "two"
    out = _train(two, cache, {**env, "RAY_ADDRESS": address},
                 ["rollout.weights_from=learner", "checkpoint_every=2"] + rm_args)
    said = out.stdout + out.stderr
    assert out.returncode == 0, said[-3000:]
    assert "joining Ray cluster at" in said and "generators: weights version 0 from the learner" in said, said[-3000:]
    # The learner's node has no copy of model.path (the bootstrap the driver built): it was sent the folder.
    assert ("sending the model through the object store" in said) == hidden, said[-3000:]
    # The checkpoint the learner saved on node 2 is in the driver's run directory, intact, named by ``latest``.
    assert ("each checkpoint is copied into" in said) == hidden, said[-3000:]
    assert verify(two / "checkpoints" / "step-000002") is None and read_latest(two / "checkpoints") == "step-000002"
    # The reward worker's node has no copy of the reward model either: it scored with the copy it was sent (it
    # would have stopped the run with a one-line error otherwise; its log line stays on node 2, in the hidden
    # run directory).
    reasons = _reasons(two)
    assert len(reasons) == 2 * 4 * 4 and all("; orm weighted score " in r for r in reasons), reasons[:4]

    (gen,) = json.loads((two / "generators.json").read_text())
    assert gen["node_id"] == node2  # placed on the second node by its role resource
    # model.path is the bootstrap's model under ``cache``: the reference loaded it, the two-node run did not.
    assert not gen["model_dir"].startswith(str(cache)) and "object store" in gen["model_source"]
    assert ref_gen["model_dir"].startswith(str(cache)) and ref_gen["model_source"].startswith("folder ")

    # Same weights, same seeds: the same samples, rewards and losses as the one-node run from disk.
    got, want = _rows(two), _rows(tmp_path / "ref")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    for g, w in zip(got, want):
        for k in SAME:
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-7), (k, g[k], w[k])

    # Node 2 loses its copy (a replaced node): `--resume` sends the learner the driver's copy and trains on.
    if on_node2:
        gone = subprocess.run([*on_node2, "rm", "-r", str(two / "checkpoints")], capture_output=True, text=True,
                              timeout=60)
        assert gone.returncode == 0, gone.stderr
    more = _train(two, cache, {**env, "RAY_ADDRESS": address},
                  ["rollout.weights_from=learner", "checkpoint_every=2", "steps=3"] + rm_args, how="--resume")
    said = more.stdout + more.stderr
    assert more.returncode == 0, said[-3000:]
    assert ("--resume: the learner's node had no step-000002; sent the driver's copy" in said) == hidden, said[-3000:]
    assert [r["step"] for r in _rows(two)] == [1, 2, 3] and _rows(two)[:2] == got
    assert read_latest(two / "checkpoints") == "step-000003"
    # The models node 2's actors were sent (the learner's whole folder, the generator's config and tokenizer, the
    # reward model) were written to its temp dir, and went with each run: Ray kills actors without exit handlers.
    # So did the rendezvous file each generator's vLLM engine made there (vllm_dist_*, which vLLM never removes).
    assert sorted(p.name for p in node2_tmp.glob("dsmath-*")) + sorted(p.name for p in node2_tmp.glob("vllm_*")) == []
