"""The reward seam (dsmath.rewards): a reward registered here, in the test, is picked up by config and hosted by the
reward actor with no other file touched; ``reward.kind=auto`` picks what the driver picked before the seam; and each
built-in kind gives, on hand-made rollouts (boxed and real-model-like unboxed answers, programs), the rewards the
pre-seam reward workers gave (recorded from ``actors/reward_worker.py`` / ``actors/reward_model.py`` before they were
split into dsmath/rewards/)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsmath import rewards
from dsmath.config import TrainConfig, with_overrides
from dsmath.errors import ConfigError, UserError
from dsmath.records import Problem, RewardResult, Rollout
from dsmath.rewards.base import RewardKind


def rollout(i: int, completion: str, gold: str, prompt_ids=(1,), completion_ids=(2, 3)) -> Rollout:
    return Rollout(f"q{i // 2}", i % 2, Problem(f"p{i}", "q", gold), "p", tuple(prompt_ids), completion,
                   tuple(completion_ids), (0.0,) * len(completion_ids), "stop", 0, "g0")


def config(*overrides: str) -> TrainConfig:
    return with_overrides(TrainConfig(), list(overrides))


def score(cfg: TrainConfig, rollouts: list[Rollout]) -> list[RewardResult]:
    reward = rewards.build(cfg, worker_id="reward-0")
    try:
        return reward.score(rollouts)
    finally:
        reward.close()


# ------------------------------------------------------------------------------------------ the seam


class ShortIsGood:
    """A toy reward, defined only here: 1 − 0.1 per completion token, correct when the completion is the gold."""

    def __init__(self, cfg, worker_id: str):
        self.cfg, self.worker_id, self.scored = cfg, worker_id, 0

    def score(self, rollouts):
        self.scored += len(rollouts)
        return [RewardResult(r.request_id, r.sample_index, 1.0 - 0.1 * len(r.completion_ids),
                             r.completion == r.problem.answer, f"short: {len(r.completion_ids)} tokens")
                for r in rollouts]

    def close(self):
        pass

    def stats(self):
        return {"worker_id": self.worker_id, "scored": self.scored}


def test_a_reward_registered_in_a_test_is_picked_by_config_and_hosted_by_the_reward_actor(monkeypatch, capsys):
    from actors.reward_worker import RewardWorker
    from wiring.cli import main

    with pytest.raises(ConfigError, match="reward.kind: 'short' is not one of auto, combined, rule, sandbox"):
        config("reward.kind=short")
    assert main(["train", "reward.kind=short"]) == 2  # a one-line error, not a traceback
    assert "reward.kind: 'short' is not one of" in capsys.readouterr().err

    monkeypatch.setitem(rewards.REGISTRY, "short", RewardKind("short", build=ShortIsGood))
    cfg = config("reward.kind=short")
    assert rewards.kind_name(cfg) == "short" and "short" in rewards.names()
    worker = RewardWorker(cfg, worker_id="reward-7")  # the actor class, in process (no Ray needed to host it)
    results = worker.score([rollout(0, "7", "7", completion_ids=(5,)),
                            rollout(1, "8 or 9", "7", completion_ids=(5, 6, 7))])
    worker.close()
    assert [r.reward for r in results] == pytest.approx([0.9, 0.7])
    assert [r.correct for r in results] == [True, False] and results[1].reason == "short: 3 tokens"
    assert worker.stats() == {"worker_id": "reward-7", "scored": 2}

    refuse = RewardKind("short", build=ShortIsGood,
                        check=lambda c: None if c.rollout.mode == "cot" else "short: cot only")
    monkeypatch.setitem(rewards.REGISTRY, "short", refuse)
    assert rewards.choose(cfg) is refuse
    with pytest.raises(UserError, match="short: cot only"):
        rewards.choose(config("reward.kind=short", "rollout.mode=pot"))


@pytest.mark.parametrize("overrides,kind", [
    ((), "rule"),
    (("rollout.mode=tool",), "rule"),
    (("rollout.mode=pot",), "sandbox"),
    (("reward.model_path=some/rm",), "combined"),
    (("reward.model_path=some/rm", "rollout.mode=pot"), "combined"),
    (("algorithm.advantage=process", "reward.model_kind=process", "reward.model_path=some/prm"), "combined"),
    (("reward.kind=rule", "reward.model_path=some/rm"), "rule"),  # an explicit kind wins
])
def test_auto_picks_the_reward_the_driver_picked_before(overrides, kind):
    assert rewards.kind_name(config(*overrides)) == kind


@pytest.mark.parametrize("overrides,message", [
    (("algorithm.advantage=process", "reward.model_kind=process"), "algorithm.advantage=process needs a process reward model"),
    (("reward.kind=combined",), "reward.kind=combined needs reward.model_path"),
    (("reward.kind=rule", "rollout.mode=pot"), "reward.kind=rule grades a stated answer"),
    (("reward.kind=sandbox",), "reward.kind=sandbox runs the completion's program"),
])
def test_a_kinds_refusal_is_one_line_before_any_actor(overrides, message):
    with pytest.raises(UserError, match=message) as err:
        rewards.choose(config(*overrides))
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------- built-in kinds, as before

COT = [("The answer is \\boxed{42}.", "42"), ("The answer is \\boxed{42.0}.", "42"), ("\\boxed{1,000}", "1000"),
       ("so \\boxed{0.5}", "1/2"), ("The answer is \\boxed{41}.", "42"), ("6 times 7, so we get 42", "42"),
       ("6 times 7 is 42. The answer is 42.", "42"), ("Therefore, the final answer is $\\frac{1}{2}$.", "0.5"),
       ("Natalia sold 48/2 = 24 clips in May.\n48 + 24 = 72\n#### 72", "72"), ("The answer is: 72", "72"),
       ("x = \\boxed{x^2+2x+1}", "(x+1)^2"), ("none", "3"),
       ("The answer is \\boxed{10^{10^{10}}+1}.", "10^{10^{10}}"), ("So the answer is (B) 12.", "B"),
       ("I think it's 7", "8")]
# (reward, correct, extracted, timed_out, audited, audit_disagrees) per COT rollout, as the pre-seam worker gave them.
STRICT = [(1.0, True, "42", False, True, False), (1.0, True, "42.0", False, True, False),
          (1.0, True, "1,000", False, True, False), (1.0, True, "0.5", False, True, False),
          (-0.5, False, "41", False, True, False), (-0.75, False, None, False, True, True),
          (1.0, True, "42", False, True, False), (1.0, True, "\\frac{1}{2}", False, True, False),
          (1.0, True, "72", False, True, False), (1.0, True, "72", False, True, False),
          (1.0, True, "x^2+2x+1", False, True, False), (-0.75, False, None, False, True, False),
          (-0.5, False, "10^{10^{10}}+1", True, False, False), (1.0, True, "B", False, True, False),
          (-0.75, False, None, False, True, False)]
LENIENT = [(1.0, True, "42", False, True, False), (1.0, True, "42.0", False, True, False),
           (1.0, True, "1,000", False, True, False), (1.0, True, "0.5", False, True, False),
           (0.0, False, "41", False, True, False), (1.0, True, "42", False, True, True),
           (1.0, True, "42", False, True, False), (1.0, True, "\\frac{1}{2}", False, True, False),
           (1.0, True, "72", False, True, False), (1.0, True, "72", False, True, False),
           (1.0, True, "x^2+2x+1", False, True, False), (0.0, False, None, False, True, False),
           (0.0, False, "10^{10^{10}}+1", True, False, False), (1.0, True, "B", False, True, False),
           (0.0, False, "7", False, True, False)]


def table(results: list[RewardResult]) -> list[tuple]:
    return [(r.reward, r.correct, r.extracted, r.timed_out, r.audited, r.audit_disagrees) for r in results]


def test_rule_reward_strict_with_penalty_and_audit_as_before():
    cfg = config("reward.incorrect_reward=-0.5", "reward.format_penalty=0.25", "reward.audit_fraction=1.0",
                 "reward.timeout_s=1.0")
    results = score(cfg, [rollout(i, c, g) for i, (c, g) in enumerate(COT)])
    assert table(results) == STRICT
    assert [(r.request_id, r.sample_index) for r in results] == [(f"q{i // 2}", i % 2) for i in range(len(COT))]
    assert results[10].reason == "dsmath.grading: symbolically equal"
    assert results[5].reason.startswith("dsmath.grading: no stated answer (strict mode needs \\boxed{}")
    assert results[5].audit_reason == "lenient: equal after normalisation (extracted '42')"
    assert results[12].reason == "dsmath.grading: sympy did not finish within 1 s (worker killed)"


def test_rule_reward_lenient_as_before_also_in_tool_mode():
    cot = [rollout(i, c, g) for i, (c, g) in enumerate(COT)]
    results = score(config("reward.strict=false", "reward.audit_fraction=1.0", "reward.timeout_s=1.0"), cot)
    assert table(results) == LENIENT
    assert results[5].audit_reason.startswith("strict: no stated answer")
    tool = score(config("reward.strict=false", "reward.audit_fraction=1.0", "rollout.mode=tool"), cot[:3])
    assert table(tool) == LENIENT[:3]


def test_sandbox_reward_as_before():
    pot = [("```python\nprint(6 * 7)\n```", "42"), ("```python\nprint(6 + 7)\n```", "42"),
           ("The answer is \\boxed{42}.", "42"), ("```python\nwhile True: pass\n```", "42"),
           ("```python\nraise ValueError\n```", "42"), ("```python\nprint(1/2)\n```", "\\frac{1}{2}")]
    cfg = config("rollout.mode=pot", "reward.incorrect_reward=-0.5", "reward.format_penalty=0.25",
                 "reward.audit_fraction=1.0", "reward.timeout_s=1.0")
    results = score(cfg, [rollout(i, c, g) for i, (c, g) in enumerate(pot)])
    assert table(results) == [(1.0, True, "42", False, False, False), (-0.5, False, "13", False, False, False),
                              (-0.75, False, None, False, False, False), (-0.75, False, None, True, False, False),
                              (-0.75, False, None, False, False, False), (1.0, True, "0.5", False, False, False)]
    assert [r.reason for r in results] == [f"dsmath.grading: program: {why}" for why in
                                           ("correct", "wrong", "no_program", "timeout", "error", "correct")]


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> tuple[Path, object]:
    """A tiny reward model (the policy's body, a fresh seeded one-label head) and its tokenizer."""
    from transformers import AutoModelForTokenClassification

    from dsmath.config import ModelConfig
    from dsmath.tiny import build_model, train_tokenizer

    out = tmp_path_factory.mktemp("rm")
    texts = [f"Q: {a} + {b}?\nA: {a} + {b} = {a + b}\nThe answer is \\boxed{{{a + b}}}."
             for a in range(9) for b in range(9)]
    tok = train_tokenizer(texts, vocab_size=300, out_dir=out / "policy")
    shape = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                        max_position_embeddings=128, vocab_size=300)
    build_model(shape, tok, seed=0).save_pretrained(str(out / "policy"))
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_pretrained(str(out / "policy"), num_labels=1)
    model.save_pretrained(str(out / "rm"))
    tok.save_pretrained(str(out / "rm"))
    return out / "rm", tok


