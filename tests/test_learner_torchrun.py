"""Two learner ranks under torchrun (ZeRO-2, gloo) == one rank on the same global batches.

Opt-in (``DSMATH_TORCHRUN_TEST=1``): it proves the same property as tests/test_learner_ray.py through
the other launcher, and two fresh interpreters importing torch+transformers+DeepSpeed cost ~90 s on
the shared 2-core CI machine.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from learner.batch import TrainBatch, collate_rollouts
from test_learner import assert_same_update, make_learner, make_tiny_model, random_rollouts

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("DSMATH_TORCHRUN_TEST"), reason="opt-in: set DSMATH_TORCHRUN_TEST=1"),
]
TESTS_DIR = Path(__file__).parent

WORKER = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from dsmath.config import AlgorithmConfig
    from learner.batch import TrainBatch, collate_rollouts
    from learner.policy import PolicyLearner
    from test_learner import learner_cfg, random_rollouts

    model_dir, out = sys.argv[2], sys.argv[3]
    learner = PolicyLearner.from_env(model_dir, learner_cfg(zero_stage=2, micro_batch_size=3),
                                     AlgorithmConfig(beta=0.04, clip_eps_high=0.28), seed=0)
    losses = []
    for seed in (40, 41):
        prompts, comps, adv = random_rollouts(seed, n=8, group=4)
        batch = collate_rollouts(prompts, comps, pad_id=0, advantages=adv)
        batch = TrainBatch(**{**batch.__dict__, "old_logprobs": learner.logprobs(batch)})
        shard = batch.shard(learner.rank, learner.world_size)
        losses += [learner.grpo_step(shard)["loss"], learner.grpo_step(shard)["loss"]]
    if learner.rank == 0:
        torch.save({k: v.clone() for k, v in learner.named_weights()}, out + "/weights.pt")
        with open(out + "/losses.json", "w") as fh:
            json.dump(losses, fh)
    """
)


def test_two_torchrun_ranks_equal_one_rank(tmp_path):
    from dsmath.utils.net import free_port

    model_dir = make_tiny_model(tmp_path / "model")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), str(TESTS_DIR), str(model_dir), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    single = make_learner(model_dir, zero_stage=2, micro_batch_size=3)
    initial = {k: v.clone() for k, v in single.named_weights()}
    losses = []
    for seed in (40, 41):
        prompts, comps, adv = random_rollouts(seed, n=8, group=4)
        batch = collate_rollouts(prompts, comps, pad_id=0, advantages=adv)
        batch = TrainBatch(**{**batch.__dict__, "old_logprobs": single.logprobs(batch)})
        losses += [single.grpo_step(batch)["loss"], single.grpo_step(batch)["loss"]]
    assert json.loads((tmp_path / "losses.json").read_text()) == pytest.approx(losses, abs=1e-5)
    two = torch.load(tmp_path / "weights.pt")
    assert_same_update(initial, dict(single.named_weights()), [two])
