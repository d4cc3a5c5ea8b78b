"""Rollout: requests from questions, generation on the generator pool with scoring on arrival, one step's samples
(with DAPO dynamic sampling and the overlong penalty), and greedy held-out evaluation.

The per-step producers the driver reads samples from (synchronous, asynchronous one step ahead, offline pool)
are in :mod:`wiring.producers`; this module is what they share with ``dsmath rm`` and iterative GRPO.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import replace as dataclasses_replace
from typing import Callable

from dsmath.config import TrainConfig
from dsmath.records import GenerationRequest, Problem, Rollout, RewardResult, SamplingParams
from dsmath.sampler import ProblemStream
from dsmath.utils.timing import StageTimer


def make_requests(problems: list[Problem], *, step: int, prompt_mode: str, n: int, temperature: float,
                  top_p: float, max_new_tokens: int, stop: tuple[str, ...], tag: str) -> list[GenerationRequest]:
    from dsmath.prompts import format_prompt

    sampling = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, stop=stop)
    return [
        GenerationRequest(request_id=f"{tag}{step}-{i}-{p.uid}", problem=p, prompt=format_prompt(p.question, prompt_mode),
                          sampling=sampling)
        for i, p in enumerate(problems)
    ]


def step_seed(seed: int, step: int, round_: int = 0) -> int:
    """The sampling seed of step ``step``'s round ``round_`` (its chunk i adds i): the same for an online step,
    the offline pool's step and a resumed or reissued one, so they all sample the same completions."""
    return seed * 1_000_003 + step * 1_000 + 100 * round_


def with_seed(requests: list[GenerationRequest], seed: int) -> list[GenerationRequest]:
    """The chunk's requests carrying one sampling seed (the generator seeds its RNG with it per call)."""
    return [dataclasses_replace(r, sampling=dataclasses_replace(r.sampling, seed=seed)) for r in requests]


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def generate_and_score(gen_pool, reward_pool, requests: list[GenerationRequest], expected_version: int,
                       timer: StageTimer, *, chunk_size: int, timeout_s: float = 600.0, seed: int | None = None,
                       on_event: Callable[[str], None] | None = None) -> tuple[list[Rollout], list[RewardResult]]:
    """Rollout, with each generator's chunk handed to the reward pool the moment it returns.

    ``time/rollout`` covers generation (scoring overlaps it); ``time/reward`` is only the scoring left
    after the last completion arrived. A generator or reward worker that dies mid-stage is replaced and its
    chunk reissued with the same sampling seed (actors.pool). Checked before returning: every requested
    sample came back exactly once and has exactly one reward.
    """
    from actors.pool import check_one_reward_each, drain

    rollouts: list[Rollout] = []
    reward_futures = []

    def scored_on_arrival(out: list[Rollout]) -> None:
        rollouts.extend(out)
        reward_futures.append(reward_pool.submit(out))

    with timer.stage("rollout"):
        futures = [gen_pool.submit(with_seed(c, seed + i) if seed is not None else c, expected_version)
                   for i, c in enumerate(chunks(requests, chunk_size))]
        if on_event:
            on_event("rollout_submitted")
        drain(gen_pool, futures, scored_on_arrival, timeout_s)
    results: list[RewardResult] = []
    with timer.stage("reward"):
        if on_event:
            on_event("reward_pending")
        drain(reward_pool, reward_futures, results.extend, timeout_s)
    check_one_reward_each(rollouts, results)
    wanted = {(r.request_id, i) for r in requests for i in range(r.sampling.n)}
    if {(r.request_id, r.sample_index) for r in rollouts} != wanted:
        raise RuntimeError(f"sample accounting broken: asked for {len(wanted)} samples, got {len(rollouts)}")
    by_key = {(r.request_id, r.sample_index): r for r in results}
    order = {r.request_id: i for i, r in enumerate(requests)}
    rollouts.sort(key=lambda r: (order[r.request_id], r.sample_index))
    return rollouts, [by_key[(r.request_id, r.sample_index)] for r in rollouts]


