"""The unified paradigm (DeepSeekMath §5.2.1, Table 10 / Appendix A.1) as switches.

For one hand-built batch, each ``algorithm.name`` must make the learner's loss produce the gradient
coefficient the paper's table gives: GC(q, o, t) = −∂loss/∂log π_θ(o_t) · (sequences) · |o| under the
paper's per-sequence token mean. Plus every kernel of dsmath.algorithms against its loop twin.
"""

import math

import pytest
import torch

from dsmath import algorithms as A
from dsmath import methods
from dsmath import grpo
from dsmath.methods import sample_advantages
from dsmath.config import ConfigError, AlgorithmConfig, load_config
from dsmath.records import Problem, RewardResult, Rollout

P = Problem(uid="p", question="q", answer="1")

# Two questions × G = 3 completions; lengths 3, 2, 4 | 4, 1, 3 completion tokens (T = 4).
LENGTHS = [3, 2, 4, 4, 1, 3]
CORRECT = [True, False, False, True, True, False]  # groups [1,0,0] and [1,1,0]
G = 3


def _ro(i: int) -> Rollout:
    n = LENGTHS[i]
    return Rollout(request_id=f"r{i // G}", sample_index=i % G, problem=P, prompt="q", prompt_ids=(1,), completion="c",
                   completion_ids=tuple(range(n)), logprobs=(0.0,) * n, finish_reason="stop", weight_version=0,
                   generator_id="g")


def _batch():
    torch.manual_seed(0)
    n, t = len(LENGTHS), max(LENGTHS)
    mask = torch.zeros(n, t, dtype=torch.float64)  # [N, T]
    for i, k in enumerate(LENGTHS):
        mask[i, :k] = 1.0
    logp = (-torch.rand(n, t, dtype=torch.float64) * 2).requires_grad_(True)  # [N, T]
    ref = logp.detach() + 0.3 * torch.randn(n, t, dtype=torch.float64)  # [N, T]
    rollouts = [_ro(i) for i in range(n)]
    results = [RewardResult(request_id=ro.request_id, sample_index=ro.sample_index, reward=float(c), correct=c,
                            reason="") for ro, c in zip(rollouts, CORRECT)]
    return logp, ref, mask, rollouts, results


def _coefficient(loss: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, sequences: float) -> torch.Tensor:
    """GC per token read off the gradient of a per-sequence-token-mean loss."""
    (grad,) = torch.autograd.grad(loss, logp, retain_graph=True)
    lengths = mask.sum(dim=1, keepdim=True)  # [N, 1]
    return -grad * sequences * lengths * mask  # [N, T]


def _per_token(values: list[float], mask: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)[:, None] * mask  # [N, T]


@pytest.mark.parametrize("algorithm", ["online_rft", "rft"])
def test_rft_switches_give_coefficient_one_for_right_answers_zero_otherwise(algorithm):
    logp, ref, mask, rollouts, results = _batch()
    adv = torch.tensor(sample_advantages(AlgorithmConfig(name=algorithm, beta=0.0), rollouts, results, G),
                       dtype=torch.float64)
    assert adv.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0)
    gc = _coefficient(loss, logp, mask, sequences=6)
    assert torch.allclose(gc, _per_token([1, 0, 0, 1, 1, 0], mask), atol=1e-12)


def test_rft_and_online_rft_differ_only_in_the_sampling_source():
    assert methods.resolve_sampling("rft", "auto") == "offline"
    assert methods.resolve_sampling("online_rft", "auto") == "online"
    assert methods.resolve_sampling("online_rft", "offline") == "offline"
    assert methods.resolve_sampling("grpo", "auto") == methods.resolve_sampling("ppo", "auto") == "online"
    assert methods.resolve_sampling("dpo", "auto") == "offline"


