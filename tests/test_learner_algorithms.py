"""The learner's DPO step and PPO's value learner on CPU DeepSpeed (one rank, no Ray)."""

import math

import pytest
import torch

from dsmath import algorithms
from dsmath.config import LearnerConfig
from learner.batch import collate_rollouts
from test_learner import VOCAB, make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-algos") / "model", seed=3)


def _pairs_batch(seed: int = 0, pairs: int = 3):
    g = torch.Generator().manual_seed(seed)
    prompts, comps = [], []
    for _ in range(pairs):
        prompt = torch.randint(2, VOCAB, (3,), generator=g).tolist()
        for _ in range(2):  # chosen, rejected: same question
            prompts.append(prompt)
            comps.append(torch.randint(2, VOCAB, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist())
    return collate_rollouts(prompts, comps, pad_id=0)


def _plain_logprobs(model, batch):
    from dsmath.grpo import token_logprobs

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # [N, T, V]
    return torch.nn.functional.pad(token_logprobs(logits[:, :-1], batch.input_ids[:, 1:]), (0, 1))  # [N, T]


def test_dpo_step_gradient_is_the_dpo_loss_gradient(model_dir):
    """After one step from a policy that differs from its reference, Adam's first moment is 0.1·gradient: it must
    equal 0.1 × autograd's gradient of mean −log σ(β(ρ⁺ − ρ⁻)) on a plain copy of the model."""
    from transformers import AutoModelForCausalLM

    from learner.policy import PolicyLearner

    cfg = LearnerConfig(lr=1e-2, zero_stage=0, micro_batch_size=2, grad_clip=0.0)  # micro-batches split pairs
    learner = PolicyLearner(model_dir, cfg, None, seed=0)
    # Move the policy away from the reference, so that ρ ≠ 0 and the coefficients differ between pairs.
    with torch.no_grad():
        for p in learner.engine.module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p.device))
    policy = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    policy.load_state_dict(learner.engine.module.state_dict())
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    batch = _pairs_batch()
    beta = 0.7

    rho = algorithms.sequence_log_ratio(_plain_logprobs(policy, batch), _plain_logprobs(reference, batch).detach(),
                                        batch.loss_mask)  # [N]
    loss, ref_metrics = algorithms.dpo_loss(rho[0::2], rho[1::2], beta)
    loss.backward()

    metrics = learner.dpo_step(batch, beta)
    assert metrics["dpo/loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert metrics["dpo/margin"] == pytest.approx(ref_metrics["dpo/margin"], abs=1e-5)
    worst = 0.0
    for (name, p), q in zip(policy.named_parameters(), learner.engine.module.parameters()):
        m = learner.optimizer.state[q]["exp_avg"].cpu()  # the learner's device (CUDA where there is one)
        worst = max(worst, float((m - 0.1 * p.grad).abs().max()))
        scale = float(p.grad.abs().max())
        assert torch.allclose(m, 0.1 * p.grad, atol=1e-6 + 1e-4 * scale), name
    print("max |adam m - 0.1 grad|:", worst)


def test_dpo_loss_is_log_two_when_the_policy_is_the_reference(model_dir):
    from learner.policy import PolicyLearner

    learner = PolicyLearner(model_dir, LearnerConfig(lr=1e-2, zero_stage=1, micro_batch_size=4), None, seed=0)
    first = learner.dpo_step(_pairs_batch(1), 0.5)
    assert first["dpo/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["dpo/coef_mean"] == pytest.approx(0.25, abs=1e-6)  # β·σ(0)
    later = [learner.dpo_step(_pairs_batch(1), 0.5) for _ in range(5)]
    assert later[-1]["dpo/loss"] < first["dpo/loss"] - 0.05  # it learns to prefer the chosen completions
    assert later[-1]["dpo/pair_accuracy"] == 1.0


def test_value_learner_is_causal_and_fits_returns(model_dir):
    from dataclasses import replace

    from learner.batch import ValueBatch
    from learner.value import ValueLearner

    learner = ValueLearner(model_dir, LearnerConfig(lr=3e-3, zero_stage=1, micro_batch_size=3), seed=0, value_clip=0.0)
    batch = _pairs_batch(2)
    values = learner.values(batch)  # [N, T]
    assert values.shape == batch.input_ids.shape
    # V at position t reads tokens 0..t only: changing the last real token leaves earlier values alone.
    edited = batch.input_ids.clone()
    last = int(batch.attention_mask[0].sum()) - 1
    edited[0, last] = (edited[0, last] + 1) % VOCAB
    v2 = learner.values(replace(batch, input_ids=edited))
    assert torch.allclose(values[0, :last], v2[0, :last], atol=1e-6)
    assert not torch.allclose(values[0, last], v2[0, last])
    returns = torch.linspace(-1, 1, batch.input_ids.shape[1])[None, :].expand_as(values) * batch.loss_mask  # [N, T]
    target = ValueBatch(input_ids=batch.input_ids, attention_mask=batch.attention_mask, loss_mask=batch.loss_mask,
                        returns=returns.contiguous(), old_values=values)
    with pytest.raises(TypeError, match="needs a ValueBatch"):  # a policy batch's advantages are not returns
        learner.value_step(replace(batch, advantages=returns.contiguous(), old_logprobs=values))
    first = learner.value_step(target)
    for _ in range(30):
        last_m = learner.value_step(replace(target, old_values=learner.values(batch)))
    assert last_m["value/loss"] < 0.25 * first["value/loss"], (first, last_m)
