"""Async mode and dynamic sampling through the real loop (Ray + vLLM + DeepSpeed, tiny model)."""

import pytest

from dsmath.config import load_config
from tiny_loop import TINY_LOOP
from dsmath.utils.metrics import read_metrics

pytestmark = pytest.mark.slow

# The tiny test model of tests/test_train_loop.py, one generator.
TINY = TINY_LOOP + [
    "eval_size=8",
]


def test_async_mode_overlaps_and_never_trains_on_samples_older_than_the_bound(tmp_path, ray_cluster, cache_dir):
    from wiring.driver import train

    cfg = load_config("tiny_cpu", TINY + [f"run_dir={tmp_path / 'run'}", f"bootstrap.data_dir={cache_dir}", "steps=4",
                                          "async.enabled=true", "async.max_staleness=1", "eval_every=2",
                                          "reward.format_penalty=1.0"])  # non-zero advantages: weights move
    summary = train(cfg, progress=False)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # Step 1 samples with the initial weights; every later batch was generated during the previous update.
    assert [r["staleness/max"] for r in rows] == [0, 1, 1, 1]
    assert all(r["staleness/max"] <= cfg.async_.max_staleness for r in rows)
    for r in rows:
        assert r["weight_version"] == r["step"]
        # Probed at the top of the step, after the sync: the generators hold the learner's pre-update version.
        assert r["generators/version_min"] == r["generators/version_max"] == r["step"] - 1
        assert "train/is_weight_mean" in r  # the truncated importance weights went into the loss
        assert 0 < r["train/is_weight_mean"] <= cfg.async_.is_correction_clip
    # Step 1 is on-policy; a later batch, sampled before an update that moved the weights, is not: the
    # generator's log-probs differ from the learner's (a step whose rewards were all equal moves nothing).
    assert rows[0]["rollout/logprob_abs_diff_max"] < 1e-4
    assert max(r["rollout/logprob_abs_diff_max"] for r in rows[1:]) > 1e-4
    assert "eval/accuracy" in rows[1]
    assert summary["samples_trained"] == 4 * 4 * 4
    assert summary["weight_version"] == 4


def test_dynamic_sampling_fills_the_batch_with_informative_groups_and_counts_the_dropped(tmp_path, ray_cluster,
                                                                                        cache_dir):
    from wiring.driver import train

    q, g = 4, 8
    # A format penalty makes groups informative often enough (some samples state an answer, some do not).
    cfg = load_config("tiny_cpu", TINY + [f"run_dir={tmp_path / 'run'}", f"bootstrap.data_dir={cache_dir}", "steps=3",
                                          "bootstrap.sft_steps=200", "rollout.max_new_tokens=32",
                                          "rollout.dynamic_sampling=true", "rollout.dynamic_sampling_max_rounds=4", "rollout.group_size=8",
                                          "reward.format_penalty=1.0", "rollout.overlong=mask"])
    summary = train(cfg, progress=False)
    rows = read_metrics(tmp_path / "run")
    trained_before = 0
    drawn = 0
    for r in rows:
        trained = r["samples_trained"] - trained_before
        trained_before = r["samples_trained"]
        kept_groups = trained // g
        assert trained % g == 0 and 1 <= kept_groups <= q
        print(f"step {r['step']}: kept {kept_groups}/{q} groups, dropped {r['dynamic_sampling/dropped_groups']}, "
              f"rounds {r['dynamic_sampling/rounds']}, zero-std fraction {r['zero_std_groups']}")
        if r["zero_std_groups"] == 0:  # every kept group carries a gradient; the batch is full or rounds ran out
            assert kept_groups == q or r["dynamic_sampling/rounds"] == 4
        else:  # nothing informative in any round: the last round is trained on (KL only), all of it uninformative
            assert r["dynamic_sampling/rounds"] == 4 and r["zero_std_groups"] == 1.0
        drawn += kept_groups + r["dynamic_sampling/dropped_groups"]
    assert any(r["zero_std_groups"] == 0 and r["samples_trained"] == (i + 1) * q * g for i, r in enumerate(rows)), \
        "no step filled its batch: the test model is too weak for this test"
    assert sum(r["dynamic_sampling/dropped_groups"] for r in rows) > 0, "nothing was dropped: test is vacuous"
    assert summary["samples_trained"] == trained_before
    # Every question drawn from the stream was either trained on or counted as dropped.
    import json

    from wiring.driver import RunState  # noqa: F401 - the checkpointed state names data_position
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000003" / "trainer_state.json").read_text())["extra"]
    assert state["data_position"] == drawn
