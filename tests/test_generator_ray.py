"""Generators as real Ray actors: weight updates by each CPU transport land in the vLLM engines (log-probs then
match the sender's model), stale versions are refused, and two generators load-balanced over a prompt stream
have every rollout rewarded exactly once."""

import sys

import pytest
import torch

from dsmath.config import RolloutConfig, TrainConfig, WeightSyncConfig
from test_generator import hf_logprobs, request, tiny_model_dir

# Ray plus two vLLM engines take 30-110 s to start on a shared 2-core machine.
pytestmark = pytest.mark.slow


class SenderActor:
    """Stands in for the learner's rank-0 process: an HF model, perturbed between versions, plus a sender."""

    def __init__(self, model_dir):
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.sender = None

    def configure(self, cfg):
        from learner.weight_sync import make_sender

        self.sender = make_sender(cfg)

    def perturb(self, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(0.2 * p.std() * torch.randn(p.shape, generator=g))

    def sync_weights(self, version, receivers):
        return self.sender.send(self.model.state_dict().items(), version, receivers)

    def logprobs(self, prompt_ids, completion_ids):
        return hf_logprobs(self.model, prompt_ids, completion_ids)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from actors.generator import generator_actor_class
    from actors.reward_worker import reward_worker_actor_class

    path = str(tmp_path_factory.mktemp("tiny"))
    tiny_model_dir(path)
    for name in (__name__, "test_generator"):  # workers cannot import test modules: ship them by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[name])
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    Gen = generator_actor_class(num_cpus=0.5)
    gens = {f"gen-{i}": Gen.remote(path, RolloutConfig(kv_cache_space_gib=1), generator_id=f"gen-{i}", seed=i)
            for i in range(2)}
    workers = [reward_worker_actor_class(num_cpus=0.25).remote(TrainConfig(), worker_id=f"rw-{i}") for i in range(2)]
    sender = ray.remote(num_cpus=0.25)(SenderActor).remote(path)
    ray.get([g.health.remote() for g in gens.values()] + [w.stats.remote() for w in workers])
    yield ray, gens, workers, sender
    ray.shutdown()


@pytest.mark.parametrize("transport", ["object_store", "gloo"])
def test_weight_update_lands_in_engines(cluster, transport):
    from learner.weight_sync import StaleWeightVersion, broadcast_weights

    ray, gens, _, sender = cluster
    version = ray.get(gens["gen-0"].get_weight_version.remote())
    probe = [request("p", "Q: what is 3 plus 4?\nA:", temperature=0.0, max_new_tokens=10)]
    (before,) = ray.get(gens["gen-0"].generate.remote(probe, version))
    ray.get(sender.perturb.remote(version + 1))
    cfg = WeightSyncConfig(transport=transport, bucket_mb=0.25, timeout_s=60.0)
    ray.get(sender.configure.remote(cfg))
    stats = broadcast_weights(sender, gens, version + 1, cfg)
    assert stats.buckets > 3 and stats.num_receivers == 2 and stats.bytes > 1_000_000
    print(f"{transport}: {stats.as_dict()}")
    for name, gen in gens.items():
        assert ray.get(gen.health.remote()).weight_version == version + 1
        with pytest.raises(StaleWeightVersion):
            try:
                ray.get(gen.generate.remote(probe, version))
            except ray.exceptions.RayTaskError as exc:
                raise exc.cause
        (after,) = ray.get(gen.generate.remote(probe, version + 1))
        assert after.weight_version == version + 1
        new_ref = ray.get(sender.logprobs.remote(after.prompt_ids, after.completion_ids))
        assert (new_ref - torch.tensor(after.logprobs)).abs().max().item() < 1e-4
    # The old completion's log-probs under the new weights differ: the test can see a missed update.
    old_under_new = ray.get(sender.logprobs.remote(before.prompt_ids, before.completion_ids))
    assert (old_under_new - torch.tensor(before.logprobs)).abs().max().item() > 1e-2


def test_two_generators_load_balanced_every_rollout_rewarded_once(cluster):
    from actors.pool import GeneratorPool, RewardPool, stream_rollouts_and_rewards

    ray, gens, workers, _ = cluster
    version = ray.get(gens["gen-0"].get_weight_version.remote())
    gen_pool, reward_pool = GeneratorPool(list(gens.values())), RewardPool(workers)
    chunks = [[request(f"q{i}-{j}", f"Q: what is {i} plus {j}?\nA:", n=3, temperature=1.0, max_new_tokens=8)
               for j in range(2)] for i in range(6)]
    rollouts, rewards = stream_rollouts_and_rewards(gen_pool, reward_pool, chunks, version, timeout_s=120)
    keys = [(r.request_id, r.sample_index) for r in rollouts]
    assert len(keys) == len(set(keys)) == 6 * 2 * 3
    assert sorted(keys) == sorted((r.request_id, r.sample_index) for r in rewards)
    assert {r.generator_id for r in rollouts} == set(gens)  # both generators served
    assert gen_pool.submitted == gen_pool.completed == 36 and sum(gen_pool.outstanding) == 0
    assert reward_pool.submitted == reward_pool.completed == 36 and sum(reward_pool.outstanding) == 0
    scored = ray.get([w.stats.remote() for w in workers])
    assert sum(s["scored"] for s in scored) == 36 and all(s["scored"] > 0 for s in scored)
