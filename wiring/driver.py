"""The training driver: one controller that reads top to bottom through named, timed stages.

    setup → eval(before) → [rollout → reward → advantages → (old_logprobs) → (ref_logprobs) → update
                              → weight_sync → (eval) → (checkpoint)] × steps → eval(after) → summary.json

Stage names are the metric names (``time/rollout`` …). Where a step's samples come from — synchronous,
asynchronous one step ahead, or the offline pool — is one interface (:mod:`wiring.producers`); the metric row
is built in one place (:func:`wiring.steps.step_row`). Synchronous mode is exactly on-policy: every generator is
at the learner's weight version before a step samples, and generators refuse requests for any other version.

This is the wiring layer: it imports Ray, the actors and the learner (inside the functions that run them).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict as dataclasses_asdict
from dataclasses import dataclass, field
from dataclasses import replace as dataclasses_replace
from pathlib import Path
from typing import Any, Callable

import yaml

from dsmath.config import TrainConfig, to_dict
from dsmath.errors import UserError
from dsmath.model_folder import pad_token_id
from dsmath.sampler import ProblemStream
from dsmath.utils.metrics import MetricsWriter, metrics_row, truncate_metrics
from dsmath.utils.timing import StageTimer
from wiring.cluster import connect_ray, place_actors, release_actors, role_resources
from wiring.console import log
from wiring.lineage import write_step_samples
from wiring.rollout import StepSamples, evaluate
from wiring.steps import build_train_batch, generator_health, generator_logprobs, logprob_gap, step_row
from wiring.task import TaskData, load_task


@dataclass
class RunState:
    """What a checkpoint must restore besides the weights and optimizer."""

    step: int = 0
    weight_version: int = 0
    data_position: int = 0
    samples_trained: int = 0
    history: list = field(default_factory=list)


@dataclass
class Run:
    """One run's set-up parts: what every stage reads. ``health`` is the generators' last probe."""

    cfg: TrainConfig
    task: TaskData
    run_dir: Path
    state: RunState
    timer: StageTimer
    pad_id: int | None  # the tokenizer's pad token id (dsmath.model_folder.pad_token_id)
    gen_pool: Any
    reward_pool: Any
    learner: Any
    placement: Any
    stream: ProblemStream
    status: Any
    builder: Any
    metrics_out: MetricsWriter
    resume_from: Path | None
    health: list = field(default_factory=list)
    unsaved_rows: list = field(default_factory=list)  # metrics rows logged since the last checkpoint
    last_ckpt: dict | None = None
    last_eval: dict | None = None


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True,
          fault_hook: Callable[[str, int, Any, Any], None] | None = None, overwrite: bool = False) -> dict:
    """Run online GRPO (or the configured method) as configured; returns (and writes) the run summary.

    A fresh run refuses a run directory (and a ``storage``) holding a run unless ``overwrite`` (then that run's
    files go first). A resume first fetches the run from ``storage`` when the run directory has no intact
    checkpoint (:func:`wiring.run_storage.restore`); it refuses a ``cfg`` that changes the run's saved config beyond
    :data:`dsmath.run_dir.MUTABLE_ON_RESUME` (allowed changes go to ``config_changes.jsonl``), and returns the saved
    summary of a finished run without setting anything up. Refusals come before anything is created or started;
    any later failure leaves ``status.json`` ``failed``.

    ``fault_hook(event, step, gen_pool, reward_pool)`` is called at ``rollout_submitted`` (generation in flight),
    ``reward_pending`` (scoring in flight) and ``weight_sync`` of every step: tests kill actors at a known point.
    """
    from tqdm import tqdm

    from dsmath.run_dir import claim_fresh, finished_summary, resume_changes

    wall_start = time.time()
    changes: list[dict] = []
    if cfg.storage:
        prepare_storage(cfg, resume=resume, overwrite=overwrite)
    if resume:
        changes = resume_changes(cfg.run_dir, to_dict(cfg))
        done = finished_summary(cfg.run_dir, cfg.steps)
        if done is not None:
            log(f"{cfg.run_dir} already finished its {done['steps']} steps (summary.json): nothing to resume")
            return done
    else:
        claim_fresh(cfg.run_dir, overwrite=overwrite)
    timer = StageTimer()
    run: Run | None = None
    producer = None
    try:
        with timer.stage("setup"):
            run = setup(cfg, resume=resume, timer=timer, changes=changes)
        setup_s = timer.pop().get("time/setup", 0.0)
        before = evaluate_before(run, resume)
        producer = start_producer(run, resume=resume, progress=progress, fault_hook=fault_hook)
        bar = tqdm(total=cfg.steps, initial=run.state.step, disable=not progress, desc="grpo", unit="step",
                   dynamic_ncols=True)
        while run.state.step < cfg.steps:
            row = train_step(run, producer)
            report_step(run, row, bar, progress)
            upload_run_files(run, checkpointed=True)
        bar.close()
        producer.finish()
        timer.pop()  # a final sync belongs to the evaluation below, not to a step's figures
        summary = finish(run, before, wall_start=wall_start, setup_s=setup_s, resume=resume)
        return summary
    except BaseException as exc:
        mark_failed(cfg, run, exc)
        raise
    finally:
        if producer is not None:
            producer.close()
        if run is not None:
            run.metrics_out.close()
            run.status.stop()
            release_actors(run.gen_pool.actors + run.reward_pool.actors, run.learner, run.placement)


def prepare_storage(cfg: TrainConfig, *, resume: bool, overwrite: bool) -> None:
    """``storage`` before anything starts: a URI pyarrow cannot open is one line naming the key; a resume fetches
    the run when the run directory has no intact checkpoint; a fresh run claims it (:mod:`wiring.run_storage`)."""
    from dsmath.storage import open_uri
    from wiring.run_storage import claim_fresh, restore

    open_uri(cfg.storage)
    if resume:
        restore(cfg.run_dir, cfg.storage, log)
    else:
        claim_fresh(cfg.storage, overwrite=overwrite)


def mark_failed(cfg: TrainConfig, run: Run | None, exc: BaseException) -> None:
    """``status.json`` says ``failed`` with the reason — also when set-up failed before the status server started
    (a resumed run's directory then still holds the previous attempt's ``running`` or ``finished``)."""
    from dsmath.status.snapshot import STATUS_FILE, SnapshotBuilder
    from learner.checkpoint import write_text_atomic

    reason = f"{type(exc).__name__}: {exc}"
    try:
        if run is not None:
            run.status.update(run.builder.finish(failed=reason))
        elif Path(cfg.run_dir).is_dir():
            snapshot = SnapshotBuilder(Path(cfg.run_dir).name, cfg.steps).finish(failed=reason)
            write_text_atomic(Path(cfg.run_dir) / STATUS_FILE, snapshot.to_json() + "\n")
    except Exception:  # noqa: BLE001 - reporting the failure must not mask it
        pass


# ------------------------------------------------------------------------------------------------ setup


def setup(cfg: TrainConfig, *, resume: bool, timer: StageTimer, changes: list[dict] | None = None) -> Run:
    """Data, the run directory, the cluster, the generators, reward workers and learner, the status server.
    ``changes``: the config changes a resume was allowed (recorded with the step they take effect)."""
    from dsmath.logs import log_to
    from dsmath.run_dir import link_latest, record_changes
    from dsmath.status.snapshot import SnapshotBuilder
    from wiring.observability import start_status

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_to(run_dir / "logs" / "driver.log")  # while quiet (the CLI's default): the libraries' lines; workers beside
    task = load_task(cfg)
    state, resume_from = (resume_state(run_dir) if resume else (RunState(), None))
    record_changes(run_dir, changes or [], from_step=state.step + 1)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    link_latest(run_dir)
    connect_ray(cfg)
    pad_id = pad_token_id(task.model_dir)
    placement = place_actors(cfg)
    holder: dict[str, Any] = {}  # the learner, for the generator factory's catch-up push
    gen_pool, reward_pool = start_actor_pools(cfg, task, state, resume_from, placement, holder)
    learner = start_learner(cfg, task, placement)
    holder["learner"] = learner
    if resume_from is not None:
        if cfg.storage:  # a learner node without this checkpoint (no shared filesystem) downloads it first
            from wiring.run_storage import checkpoints_uri

            learner.fetch_checkpoint(resume_from, checkpoints_uri(cfg.storage))
        elif cfg.rollout.weights_from == "learner" and learner.send_checkpoint(resume_from):
            log(f"--resume: the learner's node had no {resume_from.name}; sent the driver's copy through the object "
                f"store")
        learner.load_checkpoint(resume_from)
    if cfg.rollout.weights_from == "learner":
        push_initial_weights(learner, gen_pool, state.weight_version, cfg)
    record_generators(gen_pool, run_dir)
    builder = SnapshotBuilder(run_dir.name, cfg.steps)
    # gRPC status (+ Prometheus, Ray metrics), serving "running, step N/total" from its first answer; where it is,
    # printed and written
    status = start_status(cfg, run_dir, builder.step(state.step, {}))
    return Run(cfg=cfg, task=task, run_dir=run_dir, state=state, timer=timer, pad_id=pad_id, gen_pool=gen_pool,
               reward_pool=reward_pool, learner=learner, placement=placement,
               stream=ProblemStream(task.train, seed=cfg.seed, position=state.data_position), status=status,
               builder=builder, metrics_out=MetricsWriter(run_dir), resume_from=resume_from)


def resume_state(run_dir: Path) -> tuple[RunState, Path]:
    """The state saved with the newest intact checkpoint under ``run_dir/checkpoints`` (verified against its
    manifest; damaged newer ones are said in one line and skipped), and that checkpoint."""
    from learner.checkpoint import pick_intact

    ckpt_root = run_dir / "checkpoints"
    try:
        latest = pick_intact(ckpt_root, log=log)
    except UserError as exc:
        raise UserError(f"--resume: {exc}; start the run again with --overwrite") from None
    saved = json.loads((latest / "trainer_state.json").read_text())["extra"]
    state = RunState(**{k: v for k, v in saved.items() if k in RunState.__dataclass_fields__})
    log(f"resuming from {latest} at step {state.step} (weight version {state.weight_version})")
    restored = truncate_metrics(run_dir / "metrics.jsonl", state.step, saved_rows=saved.get("metrics_rows", []))
    if restored:
        log(f"metrics.jsonl: the rows of step {', '.join(map(str, restored))} restored from {latest.name} (the run "
            f"stopped before they were logged or stored)")
    return state, latest


def start_actor_pools(cfg: TrainConfig, task: TaskData, state: RunState, resume_from: Path | None, placement,
                      holder: dict) -> tuple[Any, Any]:
    """The generator and reward-worker pools; a dead actor is replaced by the pool's factory (a generator is first
    brought to the learner's current weight version, read through ``holder["learner"]``)."""
    from ray import put as ray_put

    from actors.generator import generator_actor_class
    from actors.pool import GeneratorPool, RewardPool
    from actors.reward_worker import reward_worker_actor_class
    from dsmath import rewards

    roles = role_resources()
    gen_cls = generator_actor_class(cfg.rollout.cpus_per_generator, cfg.rollout.gpus_per_generator)
    if cfg.rollout.weights_from == "learner":  # config + tokenizer by object store; weights pushed by the learner
        from dsmath.model_folder import model_files

        gen_model = ray_put(model_files(task.model_dir))
        base_version = state.weight_version - 1  # nothing loaded yet: the learner's version is the next one
    else:
        gen_model = str(resume_from or task.model_dir)
        base_version = state.weight_version  # the version ``gen_model`` holds

    def start_generator(i: int, version: int):
        return gen_cls.options(**roles.get("generator", {}), **placement.generator(i)).remote(
            gen_model, cfg.rollout, generator_id=f"generator-{i}", seed=cfg.seed + i, weight_version=version,
            sandbox_address=cfg.reward.sandbox_address)  # tool calls (rollout.mode=tool) run where PoT rewards do

    def restart_generator(i: int):
        """A replacement for dead generator i, brought to the learner's current version before it samples."""
        current = state.weight_version
        log(f"generator-{i} died: starting a replacement at weight version {current}")
        actor = start_generator(i, current if current == base_version else current - 1)
        if current != base_version:
            holder["learner"].push_weights(current, {f"generator-{i}": actor},  # every rank: ZeRO-3 gathers on all
                                           timeout_s=cfg.weight_sync.timeout_s + 300)
        return actor

    rewards.choose(cfg)  # reward.kind's refusal, as one line, before any reward actor starts
    reward_cls = reward_worker_actor_class()
    rm_files = None  # no shared filesystem: the reward model travels too, fetched only by a node without it
    if cfg.reward.model_path and cfg.rollout.weights_from == "learner":
        from dsmath.model_folder import model_files

        rm_files = [ray_put(model_files(cfg.reward.model_path, weights=True))]  # a list: Ray leaves the ref unfetched

    def start_reward_worker(i: int):
        return reward_cls.options(**roles.get("reward", {})).remote(cfg, worker_id=f"reward-{i}", model=rm_files)

    def restart_reward_worker(i: int):
        log(f"reward-{i} died: starting a replacement")
        return start_reward_worker(i)

    gen_pool = GeneratorPool([start_generator(i, base_version) for i in range(cfg.rollout.num_generators)],
                             factory=restart_generator, max_restarts=cfg.max_actor_restarts)
    reward_pool = RewardPool([start_reward_worker(i) for i in range(cfg.reward.num_workers)],
                             factory=restart_reward_worker, max_restarts=cfg.max_actor_restarts)
    return gen_pool, reward_pool


