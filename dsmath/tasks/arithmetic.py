"""Generated arithmetic word problems with exact answers — the built-in task of the tiny CPU run.

Levels: 1 = two additions/subtractions, 2 = three, 3 = a multiplication then three more. Problems are deterministic functions of (split, index, seed): the train and held-out
splits draw from disjoint seeds *and* are checked for disjoint question texts, so no held-out
question ever appears in training.

Two solution styles are generated for SFT, mirroring how instruction data mixes formats:
``direct`` states the result at once; ``stepwise`` writes one operation per line. A tiny model is
much more reliable with ``stepwise``; reinforcement learning has to discover that from rewards.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dsmath.records import Problem

NAMES = ("Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jade", "Kai", "Lena", "Milo", "Nora",
         "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tess")
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "shells", "pencils", "cards", "stamps", "beads")

SPLIT_SEEDS = {"train": 1_000_003, "heldout": 2_000_029}


@dataclass(frozen=True)
class ArithmeticProblem:
    question: str
    answer: int
    steps: tuple[tuple[int, str, int, int], ...]  # (left, op, right, result) in order
    level: int


def make_problem(rng: random.Random, level: int) -> ArithmeticProblem:
    """Level 1: two additions/subtractions; 2: three; 3: a multiplication then three more.

    Each single operation is small (a one-digit change, a times-table product), so a tiny model can
    learn it; composing several in one jump is what it finds hard.
    """
    name = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    steps: list[tuple[int, str, int, int]] = []
    if level >= 3:
        groups, per = rng.randint(2, 5), rng.randint(2, 5)
        value = groups * per
        steps.append((groups, "*", per, value))
        text = f"{name} has {groups} bags with {per} {item} in each bag."
        n_ops = 3
    else:
        value = rng.randint(5, 20)
        text = f"{name} has {value} {item}."
        n_ops = level + 1
    for _ in range(n_ops):
        if rng.random() < 0.5 or value < 10:
            n = rng.randint(1, 5)
            clause = rng.choice((f"gets {n} more", f"finds {n} more", f"buys {n} more"))
            steps.append((value, "+", n, value + n))
            value += n
        else:
            n = rng.randint(1, 5)
            clause = rng.choice((f"gives away {n}", f"loses {n}", f"uses {n}"))
            steps.append((value, "-", n, value - n))
            value -= n
        text += f" Then {name} {clause}."
    text += f" How many {item} does {name} have now?"
    return ArithmeticProblem(question=text, answer=value, steps=tuple(steps), level=level)


def stepwise_solution(p: ArithmeticProblem) -> str:
    lines = [f"{a} {op} {b} = {r}" for a, op, b, r in p.steps]
    return "\n".join(lines) + f"\nThe answer is \\boxed{{{p.answer}}}."


def direct_solution(p: ArithmeticProblem) -> str:
    return f"The answer is \\boxed{{{p.answer}}}."


def generate_split(split: str, count: int, *, levels: tuple[int, ...] = (1, 2, 3), seed: int = 0,
                   exclude_questions: set[str] | None = None) -> list[ArithmeticProblem]:
    """``count`` distinct problems of ``split`` ('train' or 'heldout'), levels round-robin.

    Guaranteed: no two problems share a question text, and none is in ``exclude_questions``.
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    rng = random.Random(SPLIT_SEEDS[split] * 7919 + seed)
    seen: set[str] = set(exclude_questions or ())
    out: list[ArithmeticProblem] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > count * 50:
            raise RuntimeError(f"could not draw {count} distinct {split} problems")
        p = make_problem(rng, levels[len(out) % len(levels)])
        if p.question in seen:
            continue
        seen.add(p.question)
        out.append(p)
    return out


def to_problem(p: ArithmeticProblem, split: str, index: int) -> Problem:
    return Problem(uid=f"arith-{split}-{index}", question=p.question, answer=str(p.answer), meta={"level": p.level})
