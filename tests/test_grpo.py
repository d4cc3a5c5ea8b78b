"""GRPO math: hand-computed values, and vectorised kernels == plain per-token loops (float64, 1e-6)."""

import math
import random

import pytest
import torch

from dsmath import grpo



@pytest.fixture(autouse=True)
def _float64():
    """Reference comparisons run in float64; restore the default for other test modules."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)

SQRT3 = math.sqrt(3.0)


# ---------------------------------------------------------------- advantages, by hand

def test_group_advantages_hand_values_unbiased_std():
    # group 1: mean 0.5, unbiased std sqrt(1/3) → ±0.5·sqrt(3); group 2: all equal → exact zeros
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = grpo.group_advantages(r, group_size=4, eps=0.0)
    h = 0.5 * SQRT3
    assert torch.allclose(adv, torch.tensor([h, -h, -h, h, 0, 0, 0, 0]), atol=1e-12)
    assert adv.shape == r.shape
    adv2 = grpo.group_advantages(r.reshape(2, 4), group_size=4, eps=0.0)
    assert adv2.shape == (2, 4) and torch.equal(adv2.reshape(-1), adv)


def test_group_advantages_all_equal_is_exactly_zero_even_with_rounding():
    # mean(0.1, 0.1, 0.1) != 0.1 in floating point; the result must still be exactly zero.
    for dtype in (torch.float32, torch.float64):
        r = torch.full((3,), 0.1, dtype=dtype)
        adv = grpo.group_advantages(r, group_size=3)
        assert torch.equal(adv, torch.zeros(3, dtype=dtype))
    assert torch.equal(grpo.group_advantages(torch.tensor([5.0, 7.0]), group_size=1), torch.zeros(2))


def test_group_advantages_eps_and_errors():
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0]), group_size=2, eps=1.0)
    # unbiased std of (1, 0) = sqrt(0.5); (0.5) / (sqrt(0.5) + 1)
    assert adv[0].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1.0), abs=1e-12)
    with pytest.raises(ValueError, match="groups of 4"):
        grpo.group_advantages(torch.zeros(6), group_size=4)


def test_group_advantages_matches_loop():
    rng = random.Random(0)
    for g in (2, 3, 8):
        rewards = [float(rng.choice([0, 1, 0.5])) for _ in range(g * 5)]
        vec = grpo.group_advantages(torch.tensor(rewards), group_size=g)
        assert torch.allclose(vec, torch.tensor(grpo.group_advantages_loop(rewards, g)), atol=1e-9)


def test_process_advantages_hand_values():
    # One group of two samples. Steps: s0 → rewards (1, 0) ending at tokens 1, 3; s1 → (1) ending at 2.
    # All steps (1, 0, 1): mean 2/3, unbiased std sqrt(1/3) → normalised 1/sqrt(3), -2/sqrt(3), 1/sqrt(3).
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.float64)
    adv = grpo.process_advantages([[1.0, 0.0], [1.0]], [[1, 3], [2]], mask, [7, 7], eps=0.0)
    a, b = 1 / SQRT3, -2 / SQRT3
    expected = torch.tensor([[0, a + b, b, b, 0], [0, a, a, 0, 0]])
    assert torch.allclose(adv, expected, atol=1e-12)


def test_process_advantages_equal_steps_give_zeros_and_groups_are_separate():
    mask = torch.ones(4, 3)
    adv = grpo.process_advantages([[1.0], [1.0, 1.0], [0.0], [1.0]], [[0], [1, 2], [2], [2]], mask, [0, 0, 1, 1])
    assert torch.equal(adv[:2], torch.zeros(2, 3))  # group 0: every step reward equal
    # group 1: steps (0, 1) → -1/sqrt(2)·..., unbiased std sqrt(0.5): normalised ∓0.5/sqrt(0.5)
    v = 0.5 / math.sqrt(0.5)
    assert torch.allclose(adv[2:], torch.tensor([[-v, -v, -v], [v, v, v]]), atol=1e-5)


def test_process_advantages_matches_loop_ragged():
    rng = random.Random(1)
    n, t = 9, 12
    mask = [[1.0 if rng.random() < 0.8 else 0.0 for _ in range(t)] for _ in range(n)]
    rewards, ends = [], []
    for _ in range(n):
        k = rng.randint(0, 4)  # ragged, including samples without any step
        rewards.append([rng.choice([0.0, 1.0, 0.3]) for _ in range(k)])
        ends.append(sorted(rng.randrange(t) for _ in range(k)))
    groups = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    vec = grpo.process_advantages(rewards, ends, torch.tensor(mask), groups)
    loop = grpo.process_advantages_loop(rewards, ends, mask, groups)
    assert torch.allclose(vec, torch.tensor(loop), atol=1e-9)


# ---------------------------------------------------------------- k3 and logprobs

def test_kl_k3_hand_values():
    logp = torch.log(torch.tensor([0.5, 0.25, 0.3]))
    ref_logp = torch.log(torch.tensor([0.25, 0.5, 0.3]))
    kl = grpo.kl_k3(logp, ref_logp)
    # ratio 0.5: 0.5 − ln 0.5 − 1; ratio 2: 2 − ln 2 − 1; equal: 0
    expected = torch.tensor([0.5 + math.log(2) - 1, 2 - math.log(2) - 1, 0.0])
    assert torch.allclose(kl, expected, atol=1e-12)
    assert (grpo.kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()
    # clamped: huge log-ratio stays finite
    assert torch.isfinite(grpo.kl_k3(torch.tensor([-1e4]), torch.tensor([0.0]))).all()


def test_token_logprobs_and_entropy_match_loop_with_chunking():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 3
    labels = torch.randint(0, 11, (3, 5))
    expected = torch.tensor(grpo.token_logprobs_loop(logits, labels))
    for chunk in (1, 4, 4096):
        assert torch.allclose(grpo.token_logprobs(logits, labels, chunk_size=chunk), expected, atol=1e-10)
        assert torch.allclose(grpo.entropy(logits, chunk_size=chunk), torch.tensor(grpo.entropy_loop(logits)), atol=1e-10)


def _head_case(seed: int = 0, n: int = 3, t: int = 7, h: int = 8, v: int = 50, dtype=torch.float32):
    """Hidden states, an LM head (with a bias, so every parameter path is checked), labels, and the weights
    [N, T] used to fold log-probs and entropy into one scalar for gradient checks."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, h, generator=g).to(dtype).requires_grad_(True)  # [N, T, H]
    head = torch.nn.Linear(h, v, bias=True).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g) * 0.7)
        head.bias.copy_(torch.randn(v, generator=g))
    labels = torch.randint(0, v, (n, t), generator=g)  # [N, T]
    w_lp, w_ent = torch.randn(n, t, generator=g), torch.randn(n, t, generator=g)  # [N, T] each
    return hidden, head, labels, w_lp, w_ent


