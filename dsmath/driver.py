"""The training driver: one controller that reads top to bottom through named, timed stages.

    setup → eval(before) → [rollout → reward → advantages → ref_logprobs → update → weight_sync
                              → (checkpoint) → (eval)] × steps → eval(after) → summary.json

Stage names are the metric names (``time/rollout`` …). Synchronous mode is exactly on-policy: every
generator is at the learner's weight version before a step samples, and generators refuse requests
for any other version.

This is the wiring layer: it imports Ray, the actors and the learner. Nothing imports it back.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict as dataclasses_asdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from dataclasses import replace as dataclasses_replace
from pathlib import Path
from typing import Any, Callable

import yaml

from dsmath.config import TrainConfig, to_dict
from dsmath.errors import UserError
from dsmath.sampler import ProblemStream
from dsmath.records import GenerationRequest, Problem, Rollout, RewardResult, SamplingParams
from dsmath.utils.metrics import MetricsWriter
from dsmath.utils.timing import StageTimer


@dataclass
class RunState:
    """What a checkpoint must restore besides the weights and optimizer."""

    step: int = 0
    weight_version: int = 0
    data_position: int = 0
    samples_trained: int = 0
    history: list = field(default_factory=list)


def _log(msg: str) -> None:
    print(f"[dsmath] {msg}", flush=True)


def job_runtime_env() -> dict:
    """The runtime env of the Ray job this driver runs in (``ray job submit``), or ``{}`` outside a job."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        return json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def worker_runtime_env() -> dict:
    """The ``env_vars`` our actors need that the job's runtime env does not already set (never a duplicate key:
    Ray refuses to merge those); one line says which were added."""
    from dsmath.env import WORKER_ENV_KEYS, env_to_add

    ours = {k: os.environ[k] for k in WORKER_ENV_KEYS if k in os.environ}
    job_env = job_runtime_env().get("env_vars") or {}
    added = env_to_add(ours, job_env)
    if job_env:
        kept = sorted(set(ours) - set(added))
        _log(f"runtime env: the job sets {len(job_env)} variables; added {sorted(added) or 'none'}"
             + (f" (kept the job's {kept})" if kept else ""))
    return {"env_vars": added} if added else {}


def connect_ray(cfg: TrainConfig):
    """Join the cluster at ``cfg.ray_address`` / ``$RAY_ADDRESS``, or start a local one."""
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
    runtime_env = worker_runtime_env()
    if address:
        _log(f"joining Ray cluster at {address}")
        ray.init(address=address, runtime_env=runtime_env or None, log_to_driver=True)
    else:
        needed = (
            cfg.rollout.num_generators * cfg.rollout.cpus_per_generator
            + cfg.learner.num_ranks * cfg.learner.cpus_per_rank
            + cfg.reward.num_workers * 0.5
        )
        # Logical CPUs: sync mode runs the stages one after another, so actors may share cores.
        num_cpus = max(int(needed + 0.999), os.cpu_count() or 1)
        _log(f"starting a local Ray cluster ({num_cpus} logical CPUs, no GPUs)")
        ray.init(num_cpus=num_cpus, num_gpus=0, include_dashboard=False, runtime_env=runtime_env or None,
                 log_to_driver=True)
    return ray


def role_resources() -> dict[str, dict]:
    """Actor options for the cluster's role resources (cluster/README.md), when the cluster has them.

    On a plain local cluster there are none, and asking for one would leave the actor pending forever.
    """
    import ray

    from dsmath.placement import role_options

    return role_options(ray.cluster_resources())


@dataclass
class Placement:
    """One placement group: a bundle per generator, then a bundle per learner rank.

    PACK puts the learner's ranks and the generators on as few nodes as possible (NVLink for the
    collectives); on a single machine it is simply a reservation, so a step never waits on a stray task.
    Each bundle carries the role resource its actor asks for, when the cluster has roles (:mod:`dsmath.placement`).
    """

    group: Any
    num_generators: int

    def generator(self, i: int) -> dict:
        return self._bundle(i)

    def learner(self, rank: int) -> dict:
        return self._bundle(self.num_generators + rank)

    def _bundle(self, index: int) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=index)}


