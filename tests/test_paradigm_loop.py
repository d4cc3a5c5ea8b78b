"""DPO through the real loop (Ray, vLLM, DeepSpeed): two steps on the tiny test model, with groups of 8 so that
right/wrong pairs exist. GRPO, online RFT, RFT, PPO and DPO as `dsmath compare` runs them (one budget, offline
step 1 equal to online step 1, PPO's value model) are checked on the README's compare block, in
tests/test_docs_commands.py."""

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
