"""A run directory's lifecycle: a fresh run claims an empty one, a resumed run is the run that was started.

- :func:`claim_fresh` refuses a directory that holds a run (``metrics.jsonl`` or ``checkpoints/``) unless asked to
  overwrite, and then removes that run's files (only the files a run writes, :data:`RUN_FILES`) first.
- :func:`resume_changes` compares the config a resume would run with the run's saved ``config.yaml``: a changed key
  is refused in one line naming it, unless it is in :data:`MUTABLE_ON_RESUME` (then it is returned, and
  :func:`record_changes` appends it to ``config_changes.jsonl`` with the step it took effect).
- :func:`finished_summary` is the run's ``summary.json`` when it already reached its steps (nothing to resume).
- :func:`link_latest` points ``<parent>/latest`` (a relative symlink; ``runs/latest`` for the default run dirs) at
  the run directory a command just started.

Nothing here creates a directory before its checks pass. Base layer: no Ray, vLLM or DeepSpeed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from dsmath.errors import UserError

# Keys a resumed run may change (dotted): how far it runs, how often it evaluates and checkpoints, where it is and
# how it is watched, how patient it is with failures. Everything else defines the run and is refused on resume.
# ``section.*`` allows every key of a section.
MUTABLE_ON_RESUME = (
    "steps",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "status.*",
    "ray_address",
    "run_dir",
    "storage",
    "max_actor_restarts",
    "weight_sync.timeout_s",
    "reward.timeout_s",
)
CONFIG_FILE = "config.yaml"
CHANGES_FILE = "config_changes.jsonl"
LATEST_LINK = "latest"
# What a run (train, pretrain, iterate) writes at the top of its directory; --overwrite removes these and no more.
RUN_FILES = (CONFIG_FILE, CHANGES_FILE, "metrics.jsonl", "tensorboard", "checkpoints", "summary.json", "status.json",
             "status_address", "status_token", "iterations.json", "init", "samples")
_ITERATION = re.compile(r"iter-\d+$")


def holds_run(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a run's curve or checkpoints (or, for ``dsmath iterate``, its iterations)."""
    run_dir = Path(run_dir)
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists():
        return True
    return (run_dir / "iterations.json").exists() or any(_ITERATION.match(p.name) for p in _entries(run_dir))


def _entries(run_dir: Path) -> list[Path]:
    return list(run_dir.iterdir()) if run_dir.is_dir() else []


def claim_fresh(run_dir: str | Path, *, overwrite: bool) -> None:
    """Refuse (one line) a fresh run into a directory holding a run; with ``overwrite``, remove that run's files."""
    run_dir = Path(run_dir)
    if not holds_run(run_dir):
        return
    if not overwrite:
        raise UserError(f"{run_dir} already holds a run (metrics.jsonl or checkpoints/): pass --resume to continue "
                        "it, --overwrite to replace it, or choose another --run-dir")
    for path in _entries(run_dir):
        if path.name in RUN_FILES or _ITERATION.match(path.name):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def saved_config_path(run_dir: str | Path) -> Path:
    """``run_dir/config.yaml`` of a run to resume; a one-line UserError (creating nothing) when there is none."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        where = "no such directory" if not run_dir.exists() else f"no {CONFIG_FILE} in it"
        raise UserError(f"--resume: {run_dir} holds no run to resume ({where}); check --run-dir, or start a run "
                        "without --resume")
    return path


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def resume_changes(run_dir: str | Path, new_config: dict, mutable: tuple[str, ...] = MUTABLE_ON_RESUME) -> list[dict]:
    """The keys ``new_config`` (plain data, :func:`dsmath.config.to_dict`) changes against the run's saved config,
    as ``{"key", "old", "new"}``. A changed key not in ``mutable`` is a one-line UserError naming it. Keys only one
    side has (a setting added since the run was saved) are not changes."""
    try:
        saved = yaml.safe_load(saved_config_path(run_dir).read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"--resume: {Path(run_dir) / CONFIG_FILE} is unreadable ({type(exc).__name__})") from None
    old, new = _flatten(saved), _flatten(new_config)
    changes = []
    for key in sorted(old.keys() & new.keys()):
        if old[key] == new[key]:
            continue
        if not _may_change(key, mutable):
            raise UserError(f"--resume: {key} was {old[key]!r} in this run, not {new[key]!r}; a resumed run keeps "
                            f"its config (only {', '.join(mutable)} may change): start a new run to change it")
        changes.append({"key": key, "old": old[key], "new": new[key]})
    return changes


def _may_change(key: str, mutable: tuple[str, ...]) -> bool:
    return key in mutable or any(m.endswith(".*") and key.startswith(m[:-1]) for m in mutable)


def record_changes(run_dir: str | Path, changes: list[dict], from_step: int) -> None:
    """Append each change to ``run_dir/config_changes.jsonl`` with ``from_step``, the first step it applies to."""
    if not changes:
        return
    with open(Path(run_dir) / CHANGES_FILE, "a", encoding="utf-8") as fh:
        for change in changes:
            fh.write(json.dumps({**change, "from_step": from_step, "time": time.time()}) + "\n")


def finished_summary(run_dir: str | Path, steps: int) -> dict | None:
    """The run's ``summary.json`` when it records ``steps`` or more steps (a finished run); else None."""
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and int(summary.get("steps", -1)) >= steps else None


def link_latest(run_dir: str | Path) -> Path | None:
    """Point ``<parent of run_dir>/latest`` at ``run_dir`` (relative symlink, replaced atomically). A real file or
    directory already named ``latest`` is left alone (None is returned); so is a run directory named ``latest``."""
    run_dir = Path(run_dir).absolute()
    link = run_dir.parent / LATEST_LINK
    if run_dir.name == LATEST_LINK or (link.exists() and not link.is_symlink()):
        return None
    tmp = run_dir.parent / f".{LATEST_LINK}.{os.getpid()}.tmp"
    try:
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(run_dir.name, tmp)
        os.replace(tmp, link)
    except OSError:  # a filesystem without symlinks: the run itself is unaffected
        return None
    return link