def test_grpo_switch_gives_normalised_advantage_plus_the_kl_term():
    logp, ref, mask, rollouts, results = _batch()
    beta = 0.04
    adv = torch.tensor(sample_advantages(AlgorithmConfig(beta=beta), rollouts, results, G), dtype=torch.float64)
    # Group [1,0,0]: mean 1/3, unbiased std 1/√3 → +1.1547, −0.5774; group [1,1,0]: +0.5774, −1.1547.
    s = 1 / math.sqrt(3)
    hand = [(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s, (1 / 3) / s, (1 / 3) / s, (-2 / 3) / s]
    assert adv.tolist() == pytest.approx(hand, abs=1e-5)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), ref, adv, mask, beta=beta)
    gc = _coefficient(loss, logp, mask, sequences=6)
    expected = (_per_token(hand, mask) + beta * (torch.exp(ref - logp.detach()) - 1.0)) * mask  # Â + β(π_ref/π_θ − 1)
    assert torch.allclose(gc, expected, atol=1e-5)
    assert torch.allclose(gc, A.grpo_coefficients(adv, logp.detach(), ref, beta) * mask, atol=1e-12)


def test_dpo_switch_gives_plus_minus_beta_sigmoid_of_the_reverse_margin():
    logp, ref, mask, rollouts, results = _batch()
    pairs = A.build_pairs(CORRECT, G)
    # Group 1: one right (0) and two wrong (1, 2) → one pair; group 2: right 3, 4 and wrong 5 → one pair.
    assert (pairs.chosen, pairs.rejected, pairs.groups_without_pair) == ([0, 3], [1, 5], 0)
    beta = 0.5
    rho = A.sequence_log_ratio(logp, ref, mask)  # [N]
    loss, metrics = A.dpo_loss(rho[pairs.chosen], rho[pairs.rejected], beta)
    gc = _coefficient(loss, logp, mask, sequences=len(pairs.chosen))
    rho_d = rho.detach()
    expected = torch.zeros_like(mask)
    for c, r in zip(pairs.chosen, pairs.rejected):
        coef = beta / (1 + math.exp(-beta * (float(rho_d[r]) - float(rho_d[c]))))  # β·σ(βρ⁻ − βρ⁺)
        expected[c] = coef * mask[c]
        expected[r] = -coef * mask[r]
    assert torch.allclose(gc, expected, atol=1e-12)
    # The learner's route: the same coefficients as per-token advantages through grpo_loss (ratio 1, β = 0),
    # normalised by the number of pairs, give the same gradient as the DPO loss itself.
    coef = A.dpo_coefficients(rho_d[pairs.chosen], rho_d[pairs.rejected], beta)
    adv = torch.zeros(len(LENGTHS), dtype=torch.float64)
    adv[pairs.chosen], adv[pairs.rejected] = coef, -coef
    rows = pairs.chosen + pairs.rejected
    surrogate, _ = grpo.grpo_loss(logp[rows], logp.detach()[rows], None, adv[rows], mask[rows], beta=0.0,
                                  normalizer=float(len(pairs.chosen)))
    (g_true,) = torch.autograd.grad(loss, logp)
    (g_sur,) = torch.autograd.grad(surrogate, logp)
    assert torch.allclose(g_true, g_sur, atol=1e-12)
    assert 0 <= metrics["dpo/pair_accuracy"] <= 1


def test_ppo_switch_gives_the_gae_advantage_with_the_kl_as_a_per_token_reward():
    # One completion of 3 tokens, right answer (r_φ = 1), β = 0.1, γ = 1, λ = 0.5.
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -0.5, -2.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.2, -0.5, -1.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.2, 0.4, 0.6, 9.0]], dtype=torch.float64)  # the 9 is padding: never used
    rewards = A.ppo_token_rewards(torch.tensor([1.0]), old, ref, mask, beta=0.1)
    # r_t = −0.1·(old − ref): −0.02, 0, +0.1; the outcome reward joins the last token: 1.1.
    assert rewards[0].tolist() == pytest.approx([-0.02, 0.0, 1.1, 0.0], abs=1e-12)
    adv, ret = A.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    d2 = 1.1 + 0.0 - 0.6  # terminal: V after the last token is 0
    d1 = 0.0 + 0.6 - 0.4
    d0 = -0.02 + 0.4 - 0.2
    a2, a1 = d2, d1 + 0.5 * d2
    a0 = d0 + 0.5 * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0], abs=1e-12)
    assert ret[0].tolist() == pytest.approx([a0 + 0.2, a1 + 0.4, a2 + 0.6, 0.0], abs=1e-12)
    logp = old.clone().requires_grad_(True)
    loss, _ = grpo.grpo_loss(logp, old, None, adv, mask, beta=0.0)  # PPO: the KL is in the reward, not the loss
    gc = _coefficient(loss, logp, mask, sequences=1)
    assert gc[0, :3].tolist() == pytest.approx([a0, a1, a2], abs=1e-12)


