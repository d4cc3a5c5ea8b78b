"""dsmath eval: the pure aggregation (pass@1, maj@k with ties, pass@k, breakdowns), few-shot prompts, scoring
through the real grading pool and sandbox, the harness's accounting, CLI errors, and one end-to-end CLI run with a
real vLLM engine on the shared GSM8K and MATH test files."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsmath.evaluation import (EvalSettings, SampleVerdict, format_table, majority_vote, pass_at_k, run_eval,
                               score_completions, summarize)
from dsmath.evaluation.aggregate import pass_at_k_loop
from dsmath.evaluation.fewshot import FEWSHOT_STOP, fewshot_prefix, load_shots, worked_solution
from dsmath.grading import GradingPool, math_equal
from dsmath.records import Problem, RewardResult, Rollout

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT.parent / "shared" / "data" / "decontam_benchmarks"
GSM8K, MATH = BENCH / "gsm8k_test.jsonl", BENCH / "math_test.jsonl"


def V(correct: bool, extracted: str | None) -> SampleVerdict:
    return SampleVerdict(correct, extracted, "hand-built")


@pytest.fixture(scope="module")
def pool():
    with GradingPool(1, timeout_s=5.0) as p:
        yield p


# ------------------------------------------------------------------------------------------ majority vote


def test_majority_vote_groups_equivalent_answers_and_breaks_ties_by_first_sample(pool):
    def equal(a, b):
        return math_equal(a, b, pool=pool)

    # 0.5 and \frac{1}{2} are one cluster of 2 and beat "3" (1 vote); None abstains
    vote = majority_vote(["3", "\\frac{1}{2}", None, "0.5"], equal)
    assert (vote.winner, vote.cluster_sizes, vote.voters) == (1, (1, 2), 3)
    # 2-2 tie: the cluster sampled first wins, whichever it is
    assert majority_vote(["4", "5", "5", "4"], equal).winner == 0
    assert majority_vote(["5", "4", "4", "5"], equal).winner == 0
    assert majority_vote(["1", "2", "2"], equal).winner == 1
    assert majority_vote([None, None], equal) == majority_vote([], equal)
    assert majority_vote([None, None], equal).winner is None


def test_majority_vote_compares_each_answer_with_cluster_representatives_only():
    calls = []

    def equal(a, b):
        calls.append((a, b))
        return a == b

    vote = majority_vote(["7", "7", "8", "7", "8", "9"], equal)
    assert vote.cluster_sizes == (3, 2, 1) and vote.winner == 0
    # identical strings skip the comparison: "8" vs "7", "9" vs "7", "9" vs "8" only
    assert calls == [("8", "7"), ("9", "7"), ("9", "8")]


# ---------------------------------------------------------------------------------------------- pass@k


def test_pass_at_k_vectorised_matches_the_loop_reference():
    rng = random.Random(0)
    for _ in range(200):
        k = rng.randint(1, 16)
        n = [rng.randint(k, 40) for _ in range(rng.randint(1, 12))]
        c = [rng.randint(0, x) for x in n]
        got = pass_at_k(np.array(n), np.array(c), k)
        np.testing.assert_allclose(got, pass_at_k_loop(n, c, k), rtol=0, atol=1e-12)
    # hand values: n=4, c=1 -> pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1/2, pass@4 = 1; c=0 -> 0
    np.testing.assert_allclose(pass_at_k(np.array([4, 4, 4]), np.array([1, 0, 4]), 2), [0.5, 0.0, 1.0])
    assert pass_at_k(np.array([4]), np.array([1]), 1)[0] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pass_at_k(np.array([2]), np.array([1]), 3)


# ----------------------------------------------------------------------------------------------- summary


def _hand_built():
    problems = [
        Problem("p0", "q0", "2", {"level": "Level 1", "type": "Algebra"}),
        Problem("p1", "q1", "0.5", {"level": "Level 2", "type": "Algebra"}),
        Problem("p2", "q2", "9", {"level": "Level 2", "type": "Geometry"}),
        Problem("p3", "q3", "5", {"level": "Level 10", "type": "Geometry"}),
    ]
    verdicts = [
        # greedy right; samples tie 2-2 and the first cluster ("2", right) wins
        [V(True, "2"), V(True, "2"), V(False, "3"), V(True, "2"), V(False, "3")],
        # greedy wrong; 0.5 and 1/2 outvote 3 (math_equal groups them)
        [V(False, "3"), V(False, "3"), V(True, "\\frac{1}{2}"), V(True, "0.5"), V(False, None)],
        # no answers at all
        [V(False, None)] + [V(False, None)] * 4,
        # greedy right; samples tie 2-2 and the first cluster ("4", wrong) wins
        [V(True, "5"), V(False, "4"), V(True, "5"), V(True, "5"), V(False, "4")],
    ]
    completions = [["x" * (i + 1)] * 5 for i in range(4)]
    return problems, completions, verdicts


def test_summary_counts_pass1_majk_passk_and_breakdowns(pool):
    problems, completions, verdicts = _hand_built()
    s = summarize(problems, completions, verdicts, equal=lambda a, b: math_equal(a, b, pool=pool))
    assert s["problems"] == 4 and s["k"] == 4
    assert (s["pass@1"], s["correct@1"]) == (0.5, 2)  # p0, p3
    assert s["maj@k"] == 0.5  # p0 (tie won by a right answer), p1 (equivalence vote)
    assert s["pass@k"] == 0.75  # p0, p1, p3 have a right sample
    assert s["sample_accuracy"] == 6 / 16
    assert (s["no_answer"], s["timeouts"]) == (1, 0)
    assert s["mean_completion_chars"] == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert list(s["by_level"]) == ["Level 1", "Level 2", "Level 10"]  # numeric order
    assert s["by_level"]["Level 1"] == {"problems": 1, "pass@1": 1.0, "maj@k": 1.0}
    assert s["by_level"]["Level 2"] == {"problems": 2, "pass@1": 0.0, "maj@k": 0.5}
    assert s["by_level"]["Level 10"] == {"problems": 1, "pass@1": 1.0, "maj@k": 0.0}
    assert s["by_subject"] == {"Algebra": {"problems": 2, "pass@1": 0.5, "maj@k": 1.0},
                               "Geometry": {"problems": 2, "pass@1": 0.5, "maj@k": 0.0}}
    assert "by_dataset" not in s  # no such meta: no such breakdown


def test_summary_accepts_reward_results_and_sample_only_runs():
    """The driver's RewardResults work as verdicts; without a greedy sample pass@1 is the mean sample accuracy."""
    problems = [Problem("a", "q", "1", {"level": 1}), Problem("b", "q", "2", {"level": 3})]

    def rr(correct, extracted):
        return RewardResult("r", 0, float(correct), correct, "test", extracted)

    verdicts = [[rr(True, "1"), rr(False, "7"), rr(True, "1")], [rr(False, "3"), rr(False, None), rr(False, "3")]]
    s = summarize(problems, [["c"] * 3] * 2, verdicts, greedy_first=False, equal=lambda a, b: a == b)
    assert s["pass@1"] == pytest.approx((2 / 3 + 0) / 2) and s["correct@1"] is None
    assert (s["k"], s["maj@k"], s["no_answer"]) == (3, 0.5, 1)
    greedy_only = summarize(problems, [["c"]] * 2, [[rr(True, "1")], [rr(False, "3")]], equal=lambda a, b: a == b)
    assert (greedy_only["pass@1"], greedy_only["k"], greedy_only["maj@k"], greedy_only["pass@k"]) == (0.5, 0, None, None)
    assert greedy_only["by_level"] == {"1": {"problems": 1, "pass@1": 1.0}, "3": {"problems": 1, "pass@1": 0.0}}
    with pytest.raises(ValueError, match="2 problems"):
        summarize(problems, [["c"]], [[rr(True, "1")]])