def place_actors(cfg: TrainConfig, timeout_s: float = 300.0) -> Placement:
    """Reserve the generators' and learner ranks' CPUs/GPUs/roles (from config) before creating any actor."""
    import ray
    from ray.util.placement_group import placement_group

    from dsmath.placement import actor_bundles

    r, lr = cfg.rollout, cfg.learner
    bundles = actor_bundles(cfg, ray.cluster_resources())
    group = placement_group(bundles, strategy="PACK", name=f"dsmath-{Path(cfg.run_dir).name}")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        raise UserError(
            f"the cluster cannot place {r.num_generators} generators ({bundles[0]}) and {lr.num_ranks} learner ranks "
            f"({bundles[-1]}) within {timeout_s:.0f} s; it has {ray.cluster_resources()} (lower "
            "rollout.num_generators / learner.num_ranks or the per-actor cpus/gpus, or add nodes)"
        )
    return Placement(group=group, num_generators=r.num_generators)


# ----------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class TaskData:
    model_dir: Path
    train: list[Problem]
    heldout: list[Problem]
    prompt_mode: str


def load_task(cfg: TrainConfig) -> TaskData:
    """The model to start from and the questions: the tiny bootstrap, or a user model + JSONL files."""
    if cfg.data.train:
        return load_user_task(cfg)
    from dsmath.bootstrap import PROMPT_MODE, ensure_bootstrap

    # model.path (an HF folder or a dsmath checkpoint, e.g. iterative GRPO's previous iteration) replaces the
    # bootstrap model as the start and the reference; the questions still come from the built-in task, whose
    # cache key must not depend on model.path.
    arts = ensure_bootstrap(cfg.bootstrap, dataclasses_replace(cfg.model, path=""), log=_log)
    if cfg.model.path:
        from learner.checkpoint import resolve

        start = resolve(Path(cfg.model.path).expanduser())
        if not (start / "config.json").exists():
            raise UserError(f"model.path={cfg.model.path}: not a model folder or checkpoint (no config.json)")
        _log(f"starting from {start} (questions from the built-in task)")
        arts = dataclasses_replace(arts, model_dir=start)
    train_all = arts.train_problems()
    # The first num_sft_problems questions were used for the SFT warm-up; RL draws from the rest.
    rl_train = train_all[cfg.bootstrap.num_sft_problems:]
    heldout = arts.heldout_problems(limit=cfg.eval_size)
    return TaskData(model_dir=arts.model_dir, train=rl_train, heldout=heldout, prompt_mode=PROMPT_MODE)


def load_user_task(cfg: TrainConfig) -> TaskData:
    """``model.path`` + ``data.train`` (+ ``data.heldout``) JSONL, prompted with ``rollout.mode``'s template."""
    from dsmath.datasets import load_problems
    from learner.checkpoint import resolve

    start = resolve(Path(cfg.model.path).expanduser())
    if not (start / "config.json").exists():
        raise UserError(f"model.path={cfg.model.path}: not a model folder or checkpoint (no config.json)")
    for key, path in (("data.train", cfg.data.train), ("data.heldout", cfg.data.heldout)):
        if path and not Path(path).expanduser().is_file():
            raise UserError(f"{key}={path}: no such file")
    train, report = load_problems(Path(cfg.data.train).expanduser())
    _log(f"questions: {report.summary()}")
    if cfg.data.heldout:
        heldout, held_report = load_problems(Path(cfg.data.heldout).expanduser(), limit=cfg.eval_size)
        _log(f"held-out: {held_report.summary()}")
    else:  # hold out the first eval_size questions; RL never sees them
        heldout, train = train[:cfg.eval_size], train[cfg.eval_size:]
        _log(f"held-out: the first {len(heldout)} questions of {cfg.data.train} (not trained on)")
    if not train:
        raise UserError(f"data.train={cfg.data.train}: no questions left to train on (eval_size={cfg.eval_size})")
    return TaskData(model_dir=start, train=train, heldout=heldout, prompt_mode=cfg.rollout.mode)


def make_requests(problems: list[Problem], *, step: int, prompt_mode: str, n: int, temperature: float,
                  top_p: float, max_new_tokens: int, stop: tuple[str, ...], tag: str) -> list[GenerationRequest]:
    from dsmath.prompts import format_prompt

    sampling = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, stop=stop)
    return [
        GenerationRequest(request_id=f"{tag}{step}-{i}-{p.uid}", problem=p, prompt=format_prompt(p.question, prompt_mode),
                          sampling=sampling)
        for i, p in enumerate(problems)
    ]


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
    round r's chunks carry the seeds ``seed·1000003 + step·1000 + 100·r + chunk``.
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
                                     seed=cfg.seed * 1_000_003 + step * 1_000 + 100 * rounds, on_event=on_event)
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