@pytest.mark.parametrize("model_kind", ["outcome", "process"])
@pytest.mark.parametrize("combine", ["weighted", "gate"])
def test_combined_reward_is_the_rule_plus_the_models_own_scores(reward_model, model_kind, combine):
    """The rule's reward and the model's sigmoid(logit), read here by a plain forward pass at the last token (ORM) or
    at each step's end token (PRM), combined by hand: weighted 0.5·rule + 2·score, gate 2·score if right else the
    rule's -0.5. A completion with no steps keeps the rule's result."""
    from transformers import AutoModelForTokenClassification

    from dsmath.reward_models import completion_step_ends

    path, tok = reward_model
    texts = [("The answer is \\boxed{7}.", "7"), ("3 + 4 = 7\nThe answer is \\boxed{8}.", "7"),
             ("3 + 4 = 7\n\nThe answer is 7", "7"), ("", "7")]
    prompt = tok("Q: 3 + 4?\nA:")["input_ids"]
    ros = [rollout(i, c, g, prompt, tok(c)["input_ids"] + ([tok.eos_token_id] if c else []))
           for i, (c, g) in enumerate(texts)]
    overrides = [f"reward.model_path={path}", f"reward.model_kind={model_kind}", f"reward.combine={combine}",
                 "reward.rule_weight=0.5", "reward.model_weight=2.0", "reward.incorrect_reward=-0.5",
                 "reward.model_batch_size=3"] + (["algorithm.advantage=process"] if model_kind == "process" else [])
    cfg = config(*overrides)
    assert rewards.kind_name(cfg) == "combined"
    results = score(cfg, ros)
    rule = [(1.0, True), (-0.5, False), (1.0, True), (-0.5, False)]  # the rule's verdicts (strict; "The answer is")
    assert [r.correct for r in results] == [c for _, c in rule]
    model = AutoModelForTokenClassification.from_pretrained(str(path)).eval()
    decode = lambda ids: tok.decode(list(ids), skip_special_tokens=True)  # noqa: E731
    for r, res, (rule_reward, right) in zip(ros, results, rule):
        ids = list(r.prompt_ids) + list(r.completion_ids)
        with torch.no_grad():
            s = torch.sigmoid(model(input_ids=torch.tensor([ids])).logits[0, :, 0]).tolist()  # [T]
        if model_kind == "outcome":
            want = 0.5 * rule_reward + 2.0 * s[-1] if combine == "weighted" else (2.0 * s[-1] if right else rule_reward)
            assert res.reward == pytest.approx(want, abs=1e-5) and res.step_rewards == ()
            continue
        ends = completion_step_ends(decode, r.completion_ids, "\n")
        if not ends:  # the empty completion: no steps, the rule's result
            assert res.reward == rule_reward and res.step_rewards == () and "prm" not in res.reason
            continue
        steps = [2.0 * s[len(prompt) + k] for k in ends]
        if combine == "weighted":
            steps[-1] += 0.5 * rule_reward
        elif not right:
            steps = [rule_reward] * len(ends)
        assert res.step_end_token_index == tuple(ends) and res.step_rewards == pytest.approx(steps, abs=1e-5)
        assert res.reward == pytest.approx(steps[-1], abs=1e-5)
    assert len([e for e in (completion_step_ends(decode, r.completion_ids, "\n") for r in ros) if len(e) > 1]) == 2