def test_driver_rollouts_and_reward_results_group_by_problem():
    """The training driver's flat (rollout, RewardResult) lists become summarize()'s per-problem lists."""
    from dsmath.evaluation import group_by_problem

    p1 = Problem("u1", "q1", "1", {"level": 1})
    p2 = Problem("u2", "q2", "2", {"level": 2})

    def ro(rid, j, p):
        return Rollout(rid, j, p, "prompt", (1,), f"{rid}/{j}", (2,), (), "stop", 0, "g")

    def rr(correct, extracted):
        return RewardResult("r", 0, float(correct), correct, "test", extracted)

    # out of order within a request, a problem's greedy and sampled requests interleaved with another problem
    rollouts = [ro("g-1", 0, p1), ro("g-2", 0, p2), ro("s-1", 1, p1), ro("s-1", 0, p1), ro("s-2", 0, p2),
                ro("s-2", 1, p2)]
    results = [rr(True, "1"), rr(False, "5"), rr(False, "7"), rr(True, "1"), rr(False, "3"), rr(False, "3")]
    problems, completions, verdicts = group_by_problem(rollouts, results)
    assert [p.uid for p in problems] == ["u1", "u2"]
    assert completions == [["g-1/0", "s-1/0", "s-1/1"], ["g-2/0", "s-2/0", "s-2/1"]]
    assert [[v.extracted for v in vs] for vs in verdicts] == [["1", "1", "7"], ["5", "3", "3"]]
    s = summarize(problems, completions, verdicts, equal=lambda a, b: a == b)
    assert (s["pass@1"], s["maj@k"], s["k"]) == (0.5, 0.5, 2)
    with pytest.raises(ValueError):
        group_by_problem(rollouts, results[:-1])


