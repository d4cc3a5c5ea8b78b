"""Reward models: step → token positions (hand-built), reward combination, Math-Shepherd labels, 10 % replay, and a
real reward-model learner (DeepSpeed, one rank) whose loss drops and whose checkpoint the scorer reads back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsmath.config import AlgorithmConfig, RewardConfig
from dsmath.records import Problem, RewardResult, Rollout
from dsmath.reward_models import (completion_step_ends, gather_scores, gather_scores_loop, replay_count, replay_mix,
                                  shepherd_label, split_steps, step_end_token_indices, token_char_ends)
from dsmath.rewards.combined import combine_rewards

# A hand-built vocabulary: token 11 ("\nThe") straddles the boundary between step 2 and step 3.
VOCAB = ["12", " +", " 5", " =", " 17", "\n", "17", " -", " 2", " =", " 15", "\nThe", " answer", " is", " 15", "."]
IDS = list(range(len(VOCAB)))


def decode(ids) -> str:
    return "".join(VOCAB[i] for i in ids)


def rollout(prompt_ids, completion_ids, uid="q", index=0) -> Rollout:
    p = Problem(uid=uid, question="?", answer="15")
    return Rollout(request_id=uid, sample_index=index, problem=p, prompt="Q:", prompt_ids=tuple(prompt_ids),
                   completion=decode(completion_ids) if max(completion_ids, default=0) < len(VOCAB) else "",
                   completion_ids=tuple(completion_ids), logprobs=(0.0,) * len(completion_ids), finish_reason="stop",
                   weight_version=0, generator_id="g")


def test_split_steps_keeps_delimiters_and_merges_blank_pieces():
    text = "12 + 5 = 17\n17 - 2 = 15\n\nThe answer is 15."
    assert [text[a:b] for a, b in split_steps(text, "\n")] == ["12 + 5 = 17\n", "17 - 2 = 15\n\n", "The answer is 15."]
    def pieces(t: str, delimiter: str) -> list[str]:
        return [t[a:b] for a, b in split_steps(t, delimiter)]

    assert pieces("\n\na\nb\n", "\n") == ["\n\na\n", "b\n"]  # leading blank text joins the first step
    assert split_steps("", "\n") == []
    assert split_steps("  ", "\n") == [(0, 2)]
    assert pieces("a;; b;; c", ";;") == ["a;;", " b;;", " c"]


def test_step_ends_map_to_the_token_that_closes_each_step():
    # Steps: "12 + 5 = 17\n" ends with token 5 ("\n"); "17 - 2 = 15\n" ends inside token 11 ("\nThe");
    # "The answer is 15." ends with token 15 (".").
    ends = completion_step_ends(decode, IDS, "\n")
    assert ends == [5, 11, 15]
    text = decode(IDS)
    spans = split_steps(text, "\n")
    for (start, end), k in zip(spans, ends):
        # The prefix up to token k holds the whole step; one token less does not.
        assert len(decode(IDS[: k + 1])) >= end > len(decode(IDS[:k]))
    assert token_char_ends(decode, [0, 1]) == [2, 4]
    assert step_end_token_indices([], [(0, 3)]) == []


def test_prm_step_scores_land_on_the_step_end_tokens_in_the_advantages_and_the_batch():
    """Hand-built: PRM scores at step ends → RewardResult → process advantages per completion token → the
    learner batch's positions (prompt length P: completion token k sits at batch position P−1+k)."""
    from dsmath.methods import sample_advantages
    from learner.batch import collate_rollouts

    cfg = RewardConfig(rule_weight=0.0, model_weight=1.0)
    prompt = [20, 21, 22]
    short = [0, 1, 2, 3, 4, 5, 12, 13, 14, 15]  # "12 + 5 = 17\n answer is 15."  → steps end at tokens 5 and 9
    ros = [rollout(prompt, IDS, index=0), rollout(prompt, short, index=1)]
    rule = [RewardResult(request_id="q", sample_index=i, reward=1.0, correct=True, reason="r") for i in range(2)]
    ends = [completion_step_ends(decode, r.completion_ids, "\n") for r in ros]
    assert ends == [[5, 11, 15], [5, 9]]
    scores = [[0.9, 0.2, 0.6], [0.5, 0.8]]
    results = [combine_rewards(r, cfg, step_scores=s, step_ends=e) for r, s, e in zip(rule, scores, ends)]
    assert results[0].step_end_token_index == (5, 11, 15) and results[0].step_rewards == pytest.approx((0.9, 0.2, 0.6))
    adv = sample_advantages(AlgorithmConfig(advantage="process", adv_eps=0.0), ros, results, group_size=2)
    flat = torch.tensor([0.9, 0.2, 0.6, 0.5, 0.8])
    norm = ((flat - flat.mean()) / flat.std()).tolist()  # the group's 5 step rewards, normalised together
    # Sample 0: tokens 0..5 see all three steps, 6..11 the last two, 12..15 the last one.
    expect0 = [sum(norm[0:3])] * 6 + [sum(norm[1:3])] * 6 + [norm[2]] * 4
    expect1 = [sum(norm[3:5])] * 6 + [norm[4]] * 4
    assert adv[0] == pytest.approx(expect0, abs=1e-5)
    assert adv[1] == pytest.approx(expect1, abs=1e-5)
    batch = collate_rollouts([r.prompt_ids for r in ros], [r.completion_ids for r in ros], pad_id=0, advantages=adv)
    P = len(prompt)
    for i, exp in enumerate((expect0, expect1)):
        got = batch.advantages[i, P - 1:P - 1 + len(exp)].tolist()
        assert got == pytest.approx(exp, abs=1e-5)
        assert float(batch.advantages[i, :P - 1].abs().sum()) == 0.0  # nothing on prompt positions