def push_initial_weights(learner, gen_pool, version: int, cfg: TrainConfig) -> None:
    """``rollout.weights_from=learner``: the learner's weights (``version``) to every generator through the object
    store, before any sample."""
    receivers = {f"generator-{i}": a for i, a in enumerate(gen_pool.actors)}
    stats = learner.push_weights(version, receivers, timeout_s=cfg.weight_sync.timeout_s + 300)
    log(f"generators: weights version {version} from the learner ({stats.get('bytes', 0) / 2**20:.1f} MiB, "
        f"{stats.get('seconds', 0.0):.1f} s); config and tokenizer through the object store")


def record_generators(gen_pool, run_dir: Path) -> None:
    """``generators.json``: where each generator runs (host, Ray node, pid) and what it loaded, from where."""
    from ray import get as ray_get

    from learner.checkpoint import write_text_atomic

    described = ray_get([a.describe.remote() for a in gen_pool.actors])
    write_text_atomic(run_dir / "generators.json", json.dumps(described, indent=1) + "\n")


def start_learner(cfg: TrainConfig, task: TaskData, placement):
    """The learner group in the placement group's learner bundles, wrapped for PPO (a value model) or DPO (pairs).
    The reference model is the starting policy, also on resume; the checkpoint restores the policy."""
    from ray import get as ray_get

    from learner.ray_group import LearnerGroup
    from wiring.paradigm import wrap_learner

    roles = role_resources()
    learner = LearnerGroup(task.model_dir, cfg.learner, cfg.algorithm, seed=cfg.seed,
                           max_tokens=cfg.rollout.max_new_tokens,
                           actor_resources=roles.get("learner", {}).get("resources"),
                           rank_options=[placement.learner(r) for r in range(cfg.learner.num_ranks)])
    learner = wrap_learner(learner, cfg, model_dir=task.model_dir, seed=cfg.seed)
    ray_get(learner.actors[0].configure_sync.remote(cfg.weight_sync))  # rank 0 sends the weights
    return learner