def evaluate(gen_pool, reward_pool, problems: list[Problem], cfg: TrainConfig, version: int, prompt_mode: str,
             *, tag: str = "eval") -> dict:
    """Greedy pass@1 on ``problems``; grading is the reward workers' (dsmath.grading)."""
    timer = StageTimer()
    requests = make_requests(problems, step=version, prompt_mode=prompt_mode, n=1, temperature=0.0, top_p=1.0,
                             max_new_tokens=cfg.rollout.max_new_tokens, stop=cfg.rollout.stop, tag=tag)
    per_gen = max(1, len(requests) // (4 * len(gen_pool.actors)))
    rollouts, results = generate_and_score(gen_pool, reward_pool, requests, version, timer, chunk_size=per_gen)
    # The `dsmath eval` harness's aggregation (dsmath.evaluation), so in-training and offline figures agree.
    from dsmath.evaluation.aggregate import group_by_problem, summarize

    summary = summarize(*group_by_problem(rollouts, results), greedy_first=True)
    return {
        "accuracy": summary["pass@1"],
        "size": summary["problems"],
        "by_level": {k: v["pass@1"] for k, v in summary.get("by_level", {}).items()},
        "timeouts": summary["timeouts"],
        "no_answer": summary["no_answer"],
        "seconds": sum(timer.pop().values()),
    }


# ------------------------------------------------------------------------------------------- the loop


@dataclass
class StepSamples:
    """One step's scored samples, and where the problem stream stood after drawing them."""

    rollouts: list[Rollout]
    results: list[RewardResult]
    timings: dict[str, float]
    data_position: int
    version: int  # the generators' weight version when they sampled
    dropped_groups: int = 0
    rounds: int = 1
    grader_failed_groups: int = 0  # groups dropped because a sample could not be graded (never trained as wrong)


def apply_overlong(rollout_cfg, rollouts: list[Rollout], results: list[RewardResult]) -> list[RewardResult]:
    """``rollout.overlong=penalty``: add DAPO's soft length penalty to each reward (mask mode acts in the batch)."""
    if rollout_cfg.overlong != "penalty":
        return results
    import torch

    from dsmath.shaping import overlong_penalty

    lengths = torch.tensor([len(r.completion_ids) for r in rollouts])  # [N]
    pen = overlong_penalty(lengths, rollout_cfg.max_new_tokens, rollout_cfg.overlong_buffer,
                           rollout_cfg.overlong_penalty)  # [N]
    return [dataclasses_replace(res, reward=res.reward + float(p)) if p else res for res, p in zip(results, pen.tolist())]


def sample_step(cfg: TrainConfig, gen_pool, reward_pool, stream: ProblemStream, prompt_mode: str, *, step: int,
                version: int, chunk: int, num_ranks: int = 1,
                on_event: Callable[[str], None] | None = None) -> StepSamples:
    """Draw ``questions_per_step`` questions, sample G completions each at ``version`` and score them.

    With ``rollout.dynamic_sampling`` (DAPO), groups whose rewards are all equal are dropped and more questions
    are drawn, up to ``dynamic_sampling_max_rounds`` rounds; the batch may end short (never empty: if every group
    of every round was dropped, the last round is kept). Deterministic for a given stream position and step:
    round r's chunks carry the seeds ``step_seed(seed, step, r) + chunk``.
    """
    import torch

    from dsmath.shaping import informative_groups

    q, g, r = cfg.rollout.questions_per_step, cfg.rollout.group_size, cfg.rollout
    timer = StageTimer()
    rollouts: list[Rollout] = []
    results: list[RewardResult] = []
    dropped, rounds, grader_failed = 0, 0, 0
    max_rounds = r.dynamic_sampling_max_rounds if r.dynamic_sampling else 1
    while rounds < max_rounds and len(rollouts) < q * g:
        problems = stream.take(q - len(rollouts) // g)
        requests = make_requests(problems, step=step, prompt_mode=prompt_mode, n=g, temperature=r.temperature,
                                 top_p=r.top_p, max_new_tokens=r.max_new_tokens, stop=r.stop,
                                 tag="s" if rounds == 0 else f"s{rounds}r")
        ro, res = generate_and_score(gen_pool, reward_pool, requests, version, timer, chunk_size=chunk,
                                     seed=step_seed(cfg.seed, step, rounds), on_event=on_event)
        res = apply_overlong(r, ro, res)
        ro, res, failed = drop_ungraded_groups(ro, res, g)
        grader_failed += failed
        rounds += 1
        if not r.dynamic_sampling:
            rollouts, results = ro, res
            break
        keep = informative_groups(torch.tensor([x.reward for x in res], dtype=torch.float32), g).tolist()  # [B]
        dropped += keep.count(False)
        for i, k in enumerate(keep):
            if k:
                rollouts += ro[i * g:(i + 1) * g]
                results += res[i * g:(i + 1) * g]
        if not rollouts and rounds == max_rounds:  # nothing informative at all: train on the last round (KL only)
            rollouts, results, dropped = ro, res, dropped - len(keep)
    while num_ranks > 1 and (len(rollouts) % num_ranks) and len(rollouts) > g:  # the batch must split over ranks
        rollouts, results, dropped = rollouts[:-g], results[:-g], dropped + 1
    if not rollouts:
        raise RuntimeError(f"step {step}: every group had a sample the grader could not judge ({grader_failed} "
                           "groups): the grader is failing, see the reward workers' grading stats")
    return StepSamples(rollouts, results, timer.pop(), stream.position, version, dropped, rounds, grader_failed)


def drop_ungraded_groups(rollouts: list[Rollout], results: list[RewardResult],
                         group_size: int) -> tuple[list[Rollout], list[RewardResult], int]:
    """Drop every group holding a sample whose grading failed (``RewardResult.grader_failed``: an
    infrastructure failure, not a wrong answer); returns the rest and how many groups were dropped."""
    keep_r: list[Rollout] = []
    keep_s: list[RewardResult] = []
    dropped = 0
    for i in range(0, len(results), group_size):
        if any(x.grader_failed for x in results[i:i + group_size]):
            dropped += 1
        else:
            keep_r += rollouts[i:i + group_size]
            keep_s += results[i:i + group_size]
    return keep_r, keep_s, dropped