def _values_and_grads(fn, hidden, head, w_lp, w_ent):
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    lp, ent = fn()
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    return lp.detach(), ent.detach(), [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]


@pytest.mark.parametrize("chunk", [1, 5, 7, 21, 4096])  # 21 = N*T exactly; 5 leaves a short last chunk
def test_head_token_logprobs_equal_the_full_logits_and_the_loop_fp32(chunk):
    """Chunked log-probs and entropy through the LM head: values and gradients (hidden states, head weight and
    bias) equal the full-logits computation and the token-by-token twin to 1e-6 in float32."""
    hidden, head, labels, w_lp, w_ent = _head_case()

    def full():
        logits = head(hidden)  # [N, T, V]
        return grpo.token_logprobs(logits, labels), grpo.entropy(logits)

    lp_f, ent_f, g_f = _values_and_grads(full, hidden, head, w_lp, w_ent)
    lp_c, ent_c, g_c = _values_and_grads(lambda: grpo.head_token_logprobs(hidden, head, labels, chunk),
                                         hidden, head, w_lp, w_ent)
    lp_r, ent_r, g_r = _values_and_grads(lambda: grpo.head_token_logprobs_loop(hidden, head, labels),
                                         hidden, head, w_lp, w_ent)
    assert lp_c.dtype == ent_c.dtype == torch.float32
    assert float(lp_f.abs().max()) > 1.0 and float(ent_f.mean()) > 0.5  # a non-degenerate case
    for other_lp, other_ent, other_g in ((lp_f, ent_f, g_f), (lp_r, ent_r, g_r)):
        assert torch.allclose(lp_c, other_lp, rtol=0, atol=1e-6), (lp_c - other_lp).abs().max()
        assert torch.allclose(ent_c, other_ent, rtol=0, atol=1e-6), (ent_c - other_ent).abs().max()
        for a, b in zip(g_c, other_g):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (a - b).abs().max()