def test_a_reward_worker_whose_node_lacks_the_reward_model_loads_the_copy_it_was_sent(reward_model, tmp_path):
    """No shared filesystem: ``reward.model_path`` is not on the worker's node. Without a copy that is one line
    naming the fix; with the folder's files (what the driver sends under ``rollout.weights_from=learner``) the
    worker scores exactly as one that loads the folder itself, and removes its copy on close."""
    from actors.reward_worker import RewardWorker
    from dsmath.model_folder import model_files

    path, tok = reward_model
    completions = ["The answer is \\boxed{7}.", "3 + 4 = 7\nThe answer is \\boxed{8}."]
    prompt = tok("Q: 3 + 4?\nA:")["input_ids"]
    ros = [rollout(i, c, "7", prompt, tok(c)["input_ids"] + [tok.eos_token_id]) for i, c in enumerate(completions)]
    elsewhere = config(f"reward.model_path={tmp_path / 'on-the-head-only' / 'rm'}", "reward.model_kind=outcome")
    with pytest.raises(UserError, match=r"no such model folder on reward-3's node; .*rollout\.weights_from=learner"):
        RewardWorker(elsewhere, worker_id="reward-3")
    worker = RewardWorker(elsewhere, worker_id="reward-3", model=[model_files(path, weights=True)])
    copy = Path(worker.local_model)
    try:
        got = worker.score(ros)
    finally:
        worker.close()
    want = score(config(f"reward.model_path={path}", "reward.model_kind=outcome"), ros)
    assert [(r.reward, r.reason) for r in got] == [(r.reward, r.reason) for r in want]
    assert "; orm weighted score " in got[0].reason and not copy.exists()
