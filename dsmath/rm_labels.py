"""Reward-model training data from the current policy: outcome labels from the grader, step labels in the
Math-Shepherd style (Wang et al. 2023; DeepSeekMath §4.1.3).

Outcome: sample completions, grade them (``dsmath.rewards.verifier``: dsmath.grading or the sandbox),
label the completion's last token 1/0.

Process: for each sampled completion with steps s1..sn (``algorithm.step_delimiter``), complete K times from the
prompt + s1..sj for every j < n with the same policy, grade prefix + continuation, and label step j with
``dsmath.reward_models.shepherd_label`` (``any``: hard estimation, ``most``: a majority). The last step's label is
the completion's own grade.

``generator`` is anything with ``Generator.generate``'s contract (the plain class in-process, or a wrapper of the
actor); ``grader`` anything with ``Reward.score``'s. Examples are the dicts ``learner.reward_model`` trains on.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

from dsmath.prompts import format_prompt
from dsmath.records import GenerationRequest, Problem, SamplingParams
from dsmath.reward_models import completion_step_ends, shepherd_label


def label_examples(generator, grader, problems: Sequence[Problem], *, kind: str, samples_per_question: int,
                   completions_per_prefix: int, label_rule: str, delimiter: str, prompt_mode: str,
                   temperature: float, max_new_tokens: int, stop: tuple[str, ...],
                   decode: Callable[[Sequence[int]], str], tag: str = "rm") -> tuple[list[dict], dict]:
    """(examples, stats). Empty completions are skipped and counted in ``stats["skipped_empty"]``."""
    sampling = SamplingParams(n=samples_per_question, temperature=temperature, max_new_tokens=max_new_tokens, stop=stop)
    requests = [GenerationRequest(request_id=f"{tag}-q{i}", problem=p, prompt=format_prompt(p.question, prompt_mode),
                                  sampling=sampling) for i, p in enumerate(problems)]
    rollouts = generator.generate(requests)
    verdicts = grader.score(rollouts)
    stats = {"questions": len(problems), "samples": len(rollouts), "samples_correct": sum(v.correct for v in verdicts),
             "skipped_empty": 0, "continuations": 0}
    kept = [(r, v) for r, v in zip(rollouts, verdicts) if r.completion_ids]
    stats["skipped_empty"] = len(rollouts) - len(kept)

    if kind == "outcome":
        examples = [{"prompt_ids": list(r.prompt_ids), "completion_ids": list(r.completion_ids),
                     "positions": [len(r.completion_ids) - 1], "labels": [int(v.correct)]} for r, v in kept]
    elif kind == "process":
        examples = _process_examples(generator, grader, kept, completions_per_prefix, label_rule, delimiter,
                                     sampling, max_new_tokens, decode, tag, stats)
    else:
        raise ValueError(f"kind must be 'outcome' or 'process', got {kind!r}")
    labels = [y for e in examples for y in e["labels"]]
    stats.update(examples=len(examples), labels=len(labels), positive_rate=sum(labels) / max(1, len(labels)))
    return examples, stats


def _process_examples(generator, grader, kept, k: int, label_rule: str, delimiter: str, sampling: SamplingParams,
                      max_new_tokens: int, decode, tag: str, stats: dict) -> list[dict]:
    # A completion whose text has no step at all (e.g. it decodes to whitespace only) is one step: its last token.
    ends_per = [completion_step_ends(decode, r.completion_ids, delimiter) or [len(r.completion_ids) - 1]
                for r, _ in kept]
    requests, owners = [], []  # owners[i] = (example index, step index) of continuation request i
    for x, ((r, _v), ends) in enumerate(zip(kept, ends_per)):
        for j, end in enumerate(ends[:-1]):
            budget = max_new_tokens - (end + 1)
            if budget < 1:
                continue  # no room left to continue: the step keeps the completion's own label below
            prefix = decode(r.completion_ids[: end + 1])
            requests.append(GenerationRequest(
                request_id=f"{tag}-c{x}-{j}", problem=r.problem, prompt=r.prompt + prefix,
                sampling=replace(sampling, n=k, max_new_tokens=budget)))
            owners.append((x, j, prefix))
    continuations = generator.generate(requests) if requests else []
    # Grade prefix + continuation: the answer may only be stated once both are put together.
    whole = [replace(c, completion=owners[i // k][2] + c.completion) for i, c in enumerate(continuations)]
    graded = grader.score(whole) if whole else []
    stats["continuations"] = len(continuations)
    outcomes: dict[tuple[int, int], list[bool]] = {}
    for i, g in enumerate(graded):
        x, j, _ = owners[i // k]
        outcomes.setdefault((x, j), []).append(bool(g.correct))
    examples = []
    for x, ((r, v), ends) in enumerate(zip(kept, ends_per)):
        labels = [shepherd_label(outcomes[(x, j)], label_rule) if (x, j) in outcomes else int(v.correct)
                  for j in range(len(ends) - 1)] + [int(v.correct)]
        examples.append({"prompt_ids": list(r.prompt_ids), "completion_ids": list(r.completion_ids),
                         "positions": list(ends), "labels": labels})
    return examples