# ------------------------------------------------------------------------------------------------ stages


def evaluate_before(run: Run, resume: bool) -> dict:
    """Held-out greedy accuracy of the starting policy (a resumed run keeps the one it measured first)."""
    state = run.state
    if resume and state.history:
        return state.history[0]
    ev = evaluate(run.gen_pool, run.reward_pool, run.task.heldout, run.cfg, state.weight_version,
                  run.task.prompt_mode, tag="eval-before")
    before = {"step": state.step, "accuracy": ev["accuracy"], "by_level": ev["by_level"]}
    state.history.append(before)
    log(f"held-out greedy accuracy before RL: {ev['accuracy']:.1%} on {ev['size']} problems "
        f"({ev['seconds']:.1f} s) by level {ev['by_level']}")
    return before


def start_producer(run: Run, *, resume: bool, progress: bool, fault_hook):
    """The run's sample producer: offline (the pool is drawn now, from the starting policy), asynchronous one
    step ahead, or synchronous (:mod:`wiring.producers`)."""
    from dsmath.methods import resolve_sampling
    from wiring.paradigm import OfflinePool
    from wiring.producers import make_producer

    cfg, state = run.cfg, run.state
    chunk = max(1, cfg.rollout.questions_per_step // (2 * len(run.gen_pool.actors)))
    offline_pool, kind = None, "async" if cfg.async_.enabled else "sync"
    if resolve_sampling(cfg.algorithm.name, cfg.algorithm.sampling) == "offline":
        kind = "offline"
        if state.step < cfg.steps:
            offline_pool = OfflinePool.draw(cfg, gen_pool=run.gen_pool, reward_pool=run.reward_pool, stream=run.stream,
                                            prompt_mode=run.task.prompt_mode, version=state.weight_version,
                                            chunk=chunk, first_step=state.step + 1, resume=resume, progress=progress,
                                            log=log)
    producer = None

    def sync_generators() -> Any:
        with run.timer.stage("weight_sync"):
            if fault_hook:
                fault_hook("weight_sync", state.weight_version, run.gen_pool, run.reward_pool)
            stats = sync_with_recovery(run.learner, run.gen_pool, state.weight_version, cfg.weight_sync)
        producer.gen_version = state.weight_version
        return stats

    def probe_health() -> None:
        run.health = generator_health(run.gen_pool)

    producer = make_producer(kind, cfg=cfg, gen_pool=run.gen_pool, reward_pool=run.reward_pool, stream=run.stream,
                             prompt_mode=run.task.prompt_mode, chunk=chunk, timer=run.timer, sync=sync_generators,
                             behind=lambda: producer.gen_version < state.weight_version, on_top=probe_health,
                             fault_hook=fault_hook, offline_pool=offline_pool)
    producer.gen_version = state.weight_version
    producer.kind = kind
    return producer


def train_step(run: Run, producer) -> dict:
    """One step, stage by stage; returns its metric row (written by :func:`report_step`)."""
    cfg, state, timer, learner = run.cfg, run.state, run.timer, run.learner
    step = state.step + 1
    samples = producer.take(step)  # time/rollout + time/reward, or time/rollout_wait (+ weight_sync when async)
    staleness = check_staleness(samples, state.weight_version, producer.kind, cfg.async_.max_staleness, step)
    with timer.stage("advantages"):
        batch = advantages_batch(run, samples)
    batch, old_lp, gap = logprob_inputs(run, samples, batch, off_policy=producer.kind == "async")
    if cfg.algorithm.beta > 0:
        with timer.stage("ref_logprobs"):
            batch = dataclasses_replace(batch, ref_logprobs=learner.ref_logprobs(batch))
    with timer.stage("update"):
        train_metrics = learner.grpo_step(dataclasses_replace(batch, old_logprobs=old_lp))
    if gap is None:  # measured inside the update's forward pass
        gap = train_metrics.pop("logprob_gap")
    state.weight_version += 1
    sync = producer.after_update()  # synchronous: every generator at the learner's new version
    state.step = step
    state.data_position = samples.data_position  # async: not the prefetched batch, it is regenerated on resume
    state.samples_trained += len(samples.rollouts)
    row = step_row(samples, train_metrics, timer.pop(), group_size=cfg.rollout.group_size, state=state,
                   staleness=staleness, logprob_gap=gap, sync=sync, gen_pool=run.gen_pool, reward_pool=run.reward_pool)
    write_step_samples(run.run_dir, cfg.lineage, step, samples, batch)  # RUN_DIR/samples/step-N.parquet
    maybe_evaluate(run, producer, row, step)
    maybe_checkpoint(run, row, step)
    if not producer.health_at_top:  # (async: probed at the top of the step, while the generators were idle)
        run.health = generator_health(run.gen_pool)
    return row


def check_staleness(samples: StepSamples, learner_version: int, kind: str, max_staleness: int, step: int) -> list[int]:
    """Learner version − sampler's version per sample; refuses a batch beyond the bound (0 when synchronous)."""
    staleness = [learner_version - r.weight_version for r in samples.rollouts]
    bound = max_staleness if kind == "async" else 0
    if kind != "offline" and max(staleness) > bound:
        raise RuntimeError(f"step {step}: a sample is {max(staleness)} weight versions behind the learner "
                           f"(bound {bound}); refusing to train on it")
    return staleness


def advantages_batch(run: Run, samples: StepSamples):
    """The configured method's advantages (or gradient coefficients), collated into the learner's batch."""
    from dsmath.methods import sample_advantages

    cfg = run.cfg
    adv = sample_advantages(cfg.algorithm, samples.rollouts, samples.results,
                            cfg.rollout.group_size)  # B*G floats/lists
    max_len = cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens
    return build_train_batch(samples.rollouts, adv, run.pad_id, max_len,
                             mask_truncated=cfg.rollout.overlong == "mask")


def logprob_inputs(run: Run, samples: StepSamples, batch, *, off_policy: bool):
    """``(batch, old_logprobs, gap)``. A separate old-logprobs pass (stage ``old_logprobs``) where the method needs
    one — off-policy samples (the IS weights), several updates per batch, or an algorithm whose loss reads them;
    otherwise the update uses its own detached log-probs (ratio exactly 1, the paper's μ = 1) and checks the
    generator's log-probs in its forward pass (``gap`` None: the update reports it)."""
    from dsmath.methods import needs_old_logprobs

    cfg = run.cfg
    old_lp, gap = None, None
    if needs_old_logprobs(cfg.algorithm, off_policy=off_policy):
        with run.timer.stage("old_logprobs"):
            old_lp = run.learner.logprobs(batch)  # [N, T]
        gap = logprob_gap(samples.rollouts, batch, old_lp)
    else:
        batch = dataclasses_replace(batch, behaviour_logprobs=generator_logprobs(samples.rollouts, batch))
    if off_policy:  # off-policy correction: w = min(π_learner / π_generator, clip) per sampled token
        from dsmath.shaping import truncated_is_weights

        batch = dataclasses_replace(batch, is_weights=truncated_is_weights(
            old_lp, generator_logprobs(samples.rollouts, batch), batch.loss_mask, cfg.async_.is_correction_clip))
    return batch, old_lp, gap


def maybe_evaluate(run: Run, producer, row: dict, step: int) -> None:
    """Stage ``eval`` every ``eval_every`` steps (not on the last: the run ends with one)."""
    cfg = run.cfg
    if not (cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps):
        return
    producer.ready_for_eval()  # async: the prefetch finished and the generators synced
    run.timer.pop()  # that sync belongs to the eval, not to the next step's figures
    with run.timer.stage("eval"):
        ev = evaluate(run.gen_pool, run.reward_pool, run.task.heldout, cfg, run.state.weight_version,
                      run.task.prompt_mode)
    row["eval/accuracy"] = ev["accuracy"]
    row.update(run.timer.pop())
    run.last_eval = {"step": step, "accuracy": ev["accuracy"]}
    run.state.history.append(run.last_eval)


def maybe_checkpoint(run: Run, row: dict, step: int) -> None:
    """Stage ``checkpoint`` every ``checkpoint_every`` steps and at the last; then only the newest
    ``keep_checkpoints`` are kept (and none newer than this one: a resume abandoned them)."""
    from learner.checkpoint import prune

    cfg = run.cfg
    if not (cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps)):
        return
    with run.timer.stage("checkpoint"):
        # The rows since the last checkpoint go with it, this step's too (report_step logs it after): a resume
        # whose metrics.jsonl lacks them (killed before logging, or fetched from storage) gets them back.
        rows = run.unsaved_rows + [metrics_row(step, row)]
        path = run.learner.save_checkpoint(run.run_dir / "checkpoints" / f"step-{step:06d}",
                                           extra={**dataclasses_asdict(run.state), "metrics_rows": rows})
        if cfg.rollout.weights_from == "learner":  # no shared filesystem: the learner's node may be another one
            copied = run.learner.bring_home(path)
            if copied and run.last_ckpt is None:
                log(f"checkpoints: the learner's node is not this one; each checkpoint is copied into {run.run_dir} "
                    f"through the object store ({copied / 2**20:.1f} MiB now)")
        prune(run.run_dir / "checkpoints", cfg.keep_checkpoints, Path(path))
        if cfg.storage:  # rank 0, whose node has the files, uploads and prunes storage
            from wiring.run_storage import checkpoints_uri

            run.learner.upload_checkpoint(path, checkpoints_uri(cfg.storage), cfg.keep_checkpoints)
    row.update(run.timer.pop())
    run.last_ckpt = {"step": step, "path": str(path)}


