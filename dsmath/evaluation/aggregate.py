"""Pure aggregation of graded completions: pass@1, maj@k, pass@k and per-level / per-subject breakdowns.

Nothing here generates or grades; it takes verdicts someone else produced (``dsmath.grading.Verdict``, a reward
worker's ``RewardResult``, or :class:`SampleVerdict` — anything with ``correct``, ``extracted`` and ``timed_out``)
and counts. The only outside call is the answer-equivalence function used to group votes for maj@k, which
defaults to ``dsmath.grading.math_equal`` (the grading module's equivalence, sympy under a deadline).

Definitions (DeepSeekMath §5 / Wang et al. self-consistency):

* pass@1 — the greedy completion is correct (one per problem).
* maj@k — the k sampled answers vote; equivalent answers (``equal``) form one cluster; the largest cluster wins,
  ties going to the cluster whose first member was sampled first; the problem counts as solved when the winning
  cluster's first member was graded correct. Samples without an extracted answer do not vote; a problem where
  none of the k samples has an answer is unsolved.
* pass@k — at least one of the samples is correct; with n ≥ k samples per problem, the unbiased estimator
  1 − C(n−c, k) / C(n, k) (Chen et al., 2021), see :func:`pass_at_k`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from dsmath.records import Problem

AnswerEqual = Callable[[str, str], bool]


class GradedSample(Protocol):
    """What the aggregation reads from one graded completion."""

    correct: bool
    extracted: str | None
    timed_out: bool


@dataclass(frozen=True)
class SampleVerdict:
    """One graded completion as the evaluation harness records it."""

    correct: bool
    extracted: str | None  # the answer the completion states (PoT: the last line the program printed)
    reason: str
    timed_out: bool = False


@dataclass(frozen=True)
class Vote:
    """The outcome of a majority vote over one problem's sampled answers."""

    winner: int | None  # index (into the samples) of the winning cluster's first member; None: nobody answered
    cluster_sizes: tuple[int, ...]  # votes per cluster, clusters in order of first appearance
    voters: int  # samples that stated an answer


# ------------------------------------------------------------------------------------------ majority vote


def majority_vote(answers: Sequence[str | None], equal: AnswerEqual) -> Vote:
    """Cluster ``answers`` by ``equal`` and return the largest cluster (earliest first member on ties).

    Each answer joins the first existing cluster whose *representative* (first member) it equals, so the result
    does not depend on ``equal`` being transitive. ``None`` answers abstain. Cost: at most
    ``len(answers) × clusters`` calls to ``equal``; identical strings never reach it.
    """
    representatives: list[str] = []
    first_index: list[int] = []
    sizes: list[int] = []
    by_text: dict[str, int] = {}  # exact-string shortcut: same text, same cluster, no comparison needed
    for index, answer in enumerate(answers):
        if answer is None:
            continue
        text = answer.strip()
        cluster = by_text.get(text)
        if cluster is None:
            cluster = next((c for c, rep in enumerate(representatives) if equal(text, rep)), None)
            if cluster is None:
                cluster = len(representatives)
                representatives.append(text)
                first_index.append(index)
                sizes.append(0)
            by_text[text] = cluster
        sizes[cluster] += 1
    if not sizes:
        return Vote(None, (), 0)
    best = max(range(len(sizes)), key=lambda c: (sizes[c], -first_index[c]))  # ties: earliest cluster wins
    return Vote(first_index[best], tuple(sizes), sum(sizes))


# ----------------------------------------------------------------------------------------------- pass@k


