"""The DeepSpeed learner on CPU (gloo): batches, micro-batch invariance, exact resume, checkpoints."""

import json
from pathlib import Path

import pytest
import torch

from dsmath.config import AlgorithmConfig, LearnerConfig
from learner.batch import TrainBatch, collate_rollouts, micro_batches

VOCAB = 64


def make_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(cfg).save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def random_rollouts(seed: int, n: int = 8, group: int = 4):
    """Ragged prompts/completions with group-relative outcome advantages, as the driver builds them."""
    from dsmath.grpo import group_advantages

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, VOCAB, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    comps = [torch.randint(2, VOCAB, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
             for _ in range(n)]
    rewards = torch.randint(0, 2, (n,), generator=g).double()
    adv = group_advantages(rewards, group).tolist()
    return prompts, comps, adv


def learner_cfg(**kw) -> LearnerConfig:
    base = dict(lr=1e-2, zero_stage=2, micro_batch_size=3, grad_clip=1.0, warmup_steps=2)
    base.update(kw)
    return LearnerConfig(**base)


def make_learner(model_dir, **kw):
    from learner.policy import PolicyLearner

    algo_cfg = kw.pop("algo_cfg", AlgorithmConfig(beta=0.04, clip_eps_low=0.2, clip_eps_high=0.28))
    return PolicyLearner(model_dir, learner_cfg(**kw), algo_cfg, seed=0)


def rl_batch(learner, seed: int) -> TrainBatch:
    """A batch whose old log-probs are the learner's current ones (then two updates on it: ratio ≠ 1)."""
    prompts, comps, adv = random_rollouts(seed)
    batch = collate_rollouts(prompts, comps, pad_id=0, advantages=adv)
    old = learner.logprobs(batch)
    return TrainBatch(**{**batch.__dict__, "old_logprobs": old})


# ---------------------------------------------------------------- batches (pure)

def test_collate_aligns_completion_tokens_to_logprob_positions():
    b = collate_rollouts([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], pad_id=0, advantages=[2.0, [1.0, 0.5, 0.25]],
                         old_logprobs=[[-1.0, -2.0], [-3.0, -4.0, -5.0]], loss_masks=[[1, 1], [1, 0, 1]])
    assert b.input_ids.tolist() == [[5, 6, 7, 9, 10], [8, 11, 12, 13, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # completion token k of a P-token prompt sits at position P-1+k; the last column is never a target
    assert b.loss_mask.tolist() == [[0, 0, 1, 1, 0], [1, 0, 1, 0, 0]]
    assert b.advantages.tolist() == [[0, 0, 2, 2, 0], [1.0, 0.5, 0.25, 0, 0]]
    assert b.old_logprobs.tolist() == [[0, 0, -1, -2, 0], [-3, -4, -5, 0, 0]]
    with pytest.raises(ValueError, match="3 completion tokens"):
        collate_rollouts([[1]], [[2, 3, 4]], pad_id=0, advantages=[[1.0]])
    t = collate_rollouts([[1, 2]], [[3, 4, 5]], pad_id=0, max_length=3)
    assert t.input_ids.tolist() == [[1, 2, 3]] and t.loss_mask.tolist() == [[0, 1, 0]]


def test_collate_from_rollout_records():
    from dsmath.records import Problem, Rollout
    from learner.batch import collate_from_rollouts

    prob = Problem("u", "q", "1")
    rs = [Rollout("r", i, prob, "p", (3, 4), "c", c, lp, "stop", 0, "g0", mask)
          for i, (c, lp, mask) in enumerate([((5, 6), (-0.5, -0.25), ()), ((7, 8, 9), (-1.0, -2.0, -3.0), (1, 0, 1))])]
    b = collate_from_rollouts(rs, [1.0, -1.0], pad_id=0, generator_logprobs_as_old=True)
    assert b.input_ids.tolist() == [[3, 4, 5, 6, 0], [3, 4, 7, 8, 9]]
    assert b.loss_mask.tolist() == [[0, 1, 1, 0, 0], [0, 1, 0, 1, 0]]
    assert b.old_logprobs.tolist() == [[0, -0.5, -0.25, 0, 0], [0, -1, -2, -3, 0]]
    assert collate_from_rollouts(rs, [1.0, -1.0], pad_id=0).old_logprobs is None


def test_micro_batches_cover_rows_once_and_trim_padding():
    prompts, comps, adv = random_rollouts(1, n=7, group=7)
    b = collate_rollouts(prompts, comps, pad_id=0, advantages=adv)
    parts = micro_batches(b, max_seqs=3, max_tokens=20)
    rows = sorted(r for idx, _ in parts for r in idx)
    assert rows == list(range(7))
    for idx, mb in parts:
        assert mb.input_ids.shape[1] == int(b.lengths()[idx].max())
        assert mb.size <= 3 and (mb.size == 1 or mb.size * mb.input_ids.shape[1] <= 20)
        assert torch.equal(mb.loss_mask.sum(1), b.loss_mask[idx].sum(1))
    assert b.shard(1, 7).input_ids.tolist() == b.input_ids[1:2].tolist()
    with pytest.raises(ValueError, match="evenly"):
        b.shard(0, 2)


# ---------------------------------------------------------------- the learner

def test_logprobs_match_plain_forward_and_ratio_is_one_on_policy(model_dir):
    from transformers import AutoModelForCausalLM

    learner = make_learner(model_dir)
    prompts, comps, adv = random_rollouts(2)
    batch = collate_rollouts(prompts, comps, pad_id=0, advantages=adv)
    lp = learner.logprobs(batch)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    full = torch.log_softmax(logits[:, :-1], -1).gather(2, batch.input_ids[:, 1:, None]).squeeze(2)
    m = batch.loss_mask[:, :-1].bool()
    assert torch.allclose(lp[:, :-1][m], full[m], atol=1e-5)
    assert torch.allclose(learner.ref_logprobs(batch)[:, :-1][m], full[m], atol=1e-5)
    metrics = learner.grpo_step(TrainBatch(**{**batch.__dict__, "old_logprobs": lp}))
    assert metrics["ratio_min"] == pytest.approx(1.0, abs=1e-5) and metrics["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6) and metrics["tokens"] == float(batch.loss_mask.sum())
    assert metrics["grad_norm"] > 0 and metrics["lr"] == pytest.approx(0.5e-2)  # warm-up step 1 of 2
    after = learner.logprobs(batch)
    assert not torch.allclose(after[:, :-1][m], lp[:, :-1][m])  # the step changed the policy


def test_micro_batch_split_does_not_change_the_update(model_dir):
    """Loss normalisation: 1 row per micro-batch, 3, or a token budget → the same parameters."""
    finals = []
    for kw in (dict(micro_batch_size=1), dict(micro_batch_size=8), dict(micro_batch_size=3)):
        learner = make_learner(model_dir, **kw)
        if kw["micro_batch_size"] == 3:
            learner.max_tokens_per_micro_batch = 16
        for seed in (10, 11):
            batch = rl_batch(learner, seed)
            learner.grpo_step(batch)
            learner.grpo_step(batch)
        finals.append(dict(learner.named_weights()))
    initial = dict(make_learner(model_dir).named_weights())
    assert_same_update(initial, finals[0], finals[1:])


def assert_same_update(initial: dict, reference: dict, others: list[dict]) -> None:
    """Parameters agree to 5e-5 while the 4 updates moved every tensor by > 1e-2.

    Why not 1e-6: float32 gradients summed in a different order differ by ~1e-9, and Adam divides
    by sqrt(v), so on near-zero gradients (a key bias gets exactly zero in exact arithmetic) that
    noise becomes up to ~1e-5 of parameter change at lr 1e-2 (measured max 6.6e-6).
    """
    for name, t in reference.items():
        assert (t - initial[name]).abs().max() > 1e-2, name
        for other in others:
            assert torch.allclose(t, other[name], rtol=0, atol=5e-5), (name, (t - other[name]).abs().max())


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_exact_resume_from_checkpoint(model_dir, tmp_path, zero_stage):
    """Train 4 steps saving after 2; a fresh learner loading that checkpoint reproduces steps 3–4."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "ckpts"
    a = make_learner(model_dir, zero_stage=zero_stage)
    losses_a = []
    for step in range(4):
        batch = rl_batch(a, 100 + step)
        losses_a.append((a.grpo_step(batch)["loss"], a.grpo_step(batch)["loss"]))
        if step == 1:
            torch.manual_seed(1234)  # RNG state must travel with the checkpoint too
            a.save_checkpoint(run / "step_2", {"data_position": 16, "weight_version": 4})
            expected_draw = torch.rand(3)
    final_a = dict(a.named_weights())

    b = make_learner(model_dir, zero_stage=zero_stage)
    extra = b.load_checkpoint(run)  # via the `latest` pointer
    assert extra == {"data_position": 16, "weight_version": 4} and b.steps == 4
    assert torch.equal(torch.rand(3), expected_draw)
    losses_b = []
    for step in range(2, 4):
        batch = rl_batch(b, 100 + step)
        losses_b.append((b.grpo_step(batch)["loss"], b.grpo_step(batch)["loss"]))
    assert losses_b == losses_a[2:]  # bit-exact: same ops, same order, same optimizer state
    assert all(torch.equal(t, final_a[k]) for k, t in b.named_weights())
    hf = AutoModelForCausalLM.from_pretrained(str(run / "step_2"), dtype=torch.float32).state_dict()
    saved = dict(b.named_weights())
    assert set(hf) == set(saved)  # same HF names under every ZeRO stage (ZeRO-3 gathers)


def test_checkpoint_is_hf_loadable_atomic_and_survives_a_failed_save(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "ckpts"
    learner = make_learner(model_dir)
    learner.grpo_step(rl_batch(learner, 5))
    good = learner.save_checkpoint(run / "step_1", {"step": 1})
    assert (run / "latest").read_text().strip() == "step_1"
    loaded = AutoModelForCausalLM.from_pretrained(str(good), dtype=torch.float32).state_dict()
    for name, t in learner.named_weights():
        assert torch.equal(loaded[name], t), name
    assert json.loads((good / "trainer_state.json").read_text())["extra"] == {"step": 1}

    learner.grpo_step(rl_batch(learner, 6))
    real_write = learner.engine._write_checkpoint

    def crash_midway(tmp, extra, tok):
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    learner.engine._write_checkpoint = crash_midway
    with pytest.raises(OSError, match="disk full"):
        learner.save_checkpoint(run / "step_2", {"step": 2})
    learner.engine._write_checkpoint = real_write
    assert (run / "latest").read_text().strip() == "step_1"
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step_1"]  # no half-written step_2, no temp dir
    fresh = make_learner(model_dir)
    assert fresh.load_checkpoint(run) == {"step": 1}
    assert all(torch.equal(t, loaded[k]) for k, t in fresh.named_weights())


def test_reset_reference_makes_kl_zero_and_is_checkpointed(model_dir, tmp_path):
    learner = make_learner(model_dir)
    for seed in (20, 21):
        learner.grpo_step(rl_batch(learner, seed))
    batch = rl_batch(learner, 22)
    m = batch.loss_mask.bool()
    assert (learner.ref_logprobs(batch)[m] - batch.old_logprobs[m]).abs().max() > 1e-4
    learner.reset_reference()
    assert torch.allclose(learner.ref_logprobs(batch)[m], batch.old_logprobs[m], atol=1e-6)
    learner.save_checkpoint(tmp_path / "c", {})
    other = make_learner(model_dir)
    other.load_checkpoint(tmp_path / "c")
    assert torch.allclose(other.ref_logprobs(batch)[m], batch.old_logprobs[m], atol=1e-6)


def test_world_size_mismatch_is_a_user_error(model_dir, tmp_path):
    from dsmath.errors import UserError

    learner = make_learner(model_dir)
    learner.save_checkpoint(tmp_path / "c", {})
    state = tmp_path / "c" / "trainer_state.json"
    state.write_text(state.read_text().replace('"world_size": 1', '"world_size": 2'))
    from learner.checkpoint import write_manifest

    write_manifest(tmp_path / "c")  # an intact checkpoint saved by 2 ranks, not a damaged one
    with pytest.raises(UserError, match="learner.num_ranks=2"):
        learner.load_checkpoint(tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a dsmath learner checkpoint"):
        learner.load_checkpoint(tmp_path / "empty")
    with pytest.raises(UserError, match="Dr. GRPO"):
        make_learner(model_dir, algo_cfg=AlgorithmConfig(loss_agg="seq_mean_token_sum_norm"))


# ---------------------------------------------------------------- memory-light options (issue: learner efficiency)

@pytest.mark.parametrize("zero_stage", [1, 2])
def test_host_reference_gives_the_same_steps_as_a_reference_copy(model_dir, zero_stage):
    """learner.reference=host (reference weights in host memory, swapped into the policy module) trains exactly
    like a second model copy: same reference log-probs after the policy moved, same losses, policy untouched by
    the swap."""
    from learner.reference import HostReference

    copy = make_learner(model_dir, zero_stage=zero_stage)
    host = make_learner(model_dir, zero_stage=zero_stage, reference="host")
    assert isinstance(host.reference, HostReference) and not isinstance(copy.reference, HostReference)
    for seed in (1, 2, 3):
        a, b = rl_batch(copy, seed), rl_batch(host, seed)
        ma, mb = copy.grpo_step(a), host.grpo_step(b)  # host computes ref log-probs before the step
        assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
        assert ma["kl"] == pytest.approx(mb["kl"], abs=1e-7)
        assert seed == 1 or ma["kl"] > 0  # after the first update the policy has moved off the reference
    batch = rl_batch(host, 9)
    before = host.logprobs(batch)
    ref_host, ref_copy = host.ref_logprobs(batch), copy.ref_logprobs(batch)
    assert torch.equal(host.logprobs(batch), before)  # the swap restored the policy exactly
    assert torch.allclose(ref_host, ref_copy, atol=1e-6)
    assert not torch.allclose(ref_host, before, atol=1e-4)


def test_token_budget_micro_batches_change_nothing_but_the_padding(model_dir):
    plain = make_learner(model_dir, zero_stage=1)
    budget = make_learner(model_dir, zero_stage=1, max_tokens_per_micro_batch=40)
    assert budget.max_tokens_per_micro_batch == 40
    for seed in (1, 2):
        ma, mb = plain.grpo_step(rl_batch(plain, seed)), budget.grpo_step(rl_batch(budget, seed))
        assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-5)


def test_update_reports_the_gap_to_the_samplers_logprobs_without_an_extra_pass(model_dir):
    """With behaviour_logprobs in the batch, grpo_step's own forward pass measures max |learner − sampler| on the
    loss tokens (the driver's weight-sync check in synchronous mode) and the loss does not change."""
    learner = make_learner(model_dir, zero_stage=1)
    twin = make_learner(model_dir, zero_stage=1)
    batch = rl_batch(learner, 4)
    behaviour = learner.logprobs(batch).clone()
    rows, cols = batch.loss_mask.nonzero(as_tuple=True)
    behaviour[rows[3], cols[3]] -= 0.5  # one sampled token the "generator" scored differently
    with_gap = learner.grpo_step(TrainBatch(**{**batch.__dict__, "behaviour_logprobs": behaviour}))
    plain = twin.grpo_step(batch)
    assert with_gap["logprob_gap"] == pytest.approx(0.5, abs=1e-5)
    assert "logprob_gap" not in plain
    assert with_gap["loss"] == pytest.approx(plain["loss"], abs=1e-7)