def test_head_token_logprobs_keep_no_full_logits_for_backward():
    """What autograd saves outside the recomputed chunks: far less than the [N, T, V] logits the full path keeps."""
    hidden, head, labels, _, _ = _head_case(n=4, t=16, h=8, v=512)
    saved = []

    def count(x):
        saved.append(x.numel())
        return x

    def saved_numel(fn):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(count, lambda x: x):
            lp, ent = fn()
        return sum(saved)

    full_logits = 4 * 16 * 512
    full = saved_numel(lambda: (grpo.token_logprobs(head(hidden), labels), grpo.entropy(head(hidden))))
    chunked = saved_numel(lambda: grpo.head_token_logprobs(hidden, head, labels, 8))
    assert full >= full_logits
    assert chunked < full_logits / 4, (chunked, full_logits)
    with torch.no_grad():  # no graph: the same values without checkpointing
        lp, ent = grpo.head_token_logprobs(hidden, head, labels, 8)
        lp2, none = grpo.head_token_logprobs(hidden, head, labels, 8, with_entropy=False)
    assert none is None and torch.equal(lp, lp2)
    assert torch.allclose(lp, grpo.token_logprobs(head(hidden), labels), atol=1e-6)


def test_head_token_logprobs_upcast_a_bf16_head_and_reject_a_bad_chunk():
    hidden, head, labels, _, _ = _head_case(dtype=torch.bfloat16)
    lp, ent = grpo.head_token_logprobs(hidden, head, labels, 4)
    assert lp.dtype == ent.dtype == torch.float32
    # The same bf16 matmuls, chunk by chunk (a bf16 GEMM's rounding depends on its shape and the thread count),
    # then float32 arithmetic.
    flat, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)  # [N*T, H], [N*T]
    want = torch.cat([grpo.token_logprobs(head(flat[i:i + 4]).float()[None], flat_labels[i:i + 4][None])[0]
                      for i in range(0, flat.shape[0], 4)]).view_as(lp)  # [N, T]
    assert torch.allclose(lp, want, atol=1e-5)
    with pytest.raises(ValueError, match="chunk_tokens"):
        grpo.head_token_logprobs(hidden, head, labels, 0)


# ---------------------------------------------------------------- the loss, by hand

def _hand_batch():
    # seq 0: A=+1, ratios 1.5 (clipped at 1+ε_high), 0.5 (unclipped wins); seq 1: A=−1, ratio 1.5 then padding
    logp = torch.log(torch.tensor([[1.5, 0.5], [1.5, 123.0]]))
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    return logp, old, adv, mask


@pytest.mark.parametrize(
    "agg,eps_high,expected",
    [
        ("seq_mean_token_mean", 0.2, ((-1.2 - 0.5) / 2 + 1.5) / 2),
        ("token_mean", 0.2, (-1.2 - 0.5 + 1.5) / 3),
        ("seq_mean_token_sum_norm", 0.2, ((-1.2 - 0.5) / 4 + 1.5 / 4) / 2),
        ("seq_mean_token_mean", 0.28, ((-1.28 - 0.5) / 2 + 1.5) / 2),  # clip-higher
    ],
)
def test_grpo_loss_hand_values(agg, eps_high, expected):
    logp, old, adv, mask = _hand_batch()
    loss, m = grpo.grpo_loss(logp, old, None, adv, mask, clip_eps_low=0.2, clip_eps_high=eps_high, beta=0.0,
                             loss_agg=agg, max_tokens=4)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert m["clip_frac"] == pytest.approx(1 / 3)
    assert m["ratio_max"] == pytest.approx(1.5) and m["ratio_min"] == pytest.approx(0.5)
    assert m["tokens"] == 3


def test_grpo_loss_kl_term_and_is_weights_by_hand():
    logp = torch.log(torch.tensor([[0.5]]))
    ref_logp = torch.log(torch.tensor([[0.25]]))
    loss, m = grpo.grpo_loss(logp, logp.clone(), ref_logp, torch.tensor([2.0]), torch.ones(1, 1),
                             beta=0.1, is_weights=torch.tensor([[0.5]]))
    k3 = 0.5 + math.log(2) - 1
    assert loss.item() == pytest.approx(-2.0 * 0.5 + 0.1 * k3, abs=1e-12)
    assert m["kl"] == pytest.approx(k3)
    with pytest.raises(ValueError, match="max_tokens"):
        grpo.grpo_loss(logp, logp, None, torch.ones(1), torch.ones(1, 1), beta=0.0, loss_agg="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.grpo_loss(logp, logp, None, torch.ones(1), torch.ones(1, 1), beta=0.1)


# ---------------------------------------------------------------- the loss and gradient vs the loop

def _random_batch(seed, n=5, t=9):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=g) * 3
    old = logp + torch.randn(n, t, generator=g) * 0.3  # ratios on both sides of the clip range
    ref_logp = logp + torch.randn(n, t, generator=g) * 0.5
    adv = torch.randn(n, t, generator=g)
    mask = (torch.rand(n, t, generator=g) < 0.7).double()
    mask[2] = 0  # a sequence with nothing to train on
    mask[:, -2:] = 0  # right padding...
    logp[:, -2:] = -50.0  # ...holding garbage that must not leak
    old[:, -2:] = 30.0
    isw = torch.rand(n, t, generator=g) * 2
    return logp, old, ref_logp, adv, mask, isw


