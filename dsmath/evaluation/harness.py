"""The evaluation loop: prompts → completions (through a caller-given ``generate``) → verdicts → summary.

Generation is injected (``generate(requests, mode) -> rollouts``), so this module imports nothing distributed:
the CLI passes an in-process vLLM ``Generator``'s method, a training driver can pass its generator pool.

Per problem the harness asks for one greedy completion (temperature 0 → pass@1) and, when ``k > 0``, ``k``
samples at ``temperature`` (→ maj@k, pass@k), both in the same ``generate`` call per chunk of problems.

Grading is the grading module's: chain-of-thought and tool-integrated completions go through
``GradingPool.grade_many`` (lenient extraction by default: ``EvalSettings.grading_mode``); program-of-thought completions run
their last ```python block in the sandbox and the last printed line is graded with ``math_equal``
(``dsmath.sandbox.pot_reward``). maj@k groups answers with the same ``math_equal``.

Guaranteed: one row per requested completion, in problem order, greedy first; a prompt longer than the model's
context is not sent but recorded (``reason="prompt too long"``, counted in ``prompt_too_long``); a sandbox or
grader failure is an incorrect, explained verdict, never a lost row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from dsmath.evaluation.aggregate import SampleVerdict, summarize
from dsmath.evaluation.fewshot import build_prompt
from dsmath.records import GenerationRequest, Problem, Rollout, SamplingParams

GenerateFn = Callable[[list[GenerationRequest], str], list[Rollout]]
MODES = ("cot", "pot", "tool", "tiny")  # tiny: the built-in arithmetic task's template, graded like cot
TOO_LONG = "prompt too long"


@dataclass(frozen=True)
class EvalSettings:
    """How to evaluate. ``k=0``: greedy only (pass@1, no maj@k)."""

    mode: str = "cot"
    k: int = 4
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0
    prefix: str = ""  # few-shot prefix (dsmath.evaluation.fewshot.fewshot_prefix)
    stop: tuple[str, ...] = ()
    chunk_size: int = 16  # problems per generate() call
    timeout_s: float = 5.0  # per symbolic check and per sandboxed program
    # lenient: the answer a human grader reads (box, stated answer, else the last math span or number) — a model
    # not trained on dsmath's prompts is graded on its answer, not its format; strict: the training reward's rule
    grading_mode: str = "lenient"

    def __post_init__(self) -> None:
        if self.grading_mode not in ("lenient", "strict"):
            raise ValueError(f"grading_mode must be 'lenient' or 'strict', got {self.grading_mode!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.k < 0 or self.chunk_size < 1 or self.max_new_tokens < 1:
            raise ValueError("need k >= 0, chunk_size >= 1, max_new_tokens >= 1")
        if self.k > 0 and self.temperature <= 0:
            raise ValueError("maj@k samples need temperature > 0 (greedy samples would all agree)")


@dataclass
class EvalOutput:
    """Per-problem completions and verdicts (greedy first), one row per completion, and the summary."""

    problems: list[Problem]
    completions: list[list[str]]
    verdicts: list[list[SampleVerdict]]
    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- scoring


def score_completions(pairs: Sequence[tuple[str, str]], mode: str, *, grading_pool, sandbox=None,
                      timeout_s: float = 5.0, grading_mode: str | None = None) -> list[SampleVerdict]:
    """One verdict per (completion, gold) pair, in order, by the grading module (PoT: sandbox + math_equal).

    ``grading_pool`` is a ``dsmath.grading.GradingPool``; ``sandbox`` anything with ``run(code, ...)`` (default:
    the process-wide sandbox pool), used only for ``mode="pot"``. ``grading_mode``: lenient / strict extraction
    (None: the pool's own mode).
    """
    if mode != "pot":
        verdicts = grading_pool.grade_many(list(pairs), timeout_s=timeout_s, mode=grading_mode)
        return [SampleVerdict(bool(v.correct), v.extracted, str(v.reason), bool(v.timed_out)) for v in verdicts]
    from dsmath.grading import math_equal
    from dsmath.sandbox import pot_reward, runner_for

    runner = sandbox if sandbox is not None else runner_for("")

    def equal(a: str, b: str) -> bool:
        return math_equal(a, b, pool=grading_pool, timeout_s=timeout_s)

    out = []
    for completion, gold in pairs:
        try:
            r = pot_reward(completion, gold, runner=runner, timeout_s=timeout_s, equal=equal)
            out.append(SampleVerdict(r.correct, r.answer, f"program: {r.reason}", r.reason == "timeout"))
        except Exception as exc:  # noqa: BLE001 - a sandbox failure is an incorrect, explained verdict
            out.append(SampleVerdict(False, None, f"sandbox error: {type(exc).__name__}: {exc}"))
    return out


# ------------------------------------------------------------------------------------------- generation


def chunk_seed(seed: int, chunk_index: int) -> int:
    """The sampling seed of one chunk: distinct across (seed, chunk) pairs for any realistic run."""
    return seed * 1_000_003 + chunk_index


def _requests(problems: Sequence[Problem], first_index: int, settings: EvalSettings, seed: int,
              max_new: Sequence[int]) -> list[GenerationRequest]:
    requests = []
    for offset, (p, budget) in enumerate(zip(problems, max_new)):
        if budget <= 0:
            continue
        prompt = build_prompt(p.question, settings.mode, settings.prefix)
        i = first_index + offset
        greedy = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=budget, stop=settings.stop,
                                seed=seed, logprobs=False)
        requests.append(GenerationRequest(f"greedy-{i}", p, prompt, greedy))
        if settings.k > 0:
            sampled = SamplingParams(n=settings.k, temperature=settings.temperature, top_p=settings.top_p,
                                     max_new_tokens=budget, stop=settings.stop, seed=seed, logprobs=False)
            requests.append(GenerationRequest(f"sample-{i}", p, prompt, sampled))
    return requests


@dataclass
class _Collected:
    """Per problem, in problem order: its completions, their verdicts and finish reasons (greedy first)."""

    completions: list[list[str]]
    verdicts: list[list[SampleVerdict]]
    finish: list[list[str]]
    seconds: dict[str, float]

    @classmethod
    def empty(cls, n: int) -> "_Collected":
        return cls([[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)],
                   {"generate": 0.0, "grade": 0.0})


def run_eval(problems: Sequence[Problem], generate: GenerateFn, settings: EvalSettings, *, grading_pool,
             sandbox=None, count_tokens: Callable[[str], int] | None = None, max_model_len: int | None = None,
             progress: Callable[[int], None] | None = None, equal: Callable[[str, str], bool] | None = None,
             ) -> EvalOutput:
    """Generate, grade and summarise ``problems``; ``progress(n)`` is called as chunks of problems finish.

    ``count_tokens``/``max_model_len`` (both or neither) let the harness cap ``max_new_tokens`` to the context
    left after the prompt and skip prompts that do not fit at all. The summary is :func:`summarize`'s over all
    problems plus ``datasets`` (the same per ``meta["dataset"]``), ``settings``, ``prompt_too_long``,
    ``truncated`` (completions that hit the token limit) and ``seconds`` (generation, grading).
    """
    problems = list(problems)
    got = _Collected.empty(len(problems))
    for chunk_index, start in enumerate(range(0, len(problems), settings.chunk_size)):
        chunk = problems[start:start + settings.chunk_size]
        budgets = [_token_budget(p, settings, count_tokens, max_model_len) for p in chunk]
        _eval_chunk(chunk, start, budgets, chunk_index, generate, settings, got, grading_pool, sandbox)
        if progress is not None:
            progress(len(chunk))
    if equal is None:
        from dsmath.grading import math_equal

        def equal(a: str, b: str) -> bool:
            return math_equal(a, b, pool=grading_pool, timeout_s=settings.timeout_s)

    return EvalOutput(problems, got.completions, got.verdicts, _rows(problems, got),
                      _summary(problems, got, settings, equal))


def _token_budget(p: Problem, settings: EvalSettings, count_tokens, max_model_len) -> int:
    """``max_new_tokens``, capped to the context the prompt leaves (≤ 0: the prompt does not fit)."""
    if count_tokens is None or max_model_len is None:
        return settings.max_new_tokens
    return min(settings.max_new_tokens,
               max_model_len - count_tokens(build_prompt(p.question, settings.mode, settings.prefix)))


def _eval_chunk(chunk: list[Problem], start: int, budgets: list[int], chunk_index: int, generate: GenerateFn,
                settings: EvalSettings, got: _Collected, grading_pool, sandbox) -> None:
    """Generate and grade one chunk of problems (``start`` = the first one's index), filling ``got``."""
    n_per = 1 + settings.k
    requests = _requests(chunk, start, settings, chunk_seed(settings.seed, chunk_index), budgets)
    t0 = time.perf_counter()
    rollouts = generate(requests, settings.mode) if requests else []
    got.seconds["generate"] += time.perf_counter() - t0
    by_request: dict[str, list[Rollout]] = {}
    for r in rollouts:
        by_request.setdefault(r.request_id, []).append(r)
    pairs, slots = [], []  # slots: (problem index, completion) in the order verdicts are filled
    for offset, (p, budget) in enumerate(zip(chunk, budgets)):
        i = start + offset
        if budget <= 0:
            got.completions[i] = [""] * n_per
            got.verdicts[i] = [SampleVerdict(False, None, TOO_LONG)] * n_per
            got.finish[i] = [TOO_LONG] * n_per
            continue
        mine = by_request.get(f"greedy-{i}", []) + sorted(by_request.get(f"sample-{i}", []),
                                                           key=lambda r: r.sample_index)
        if len(mine) != n_per:
            raise RuntimeError(f"generator returned {len(mine)} completions for problem {p.uid}, expected {n_per}")
        for r in mine:
            pairs.append((r.completion, p.answer))
            slots.append(i)
            got.completions[i].append(r.completion)
            got.finish[i].append(r.finish_reason)
    t0 = time.perf_counter()
    scored = score_completions(pairs, settings.mode, grading_pool=grading_pool, sandbox=sandbox,
                               timeout_s=settings.timeout_s, grading_mode=settings.grading_mode)
    got.seconds["grade"] += time.perf_counter() - t0
    for i, v in zip(slots, scored, strict=True):
        got.verdicts[i].append(v)


def _rows(problems: list[Problem], got: _Collected) -> list[dict]:
    """One row per completion (greedy first), for ``samples.jsonl``."""
    rows = []
    for i, p in enumerate(problems):
        for j, (c, v, fr) in enumerate(zip(got.completions[i], got.verdicts[i], got.finish[i])):
            rows.append({"dataset": p.meta.get("dataset"), "uid": p.uid, "level": p.meta.get("level"),
                         "subject": p.meta.get("subject", p.meta.get("type")), "gold": p.answer,
                         "sample": "greedy" if j == 0 else j - 1, "completion": c, "extracted": v.extracted,
                         "correct": v.correct, "reason": v.reason, "timed_out": v.timed_out, "finish_reason": fr})
    return rows


def _summary(problems: list[Problem], got: _Collected, settings: EvalSettings, equal) -> dict[str, Any]:
    """:func:`summarize` over all problems and per dataset, with too-long / truncated counts and the settings."""

    def extra(indices: Sequence[int]) -> dict[str, Any]:
        return {"prompt_too_long": sum(got.finish[i][0] == TOO_LONG for i in indices),
                "truncated": sum(f == "length" for i in indices for f in got.finish[i])}

    summary = summarize(problems, got.completions, got.verdicts, greedy_first=True, equal=equal)
    summary.update(extra(range(len(problems))))
    datasets: dict[str, list[int]] = {}
    for i, p in enumerate(problems):
        datasets.setdefault(str(p.meta.get("dataset", "data")), []).append(i)
    summary["datasets"] = {}
    for name, idx in datasets.items():
        part = summarize([problems[i] for i in idx], [got.completions[i] for i in idx],
                         [got.verdicts[i] for i in idx], greedy_first=True, equal=equal)
        part.pop("by_dataset", None)
        part.update(extra(idx))
        summary["datasets"][name] = part
    summary["settings"] = {"mode": settings.mode, "k": settings.k, "temperature": settings.temperature,
                           "top_p": settings.top_p, "max_new_tokens": settings.max_new_tokens, "seed": settings.seed,
                           "fewshot_prefix_chars": len(settings.prefix), "stop": list(settings.stop),
                           "grading_mode": settings.grading_mode}
    summary["seconds"] = {k: round(v, 3) for k, v in got.seconds.items()}
    return summary


# ------------------------------------------------------------------------------------------------ table


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:5.1f}%"


def format_table(summary: dict) -> str:
    """A plain-text table of a :func:`run_eval` summary: one line per dataset, its levels and subjects, total.

    Columns: problems, pass@1, maj@k, pass@k, no-ans (greedy completions stating no answer), trunc (completions
    that hit the token limit), long (prompts longer than the context, not generated, counted as misses)."""
    k = summary.get("k", 0) or "k"  # greedy-only runs: the columns say maj@k / pass@k and hold "-"
    head = (f"{'':<28} {'problems':>8} {'pass@1':>7} {f'maj@{k}':>7} {f'pass@{k}':>7} {'no-ans':>6} {'trunc':>6}"
            f" {'long':>5}")
    lines = [head, "-" * len(head)]

    def line(name: str, s: dict, full: bool) -> str:
        base = f"{name[:28]:<28} {s['problems']:>8} {_pct(s['pass@1']):>7} {_pct(s.get('maj@k')):>7}"
        if not full:
            return base
        return base + (f" {_pct(s.get('pass@k')):>7} {s.get('no_answer', 0):>6} {s.get('truncated', 0):>6}"
                       f" {s.get('prompt_too_long', 0):>5}")

    for name, part in summary.get("datasets", {}).items():
        lines.append(line(name, part, True))
        for group in ("by_level", "by_subject"):
            for value, s in part.get(group, {}).items():
                lines.append(line(f"  {value}", s, False))
    if len(summary.get("datasets", {})) != 1:
        lines.append(line("all", summary, True))
    return "\n".join(lines)
