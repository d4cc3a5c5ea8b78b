"""The learner's GPU-scale switches on CPU DeepSpeed (one rank): learner.precision=bf16,
learner.gradient_checkpointing, learner.logprob_chunk_tokens, and no reference model when β = 0."""

import os

import pytest
import torch

from dsmath import methods
from dsmath.config import AlgorithmConfig
from dsmath.errors import UserError
from learner.batch import TrainBatch
from test_learner import make_learner, make_tiny_model, rl_batch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-precision") / "model", seed=1)


def _first_step_gradients(model_dir, **kw):
    """One GRPO step on ZeRO-0 without clipping: Adam's first moment is then exactly 0.1 × the gradient."""
    learner = make_learner(model_dir, zero_stage=0, grad_clip=0.0, **kw)
    metrics = learner.grpo_step(rl_batch(learner, 7))
    moments = [learner.optimizer.state[p]["exp_avg"].clone() for p in learner.engine.module.parameters()]
    return learner, metrics, moments


# ---------------------------------------------------------------- chunked log-probs through the LM head

def test_chunked_logprobs_equal_the_full_logits_values_and_gradients(model_dir):
    """learner.logprob_chunk_tokens=5: log-probs, reference log-probs, entropy and the step's gradient equal the
    full-logits learner's to 1e-6 (float32)."""
    full, m_full, g_full = _first_step_gradients(model_dir)
    chunked, m_chunk, g_chunk = _first_step_gradients(model_dir, logprob_chunk_tokens=5)
    assert full.token_logprobs.chunk_tokens == 0 and chunked.token_logprobs.chunk_tokens == 5
    assert m_chunk["loss"] == pytest.approx(m_full["loss"], abs=1e-6)
    assert m_chunk["entropy"] == pytest.approx(m_full["entropy"], abs=1e-6) and m_full["entropy"] > 1.0
    scale = max(float(g.abs().max()) for g in g_full)
    assert scale > 1e-3  # the step had a real gradient
    for a, b in zip(g_full, g_chunk):
        assert torch.allclose(a, b, rtol=0, atol=1e-7 * max(1.0, scale) * 10), (a - b).abs().max()  # grad 1e-6
    batch = rl_batch(full, 8)
    m = batch.loss_mask.bool()
    assert torch.allclose(chunked.logprobs(batch)[m], full.logprobs(batch)[m], rtol=0, atol=1e-6)
    assert torch.allclose(chunked.ref_logprobs(batch)[m], full.ref_logprobs(batch)[m], rtol=0, atol=1e-6)


def test_chunked_logprobs_under_zero3_train_like_the_full_logits(model_dir):
    """ZeRO-3 gathers the LM head through its module hooks for every chunk (and its recompute in backward)."""
    full = make_learner(model_dir, zero_stage=3)
    chunked = make_learner(model_dir, zero_stage=3, logprob_chunk_tokens=4)
    for seed in (1, 2):
        batch = rl_batch(full, seed)
        for _ in range(2):  # the second step has ratio != 1
            assert chunked.grpo_step(batch)["loss"] == pytest.approx(full.grpo_step(batch)["loss"], abs=1e-6)
    held = rl_batch(full, 3)
    m = held.loss_mask.bool()
    assert torch.allclose(chunked.logprobs(held)[m], full.logprobs(held)[m], rtol=0, atol=2e-5)


def test_post_processed_logits_fall_back_to_the_full_logits(model_dir):
    """A model whose logits are not lm_head(hidden) is detected (numerically) and trained on its own logits."""
    from learner.logprobs import head_unsupported, probe_head

    learner = make_learner(model_dir, logprob_chunk_tokens=4)
    assert head_unsupported(learner.engine.module) is None and probe_head(learner.engine.module, learner.device) is None
    handle = learner.engine.module.register_forward_hook(lambda _m, _a, out: out.__setitem__("logits", out.logits * 0.5))
    try:
        assert "post-processed" in probe_head(learner.engine.module, learner.device)
    finally:
        handle.remove()
    learner.engine.module.config.final_logit_softcapping = 30.0  # Gemma-2's switch
    try:
        assert "final_logit_softcapping=30.0" in head_unsupported(learner.engine.module)
    finally:
        del learner.engine.module.config.final_logit_softcapping


