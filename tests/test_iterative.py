"""Iterative GRPO end to end (real Ray, vLLM, DeepSpeed): two iterations of two steps with a process reward model.

The reference really is reset: iteration 2 starts from iteration 1's final policy, the reference built from it
holds exactly those weights (not the initial model's), and the first step of every iteration measures KL = 0.
The reward model's replay is 10 % of each later round's training set.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from dsmath.config import load_config
from tiny_loop import TINY_LOOP
from dsmath.reward_models import replay_count
from dsmath.utils.metrics import read_metrics

pytestmark = pytest.mark.slow

TINY = TINY_LOOP + [
    "rm.questions=4",
    "rm.samples_per_question=3",
    "rm.completions_per_prefix=2",
    "rm.epochs=1",
    "steps=2",
]


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_two_iterations_reset_the_reference_and_replay_ten_percent(tmp_path, ray_cluster):
    from wiring.iterative import iterate
    from dsmath.model_folder import resolve

    run = tmp_path / "iter"
    cfg = load_config("tiny_cpu", TINY + [f"run_dir={run}", f"bootstrap.data_dir={tmp_path / 'cache'}"])
    summary = iterate(cfg, iterations=2, kind="process", progress=False)
    records = json.loads((run / "iterations.json").read_text())
    assert [r["iteration"] for r in records] == [0, 1, 2]
    initial = records[1]["policy_start"]
    end1 = resolve(run / "iter-1" / "checkpoints")
    assert records[1]["policy_end"] == str(end1) and records[2]["policy_start"] == str(end1)

    # Iteration 2's run started from (and built its reference from) iteration 1's final policy.
    cfg2 = yaml.safe_load((run / "iter-2" / "config.yaml").read_text())
    assert cfg2["model"]["path"] == str(end1)
    assert cfg2["algorithm"]["advantage"] == "process"
    assert cfg2["reward"]["model_path"] == records[1]["rm"]["checkpoint"]

    # Iteration 1 changed the policy, so "reference = end of iteration 1" differs from "reference = initial".
    w0, w1 = _weights(Path(initial)), _weights(end1)
    assert max(float((w0[k] - w1[k]).abs().max()) for k in w0) > 1e-4

    # The reference the learner builds for iteration 2 holds iteration 1's final weights, not the initial ones.
    # (In a fresh Ray worker process: DeepSpeed keeps process-wide state from the in-process bootstrap.)
    def reference_vs(start: str, others: list[str]) -> list[float]:
        from safetensors.torch import load_file

        from dsmath.config import AlgorithmConfig, LearnerConfig
        from learner.policy import PolicyLearner

        learner = PolicyLearner(start, LearnerConfig(lr=1e-3, zero_stage=0), AlgorithmConfig(), with_reference=True)
        ref = {k: v.detach() for k, v in learner.reference.state_dict().items()}
        saved = [load_file(f"{o}/model.safetensors") for o in others]
        return [max(float((ref[k] - w[k]).abs().max()) for k in w) for w in saved]

    task = ray_cluster.remote(num_cpus=1, max_calls=1)(reference_vs)
    to_end1, to_initial = ray_cluster.get(task.remote(str(end1), [str(end1), initial]))
    assert to_end1 == 0.0 and to_initial > 1e-4, (to_end1, to_initial)

    # Behaviour in the real runs: the first step of every iteration sees policy == reference (KL exactly 0);
    # by the second step the policy has moved away from it.
    for k in (1, 2):
        rows = read_metrics(run / f"iter-{k}")
        assert [r["step"] for r in rows] == [1, 2]
        assert rows[0]["train/kl"] == 0.0, (k, rows[0]["train/kl"])
        assert rows[1]["train/kl"] > 0.0, (k, rows[1]["train/kl"])

    # Reward model: round k trains on its fresh examples + 10 % replay of all earlier rounds.
    fresh = [r["rm"]["fresh_examples"] for r in records]
    for k in (1, 2):
        rm = records[k]["rm"]
        assert rm["history_examples"] == sum(fresh[:k])
        assert rm["replayed_examples"] == min(replay_count(rm["fresh_examples"], 0.1), rm["history_examples"])
        assert rm["train_examples"] == rm["fresh_examples"] + rm["replayed_examples"]
        assert (run / f"iter-{k}" / "rm" / "checkpoint" / "config.json").exists()
        assert (run / f"iter-{k}" / "summary.json").exists()
    assert records[0]["rm"]["replayed_examples"] == 0
    assert summary["samples_trained"] == 2 * 2 * 4 * 4
    print("kl per iteration:", [[r["train/kl"] for r in read_metrics(run / f"iter-{k}")] for k in (1, 2)],
          "rm fresh/replayed:", [(r["rm"]["fresh_examples"], r["rm"]["replayed_examples"]) for r in records])