@pytest.mark.parametrize("agg", grpo.LOSS_AGGS)
@pytest.mark.parametrize("with_is", [False, True])
@pytest.mark.parametrize("seq_adv", [False, True])
def test_grpo_loss_and_gradient_equal_loop(agg, with_is, seq_adv):
    logp0, old, ref_logp, adv, mask, isw = _random_batch(3)
    if seq_adv:
        adv = adv[:, 0].clone()
    kwargs = dict(clip_eps_low=0.2, clip_eps_high=0.28, beta=0.04, loss_agg=agg, max_tokens=9,
                  is_weights=isw if with_is else None)
    logp_a = logp0.clone().requires_grad_(True)
    loss_a, _ = grpo.grpo_loss(logp_a, old, ref_logp, adv, mask, **kwargs)
    loss_a.backward()
    logp_b = logp0.clone().requires_grad_(True)
    loss_b = grpo.grpo_loss_loop(logp_b, old, ref_logp, adv, mask, **kwargs)
    loss_b.backward()
    assert loss_a.item() == pytest.approx(loss_b.item(), abs=1e-6)
    assert torch.allclose(logp_a.grad, logp_b.grad, atol=1e-6)
    assert logp_a.grad.abs().sum() > 0  # the check is not vacuous
    assert torch.equal(logp_a.grad[mask == 0], torch.zeros_like(logp_a.grad[mask == 0]))


@pytest.mark.parametrize("agg", grpo.LOSS_AGGS)
def test_split_batch_with_global_normalizer_adds_up(agg):
    logp, old, ref_logp, adv, mask, _ = _random_batch(4, n=6)
    kw = dict(beta=0.04, loss_agg=agg, max_tokens=9)
    whole, _ = grpo.grpo_loss(logp, old, ref_logp, adv, mask, **kw)
    total = grpo.loss_normalizer(mask, agg, 9)
    parts = [grpo.grpo_loss(logp[s], old[s], ref_logp[s], adv[s], mask[s], normalizer=total, **kw)[0]
             for s in (slice(0, 1), slice(1, 4), slice(4, 6))]
    assert sum(p.item() for p in parts) == pytest.approx(whole.item(), abs=1e-12)


def test_sft_loss_is_token_mean_nll():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    assert grpo.sft_loss(logp, torch.tensor([[1, 1, 0]])).item() == pytest.approx((math.log(2) + math.log(4)) / 2)


def test_online_rft_coefficients_give_the_unified_paradigm_gradient():
    correct = torch.tensor([True, False, True])
    coef = grpo.online_rft_advantages(correct)
    assert coef.tolist() == [1.0, 0.0, 1.0]
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1], [-3.0, -1.5]], requires_grad=True)
    mask = torch.ones(3, 2)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, coef, mask, beta=0.0, loss_agg="token_mean")
    loss.backward()
    # d/dlogp of −mean(coef · ratio) at ratio 1 = −coef / #tokens
    assert torch.allclose(logp.grad, -coef[:, None].expand(3, 2) / 6)


def test_kl_k3_matches_loop_including_the_clamp():
    logp = torch.tensor([[-1.0, -0.2, -30.0], [-2.5, -0.01, -0.5]], dtype=torch.float64)
    ref_logp = torch.tensor([[-1.3, -0.2, -1.0], [-0.5, -40.0, -0.7]], dtype=torch.float64)  # two beyond ±20
    vec = grpo.kl_k3(logp, ref_logp)
    loop = [[grpo.kl_k3_loop(float(a), float(b)) for a, b in zip(ra, rb)] for ra, rb in zip(logp, ref_logp)]
    assert torch.allclose(vec, torch.tensor(loop, dtype=torch.float64), atol=1e-9)
    assert vec[0, 1] == 0 and vec[0, 2] > 1e8 / 2  # equal log-probs: 0; the clamp caps exp(29) at exp(20)