# ---------------------------------------------------------------- activation checkpointing

def test_checkpointed_gradients_equal_unchecked_ones_and_keep_fewer_activations(model_dir):
    plain, m_plain, g_plain = _first_step_gradients(model_dir)
    ckpt, m_ckpt, g_ckpt = _first_step_gradients(model_dir, gradient_checkpointing=True)
    assert ckpt.engine.module.is_gradient_checkpointing and not plain.engine.module.is_gradient_checkpointing
    assert m_ckpt["loss"] == m_plain["loss"]
    for a, b in zip(g_plain, g_ckpt):
        assert torch.allclose(a, b, rtol=0, atol=1e-7), (a - b).abs().max()  # gradients to 1e-6

    def saved_numel(learner) -> int:
        sizes = []
        learner.engine.ds.train()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            learner._logprobs(learner.engine.ds, rl_batch(learner, 9))
        return sum(sizes)

    assert saved_numel(ckpt) < 0.5 * saved_numel(plain)


# ---------------------------------------------------------------- bf16

def test_bf16_on_zero_stage_0_is_refused_in_one_line(model_dir):
    with pytest.raises(UserError, match="zero_stage >= 1") as err:
        make_learner(model_dir, zero_stage=0, precision="bf16")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_bf16_losses_track_fp32(model_dir, zero_stage):
    """learner.precision=bf16 tracks fp32 over 8 GRPO steps (4 batches × 2 updates) at lr 3e-3.

    Tolerances: every step's loss within 2e-3 of fp32's (measured at most 7e-4), and the two policies' log-probs on
    a held-out batch apart by at most 10 % of how far the steps moved fp32's (> 0.15 nats; measured gap/move up to
    5 %: 0.012 of 0.25 nats on this model).
    The bf16 learner's weights, its reference and its log-prob arithmetic are checked for their dtypes.
    """
    fp32 = make_learner(model_dir, zero_stage=zero_stage, lr=3e-3)
    bf16 = make_learner(model_dir, zero_stage=zero_stage, lr=3e-3, precision="bf16")
    assert next(bf16.engine.module.parameters()).dtype == torch.bfloat16
    ref_module = getattr(bf16.reference, "module", bf16.reference)
    assert next(ref_module.parameters()).dtype == torch.bfloat16
    held = rl_batch(fp32, 99)
    m = held.loss_mask.bool()
    start = fp32.logprobs(held)
    assert bf16.logprobs(held).dtype == torch.float32
    for seed in range(4):
        batch = rl_batch(fp32, 50 + seed)
        for _ in range(2):
            a, b = fp32.grpo_step(batch), bf16.grpo_step(batch)
            assert b["loss"] == pytest.approx(a["loss"], abs=2e-3), (seed, a["loss"], b["loss"])
    end32, end16 = fp32.logprobs(held), bf16.logprobs(held)
    moved, gap = float((end32 - start)[m].abs().max()), float((end32 - end16)[m].abs().max())
    assert moved > 0.15 and gap < 0.1 * moved, (moved, gap)


# ---------------------------------------------------------------- all three switches together

@pytest.mark.parametrize("zero_stage", [1, 3])
def test_all_switches_train_and_resume_exactly(model_dir, tmp_path, zero_stage):
    """bf16 + activation checkpointing + chunked log-probs: GRPO steps, and a learner loading the checkpoint
    taken after step 2 reproduces steps 3–4 bit for bit (losses and final weights)."""
    switches = dict(zero_stage=zero_stage, precision="bf16", gradient_checkpointing=True, logprob_chunk_tokens=6)
    a = make_learner(model_dir, **switches)
    assert a.token_logprobs.chunk_tokens == 6 and a.engine.module.is_gradient_checkpointing
    losses_a = []
    for step in range(4):
        batch = rl_batch(a, 100 + step)
        losses_a.append((a.grpo_step(batch)["loss"], a.grpo_step(batch)["loss"]))
        if step == 1:
            a.save_checkpoint(tmp_path / "step_2", {})
    final_a = dict(a.named_weights())
    assert any(abs(x) > 1e-4 for pair in losses_a for x in pair)

    b = make_learner(model_dir, **switches)
    b.load_checkpoint(tmp_path / "step_2")
    losses_b = []
    for step in range(2, 4):
        batch = rl_batch(b, 100 + step)
        losses_b.append((b.grpo_step(batch)["loss"], b.grpo_step(batch)["loss"]))
    assert losses_b == losses_a[2:]
    assert all(torch.equal(t, final_a[k]) for k, t in b.named_weights())