def build_train_batch(rollouts: list[Rollout], advantages, pad_id: int, max_length: int, *,
                      mask_truncated: bool = False):
    """The learner's batch; ``mask_truncated`` (``rollout.overlong=mask``) drops completions that hit the length
    limit from the loss (their group statistics still count them)."""
    from learner.batch import collate_rollouts

    def loss_mask(r: Rollout) -> list[int]:
        if mask_truncated and r.truncated:
            return [0] * len(r.completion_ids)
        return list(r.loss_mask) if r.loss_mask else [1] * len(r.completion_ids)

    return collate_rollouts(
        [r.prompt_ids for r in rollouts],
        [r.completion_ids for r in rollouts],
        pad_id=pad_id,
        advantages=[a if isinstance(a, list) else float(a) for a in advantages],
        loss_masks=[loss_mask(r) for r in rollouts],
        max_length=max_length,
    )


def generator_logprobs(rollouts: list[Rollout], batch):
    """``[N, T]``: each sampled token's log-prob under the generator that sampled it, at the batch's positions."""
    import torch

    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)  # [N, T]
    for i, r in enumerate(rollouts):
        p = len(r.prompt_ids)
        k = min(len(r.logprobs), batch.input_ids.shape[1] - p)
        if k > 0:
            out[i, p - 1:p - 1 + k] = torch.tensor(r.logprobs[:k], dtype=torch.float32)
    return out


def logprob_gap(rollouts: list[Rollout], batch, learner_logprobs) -> float:
    """Max |generator logprob − learner logprob| over the trained tokens: a weight-sync bug shows up here."""
    sel = batch.loss_mask.bool()  # [N, T]
    gap = (generator_logprobs(rollouts, batch) - learner_logprobs.float()).abs()[sel]
    return float(gap.max()) if gap.numel() else 0.0