def test_ppo_and_dpo_advantage_stage_hands_on_what_their_learners_need():
    _, _, _, rollouts, results = _batch()
    rewards = [0.5 if c else -0.25 for c in CORRECT]
    results = [RewardResult(request_id=r.request_id, sample_index=r.sample_index, reward=x, correct=r.correct,
                            reason="") for r, x in zip(results, rewards)]
    # PPO: the outcome reward r_φ(o) (GAE needs the values, so the learner wrapper finishes the job).
    assert sample_advantages(AlgorithmConfig(name="ppo"), rollouts, results, G) == rewards
    # DPO: I(o), from which the right/wrong pairs are built.
    assert sample_advantages(AlgorithmConfig(name="dpo", beta=0.0), rollouts, results, G) == [1, 0, 0, 1, 1, 0]
    with pytest.raises(ValueError):
        sample_advantages(AlgorithmConfig(name="ppo", advantage="process"), rollouts, results, G)


# --------------------------------------------------------------------------- kernels vs loops


def _random(n=5, t=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, t, generator=g) > 0.25).to(torch.float64)  # holes: tool output / padding
    mask[0] = 0.0  # a row with no loss token
    mask[1, :] = 1.0
    return (mask, -torch.rand(n, t, generator=g, dtype=torch.float64) * 3,
            -torch.rand(n, t, generator=g, dtype=torch.float64) * 3, torch.randn(n, t, generator=g, dtype=torch.float64))