# ---------------------------------------------------------------- the reference only where it is read

def test_needs_reference_reads_beta_and_the_algorithm():
    assert methods.needs_reference(AlgorithmConfig(beta=0.04))
    assert not methods.needs_reference(AlgorithmConfig(beta=0.0))
    assert methods.needs_reference(AlgorithmConfig(name="dpo", beta=0.0))  # DPO's loss is relative to π_ref
    assert methods.needs_reference(AlgorithmConfig(name="ppo", beta=0.04))  # PPO's KL reward
    assert not methods.needs_reference(AlgorithmConfig(name="ppo", beta=0.0))
    assert not methods.needs_reference(AlgorithmConfig(name="online_rft", beta=0.0))


def test_beta_zero_builds_no_reference_and_the_loss_is_unchanged(model_dir, monkeypatch):
    """β = 0: no reference model (also as the driver builds the learner, through LearnerRank.setup), and the same
    GRPO losses as a learner that carries an unused reference."""
    from learner.policy import PolicyLearner
    from learner.ray_group import LearnerRank
    from test_learner import learner_cfg

    g = AlgorithmConfig(beta=0.0, clip_eps_high=0.28)
    lean = make_learner(model_dir, algo_cfg=g)
    assert lean.reference is None
    with pytest.raises(RuntimeError, match="with_reference=False"):
        lean.ref_logprobs(rl_batch(lean, 1))
    carried = PolicyLearner(model_dir, learner_cfg(), g, seed=0, with_reference=True)
    assert carried.reference is not None
    for seed in (1, 2):
        batch = rl_batch(lean, seed)
        for _ in range(2):
            assert lean.grpo_step(batch)["loss"] == carried.grpo_step(batch)["loss"]
    assert make_learner(model_dir).reference is not None  # β = 0.04 keeps it

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):  # setup() writes them
        monkeypatch.setenv(key, os.environ.get(key, "0"))
    rank = LearnerRank()
    rank.setup(str(model_dir), learner_cfg(), g, rank=0, world_size=1, master_addr="127.0.0.1", master_port=0,
               seed=0, env={}, kwargs={})
    assert rank.learner.reference is None
    dpo = LearnerRank()
    dpo.setup(str(model_dir), learner_cfg(), AlgorithmConfig(name="dpo", beta=0.0), rank=0, world_size=1,
              master_addr="127.0.0.1", master_port=0, seed=0, env={}, kwargs={})
    assert dpo.learner.reference is not None


def test_zero3_reference_is_sharded_and_reset_and_checkpointed(model_dir, tmp_path):
    """Under ZeRO-3 the reference is a DeepSpeed engine holding partitioned parameters; reset_reference and the
    checkpoint gather and scatter it."""
    learner = make_learner(model_dir, zero_stage=3)
    ref_params = list(learner.reference.module.parameters())
    assert all(hasattr(p, "ds_numel") for p in ref_params)
    assert sum(p.numel() for p in ref_params) < sum(p.ds_numel for p in ref_params)  # partitioned storage
    for seed in (20, 21):
        learner.grpo_step(rl_batch(learner, seed))
    batch = rl_batch(learner, 22)
    m = batch.loss_mask.bool()
    assert (learner.ref_logprobs(batch)[m] - batch.old_logprobs[m]).abs().max() > 1e-4
    learner.reset_reference()
    assert torch.allclose(learner.ref_logprobs(batch)[m], batch.old_logprobs[m], atol=1e-6)
    learner.save_checkpoint(tmp_path / "c", {})
    other = make_learner(model_dir, zero_stage=3)
    other.load_checkpoint(tmp_path / "c")
    assert torch.allclose(other.ref_logprobs(batch)[m], batch.old_logprobs[m], atol=1e-6)
    step = other.grpo_step(TrainBatch(**{**batch.__dict__}))
    assert step["kl"] == pytest.approx(0.0, abs=1e-6)
