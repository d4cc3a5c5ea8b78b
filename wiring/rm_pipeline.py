"""One round of reward-model training: sample from the current policy, label, mix in replay, train, save.

Used by ``dsmath rm train`` and by every iteration of ``dsmath iterate`` (paper Algorithm 1). Wiring layer: the
policy samples in a child process (vLLM), the RM learner (DeepSpeed, one rank) trains in this one.

Writes into ``out_dir``: ``rm_data.jsonl`` (this round's fresh labelled examples — the next round's history),
``metrics.jsonl`` (per optimizer step), ``checkpoint/`` (HF folder + DeepSpeed state, as the policy's
checkpoints) and ``rm_summary.json``.
"""

from __future__ import annotations

import atexit
import json
import random
import sys
import time
from pathlib import Path
from typing import Sequence

from dsmath.config import LearnerConfig, TrainConfig
from dsmath.errors import UserError
from dsmath.records import Problem


def read_examples(paths: Sequence[str | Path]) -> list[dict]:
    """Labelled examples from JSONL files (``rm_data.jsonl`` of earlier rounds); a malformed line is a UserError."""
    out = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path}: no such file")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
                if not all(k in e for k in ("prompt_ids", "completion_ids", "positions", "labels")):
                    raise ValueError("needs prompt_ids, completion_ids, positions, labels")
            except ValueError as exc:
                raise UserError(f"{path}:{n}: not a reward-model example ({exc})") from None
            out.append(e)
    return out


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def label_with_policy(cfg: TrainConfig, policy_dir: str | Path, problems: Sequence[Problem], prompt_mode: str,
                      kind: str, *, seed: int) -> tuple[list[dict], dict]:
    """Sample and label with the policy at ``policy_dir``, in a child process.

    The child owns the vLLM engine (and the torch.distributed group vLLM makes for itself) and exits when done,
    so the reward-model learner that runs next in this process starts from a clean slate.
    """
    import multiprocessing

    from dsmath.logs import quiet_child, worker_env

    # A quiet command's child writes vLLM's lines beside the command's log, not on the terminal.
    with multiprocessing.get_context("spawn").Pool(1, initializer=quiet_child, initargs=(worker_env(),)) as pool:
        labelled = pool.apply(_label_in_this_process, (cfg, str(policy_dir), list(problems), prompt_mode, kind, seed))
        pool.close()  # the child exits on its own (its finalizers run): killed, it would leave a semaphore behind
        pool.join()
    return labelled


def _exit_now() -> None:
    """The labelling child's last exit handler to be registered, so the first to run: multiprocessing has already
    run its finalizers (the semaphores are released), and what is left — vLLM's shutdown hooks and the teardown of
    every module, about 2.5 CPU-seconds — goes with the process anyway."""
    import os

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def _label_in_this_process(cfg: TrainConfig, policy_dir: str, problems: list[Problem], prompt_mode: str, kind: str,
                           seed: int) -> tuple[list[dict], dict]:
    from actors.generator import Generator
    from dsmath.rewards import verifier
    from dsmath.rm_labels import label_examples

    gen = Generator(str(policy_dir), cfg.rollout, generator_id="rm-labeler", seed=seed)
    atexit.register(_exit_now)  # only ever in label_with_policy's child; after vLLM's exit handlers, so before them
    grader = verifier(cfg, worker_id="rm-grader")
    try:
        tok = gen.tokenizer
        return label_examples(
            gen, grader, problems, kind=kind, samples_per_question=cfg.rm.samples_per_question,
            completions_per_prefix=cfg.rm.completions_per_prefix, label_rule=cfg.rm.label,
            delimiter=cfg.algorithm.step_delimiter, prompt_mode=prompt_mode, temperature=cfg.rollout.temperature,
            max_new_tokens=cfg.rollout.max_new_tokens, stop=cfg.rollout.stop,
            decode=lambda ids: tok.decode(list(ids), skip_special_tokens=True))
    finally:
        grader.close()
        gen.remove_files()  # _exit_now ends this child before the scratch folder's own exit handler could run


def rm_round(cfg: TrainConfig, *, policy_dir: str | Path, init_dir: str | Path, out_dir: str | Path,
             problems: Sequence[Problem], prompt_mode: str, kind: str, history: Sequence[dict] = (),
             fresh: Sequence[dict] | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Label ``problems`` with the policy (unless ``fresh`` examples are given), mix in ``cfg.rm.replay_fraction``
    of ``history``, train the RM initialised from ``init_dir`` for ``cfg.rm.epochs``, save it. Returns the summary.
    """
    import torch

    from dsmath.reward_models import replay_mix
    from dsmath.utils.metrics import MetricsWriter
    from learner.reward_model import RewardModelLearner, collate_rm_examples, train_reward_model

    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label_stats: dict = {}
    if fresh is None:
        fresh, label_stats = label_with_policy(cfg, policy_dir, problems, prompt_mode, kind, seed=seed)
    fresh = list(fresh)
    if not fresh:
        raise UserError("no reward-model examples: every sampled completion was empty")
    _write_jsonl(out / "rm_data.jsonl", fresh)
    mixed = replay_mix(fresh, history, cfg.rm.replay_fraction, seed=seed)
    label_s = time.time() - start

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: two busy OpenMP pools on 2 cores run many times slower
    learner = None
    try:
        learner = RewardModelLearner(
            init_dir, LearnerConfig(lr=cfg.rm.lr, zero_stage=cfg.learner.zero_stage, warmup_steps=0,
                                    micro_batch_size=cfg.learner.micro_batch_size, weight_decay=0.0),
            rank=0, world_size=1, seed=seed)
        tok = learner.tokenizer
        if tok is None:
            raise UserError(f"{init_dir}: no tokenizer in the folder the reward model starts from")
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        fresh_batch = collate_rm_examples(fresh, pad)
        before = learner.evaluate(fresh_batch)
        writer = MetricsWriter(out, tensorboard=False)
        try:
            rows = train_reward_model(learner, mixed, epochs=cfg.rm.epochs, batch_size=cfg.rm.batch_size, seed=seed,
                                      pad_id=pad, progress=progress, on_step=writer.write)
        finally:
            writer.close()
        after = learner.evaluate(fresh_batch)
        ckpt_path = learner.save_checkpoint(out / "checkpoint", extra={"kind": kind, "examples": len(mixed)},
                                            tokenizer=tok)
    finally:
        torch.set_num_threads(threads)
        del learner  # the one-rank process group stays for the next learner in this process (see bootstrap.warm_up)
    summary = {
        "kind": kind, "policy": str(policy_dir), "init": str(init_dir), "checkpoint": str(ckpt_path),
        "fresh_examples": len(fresh), "replayed_examples": len(mixed) - len(fresh), "history_examples": len(history),
        "train_examples": len(mixed), "optimizer_steps": len(rows), **{f"label/{k}": v for k, v in label_stats.items()},
        "fresh_before": before, "fresh_after": after,
        "loss_first": rows[0]["loss"] if rows else None, "loss_last": rows[-1]["loss"] if rows else None,
        "label_seconds": label_s, "wall_seconds": time.time() - start,
    }
    (out / "rm_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def sample_problems(problems: Sequence[Problem], count: int, seed: int) -> list[Problem]:
    """``count`` questions drawn without replacement (all of them if fewer), seeded."""
    rng = random.Random(seed)
    return rng.sample(list(problems), min(count, len(problems)))
