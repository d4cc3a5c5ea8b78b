"""The model a run starts from and its questions: the tiny bootstrap, or a user model and JSONL files."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import replace as dataclasses_replace
from pathlib import Path

from dsmath.config import TrainConfig
from dsmath.errors import UserError
from dsmath.model_folder import model_folder
from dsmath.records import Problem
from wiring.console import log


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
    from wiring.bootstrap import PROMPT_MODE, ensure_bootstrap

    # model.path (an HF folder or a dsmath checkpoint, e.g. iterative GRPO's previous iteration) replaces the
    # bootstrap model as the start and the reference; the questions still come from the built-in task, whose
    # cache key must not depend on model.path.
    arts = ensure_bootstrap(cfg.bootstrap, dataclasses_replace(cfg.model, path=""), log=log)
    if cfg.model.path:
        start = model_folder(cfg.model.path, f"model.path={cfg.model.path}")
        log(f"starting from {start} (questions from the built-in task)")
        arts = dataclasses_replace(arts, model_dir=start)
    train_all = arts.train_problems()
    # The first num_sft_problems questions were used for the SFT warm-up; RL draws from the rest.
    rl_train = train_all[cfg.bootstrap.num_sft_problems:]
    heldout = arts.heldout_problems(limit=cfg.eval_size)
    return TaskData(model_dir=arts.model_dir, train=rl_train, heldout=heldout, prompt_mode=PROMPT_MODE)


def load_user_task(cfg: TrainConfig) -> TaskData:
    """``model.path`` + ``data.train`` (+ ``data.heldout``) JSONL, prompted with ``rollout.mode``'s template."""
    from dsmath.datasets import load_problems

    start = model_folder(cfg.model.path, f"model.path={cfg.model.path}")
    for key, path in (("data.train", cfg.data.train), ("data.heldout", cfg.data.heldout)):
        if path and not Path(path).expanduser().is_file():
            raise UserError(f"{key}={path}: no such file")
    train, report = load_problems(Path(cfg.data.train).expanduser())
    log(f"questions: {report.summary()}")
    if cfg.data.heldout:
        heldout, held_report = load_problems(Path(cfg.data.heldout).expanduser(), limit=cfg.eval_size)
        log(f"held-out: {held_report.summary()}")
    else:  # hold out the first eval_size questions; RL never sees them
        heldout, train = train[:cfg.eval_size], train[cfg.eval_size:]
        log(f"held-out: the first {len(heldout)} questions of {cfg.data.train} (not trained on)")
    if not train:
        raise UserError(f"data.train={cfg.data.train}: no questions left to train on (eval_size={cfg.eval_size})")
    return TaskData(model_dir=start, train=train, heldout=heldout, prompt_mode=cfg.rollout.mode)
