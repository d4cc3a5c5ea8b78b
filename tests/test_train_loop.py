"""The online GRPO loop end to end: real Ray, real vLLM, real DeepSpeed, two generators, six steps."""

import json

import pytest

from dsmath.config import load_config
from tiny_loop import TINY_LOOP
from dsmath.utils.metrics import read_metrics

pytestmark = pytest.mark.slow

TINY = TINY_LOOP + [
    "rollout.num_generators=2",
    "checkpoint_every=2",
]


# One uninterrupted run serves every test of this file: the fault-injection run equals its first 3 steps, the
# killed-and-resumed run all 6 (same overrides, so one run less than a reference per test).
SIX_STEPS = TINY + ["steps=6", "checkpoint_every=2", "eval_size=8", "lineage.keep_full_steps=2",
                    "reward.audit_fraction=0.5"]


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, ray_cluster, cache_dir):
    """An uninterrupted 6-step run with two generators: (run dir, summary)."""
    from wiring.driver import train

    run = tmp_path_factory.mktemp("six-steps") / "run"
    cfg = load_config("tiny_cpu", SIX_STEPS + [f"run_dir={run}", f"bootstrap.data_dir={cache_dir}"])
    return run, train(cfg, progress=False)


def test_six_steps_two_generators(six_steps):
    run, summary = six_steps
    tmp_path = run.parent
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        # Synchronous mode: after each step every generator holds exactly the learner's version.
        assert r["generators/version_min"] == r["generators/version_max"] == r["weight_version"] == r["step"]
        assert r["generators/alive"] == 2
        # The generator's sampling logprobs equal the learner's recomputation under the same weights.
        assert r["rollout/logprob_abs_diff_max"] < 1e-3, r["rollout/logprob_abs_diff_max"]
        for stage in ("rollout", "reward", "advantages", "update", "weight_sync"):
            assert r[f"time/{stage}"] >= 0
    print("logprob max abs diff per step:", [r["rollout/logprob_abs_diff_max"] for r in rows])
    # Every completion was rewarded and trained on: none lost.
    assert summary["samples_trained"] == 6 * 4 * 4
    assert rows[-1]["samples_trained"] == 96
    assert summary["steps"] == 6 and summary["heldout_size"] == 8
    assert 0.0 <= summary["heldout_accuracy_before"] <= 1.0 and 0.0 <= summary["heldout_accuracy_after"] <= 1.0
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["samples_trained"] == 96
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-000006"
    # Each checkpoint carries the rows since the one before (a resume restores those it lacks): steps 5-6 here, as
    # logged, less what report_step adds after the checkpoint (its own time and the generators' probe).
    carried = json.loads((run / "checkpoints" / "step-000006" / "trainer_state.json").read_text())["extra"]
    assert [r["step"] for r in carried["metrics_rows"]] == [5, 6]
    for saved_row, logged in zip(carried["metrics_rows"], rows[4:]):
        late = {"time/checkpoint"} | {k for k in logged if k.startswith("generators/")} if saved_row["step"] == 6 else set()
        assert {k: v for k, v in logged.items() if k not in late | {"time"}} == \
            {k: v for k, v in saved_row.items() if k != "time"}, saved_row["step"]
    assert rows[-1]["faults/generator_restarts"] == rows[-1]["faults/reward_worker_restarts"] == 0


def test_every_trained_sample_is_in_the_lineage_files_and_agrees_with_the_metrics(six_steps, capsys):
    """RUN_DIR/samples/ read back with pyarrow: 16 samples per step, each with its generator and weight version,
    advantages of GRPO's sign, the step's metrics recomputed from its rows (reward, accuracy, lengths, the
    verifier audit), steps 1-4 reduced to no text (lineage.keep_full_steps=2), and `dsmath samples` filtering
    it."""
    import pyarrow.parquet as pq

    from wiring.cli import main
    from wiring.lineage import available_steps, read_step

    run, _ = six_steps
    metrics = read_metrics(run)
    assert available_steps(run) == [1, 2, 3, 4, 5, 6]
    assert pq.read_table(run / "samples").num_rows == 96  # the folder reads as one dataset
    generators = set()
    for row in metrics:
        samples, text_kept = read_step(run, row["step"])
        assert len(samples) == 16 and text_kept is (row["step"] > 4)
        assert {s["weight_version"] for s in samples} == {row["step"] - 1}  # synchronous: sampled at step - 1
        generators |= {s["generator_id"] for s in samples}
        assert sum(s["reward"] for s in samples) / 16 == pytest.approx(row["reward/mean"], abs=1e-6)
        assert sum(s["verdict"] == "right" for s in samples) / 16 == row["accuracy"]
        assert sum(s["completion_tokens"] for s in samples) / 16 == pytest.approx(row["response_length/mean"])
        assert sum(s["audited"] for s in samples) == row["verifier/audited"] > 0
        assert sum(s["audit_disagrees"] for s in samples) == row["verifier/disagreements"]
        assert sum(s["no_answer"] for s in samples) / 16 == row["verifier/no_answer_rate"]
        assert not any(s["reissued"] for s in samples) and all(s["grader_seconds"] > 0 for s in samples)
        for q in {s["request_id"] for s in samples}:  # GRPO: above the group's mean reward -> positive advantage
            group = [s for s in samples if s["request_id"] == q]
            mean = sum(s["reward"] for s in group) / len(group)
            for s in group:
                if s["completion_tokens"] and abs(s["reward"] - mean) > 1e-6:
                    assert (s["advantage"] > 0) is (s["reward"] > mean), s
    assert generators == {"generator-0", "generator-1"}
    assert main(["samples", str(run), "--step", "6", "--verdict", "wrong", "--limit", "0"]) == 0
    out = capsys.readouterr().out
    wrong = [s for s in read_step(run, 6)[0] if s["verdict"] == "wrong"]
    assert out.count("\n[s6-") == len(wrong) and f"showing {len(wrong)} of {len(wrong)} matching" in out