def upload_run_files(run: Run, *, checkpointed: bool = False) -> None:
    """With ``storage`` set: the run's files to ``STORAGE/run`` (:mod:`wiring.run_storage`). ``checkpointed``:
    only when this step saved a checkpoint (called after its metrics row is written, so the row goes too)."""
    if not run.cfg.storage or (checkpointed and (run.last_ckpt or {}).get("step") != run.state.step):
        return
    from wiring.run_storage import upload_run_files as upload

    upload(run.run_dir, run.cfg.storage)


def report_step(run: Run, row: dict, bar, progress: bool) -> None:
    """The row to ``metrics.jsonl``, the status server, the progress bar (or one log line without one)."""
    step, cfg = run.state.step, run.cfg
    versions = [h.get("weight_version", -1) for h in run.health]
    row["generators/version_min"], row["generators/version_max"] = min(versions), max(versions)
    row["generators/alive"] = sum(bool(h.get("alive")) for h in run.health)
    written = run.metrics_out.write(step, row)
    if cfg.checkpoint_every:  # the next checkpoint carries them (maybe_checkpoint)
        run.unsaved_rows = [] if (run.last_ckpt or {}).get("step") == step else run.unsaved_rows + [written]
    queues = {"reward": {"depth": sum(run.reward_pool.outstanding),
                         "timeout_rate": row["grading_timeouts"] / row["samples"]}}
    run.status.update(run.builder.step(step, row, generators=run.health, queues=queues,
                                       last_checkpoint=run.last_ckpt, last_eval=run.last_eval))
    bar.set_postfix(reward=f"{row['reward/mean']:.2f}", acc=f"{row['accuracy']:.2f}",
                    kl=f"{row.get('train/kl', row.get('kl', 0.0)):.3f}")
    bar.update(1)
    if not progress:
        log(f"step {step}/{cfg.steps} reward {row['reward/mean']:.3f} acc {row['accuracy']:.3f} "
            f"step time {sum(v for k, v in row.items() if k.startswith('time/')):.1f} s")


