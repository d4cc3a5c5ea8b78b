"""Where a model is on disk: an HF model folder, a dsmath checkpoint, or a run's ``checkpoints/`` folder whose
``latest`` file names its newest checkpoint. One check, one error line, for every command and layer."""

from __future__ import annotations

from pathlib import Path

from dsmath.errors import UserError

LATEST = "latest"


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a folder whose ``latest`` file names one (then that one)."""
    path = Path(path)
    pointer = path / LATEST
    if pointer.is_file():
        return path / pointer.read_text().strip()
    return path


def model_folder(path: str | Path, what: str, hint: str = "") -> Path:
    """``path`` resolved (``~`` expanded, ``latest`` followed) when it holds a model's ``config.json``; else a
    one-line UserError naming ``what`` (e.g. ``"--model runs/x"``) and ending with ``hint``."""
    resolved = resolve(Path(path).expanduser())
    if not (resolved / "config.json").is_file():
        raise UserError(f"{what}: not a model folder or checkpoint (no config.json){hint}")
    return resolved