def test_killed_generator_and_reward_worker_are_replaced_and_nothing_is_lost(tmp_path, six_steps, cache_dir):
    """ray.kill a generator while its chunks are being generated and the only reward worker before it scores, at
    step 2, and the other generator just before a weight broadcast: all are replaced (generators brought to the
    current weight version), their chunks reissued, the broadcast resent to those still behind, the learner
    untouched — and the run equals the uninterrupted one's first 3 steps sample for sample."""
    import ray

    from wiring.driver import train

    killed = []

    def kill_at_step_2(event, step, gen_pool, reward_pool):
        if step == 2 and event == "rollout_submitted":
            victims = [gen_pool.actors[0], reward_pool.actors[0]]
        elif step == 3 and event == "weight_sync":  # the other generator, just before version 3 is broadcast
            victims = [gen_pool.actors[1]]
        else:
            return
        for actor in victims:
            ray.kill(actor, no_restart=True)
        killed.extend(victims)

    # gloo weight sync: the collective group must re-form with the replacement at the next broadcast.
    cfg = load_config("tiny_cpu", SIX_STEPS + [f"run_dir={tmp_path / 'run'}", f"bootstrap.data_dir={cache_dir}",
                                               "steps=3", "weight_sync.transport=gloo"])
    summary = train(cfg, progress=False, fault_hook=kill_at_step_2)
    assert len(killed) == 3
    rows = read_metrics(tmp_path / "run")
    assert [r["faults/generator_restarts"] for r in rows] == [0, 1, 2]
    assert [r["faults/reward_worker_restarts"] for r in rows] == [0, 1, 1]
    assert rows[1]["faults/reissued_samples"] > 0  # generator 0 owed samples when it died
    for r in rows:  # after the restart, every generator (the replacement too) holds the learner's version
        assert r["generators/alive"] == 2
        assert r["generators/version_min"] == r["generators/version_max"] == r["weight_version"] == r["step"]
    assert summary["samples_trained"] == 3 * 4 * 4  # none trained twice, none lost (the driver checks each key)
    from wiring.lineage import read_step

    reissued = [sum(s["reissued"] for s in read_step(tmp_path / "run", step)[0]) for step in (1, 2)]
    assert reissued[0] == 0 and reissued[1] > 0  # the lineage says which samples were generated or graded again
    reference = read_metrics(six_steps[0])[:3]
    for ra, rb in zip(reference, rows, strict=True):  # reissued chunks carry their sampling seed: same samples, same update
        for key in ("reward/mean", "response_length/mean", "train/loss"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), (ra["step"], key)


def test_resume_after_a_killed_driver_matches_an_uninterrupted_run_step_for_step(tmp_path, six_steps, ray_cluster,
                                                                                 cache_dir):
    """SIGKILL a `dsmath train` driver process once a checkpoint before its last step is on disk (step 2, or step 4
    where the machine was too busy to see step 2 in time: it is then inside the next step), resume to step 6: every
    step equals an uninterrupted 6-step run's (same samples, rewards, losses), and no sample is trained twice or
    lost."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from wiring.driver import train

    overrides = SIX_STEPS + [f"bootstrap.data_dir={cache_dir}"]
    full_dir, full = six_steps

    # The killed run: its own driver process on this test's Ray cluster (its actors die with it).
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    driver = subprocess.Popen([sys.executable, "-m", "wiring.cli", "train", "--no-progress",
                               *overrides, f"run_dir={tmp_path / 'split'}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest = tmp_path / "split" / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while not (latest.exists() and latest.read_text().strip() in ("step-000002", "step-000004")):
        assert driver.poll() is None, driver.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no step-2 or step-4 checkpoint within 600 s"
        time.sleep(0.1)  # polling a file the other process writes; not synchronising threads
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    assert driver.returncode == -signal.SIGKILL
    assert not (tmp_path / "split" / "summary.json").exists()  # it really died mid-run

    resumed = train(load_config("tiny_cpu", overrides + [f"run_dir={tmp_path / 'split'}"]), resume=True,
                    progress=False)
    a, b = read_metrics(full_dir), read_metrics(tmp_path / "split")
    # Rows the killed driver logged after its checkpoint are dropped; a checkpointed step it had not logged yet
    # comes back from the checkpoint (test_checkpoint_integrity.py pins both cases without the timing).
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("reward/mean", "response_length/mean", "train/loss", "train/kl", "train/grad_norm"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
        assert ra["weight_version"] == rb["weight_version"] == ra["step"]
    assert resumed["samples_trained"] == full["samples_trained"] == 6 * 4 * 4
    assert resumed["resumed"] and resumed["steps"] == 6
    assert resumed["heldout_accuracy_before"] == full["heldout_accuracy_before"]
    assert resumed["heldout_accuracy_after"] == full["heldout_accuracy_after"]