def test_combine_weighted_and_gate():
    ok = RewardResult(request_id="a", sample_index=0, reward=1.0, correct=True, reason="r")
    bad = RewardResult(request_id="a", sample_index=1, reward=-0.5, correct=False, reason="r")
    w = RewardConfig(combine="weighted", rule_weight=0.5, model_weight=2.0)
    g = RewardConfig(combine="gate", model_weight=2.0)
    assert combine_rewards(ok, w, outcome_score=0.25).reward == pytest.approx(0.5 * 1.0 + 2.0 * 0.25)
    assert combine_rewards(bad, w, outcome_score=0.25).reward == pytest.approx(0.5 * -0.5 + 2.0 * 0.25)
    assert combine_rewards(ok, g, outcome_score=0.25).reward == pytest.approx(0.5)
    assert combine_rewards(bad, g, outcome_score=0.9).reward == pytest.approx(-0.5)  # the gate stays shut
    steps = combine_rewards(ok, w, step_scores=[0.1, 0.4], step_ends=[3, 7])
    assert steps.step_rewards == pytest.approx((0.2, 0.8 + 0.5)) and steps.reward == pytest.approx(1.3)
    gated = combine_rewards(bad, g, step_scores=[0.1, 0.4], step_ends=[3, 7])
    assert gated.step_rewards == pytest.approx((-0.5, -0.5)) and gated.step_end_token_index == (3, 7)
    assert combine_rewards(ok, w) is ok  # no model score: the rule result unchanged
    assert combine_rewards(bad, w, outcome_score=0.9).correct is False  # correctness is always the rule's
    with pytest.raises(ValueError):
        combine_rewards(ok, w, step_scores=[0.1], step_ends=[])


def test_shepherd_labels():
    assert shepherd_label([False, False, True, False], "any") == 1
    assert shepherd_label([False, False, True, False], "most") == 0
    assert shepherd_label([True, True, False], "most") == 1
    assert shepherd_label([True, False], "most") == 0  # a tie is not a majority
    assert shepherd_label([], "any") == 0


