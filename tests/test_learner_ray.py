"""Two learner ranks as Ray actors (ZeRO-2, gloo, num_gpus=0) == one rank on the same global batches."""

import pytest
import torch

from dsmath.config import AlgorithmConfig
from learner.batch import TrainBatch, collate_rollouts
from test_learner import assert_same_update, learner_cfg, make_learner, make_tiny_model, random_rollouts

pytestmark = pytest.mark.slow


def batches_for(logprobs_fn, seed):
    prompts, comps, adv = random_rollouts(seed, n=8, group=4)
    batch = collate_rollouts(prompts, comps, pad_id=0, advantages=adv)
    return TrainBatch(**{**batch.__dict__, "old_logprobs": logprobs_fn(batch)})


@pytest.fixture(scope="module")
def ray_local():
    import os

    import ray

    env = {k: os.environ[k] for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "RAY_AUTH_MODE")}
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_two_ray_ranks_equal_one_rank(ray_local, tmp_path):
    from learner.ray_group import LearnerGroup

    model_dir = make_tiny_model(tmp_path / "model")
    algo_cfg = AlgorithmConfig(beta=0.04, clip_eps_high=0.28)
    cfg = learner_cfg(zero_stage=2, micro_batch_size=3, cpus_per_rank=1.0)

    single = make_learner(model_dir, zero_stage=2, micro_batch_size=3)
    initial = {k: v.clone() for k, v in single.named_weights()}  # views otherwise
    losses_1 = []
    for seed in (30, 31):
        batch = batches_for(single.logprobs, seed)
        losses_1 += [single.grpo_step(batch)["loss"], single.grpo_step(batch)["loss"]]

    group = LearnerGroup(model_dir, cfg, algo_cfg, num_ranks=2, seed=0)
    try:
        losses_2, metrics = [], None
        for seed in (30, 31):
            batch = batches_for(group.logprobs, seed)
            metrics = group.grpo_step(batch)
            losses_2.append(metrics["loss"])
            losses_2.append(group.grpo_step(batch)["loss"])
        assert metrics["tokens"] == float(batch.loss_mask.sum())  # reduced over both ranks
        assert losses_2 == pytest.approx(losses_1, abs=1e-5)
        two = dict(group.named_weights())
        assert_same_update(initial, dict(single.named_weights()), [two])
        ref = dict(single.named_weights())
        print(f"1 vs 2 ranks: max |loss diff| {max(abs(a - b) for a, b in zip(losses_1, losses_2)):.3g}, "
              f"max |param diff| {max(float((ref[k] - t).abs().max()) for k, t in two.items()):.3g}")

        # A 2-rank checkpoint holds both ranks' optimizer shards and restores them.
        group.save_checkpoint(tmp_path / "ckpt" / "step_4", {"step": 4})
        names = {p.name for p in (tmp_path / "ckpt" / "step_4").rglob("*optim_states.pt")}
        assert len(names) == 2, names
        group.grpo_step(batch)
        assert group.load_checkpoint(tmp_path / "ckpt") == {"step": 4}
        assert all(torch.equal(t, two[k]) for k, t in group.named_weights())
    finally:
        group.shutdown()
