import re

from dsmath.tasks.arithmetic import direct_solution, generate_split, stepwise_solution


def _eval_steps(p):
    value = None
    for a, op, b, r in p.steps:
        if value is not None:
            assert a == value
        assert r == {"+": a + b, "-": a - b, "*": a * b}[op]
        value = r
    return value


def test_answers_are_exact_and_splits_disjoint():
    train = generate_split("train", 3000)
    held = generate_split("heldout", 500, exclude_questions={p.question for p in train})
    assert not {p.question for p in train} & {p.question for p in held}
    for p in train[:500] + held:
        assert _eval_steps(p) == p.answer
        assert p.answer >= 0
        numbers = [int(x) for x in re.findall(r"\d+", p.question)]
        assert numbers, p.question
    assert {p.level for p in held} == {1, 2, 3}


def test_generation_is_deterministic_and_solutions_boxed():
    a = generate_split("heldout", 50)
    b = generate_split("heldout", 50)
    assert [p.question for p in a] == [p.question for p in b]
    for p in a:
        assert stepwise_solution(p).endswith(f"\\boxed{{{p.answer}}}.")
        assert direct_solution(p) == f"The answer is \\boxed{{{p.answer}}}."