def test_replay_is_ten_percent_of_the_mixed_set():
    fresh = [("fresh", i) for i in range(180)]
    history = [("old", i) for i in range(1000)]
    mixed = replay_mix(fresh, history, 0.1, seed=3)
    replayed = [x for x in mixed if x[0] == "old"]
    assert len(mixed) == 200 and len(replayed) == 20 == replay_count(180, 0.1)
    assert len(replayed) / len(mixed) == pytest.approx(0.1)
    assert sorted(x for x in mixed if x[0] == "fresh") == fresh  # every fresh example exactly once
    assert len(set(replayed)) == 20 and set(replayed) <= set(history)
    assert mixed == replay_mix(fresh, history, 0.1, seed=3)  # deterministic
    assert replay_mix(fresh, history, 0.1, seed=4) != mixed
    assert sum(x[0] == "old" for x in replay_mix(fresh, history[:5], 0.1)) == 5  # small history: all of it
    assert replay_mix(fresh, [], 0.1) and all(x[0] == "fresh" for x in replay_mix(fresh, [], 0.1))
    assert not any(x[0] == "old" for x in replay_mix(fresh, history, 0.0))
    with pytest.raises(ValueError):
        replay_mix(fresh, history, 1.0)


def test_gather_scores_matches_loop():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 9, generator=g)
    rows, cols = [0, 0, 2, 3, 3, 1], [1, 8, 4, 0, 7, 7]
    assert torch.equal(gather_scores(scores, rows, cols), gather_scores_loop(scores, rows, cols))


# ----------------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    from dsmath.config import ModelConfig
    from dsmath.tiny import build_model, train_tokenizer

    out = tmp_path_factory.mktemp("rm") / "policy"
    texts = [f"Q: {a} + {b}?\nA: {a} + {b} = {a + b}\nThe answer is \\boxed{{{a + b}}}." for a in range(9) for b in range(9)]
    tok = train_tokenizer(texts, vocab_size=300, out_dir=out)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                      max_position_embeddings=128, vocab_size=300)
    build_model(cfg, tok, seed=0).save_pretrained(str(out))
    return out


def test_reward_model_learns_and_scorer_reads_the_checkpoint(policy_dir, tmp_path):
    from transformers import AutoTokenizer

    from dsmath.rewards.model import RewardModelScorer
    from dsmath.config import LearnerConfig
    from learner.reward_model import RewardModelLearner, collate_rm_examples, train_reward_model

    tok = AutoTokenizer.from_pretrained(str(policy_dir))
    dec = lambda ids: tok.decode(list(ids), skip_special_tokens=True)  # noqa: E731
    examples, ros = [], []
    for i, (a, b) in enumerate([(1, 2), (3, 4), (2, 5), (6, 1), (4, 4), (7, 1), (0, 3), (5, 2)]):
        good = i % 2 == 0
        ans = a + b if good else a + b + 1
        prompt = tok(f"Q: {a} + {b}?\nA:")["input_ids"]
        comp = tok(f" {a} + {b} = {ans}\nThe answer is \\boxed{{{ans}}}.")["input_ids"] + [tok.eos_token_id]
        ends = completion_step_ends(dec, comp, "\n")
        assert len(ends) == 2
        examples.append({"prompt_ids": prompt, "completion_ids": comp, "positions": ends, "labels": [int(good)] * 2})
        ros.append(rollout(prompt, comp, uid=f"q{i}"))
    learner = RewardModelLearner(policy_dir, LearnerConfig(lr=3e-3, zero_stage=1, micro_batch_size=3), seed=0)
    batch = collate_rm_examples(examples, tok.pad_token_id)
    before = learner.evaluate(batch)
    rows = train_reward_model(learner, examples, epochs=40, batch_size=8, seed=0, pad_id=tok.pad_token_id)
    after = learner.evaluate(batch)
    print(f"RM BCE {before['loss']:.3f} -> {after['loss']:.3f}, accuracy {before['accuracy']:.2f} -> "
          f"{after['accuracy']:.2f} over {len(rows)} steps")
    assert rows[0]["labels"] == 16 and after["labels"] == 16
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] == 1.0
    ckpt = learner.save_checkpoint(tmp_path / "rm", tokenizer=tok)
    # The learner's own scores at the labelled positions, unpadded, one sequence at a time.
    model = learner.model.eval()
    own = []
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e["prompt_ids"] + e["completion_ids"]])
            logit = model(input_ids=ids).logits[0, :, 0]
            own.append([float(torch.sigmoid(logit[len(e["prompt_ids"]) + k])) for k in e["positions"]])
    scorer = RewardModelScorer(ckpt, batch_size=3)  # padded batches of 3
    got = scorer.step_scores(ros, "\n")
    for (scores, ends), e, mine in zip(got, examples, own):
        assert ends == e["positions"]
        assert scores == pytest.approx(mine, abs=1e-5)
        assert all((s > 0.5) == bool(y) for s, y in zip(scores, e["labels"]))
    outcome = scorer.outcome_scores(ros)  # at the last token (EOS)
    assert len(outcome) == len(ros) and all(0.0 < s < 1.0 for s in outcome)