def test_gae_and_ppo_rewards_match_the_loops():
    mask, old, ref, values = _random()
    final = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    rew = A.ppo_token_rewards(final, old, ref, mask, beta=0.05)
    rew_ref = A.ppo_token_rewards_loop(final.tolist(), old.tolist(), ref.tolist(), mask.tolist(), 0.05)
    assert torch.allclose(rew, torch.tensor(rew_ref, dtype=torch.float64), atol=1e-6)
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (1.0, 0.0)):
        adv, ret = A.gae(rew, values, mask, gamma, lam)
        adv_r, ret_r = A.gae_loop(rew.tolist(), values.tolist(), mask.tolist(), gamma, lam)
        assert torch.allclose(adv, torch.tensor(adv_r, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(ret, torch.tensor(ret_r, dtype=torch.float64), atol=1e-6)
    # λ = γ = 1: the advantage is the return-to-go minus the value (Monte Carlo).
    adv, _ = A.gae(rew, values, mask, 1.0, 1.0)
    row = 1
    togo = rew[row].flip(0).cumsum(0).flip(0)
    assert torch.allclose(adv[row], togo - values[row], atol=1e-9)


def test_dpo_kernels_match_the_loops():
    mask, logp, ref, _ = _random(n=6, seed=2)
    rho = A.sequence_log_ratio(logp, ref, mask)
    assert torch.allclose(rho, torch.tensor(A.sequence_log_ratio_loop(logp.tolist(), ref.tolist(), mask.tolist()),
                                            dtype=torch.float64), atol=1e-6)
    assert float(rho[0]) == 0.0  # no loss tokens
    c, r = rho[[1, 2, 3]], rho[[4, 5, 0]]
    loss, _ = A.dpo_loss(c, r, beta=0.3)
    assert float(loss) == pytest.approx(A.dpo_loss_loop(c.tolist(), r.tolist(), 0.3), abs=1e-6)
    assert A.dpo_coefficients(c, r, 0.3).tolist() == pytest.approx(A.dpo_coefficients_loop(c.tolist(), r.tolist(), 0.3),
                                                                   abs=1e-6)
    # Equal policy and reference: loss log 2, coefficient β/2.
    zero = torch.zeros(3, dtype=torch.float64)
    assert float(A.dpo_loss(zero, zero, 0.3)[0]) == pytest.approx(math.log(2), abs=1e-12)
    assert A.dpo_coefficients(zero, zero, 0.3).tolist() == pytest.approx([0.15] * 3)


def test_value_loss_matches_the_loop_and_clips():
    mask, values, old_values, returns = _random(seed=3)
    for clip in (0.2, 0.0):
        loss, _ = A.value_loss(values, old_values, returns, mask, clip=clip)
        assert float(loss) == pytest.approx(
            A.value_loss_loop(values.tolist(), old_values.tolist(), returns.tolist(), mask.tolist(), clip), abs=1e-6)
    # One token, V moved 1.0 past V_old towards nothing: the clipped error (0.2 step) dominates.
    m = torch.ones(1, 1, dtype=torch.float64)
    loss, _ = A.value_loss(torch.tensor([[1.0]]).double(), torch.zeros(1, 1).double(), torch.tensor([[2.0]]).double(),
                           m, clip=0.2)
    assert float(loss) == pytest.approx(0.5 * (2.0 - 0.2) ** 2)


def test_build_pairs_counts_groups_without_a_pair():
    pairs = A.build_pairs([True, True, False, False, False, False, False, False, True, False, False, True],
                          group_size=4)
    assert pairs.chosen == [0, 1, 8, 11] and pairs.rejected == [2, 3, 9, 10]
    assert pairs.groups_without_pair == 1  # the all-wrong second question
    with pytest.raises(ValueError):
        A.build_pairs([True, False, True], group_size=2)


def test_whiten_is_zero_mean_unit_std_on_the_mask():
    mask, x, _, _ = _random(seed=4)
    w = A.whiten(x, mask)
    sel = mask > 0
    assert float(w[sel].mean()) == pytest.approx(0.0, abs=1e-9)
    assert float(w[sel].std(unbiased=False)) == pytest.approx(1.0, abs=1e-6)
    assert float(w[~sel].abs().max()) == 0.0


@pytest.mark.parametrize("overrides, key", [
    (["algorithm.name=rft", "algorithm.beta=0", "algorithm.sampling=online"], "algorithm.sampling"),
    (["algorithm.name=ppo", "algorithm.sampling=offline"], "algorithm.sampling"),
    (["algorithm.name=online_rft"], "algorithm.beta"),
    (["algorithm.name=dpo", "algorithm.beta=0", "rollout.group_size=1"], "rollout.group_size"),
    (["algorithm.name=dpo", "algorithm.beta=0", "algorithm.dpo_beta=0"], "algorithm.dpo_beta"),
    (["algorithm.name=ppo", "algorithm.gae_lambda=1.5"], "algorithm.gae_lambda"),
    (["algorithm.sampling=sometimes"], "algorithm.sampling"),
])
def test_impossible_combinations_are_one_line_errors_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config("tiny_cpu", overrides)
    msg = str(err.value)
    assert msg.startswith(key) and "\n" not in msg


def test_every_sensible_table_10_combination_loads():
    for algorithm, sampling in (("grpo", "online"), ("grpo", "offline"), ("online_rft", "online"),
                                ("online_rft", "offline"), ("rft", "offline"), ("dpo", "offline"), ("dpo", "online"),
                                ("ppo", "online")):
        beta = "0.04" if algorithm in ("grpo", "ppo") else "0"
        cfg = load_config("tiny_cpu", [f"algorithm.name={algorithm}", f"algorithm.sampling={sampling}",
                                       f"algorithm.beta={beta}"])
        assert methods.resolve_sampling(cfg.algorithm.name, cfg.algorithm.sampling) == sampling
