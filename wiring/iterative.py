"""Iterative GRPO (DeepSeekMath §4.1.4, Algorithm 1): the policy and its reward model improve in turns.

    RM_0 ← reward model trained on samples of the starting policy π_0        (unless reward.model_path is given)
    for k = 1 … I:
        π_ref ← π_{k-1}                          the reference model is reset to the current policy
        π_k  ← M GRPO steps from π_{k-1} with rewards from RM_{k-1} (and the rule, reward.combine)
        RM_k ← RM_{k-1} trained further on fresh samples of π_k + rm.replay_fraction replay of all earlier rounds

The reset is structural: iteration k is a fresh ``wiring.driver.train`` run whose ``model.path`` is π_{k-1}'s
final checkpoint, and the driver builds the reference from the model it starts from. The optimizer state
starts fresh every iteration (the paper does not say; a new reference is a new KL anchor anyway).

Layout under ``run_dir``::

    iter-0/rm/            RM_0 (rm_data.jsonl, metrics.jsonl, checkpoint/, rm_summary.json)
    iter-k/               iteration k's GRPO run (config.yaml, metrics.jsonl, checkpoints/, summary.json)
    iter-k/rm/            RM_k
    iterations.json       per-iteration summary: start/reference model, RM used, accuracies, RM figures

Reward-model rounds run as Ray tasks in a fresh worker process each (``max_calls=1``): vLLM and the RM learner's
process group never share a process with the driver's long-lived state.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from wiring.console import log
from dsmath.config import TrainConfig, with_overrides
from dsmath.errors import UserError


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _rm_round_remote(**kwargs) -> dict:
    import ray

    from wiring.rm_pipeline import rm_round

    task = ray.remote(num_cpus=1, max_calls=1)(rm_round)
    return ray.get(task.remote(**kwargs))


def iterate(cfg: TrainConfig, *, iterations: int, kind: str = "process", progress: bool = True,
            train_fn: Callable[..., dict] | None = None, rm_round_fn: Callable[..., dict] | None = None,
            overwrite: bool = False) -> dict:
    """Run ``iterations`` rounds of Algorithm 1 with ``cfg.steps`` GRPO steps each; returns (and writes) the summary.

    ``kind`` is the reward model trained between iterations (``process``: PRM + ``algorithm.advantage=process``;
    ``outcome``: ORM + outcome advantages). ``train_fn`` / ``rm_round_fn`` default to the real driver and RM round.
    A ``run_dir`` holding iterations is refused unless ``overwrite`` (then they are removed first); the run dir's
    parent's ``latest`` link is pointed at it.
    """
    from wiring.cluster import connect_ray
    from wiring.driver import train
    from wiring.task import load_task
    from wiring.rm_pipeline import sample_problems
    from dsmath.model_folder import resolve
    from dsmath.logs import log_to
    from dsmath.run_dir import claim_fresh, link_latest

    if iterations < 1:
        raise UserError("--iterations: must be >= 1")
    train_fn = train_fn or train
    rm_round_fn = rm_round_fn or _rm_round_remote
    run_dir = Path(cfg.run_dir)
    claim_fresh(run_dir, overwrite=overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_to(run_dir / "logs" / "driver.log")  # while quiet: the libraries' lines, every iteration's
    link_latest(run_dir)
    task = load_task(cfg)
    connect_ray(cfg)
    policy = task.model_dir
    history: list[dict] = []
    records: list[dict[str, Any]] = []
    start = time.time()

    def rm_round(k: int, init: Path) -> dict:
        out = run_dir / f"iter-{k}" / "rm"
        problems = sample_problems(task.train, cfg.rm.questions, cfg.rm.seed + k)
        log(f"iteration {k}: training the {kind} reward model from {init} on samples of {policy} "
             f"({len(problems)} questions, {len(history)} historical examples to replay from)")
        s = rm_round_fn(cfg=cfg, policy_dir=str(policy), init_dir=str(init), out_dir=str(out), problems=problems,
                        prompt_mode=task.prompt_mode, kind=kind, history=list(history), seed=cfg.rm.seed + k,
                        progress=progress)
        history.extend(_read_jsonl(out / "rm_data.jsonl"))
        return s

    rm = Path(cfg.reward.model_path) if cfg.reward.model_path else None
    if rm is None:
        records.append({"iteration": 0, "rm": rm_round(0, policy)})
        rm = Path(records[-1]["rm"]["checkpoint"])
    advantage = "process" if kind == "process" else "outcome"
    every = cfg.checkpoint_every or cfg.steps  # every iteration must end on a checkpoint: the next one starts there
    for k in range(1, iterations + 1):
        it_dir = run_dir / f"iter-{k}"
        cfg_k = with_overrides(cfg, [f"run_dir={it_dir}", f"model.path={policy}", f"reward.model_path={rm}",
                                     f"reward.model_kind={kind}", f"algorithm.advantage={advantage}",
                                     f"checkpoint_every={every}"])
        log(f"iteration {k}: {cfg.steps} GRPO steps from {policy} (also the reference) with RM {rm}")
        summary = train_fn(cfg_k, progress=progress)
        new_policy = resolve(it_dir / "checkpoints")
        record = {"iteration": k, "policy_start": str(policy), "reference": str(policy), "reward_model": str(rm),
                  "policy_end": str(new_policy), "grpo": summary}
        policy = new_policy
        record["rm"] = rm_round(k, rm)
        rm = Path(record["rm"]["checkpoint"])
        records.append(record)
        (run_dir / "iterations.json").write_text(json.dumps(records, indent=2))
    result = _summary(records, iterations=iterations, kind=kind, steps=cfg.steps, policy=policy, rm=rm,
                      wall_seconds=time.time() - start)
    (run_dir / "iterations.json").write_text(json.dumps(records, indent=2))
    (run_dir / "summary.json").write_text(json.dumps({k: v for k, v in result.items() if k != "per_iteration"},
                                                     indent=2))
    return result


def _summary(records: list[dict], *, iterations: int, kind: str, steps: int, policy, rm, wall_seconds: float) -> dict:
    """The whole run: held-out accuracy before the first and after the last iteration, samples spent, where the
    final policy and reward model are, and every iteration's record."""
    grpo = [r["grpo"] for r in records if "grpo" in r]
    return {
        "iterations": iterations, "kind": kind, "steps_per_iteration": steps,
        "heldout_accuracy_before": grpo[0]["heldout_accuracy_before"],
        "heldout_accuracy_after": grpo[-1]["heldout_accuracy_after"],
        "heldout_size": grpo[-1]["heldout_size"],
        "samples_trained": sum(g["samples_trained"] for g in grpo),
        "rm_samples": sum(r["rm"].get("label/samples", 0) + r["rm"].get("label/continuations", 0) for r in records),
        "final_policy": str(policy), "final_reward_model": str(rm), "wall_seconds": wall_seconds,
        "per_iteration": records,
    }
