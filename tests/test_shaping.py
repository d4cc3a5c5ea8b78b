"""dsmath.shaping: dynamic sampling filter, overlong penalty, truncated importance weights (vs loop twins)."""

import math

import pytest
import torch

from dsmath import shaping


def test_informative_groups_drop_all_equal_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # groups of 3
    assert shaping.informative_groups(rewards, 3).tolist() == [False, True, False]
    assert shaping.informative_groups_loop(rewards.tolist(), 3) == [False, True, False]


@pytest.mark.parametrize("buffer", [0, 4, 16])
def test_overlong_penalty_matches_loop_and_hand_values(buffer):
    lengths = list(range(0, 40))
    vec = shaping.overlong_penalty(torch.tensor(lengths), max_len=32, buffer=buffer, factor=0.5)
    assert vec.tolist() == pytest.approx(shaping.overlong_penalty_loop(lengths, 32, buffer, 0.5), abs=1e-7)
    assert vec[32] == pytest.approx(-0.5) and vec[0] == 0.0
    if buffer == 4:  # ramp over 28..32: 30 is half-way
        assert vec[28] == 0.0 and vec[30] == pytest.approx(-0.25)


def test_truncated_is_weights_hand_computed():
    # Sampled tokens' log-probs: generator (older policy) vs learner (current). Ratios e^0.5, e^-1, e^2 -> clip 2.
    behaviour = torch.tensor([[-1.0, -2.0, -3.0, 0.0]])
    proximal = torch.tensor([[-0.5, -3.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = shaping.truncated_is_weights(proximal, behaviour, mask, clip=2.0)
    assert w.tolist()[0] == pytest.approx([math.exp(0.5), math.exp(-1.0), 2.0, 1.0])
    loop = shaping.truncated_is_weights_loop(proximal.tolist(), behaviour.tolist(), mask.tolist(), 2.0)
    assert w.tolist()[0] == pytest.approx(loop[0])
    unclipped = shaping.truncated_is_weights(proximal, behaviour, mask, clip=0.0)
    assert unclipped[0, 2] == pytest.approx(math.exp(2.0))


def test_is_weights_scale_the_policy_gradient_in_the_loss():
    """The correction is applied: grpo_loss's gradient w.r.t. logp is multiplied token-wise by the weights."""
    from dsmath.grpo import grpo_loss

    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = logp.detach().clone()
    adv = torch.tensor([1.0])
    mask = torch.ones(1, 2)
    w = torch.tensor([[0.5, 2.0]])
    loss, _ = grpo_loss(logp, old, None, adv, mask, beta=0.0, loss_agg="token_mean", is_weights=w)
    loss.backward()
    # token_mean over 2 tokens of -ratio*A*w: d/dlogp = -A*w/2 at ratio 1
    assert logp.grad.tolist()[0] == pytest.approx([-0.25, -1.0])