def test_cli_mistakes_are_one_line_errors(tmp_path, capsys):
    from wiring.cli import main

    good = '{"prompt_ids": [1], "completion_ids": [2, 3], "positions": [1], "labels": [1]}'
    bad = tmp_path / "rm.jsonl"
    bad.write_text(good + "\n" + '{"prompt_ids": [1]}' + "\n")
    assert main(["rm", "train", "--kind", "process", "--out", str(tmp_path / "o"), "--data", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsmath rm: error: ") and f"{bad}:2" in err and "\n" not in err
    assert main(["rm", "train", "--kind", "outcome", "--out", str(tmp_path / "o"), "--history", str(tmp_path / "no")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["rm"]) == 2
    assert "dsmath rm train" in capsys.readouterr().err
    assert main(["rm", "train", "--kind", "process", "--out", "x", "rm.replay_fraction=1.5"]) == 2
    assert "rm.replay_fraction" in capsys.readouterr().err
    assert main(["iterate", "--iterations", "0"]) == 2
    assert "--iterations" in capsys.readouterr().err
    assert main(["train", "algorithm.advantage=process"]) == 2  # process supervision without a PRM is refused up front
    assert "reward.model_kind=process" in capsys.readouterr().err


def test_process_labels_give_a_completion_without_steps_one_position():
    """A completion that decodes to whitespace only has no step: it is one step ending at its last token, with its
    own grade (it used to give 0 positions and 1 label, which `dsmath rm train --kind process` crashed on)."""
    from types import SimpleNamespace

    from dsmath.rm_labels import label_examples
    from dsmath.records import Problem, Rollout

    class Policy:  # the real generator cannot be told to emit whitespace on demand
        def generate(self, requests):
            return [Rollout(request_id=q.request_id, sample_index=0, problem=q.problem, prompt=q.prompt,
                            prompt_ids=(1, 2), completion="  ", completion_ids=(7, 7), logprobs=(-1.0, -1.0),
                            finish_reason="stop", weight_version=0, generator_id="g") for q in requests]

    grader = SimpleNamespace(score=lambda rollouts: [SimpleNamespace(correct=False) for _ in rollouts])
    examples, stats = label_examples(
        Policy(), grader, [Problem(uid="p", question="1+1?", answer="2")], kind="process", samples_per_question=1,
        completions_per_prefix=2, label_rule="any", delimiter="\n", prompt_mode="tiny", temperature=1.0,
        max_new_tokens=8, stop=(), decode=lambda ids: " " * len(ids))
    assert [(e["positions"], e["labels"]) for e in examples] == [([1], [0])] and stats["continuations"] == 0