def pass_at_k(num_samples: np.ndarray, num_correct: np.ndarray, k: int) -> np.ndarray:
    """Unbiased pass@k per problem, vectorised: 1 − C(n−c, k)/C(n, k) for arrays n, c of shape [P].

    Computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i) (numerically stable; no big binomials). Requires n ≥ k ≥ 1 and
    0 ≤ c ≤ n elementwise; raises ValueError otherwise. See :func:`pass_at_k_loop` for the plain loop.
    """
    n = np.asarray(num_samples, dtype=np.int64)  # [P]
    c = np.asarray(num_correct, dtype=np.int64)  # [P]
    if k < 1 or np.any(n < k) or np.any(c < 0) or np.any(c > n):
        raise ValueError(f"pass@{k} needs n >= k >= 1 and 0 <= c <= n (got n={n.tolist()}, c={c.tolist()})")
    if n.size == 0:
        return np.zeros(0, dtype=np.float64)
    # factors i = n-c+1 .. n for each problem, laid out on a common [P, max c] grid; padding contributes 1
    width = int(c.max()) if c.size else 0
    offsets = np.arange(width)[None, :]  # [1, W]
    i = (n - c + 1)[:, None] + offsets  # [P, W]
    valid = offsets < c[:, None]  # [P, W]
    factors = np.where(valid, 1.0 - k / np.maximum(i, 1), 1.0)  # [P, W]
    miss = np.prod(factors, axis=1)  # [P]: probability that k draws miss every correct sample
    # when n - c < k every k-subset holds a correct sample; the product form gives a factor exactly 0 then
    return 1.0 - miss


