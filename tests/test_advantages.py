"""The driver's advantages stage (dsmath.advantages): one rule per algorithm/supervision switch."""

import pytest

from dsmath.methods import sample_advantages
from dsmath.config import AlgorithmConfig
from dsmath.records import Problem, RewardResult, Rollout

P = Problem(uid="p", question="q", answer="1")


def _ro(i: int, n_tokens: int) -> Rollout:
    return Rollout(request_id="r", sample_index=i, problem=P, prompt="q", prompt_ids=(1,), completion="c",
                   completion_ids=tuple(range(n_tokens)), logprobs=(0.0,) * n_tokens, finish_reason="stop",
                   weight_version=0, generator_id="g")


def _res(i: int, reward: float, steps=(), ends=()) -> RewardResult:
    return RewardResult(request_id="r", sample_index=i, reward=reward, correct=reward > 0, reason="",
                        step_rewards=tuple(steps), step_end_token_index=tuple(ends))


def test_outcome_grpo_is_the_group_zscore():
    rollouts = [_ro(i, 3) for i in range(4)]
    results = [_res(i, r) for i, r in enumerate([1.0, 0.0, 0.0, 0.0])]
    adv = sample_advantages(AlgorithmConfig(), rollouts, results, group_size=4)
    # mean 0.25, unbiased std 0.5: (1-0.25)/0.5 = 1.5, (0-0.25)/0.5 = -0.5
    assert adv == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)


def test_online_rft_coefficient_is_one_for_correct_zero_otherwise():
    rollouts = [_ro(i, 2) for i in range(3)]
    results = [_res(0, 1.0), _res(1, 0.0), _res(2, 1.0)]
    assert sample_advantages(AlgorithmConfig(name="online_rft"), rollouts, results, 3) == [1.0, 0.0, 1.0]


def test_process_supervision_sums_normalised_step_rewards_ending_at_or_after_each_token():
    # Group of 2: sample 0 has steps ending at tokens 1 and 3 (rewards 1, 0); sample 1 one step at token 2 (reward 0).
    rollouts = [_ro(0, 4), _ro(1, 3)]
    results = [_res(0, 0.0, steps=(1.0, 0.0), ends=(1, 3)), _res(1, 0.0, steps=(0.0,), ends=(2,))]
    adv = sample_advantages(AlgorithmConfig(advantage="process"), rollouts, results, group_size=2)
    # steps {1, 0, 0}: mean 1/3, unbiased std sqrt(1/3) -> normalised 1.1547, -0.5774, -0.5774
    hi, lo = (1 - 1 / 3) / (1 / 3) ** 0.5, (0 - 1 / 3) / (1 / 3) ** 0.5
    assert adv[0] == pytest.approx([hi + lo, hi + lo, lo, lo], abs=1e-5)
    assert adv[1] == pytest.approx([lo, lo, lo], abs=1e-5)
    assert [len(a) for a in adv] == [4, 3]