def finish(run: Run, before: dict, *, wall_start: float, setup_s: float, resume: bool) -> dict:
    """Held-out accuracy after RL, ``summary.json``, and the status server's final state."""
    state = run.state
    ev = evaluate(run.gen_pool, run.reward_pool, run.task.heldout, run.cfg, state.weight_version,
                  run.task.prompt_mode, tag="eval-after")
    log(f"held-out greedy accuracy after RL: {ev['accuracy']:.1%} by level {ev['by_level']}")
    summary_path = run.run_dir / "summary.json"
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
        "config": run.cfg.run_dir,
        "resumed": bool(resume),
        "summary_path": str(summary_path),
    }
    summary_path.write_text(json.dumps(summary, indent=2))
    run.status.update(run.builder.finish())
    upload_run_files(run)
    return summary


# ------------------------------------------------------------------------------------------------ weights


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
        log(f"weight sync to version {version} failed ({type(exc).__name__}); replaced generators {replaced}")
    behind = {i: a for i, a in enumerate(gen_pool.actors)
              if ray.get(a.get_weight_version.remote(), timeout=sync_cfg.timeout_s) != version}
    if not behind:
        return SyncStats(version=version, transport=sync_cfg.transport, num_receivers=0, buckets=0, tensors=0)
    return sender.sync_weights(version, named(behind), sync_cfg)