def pass_at_k_loop(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> list[float]:
    """Plain-loop reference for :func:`pass_at_k` (exact binomials)."""
    out = []
    for n, c in zip(num_samples, num_correct):
        if not (1 <= k <= n and 0 <= c <= n):
            raise ValueError(f"pass@{k} needs n >= k >= 1 and 0 <= c <= n (got n={n}, c={c})")
        out.append(1.0 - math.comb(n - c, k) / math.comb(n, k))
    return out


# ------------------------------------------------------------------------------------- driver adapter


def group_by_problem(rollouts: Sequence[Any], results: Sequence[GradedSample]
                     ) -> tuple[list[Problem], list[list[str]], list[list[GradedSample]]]:
    """(problems, completions, verdicts) for :func:`summarize` from flat, aligned rollouts and their grades.

    ``rollouts`` are ``dsmath.records.Rollout``-like (``request_id``, ``sample_index``, ``problem``,
    ``completion``); ``results[i]`` grades ``rollouts[i]`` (a ``RewardResult`` or ``Verdict``). Problems come in
    order of first appearance (by ``problem.uid``, so several requests for one problem — a greedy one and a
    sampled one — merge, in the order they appear); within a request, samples are sorted by ``sample_index``.
    Raises ValueError when the lengths differ.
    """
    if len(rollouts) != len(results):
        raise ValueError(f"{len(rollouts)} rollouts but {len(results)} results")
    order: dict[str, int] = {}
    requests: list[dict[str, list[tuple[int, str, GradedSample]]]] = []
    problems: list[Problem] = []
    for rollout, result in zip(rollouts, results):
        uid = rollout.problem.uid
        if uid not in order:
            order[uid] = len(problems)
            problems.append(rollout.problem)
            requests.append({})
        requests[order[uid]].setdefault(rollout.request_id, []).append(
            (rollout.sample_index, rollout.completion, result))
    completions: list[list[str]] = []
    verdicts: list[list[GradedSample]] = []
    for per_request in requests:
        items = [item for group in per_request.values() for item in sorted(group, key=lambda t: t[0])]
        completions.append([c for _, c, _ in items])
        verdicts.append([v for _, _, v in items])
    return problems, completions, verdicts


# ---------------------------------------------------------------------------------------------- summary


def _default_equal() -> AnswerEqual:
    from dsmath.grading import math_equal

    return math_equal


def _level_key(level: Any) -> tuple:
    """Sort 'Level 2' before 'Level 10' and 3 before 12; anything else by text."""
    text = str(level)
    digits = "".join(ch for ch in text if ch.isdigit())
    return (0, int(digits), text) if digits else (1, 0, text)


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def _group(problems: Sequence[Problem], key: str | tuple[str, ...]) -> dict[str, list[int]]:
    keys = (key,) if isinstance(key, str) else key
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(problems):
        value = next((p.meta[k] for k in keys if p.meta.get(k) not in (None, "")), None)
        if value is not None:
            groups.setdefault(str(value), []).append(i)
    return groups


def summarize(
    problems: Sequence[Problem],
    completions: Sequence[Sequence[str]],
    verdicts: Sequence[Sequence[GradedSample]],
    *,
    greedy_first: bool = True,
    equal: AnswerEqual | None = None,
) -> dict:
    """Accuracy summary with breakdowns, from per-problem lists of completions and their verdicts.

    ``completions[i]`` / ``verdicts[i]`` belong to ``problems[i]`` and have the same length. With
    ``greedy_first=True`` element 0 is the greedy completion (→ pass@1) and elements 1: are the k samples
    (→ maj@k, pass@k, sample accuracy); with ``greedy_first=False`` every element is a sample and pass@1 is the
    mean sample accuracy (the unbiased pass@1 estimate). Problems may have different sample counts; ``k`` is
    then the smallest (pass@k uses it) and maj@k votes over each problem's own samples.

    Returned keys: ``problems``, ``pass@1``, ``correct@1``, ``k``, ``maj@k``, ``pass@k``, ``sample_accuracy``
    (the last three None without samples), ``no_answer`` (greedy completions with no stated answer; with
    ``greedy_first=False``: samples), ``timeouts`` (all gradings), ``mean_completion_chars``, and when the
    problems' ``meta`` has them: ``by_level`` (meta "level"), ``by_subject`` (meta "subject" or "type"),
    ``by_dataset`` (meta "dataset"), each ``{value: {"problems", "pass@1", "maj@k"}}``.

    Guaranteed: counts add up (every problem is in exactly the groups its meta names); nothing is dropped.
    Raises ValueError when the lists do not line up.
    """
    if not (len(problems) == len(completions) == len(verdicts)):
        raise ValueError(f"{len(problems)} problems, {len(completions)} completion lists, {len(verdicts)} verdict lists")
    for i, (cs, vs) in enumerate(zip(completions, verdicts)):
        if len(cs) != len(vs) or not vs:
            raise ValueError(f"problem {i}: {len(cs)} completions and {len(vs)} verdicts (need equal, at least 1)")
    equal = equal or _default_equal()
    start = 1 if greedy_first else 0
    greedy_correct = [bool(vs[0].correct) for vs in verdicts] if greedy_first else None
    sampled = [list(vs[start:]) for vs in verdicts]
    sample_counts = [len(s) for s in sampled]
    k = min(sample_counts) if sampled else 0
    has_samples = k > 0

    maj_correct: list[bool] = []
    if has_samples:
        for samples in sampled:
            vote = majority_vote([s.extracted for s in samples], equal)
            maj_correct.append(vote.winner is not None and bool(samples[vote.winner].correct))
    if greedy_first:
        per_problem_pass1 = [float(c) for c in greedy_correct]
    else:
        per_problem_pass1 = [sum(bool(s.correct) for s in samples) / len(samples) for samples in sampled]

    num_correct = np.array([sum(bool(s.correct) for s in samples) for samples in sampled], dtype=np.int64)
    pass_k = pass_at_k(np.array(sample_counts), num_correct, k) if has_samples else None

    def block(indices: Sequence[int]) -> dict:
        out: dict[str, Any] = {"problems": len(indices),
                               "pass@1": _rate(sum(per_problem_pass1[i] for i in indices), len(indices))}
        if has_samples:
            out["maj@k"] = _rate(sum(maj_correct[i] for i in indices), len(indices))
        return out

    no_answer_pool = [vs[0] for vs in verdicts] if greedy_first else [s for samples in sampled for s in samples]
    total_samples = sum(len(vs) for vs in verdicts)
    summary: dict[str, Any] = {
        "problems": len(problems),
        "pass@1": _rate(sum(per_problem_pass1), len(problems)),
        "correct@1": int(sum(greedy_correct)) if greedy_first else None,
        "k": k,
        "maj@k": _rate(sum(maj_correct), len(problems)) if has_samples else None,
        "pass@k": float(pass_k.mean()) if has_samples and len(problems) else None,
        "sample_accuracy": _rate(int(num_correct.sum()), sum(sample_counts)) if has_samples else None,
        "no_answer": sum(v.extracted is None for v in no_answer_pool),
        "timeouts": sum(bool(v.timed_out) for vs in verdicts for v in vs),
        "mean_completion_chars": _rate(sum(len(c) for cs in completions for c in cs), total_samples),
    }
    for name, key in (("by_level", "level"), ("by_subject", ("subject", "type")), ("by_dataset", "dataset")):
        groups = _group(problems, key)
        if groups:
            order = sorted(groups, key=_level_key) if name == "by_level" else sorted(groups)
            summary[name] = {g: block(groups[g]) for g in order}
    return summary
