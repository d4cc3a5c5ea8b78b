"""The algorithm switches through the real loop (Ray, vLLM, DeepSpeed): rft / online_rft via `dsmath compare`,
ppo and dpo via the driver — two steps each on the tiny test model, samples counted."""

import json
import math

import pytest

from dsmath.config import load_config
from tiny_loop import TINY_LOOP
from dsmath.utils.metrics import read_metrics

pytestmark = pytest.mark.slow

TINY = TINY_LOOP + [
    "bootstrap.num_heldout_problems=16",
    "bootstrap.sft_steps=300",  # enough for a few right answers (DPO needs right/wrong pairs)
    "bootstrap.levels=[1]",
    "eval_size=8",
    "checkpoint_every=0",
    "steps=2",
]
SAMPLES = 2 * 4 * 4


def test_compare_runs_rft_and_online_rft_with_one_budget_and_writes_table_and_plot(tmp_path, ray_cluster, cache_dir,
                                                                                   capsys):
    from wiring.cli import main

    (tmp_path / "online_rft.yaml").write_text("algorithm: {name: online_rft, beta: 0.0}\n")
    (tmp_path / "rft.yaml").write_text("algorithm: {name: rft, beta: 0.0}\n")
    out = tmp_path / "cmp"
    rc = main(["compare", "--config", str(tmp_path / "online_rft.yaml"), "--config", str(tmp_path / "rft.yaml"),
               "--samples", str(SAMPLES), "--eval-every", "1", "--out", str(out), "--no-progress",
               *[o for o in TINY if not o.startswith("steps=")], f"bootstrap.data_dir={cache_dir}"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.count("[compare] 1/2 online_rft") == 2 and "[compare] 2/2 rft" in printed
    table = (out / "compare.md").read_text()
    assert "| online_rft | online_rft | online |" in table and "| rft | rft | offline |" in table
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    rows = {r["name"]: r for r in json.loads((out / "compare.json").read_text())}
    for name in ("online_rft", "rft"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["samples_trained"] == SAMPLES and summary["steps"] == 2
        # Curve: before, after step 1 (eval_every 1; the last step's eval is the final one).
        assert [p[1] for p in rows[name]["curve"]] == [0, SAMPLES // 2, SAMPLES]
    on, off = read_metrics(out / "online_rft"), read_metrics(out / "rft")
    # Offline step s uses the questions and sampling seed of online step s, drawn from the starting policy:
    # at step 1 both are the starting policy, so the samples (hence rewards, lengths) are identical.
    for key in ("reward/mean", "response_length/mean"):
        assert on[0][key] == off[0][key], key
    # The generators still receive every update (evaluation needs the current weights); the pool does not.
    assert [r["weight_version"] for r in off] == [1, 2]
    # The coefficient is I(o): the mean advantage over trained tokens lies in [0, 1], never negative.
    for r in on + off:
        assert 0.0 <= r["train/adv_min"] and r["train/adv_max"] <= 1.0


def test_dpo_trains_on_right_wrong_pairs_against_the_frozen_reference(tmp_path, ray_cluster, cache_dir):
    from wiring.driver import train

    cfg = load_config("tiny_cpu", TINY + [f"run_dir={tmp_path / 'run'}", f"bootstrap.data_dir={cache_dir}",
                                          "algorithm.name=dpo", "algorithm.beta=0", "algorithm.dpo_beta=0.5",
                                          "rollout.group_size=8"])
    summary = train(cfg, progress=False)
    rows = read_metrics(tmp_path / "run")
    assert summary["samples_trained"] == 2 * 4 * 8
    for r in rows:
        assert r["dpo/pairs"] + r["dpo/pairs_left_for_ranks"] <= 4 * 8 // 2
        assert 0 <= r["dpo/groups_without_pair"] <= 4
    trained = [r for r in rows if r["dpo/skipped_step"] == 0.0]
    assert trained, f"no step had a right/wrong pair: {rows}"
    first = trained[0]
    if first["step"] == 1:  # the policy is the reference: every log-ratio is 0, the loss is log 2, margin 0
        assert first["dpo/loss"] == pytest.approx(math.log(2), abs=1e-4)
        assert abs(first["dpo/margin"]) < 1e-4
    assert all(math.isfinite(r["train/grad_norm"]) for r in trained)


def test_ppo_learns_a_value_model_beside_the_policy(tmp_path, ray_cluster, cache_dir):
    from wiring.driver import train

    cfg = load_config("tiny_cpu", TINY + [f"run_dir={tmp_path / 'run'}", f"bootstrap.data_dir={cache_dir}",
                                          "algorithm.name=ppo", "algorithm.beta=0.04", "algorithm.value_lr=1e-3"])
    summary = train(cfg, progress=False)
    rows = read_metrics(tmp_path / "run")
    assert summary["samples_trained"] == SAMPLES and [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["time/values"] > 0 and r["time/value_update"] > 0
        assert math.isfinite(r["value/loss"]) and r["value/loss"] >= 0
        assert r["weight_version"] == r["step"]
    # Step 1: old policy == reference, so the per-token KL penalty is 0; whitened advantages have mean 0.
    assert abs(rows[0]["ppo/kl_penalty_mean"]) < 1e-5
    assert abs(rows[0]["train/adv_mean"]) < 1e-4
    # The value model was trained: its error on step 2's returns differs from step 1's (it moved).
    assert rows[0]["value/abs_err"] != rows[1]["value/abs_err"]