# ---------------------------------------------------------------------------------------------- few-shot


def test_prompts_are_the_deepseekmath_templates_with_chinese_questions_in_chinese():
    from dsmath.evaluation.fewshot import build_prompt

    en = build_prompt("What is 2+3?", "cot")
    assert en == ("User: What is 2+3?\nPlease reason step by step, and put your final answer within \\boxed{}."
                  "\n\nAssistant:")
    assert "Please integrate natural language reasoning with programs to solve the problem above, and put your " \
           "final answer within \\boxed{}." in build_prompt("What is 2+3?", "tool")
    cmath = json.loads((BENCH / "cmath_test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    zh = build_prompt(cmath["question"], "cot")
    assert zh.endswith("\n请通过逐步推理来解答问题，并把最终答案放置于\\boxed{}中。\n\nAssistant:")
    assert "请结合自然语言和Python程序语言来解答问题" in build_prompt(cmath["question"], "tool")
    from dsmath.datasets import gold_from_record

    assert gold_from_record(cmath) == "18"  # CMATH's "golden"


def test_fewshot_shots_from_gsm8k_and_math_state_their_answers_the_graders_way():
    record = {"question": "q", "answer": "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"}
    assert worked_solution(record, "cot") == "She has 3 + 4 = 7 apples.\nThe answer is \\boxed{7}."
    assert worked_solution({"problem": "q", "solution": "so $\\boxed{2}$."}, "cot") == "so $\\boxed{2}$."
    assert worked_solution({"question": "q", "code": "print(7)"}, "pot") == "```python\nprint(7)\n```"
    assert worked_solution({"question": "q", "golden": "18"}, "cot") == "The answer is \\boxed{18}."  # CMATH
    assert worked_solution({"question": "q"}, "cot") is None
    shots = load_shots(GSM8K, 2, "cot")
    assert len(shots) == 2 and shots[0].question.startswith("Janet")
    prefix = fewshot_prefix(shots, "cot")
    assert prefix.count("User:") == 2 and prefix.count("\\boxed{18}") == 1 and "<<" not in prefix
    assert FEWSHOT_STOP not in shots[0].solution
    math_shots = load_shots(MATH, 1, "tool")
    assert "\\boxed{2}" in math_shots[0].solution
    from dsmath.errors import UserError

    with pytest.raises(UserError, match="no worked solution for pot few-shot"):
        load_shots(GSM8K, 1, "pot")
    with pytest.raises(UserError, match="no such file"):
        load_shots(BENCH / "missing.jsonl", 1, "cot")


def test_fewshot_examples_from_a_data_file_are_not_evaluated():
    from wiring.commands.eval import load_eval_problems

    problems, prefixes, notes = load_eval_problems([str(GSM8K)], limit=5, shuffle=False, seed=0, mode="cot",
                                                   fewshot=3, fewshot_file=None)
    assert [p.uid for p in problems] == [f"gsm8k_test-{i}" for i in range(3, 8)]
    assert prefixes["gsm8k_test"].count("User:") == 3 and any("not evaluated" in n for n in notes)
    shuffled, _, _ = load_eval_problems([str(MATH)], limit=24, shuffle=True, seed=0, mode="cot", fewshot=0,
                                        fewshot_file=None)
    assert len(shuffled) == 24 and len({p.meta["type"] for p in shuffled}) > 1  # a subset across subjects


# ----------------------------------------------------------------------------------------------- scoring


def test_scoring_uses_the_grading_module_and_the_sandbox(pool):
    cot = score_completions([("so it is \\boxed{\\frac12}", "0.5"), ("The answer is 7.", "8"), ("no idea", "3")],
                            "cot", grading_pool=pool)
    assert [(v.correct, v.extracted) for v in cot] == [(True, "\\frac12"), (False, "7"), (False, None)]
    tool = score_completions(
        [("Compute it.\n```python\nprint(6*7)\n```\n```output\n42\n```\nSo the answer is $\\boxed{42}$.", "42")],
        "tool", grading_pool=pool)
    assert tool[0].correct and tool[0].extracted == "42"
    from dsmath.sandbox import SandboxPool

    with SandboxPool(size=1) as sandbox:
        pot = score_completions([
            ("```python\nprint('work')\nprint(3/4)\n```", "\\frac{3}{4}"),  # the last printed line is the answer
            ("```python\nprint(5)\n```", "6"),
            ("I will not write code", "1"),
            ("```python\nraise ValueError('x')\n```", "1"),
            ("```python\nwhile True:\n    pass\n```", "1"),
        ], "pot", grading_pool=pool, sandbox=sandbox, timeout_s=1.0)
    assert [(v.correct, v.extracted, v.reason, v.timed_out) for v in pot] == [
        (True, "0.75", "program: correct", False), (False, "5", "program: wrong", False),
        (False, None, "program: no_program", False), (False, None, "program: error", False),
        (False, None, "program: timeout", True)]


# ------------------------------------------------------------------------------------ harness accounting


class ScriptedGenerator:
    """Answers from a fixed script (the harness's generation interface; the vLLM path is the slow test's)."""

    def __init__(self, script):
        self.script = script  # (uid, "greedy" | sample index) -> completion
        self.calls = []

    def __call__(self, requests, mode):
        self.calls.append((list(requests), mode))
        out = []
        for r in requests:
            for j in range(r.sampling.n):
                key = (r.problem.uid, "greedy" if r.request_id.startswith("greedy") else j)
                out.append(Rollout(r.request_id, j, r.problem, r.prompt, (1,), self.script[key], (2,), (),
                                   "length" if key[1] == 1 else "stop", 0, "scripted"))
        return out


def test_harness_requests_grades_and_accounts_every_completion(pool):
    problems = [Problem(f"u{i}", f"question {i}", str(i), {"level": f"Level {1 + i % 2}", "dataset": "d"})
                for i in range(5)]
    script = {}
    for i in range(5):
        script[(f"u{i}", "greedy")] = f"\\boxed{{{i if i % 2 == 0 else 99}}}"  # u0, u2, u4 right
        for j in range(3):
            script[(f"u{i}", j)] = f"The answer is {i if j < 2 else 7}."  # 2 of 3 right: maj right
    gen = ScriptedGenerator(script)
    settings = EvalSettings(mode="cot", k=3, temperature=0.9, max_new_tokens=50, seed=1, chunk_size=2,
                            prefix="SHOTS ", stop=("\nUser:",))
    def count_tokens(prompt):
        return 500 if "question 3" in prompt else 10  # u3's prompt does not fit in 100 tokens

    out = run_eval(problems, gen, settings, grading_pool=pool, count_tokens=count_tokens, max_model_len=100)
    assert len(gen.calls) == 3  # chunks of 2 problems
    first = gen.calls[0][0]
    assert [r.request_id for r in first] == ["greedy-0", "sample-0", "greedy-1", "sample-1"]
    assert (first[0].sampling.n, first[0].sampling.temperature) == (1, 0.0)
    assert (first[1].sampling.n, first[1].sampling.temperature) == (3, 0.9)
    assert first[0].sampling.max_new_tokens == 50 and first[0].sampling.stop == ("\nUser:",)
    assert first[0].prompt.startswith("SHOTS User: question 0\nPlease reason step by step")
    seeds = [c[0][0].sampling.seed for c in gen.calls]
    assert len(set(seeds)) == 3  # one sampling seed per chunk
    assert "question 3" not in "".join(r.prompt for c in gen.calls for r in c[0])  # too long: not sent

    s = out.summary
    assert len(out.rows) == 5 * 4 and [r["sample"] for r in out.rows[:4]] == ["greedy", 0, 1, 2]
    assert s["prompt_too_long"] == 1 and out.rows[12]["reason"] == "prompt too long"
    assert s["pass@1"] == 3 / 5 and s["maj@k"] == 4 / 5  # u3 counts, as a miss
    assert s["sample_accuracy"] == 8 / 15 and s["pass@k"] == pytest.approx(4 / 5)
    assert s["truncated"] == 4  # sample 1 of the four problems that were generated
    assert s["by_level"] == {"Level 1": {"problems": 3, "pass@1": 1.0, "maj@k": 1.0},
                             "Level 2": {"problems": 2, "pass@1": 0.0, "maj@k": 0.5}}
    assert s["datasets"]["d"]["pass@1"] == s["pass@1"]
    table = format_table(s)
    assert "maj@3" in table and " 60.0%" in table and "Level 2" in table


# --------------------------------------------------------------------------------------------------- CLI


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wiring.cli", "eval", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_user_mistakes_are_one_line_errors(tmp_path):
    fake_model = tmp_path / "model"
    fake_model.mkdir()
    (fake_model / "config.json").write_text("{}")
    for run in ("ckpts", "run"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "latest").write_text("step-000003")
    (tmp_path / "run" / "step-000003").mkdir()
    (tmp_path / "run" / "step-000003" / "config.json").write_text("{}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "answer": "2"}\n{"question": oops}\n')
    cases = [
        (["--model", str(tmp_path / "nope"), "--data", str(GSM8K)], "not a model folder"),
        (["--model", str(tmp_path / "ckpts"), "--data", str(GSM8K)], "not a model folder"),  # latest -> missing
        (["--model", str(tmp_path / "run"), "--data", str(bad)], f"{bad}:2: not valid JSON"),  # latest -> found
        (["--model", str(fake_model), "--data", str(tmp_path / "missing.jsonl")], "no such file"),
        (["--model", str(fake_model), "--data", str(bad)], f"{bad}:2: not valid JSON"),
        (["--model", str(fake_model), "--data", str(GSM8K), "--k", "-1"], "--k must be >= 0"),
        (["--model", str(fake_model), "--data", str(GSM8K), "--temperature", "0"], "--temperature must be > 0"),
        (["--model", str(fake_model), "--data", str(GSM8K), "--fewshot", "2", "--mode", "pot"], "pot few-shot"),
        (["--model", str(fake_model), "--data", str(GSM8K), "--limit", "1", "--address", f"127.0.0.1:{_free_port()}"],
         "nothing answers there"),
    ]
    for args, message in cases:
        out = _cli(*args)
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dsmath eval: error:") and message in lines[0], out.stderr
    helped = _cli("--help")
    assert helped.returncode == 0 and "--fewshot-file" in helped.stdout and "maj@k" in helped.stdout


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_cli_end_to_end_on_the_shared_gsm8k_and_math_files(tmp_path):
    """A real vLLM engine (tiny random model: accuracy ~0) over 24 + 24 problems: fields, counts, consistency."""
    from dsmath.config import ModelConfig
    from dsmath.tiny import build_model, train_tokenizer

    model_dir = tmp_path / "tiny"
    texts = [f"Q: what is {a} plus {b}?\nA: The answer is \\boxed{{{a + b}}}." for a in range(40) for b in range(20)]
    tok = train_tokenizer(texts, 384, model_dir)
    build_model(ModelConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
                            vocab_size=384, max_position_embeddings=1024), tok).save_pretrained(model_dir)
    out_dir = tmp_path / "out"
    run = _cli("--model", str(model_dir), "--data", str(GSM8K), str(MATH), "--limit", "24", "--shuffle",
               "--k", "2", "--max-new-tokens", "16", "--out", str(out_dir), "--no-progress")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pass@1" in run.stdout and "maj@2" in run.stdout and "gsm8k_test" in run.stdout
    summary = json.loads((out_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert summary["problems"] == 48 and summary["k"] == 2 and len(rows) == 48 * 3
    for key in ("pass@1", "maj@k", "pass@k", "sample_accuracy", "no_answer", "truncated", "seconds", "settings"):
        assert key in summary, key
    assert set(summary["datasets"]) == {"gsm8k_test", "math_test"}
    math_part = summary["datasets"]["math_test"]
    assert math_part["problems"] == 24 and "by_level" not in summary["datasets"]["gsm8k_test"]
    assert sum(g["problems"] for g in math_part["by_level"].values()) == 24
    assert sum(g["problems"] for g in math_part["by_subject"].values()) == 24
    assert len(math_part["by_subject"]) > 1
    greedy = [r for r in rows if r["sample"] == "greedy"]
    assert len(greedy) == 48 and all(isinstance(r["correct"], bool) and r["reason"] for r in rows)
    assert summary["pass@1"] == sum(r["correct"] for r in greedy) / 48
    assert summary["no_answer"] == sum(r["extracted"] is None for r in greedy)
    assert summary["truncated"] == sum(r["finish_reason"] == "length" for r in rows)
    assert summary["prompt_too_long"] == sum(r["reason"] == "prompt too long" for r in greedy)
    gsm8k_golds = {json.loads(line)["answer"].rsplit("####", 1)[1].strip() for line in GSM8K.read_text().splitlines()}
    assert {r["gold"] for r in rows if r["dataset"] == "gsm8k_test"} <= gsm8k_golds


TOOL_QUESTION = "What is 6 times 7?"
TOOL_CALL = " Let me compute.\n```python\nprint(6*7)\n```\n"
# What the overfit model writes after each mode's prompt. The trained output blocks never say 42: a completion
# showing 42 there got it from the sandbox, not the model. Three of them, so that what follows the block does not
# hang on the one number seen in training (a single 41 left the model lost after the sandbox's 42 on some CPUs).
SCRIPTS = [("tool", TOOL_CALL + f"```output\n{n}\n```\nThe answer is \\boxed{{42}}.") for n in (41, 40, 43)] + [
    ("pot", " ```python\nprint(6*7)\n```")]


@pytest.mark.slow
def test_tool_and_pot_modes_end_to_end_run_the_programs(tmp_path):
    """A tiny model overfit on the scripts of each mode: the real tool loop / sandbox produce the answer; pass@1 is
    exactly 1/2 because the same question appears once with its right gold (42) and once with a wrong one (41)."""
    import torch

    from wiring.commands.eval import evaluate_model
    from dsmath.config import ModelConfig
    from dsmath.evaluation.fewshot import build_prompt
    from dsmath.tiny import build_model, train_tokenizer

    model_dir = tmp_path / "overfit"
    texts = [build_prompt(TOOL_QUESTION, mode) + script for mode, script in SCRIPTS] * 20
    tok = train_tokenizer(texts, 384, model_dir)
    model = build_model(ModelConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
                                    vocab_size=384), tok, seed=0)
    batch = [tok(build_prompt(TOOL_QUESTION, m) + s + tok.eos_token, add_special_tokens=False)["input_ids"]
             for m, s in SCRIPTS]
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)  # 1e-2 spiked (5.9 at step 100) where MKL's AVX2 path ran
    for _ in range(300):
        loss = sum(model(torch.tensor([ids]), labels=torch.tensor([ids])).loss for ids in batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() / len(batch) < 0.05, loss.item()  # each script learnt, but for the output blocks' numbers
    model.save_pretrained(model_dir)
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": TOOL_QUESTION, "answer": "42"}) + "\n"
                    + json.dumps({"question": TOOL_QUESTION, "answer": "41"}) + "\n")
    import ray

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        for mode, address in (("tool", None), ("pot", "auto")):  # pot: the engine as a Ray actor (--address)
            _check_mode(evaluate_model(str(model_dir), [str(data)], mode=mode, k=2, temperature=0.5,
                                       max_new_tokens=60, out=str(tmp_path / mode), progress=False,
                                       address=address, log=lambda line: None), mode, tmp_path)
    finally:
        ray.shutdown()


def _check_mode(s, mode, tmp_path):
    assert s["settings"]["engine"] == ("local" if mode == "tool" else "ray actor (CPU)")
    rows = [json.loads(line) for line in (tmp_path / mode / "samples.jsonl").read_text().splitlines()]
    greedy = [r for r in rows if r["sample"] == "greedy"]
    assert s["pass@1"] == 0.5 and [r["correct"] for r in greedy] == [True, False], greedy
    assert [r["extracted"] for r in greedy] == ["42", "42"]
    if mode == "tool":  # the output block is the sandbox's (42), not the trained text's (41)
        assert greedy[0]["completion"].startswith(TOOL_CALL + "```output\n42\n```")
        assert greedy[0]["finish_reason"] == "stop"
    else:
        assert greedy[0]["reason"] == "program: correct" and greedy[1]["reason"] == "program: wrong"
    assert s["k"] == 2 and s["maj@k"] in (0.0, 0.5)  # the wrong-gold twin can never be solved