def rollout_metrics(rollouts: list[Rollout], results: list[RewardResult], group_size: int) -> dict:
    import torch

    rewards = torch.tensor([r.reward for r in results], dtype=torch.float32)  # [B*G]
    groups = rewards.view(-1, group_size)  # [B, G]
    lengths = torch.tensor([len(r.completion_ids) for r in rollouts], dtype=torch.float32)
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "accuracy": float(sum(r.correct for r in results) / len(results)),
        "zero_std_groups": float((groups.std(dim=1) == 0).float().mean()),
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "truncation_rate": float(sum(r.truncated for r in rollouts) / len(rollouts)),
        "grading_timeouts": float(sum(r.timed_out for r in results)),
    }


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """On resume, drop rows written after the checkpoint (a killed run may have logged steps it never saved)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _generator_health(gen_pool) -> list[dict]:
    import ray

    out = []
    for i, actor in enumerate(gen_pool.actors):
        try:
            h = ray.get(actor.health.remote(), timeout=10)
            out.append({"id": i, "alive": h.alive, "weight_version": h.weight_version,
                        "requests": h.requests_served, "tokens": h.tokens_generated})
        except Exception:  # noqa: BLE001 - a dead or hung generator is shown as such, not raised
            out.append({"id": i, "alive": False})
    return out


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True,
          fault_hook: Callable[[str, int, Any, Any], None] | None = None) -> dict:
    """Run online GRPO as configured; returns (and writes) the run summary.

    ``fault_hook(event, step, gen_pool, reward_pool)`` is called at ``rollout_submitted`` (generation in flight)
    and ``reward_pending`` (scoring in flight) of every step: tests use it to kill actors at a known point.
    """
    import torch
    from tqdm import tqdm

    from actors.generator import generator_actor_class
    from actors.pool import GeneratorPool, RewardPool
    from actors.reward_worker import reward_worker_actor_class
    from dsmath.advantages import sample_advantages
    from dsmath.algorithms import resolve_sampling
    from dsmath.paradigm import OfflinePool, wrap_learner
    from dsmath.status import StatusServer
    from dsmath.status.snapshot import SnapshotBuilder
    from learner import checkpoint as ckpt
    from learner.ray_group import LearnerGroup
    from learner.weight_sync import broadcast_weights

    from ray import get as ray_get

    wall_start = time.time()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = run_dir / "checkpoints"
    timer = StageTimer()
    state = RunState()

    # --- setup: data, cluster, actors --------------------------------------------------------------
    with timer.stage("setup"):
        task = load_task(cfg)
        resume_from = None
        if resume:
            latest = ckpt.resolve(ckpt_root)
            if not (latest / "trainer_state.json").exists():
                raise UserError(f"--resume: no checkpoint under {ckpt_root} (run without --resume to start fresh)")
            resume_from = latest
            saved = json.loads((latest / "trainer_state.json").read_text())["extra"]
            state = RunState(**{k: v for k, v in saved.items() if k in RunState.__dataclass_fields__})
            _log(f"resuming from {latest} at step {state.step} (weight version {state.weight_version})")
            truncate_metrics(run_dir, state.step)
        elif (run_dir / "metrics.jsonl").exists():
            (run_dir / "metrics.jsonl").unlink()  # a fresh run does not append to an old run's curve
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        connect_ray(cfg)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(task.model_dir))
        gen_model = str(resume_from or task.model_dir)
        roles = role_resources()
        placement = place_actors(cfg)
        gen_cls = generator_actor_class(cfg.rollout.cpus_per_generator, cfg.rollout.gpus_per_generator)
        base_version = state.weight_version  # the version ``gen_model`` holds

        def start_generator(i: int, version: int):
            return gen_cls.options(**roles.get("generator", {}), **placement.generator(i)).remote(
                gen_model, cfg.rollout, generator_id=f"generator-{i}", seed=cfg.seed + i, weight_version=version)

        def restart_generator(i: int):
            """A replacement for dead generator i, brought to the learner's current version before it samples."""
            current = state.weight_version
            _log(f"generator-{i} died: starting a replacement at weight version {current}")
            actor = start_generator(i, current if current == base_version else current - 1)
            if current != base_version:
                learner.push_weights(current, {f"generator-{i}": actor},  # every rank: ZeRO-3 gathers on all
                                     timeout_s=cfg.weight_sync.timeout_s + 300)
            return actor

        reward_cls = reward_worker_actor_class()
        if cfg.reward.model_path or cfg.grpo.advantage == "process":  # rule + reward-model score in one actor
            from actors.reward_model import reward_model_worker_actor_class

            reward_cls = reward_model_worker_actor_class(cfg)

        def start_reward_worker(i: int):
            return reward_cls.options(**roles.get("reward", {})).remote(cfg.reward, worker_id=f"reward-{i}",
                                                                        mode=cfg.rollout.mode)

        def restart_reward_worker(i: int):
            _log(f"reward-{i} died: starting a replacement")
            return start_reward_worker(i)

        gen_pool = GeneratorPool([start_generator(i, base_version) for i in range(cfg.rollout.num_generators)],
                                 factory=restart_generator, max_restarts=cfg.max_actor_restarts)
        reward_pool = RewardPool([start_reward_worker(i) for i in range(cfg.reward.num_workers)],
                                 factory=restart_reward_worker, max_restarts=cfg.max_actor_restarts)
        # The reference model is the starting policy, also on resume; the checkpoint restores the policy.
        learner = LearnerGroup(task.model_dir, cfg.learner, cfg.grpo, seed=cfg.seed,
                               max_tokens=cfg.rollout.max_new_tokens,
                               actor_resources=roles.get("learner", {}).get("resources"),
                               rank_options=[placement.learner(r) for r in range(cfg.learner.num_ranks)])
        # ppo: + a value model (its own Ray group); dpo: pairs and the DPO loss. Others: the group itself.
        learner = wrap_learner(learner, cfg, model_dir=task.model_dir, seed=cfg.seed)
        ray_get(learner.actors[0].configure_sync.remote(cfg.weight_sync))  # rank 0 sends the weights
        if resume_from is not None:
            learner.load_checkpoint(resume_from)
        stream = ProblemStream(task.train, seed=cfg.seed, position=state.data_position)
        status = StatusServer(port=cfg.status_port, run_dir=run_dir)
        builder = SnapshotBuilder(run_dir.name, cfg.steps)
        status.update(builder.step(state.step, {}))  # visible as "running, step N/total" from the start
        _log(f"status: dsmath status {run_dir}   (gRPC on {status.address})")
    metrics_out = MetricsWriter(run_dir)
    setup_s = timer.pop().get("time/setup", 0.0)

    summary_path = run_dir / "summary.json"
    producer = None
    try:
        # --- eval before RL -------------------------------------------------------------------------
        before = state.history[0] if (resume and state.history) else None
        if before is None:
            ev = evaluate(gen_pool, reward_pool, task.heldout, cfg, state.weight_version, task.prompt_mode,
                          tag="eval-before")
            before = {"step": state.step, "accuracy": ev["accuracy"], "by_level": ev["by_level"]}
            state.history.append(before)
            _log(f"held-out greedy accuracy before RL: {ev['accuracy']:.1%} on {ev['size']} problems "
                 f"({ev['seconds']:.1f} s) by level {ev['by_level']}")

        q, g = cfg.rollout.questions_per_step, cfg.rollout.group_size
        chunk = max(1, q // (2 * len(gen_pool.actors)))
        max_len = cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens
        # Offline sampling (rft and dpo by default, or grpo.sampling=offline): every step's samples are drawn now,
        # once, from the starting policy; the loop trains on them in order and samples nothing itself.
        offline_pool = None
        if resolve_sampling(cfg.grpo.algorithm, cfg.grpo.sampling) == "offline" and state.step < cfg.steps:
            offline_pool = OfflinePool.draw(cfg, gen_pool=gen_pool, reward_pool=reward_pool, stream=stream,
                                            prompt_mode=task.prompt_mode, version=state.weight_version, chunk=chunk,
                                            first_step=state.step + 1, resume=resume, progress=progress, log=_log)
        bar = tqdm(total=cfg.steps, initial=state.step, disable=not progress, desc="grpo", unit="step",
                   dynamic_ncols=True)
        last_ckpt, last_eval = None, None
        # Async mode: step k+1's rollout runs in a thread (generators busy) while the learner trains step k;
        # generators are synced at the top of each step, so every sample is exactly one version behind.
        async_mode = cfg.async_.enabled and offline_pool is None
        producer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsmath-rollout") if async_mode else None
        prefetched = None  # async: Future[StepSamples] of the next step
        gen_version = state.weight_version  # what the generators hold
        sync = None

        def produce(step_: int) -> StepSamples:
            hook = (lambda event: fault_hook(event, step_, gen_pool, reward_pool)) if fault_hook else None
            if offline_pool is not None:  # offline: the pool holds this step's samples, drawn at the start
                ro, res = offline_pool.take(step_)
                return StepSamples(ro, res, {}, stream.position, gen_version)
            return sample_step(cfg, gen_pool, reward_pool, stream, task.prompt_mode, step=step_, version=gen_version,
                               chunk=chunk, num_ranks=cfg.learner.num_ranks, on_event=hook)

        def sync_generators() -> Any:
            nonlocal gen_version
            with timer.stage("weight_sync"):
                if fault_hook:
                    fault_hook("weight_sync", state.weight_version, gen_pool, reward_pool)
                stats = sync_with_recovery(learner, gen_pool, state.weight_version, cfg.weight_sync)
            gen_version = state.weight_version
            return stats

        # A separate old-logprobs pass is needed off-policy (async: the IS weights), for PPO (its KL reward) and
        # for several updates per batch; one on-policy update uses the learner's own detached log-probs.
        recompute_old = (async_mode or cfg.grpo.updates_per_step > 1
                         or cfg.grpo.algorithm not in ("grpo", "online_rft", "rft"))
        health = None
        while state.step < cfg.steps:
            step = state.step + 1
            if prefetched is not None:
                with timer.stage("rollout_wait"):  # the part of the prefetch the update did not hide
                    samples = prefetched.result()
                prefetched = None
            else:
                samples = produce(step)
            rollouts, results = samples.rollouts, samples.results
            staleness = [state.weight_version - r.weight_version for r in rollouts]  # learner version − sampler's
            bound = cfg.async_.max_staleness if async_mode else 0
            if offline_pool is None and max(staleness) > bound:
                raise RuntimeError(f"step {step}: a sample is {max(staleness)} weight versions behind the learner "
                                   f"(bound {bound}); refusing to train on it")
            if async_mode:  # the generators are idle: bring them up to date, then let them sample step+1
                sync = sync_generators() if gen_version < state.weight_version else None
                health = _generator_health(gen_pool)
                if step < cfg.steps:
                    prefetched = producer.submit(produce, step + 1)
            with timer.stage("advantages"):
                adv = sample_advantages(cfg.grpo, rollouts, results, g)  # B*G floats or per-token lists
                batch = build_train_batch(rollouts, adv, tokenizer.pad_token_id, max_len,
                                          mask_truncated=cfg.rollout.overlong == "mask")
            old_lp = None  # None: the learner's own detached log-probs, ratio exactly 1 (paper: μ = 1, π_old = π_θ)
            if recompute_old:
                with timer.stage("old_logprobs"):
                    old_lp = learner.logprobs(batch)  # [N, T]
                gap = logprob_gap(rollouts, batch, old_lp)
            else:  # the update's forward pass checks the generator's log-probs: no extra pass over the batch
                batch = dataclasses_replace(batch, behaviour_logprobs=generator_logprobs(rollouts, batch))
            if async_mode:  # off-policy correction: w = min(π_learner / π_generator, clip) per sampled token
                from dsmath.shaping import truncated_is_weights

                batch = dataclasses_replace(batch, is_weights=truncated_is_weights(
                    old_lp, generator_logprobs(rollouts, batch), batch.loss_mask, cfg.async_.is_correction_clip))
            if cfg.grpo.beta > 0:
                with timer.stage("ref_logprobs"):
                    batch = dataclasses_replace(batch, ref_logprobs=learner.ref_logprobs(batch))
            with timer.stage("update"):
                train_metrics = learner.grpo_step(dataclasses_replace(batch, old_logprobs=old_lp))
            if not recompute_old:
                gap = train_metrics.pop("logprob_gap")
            state.weight_version += 1
            if not async_mode:  # synchronous: exactly on-policy, every generator at the learner's version
                sync = sync_generators()
            state.step = step
            state.data_position = samples.data_position  # async: not the prefetched batch, it is regenerated on resume
            state.samples_trained += len(rollouts)

            row = rollout_metrics(rollouts, results, g)
            row.update({k if "/" in k else f"train/{k}": v for k, v in train_metrics.items()})
            row.update(samples.timings)  # rollout/reward (in async mode: overlapped with the previous update)
            row.update(timer.pop())
            completion_tokens = sum(len(r.completion_ids) for r in rollouts)
            if row.get("time/rollout", 0.0) > 0:  # (offline sampling generates nothing during the step)
                row["tokens_per_s"] = completion_tokens / row["time/rollout"]
            row["rollout/logprob_abs_diff_max"] = gap
            row["weight_version"] = state.weight_version
            row["samples_trained"] = state.samples_trained
            row["staleness/mean"] = sum(staleness) / len(staleness)
            row["staleness/max"] = max(staleness)
            row["dynamic_sampling/dropped_groups"] = samples.dropped_groups
            row["dynamic_sampling/rounds"] = samples.rounds
            row["reward/grader_failed_groups"] = samples.grader_failed_groups
            row["weight_sync/bytes"] = float(sync.bytes) if sync else 0.0
            row["weight_sync/pause_s"] = float(sync.pause_s) if sync else 0.0
            row["weight_sync/transfer_s"] = float(sync.transfer_s) if sync else 0.0
            row["faults/generator_restarts"] = gen_pool.restarts
            row["faults/reward_worker_restarts"] = reward_pool.restarts
            row["faults/reissued_samples"] = gen_pool.reissued

            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                if async_mode:  # let the prefetch finish (result kept), then evaluate the current weights
                    if prefetched is not None:
                        prefetched.result()
                    sync_generators()
                    timer.pop()  # this sync belongs to the eval, not to the next step's figures
                with timer.stage("eval"):
                    ev = evaluate(gen_pool, reward_pool, task.heldout, cfg, state.weight_version, task.prompt_mode)
                row["eval/accuracy"] = ev["accuracy"]
                row.update(timer.pop())
                last_eval = {"step": step, "accuracy": ev["accuracy"]}
                state.history.append(last_eval)
            if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                with timer.stage("checkpoint"):
                    path = learner.save_checkpoint(ckpt_root / f"step-{step:06d}", extra=dataclasses_asdict(state))
                row.update(timer.pop())
                last_ckpt = {"step": step, "path": str(path)}
            if not async_mode:  # (async: probed at the top of the step, while the generators were idle)
                health = _generator_health(gen_pool)
            versions = [h.get("weight_version", -1) for h in health]
            row["generators/version_min"], row["generators/version_max"] = min(versions), max(versions)
            row["generators/alive"] = sum(bool(h.get("alive")) for h in health)
            metrics_out.write(step, row)
            status.update(builder.step(step, row, generators=health,
                                       queues={"reward": {"depth": sum(reward_pool.outstanding),
                                                          "timeout_rate": row["grading_timeouts"] / len(results)}},
                                       last_checkpoint=last_ckpt, last_eval=last_eval))
            bar.set_postfix(reward=f"{row['reward/mean']:.2f}", acc=f"{row['accuracy']:.2f}",
                            kl=f"{row.get('train/kl', row.get('kl', 0.0)):.3f}")
            bar.update(1)
            if not progress:
                _log(f"step {step}/{cfg.steps} reward {row['reward/mean']:.3f} acc {row['accuracy']:.3f} "
                     f"step time {sum(v for k, v in row.items() if k.startswith('time/')):.1f} s")
        bar.close()
        if async_mode and gen_version < state.weight_version:
            sync_generators()  # the final weights, for the evaluation below
            timer.pop()

        # --- eval after RL ----------------------------------------------------------------------------
        ev = evaluate(gen_pool, reward_pool, task.heldout, cfg, state.weight_version, task.prompt_mode,
                      tag="eval-after")
        _log(f"held-out greedy accuracy after RL: {ev['accuracy']:.1%} by level {ev['by_level']}")
        summary = {
            "heldout_accuracy_before": before["accuracy"],
            "heldout_accuracy_after": ev["accuracy"],
            "heldout_accuracy_before_by_level": before.get("by_level", {}),
            "heldout_accuracy_after_by_level": ev["by_level"],
            "heldout_size": ev["size"],
            "steps": state.step,
            "samples_trained": state.samples_trained,
            "weight_version": state.weight_version,
            "wall_seconds": time.time() - wall_start,
            "setup_seconds": setup_s,
            "config": cfg.run_dir,
            "resumed": bool(resume),
            "summary_path": str(summary_path),
        }
        summary_path.write_text(json.dumps(summary, indent=2))
        status.update(builder.finish())
        return summary
    except BaseException as exc:
        try:
            status.update(builder.finish(failed=f"{type(exc).__name__}: {exc}"))
        except Exception:  # noqa: BLE001 - reporting the failure must not mask it
            pass
        raise
    finally:
        if producer is not None:
            producer.shutdown(wait=False, cancel_futures=True)
        metrics_out.close()
        status.stop()
        release_actors(gen_pool.actors + reward_pool.actors, learner, placement)


def sync_with_recovery(sender, gen_pool, version: int, sync_cfg) -> Any:
    """Broadcast ``version`` to every generator; if one died on the way, replace it (the replacement is brought
    to ``version`` by the pool's factory) and resend to the generators still behind. Survivors of the failed
    attempt refused nothing: an aborted update leaves them at their old version, so the resend is valid.
    ``sender``: the learner group (``sync_weights(version, receivers, cfg)`` on every rank together)."""
    import ray

    from learner.weight_sync import SyncStats, WeightSyncError

    def named(actors: dict[int, Any]) -> dict[str, Any]:
        return {f"generator-{i}": a for i, a in actors.items()}

    try:
        return sender.sync_weights(version, named(dict(enumerate(gen_pool.actors))), sync_cfg)
    except (WeightSyncError, ray.exceptions.RayError) as exc:
        replaced = gen_pool.replace_dead(probe="get_weight_version")
        if not replaced:
            raise
        _log(f"weight sync to version {version} failed ({type(exc).__name__}); replaced generators {replaced}")
    behind = {i: a for i, a in enumerate(gen_pool.actors)
              if ray.get(a.get_weight_version.remote(), timeout=sync_cfg.timeout_s) != version}
    if not behind:
        return SyncStats(version=version, transport=sync_cfg.transport, num_receivers=0, buckets=0, tensors=0)
    return sender.sync_weights(version, named(behind), sync_cfg)


def release_actors(actors: list, learner, placement: Placement) -> None:
    """Kill this run's actors and free its placement group, so a later run on the same cluster gets them."""
    import ray
    from ray.util.placement_group import remove_placement_group

    learner.shutdown()
    for actor in actors:
        ray.kill(actor)
    remove_placement_group(placement.group)
