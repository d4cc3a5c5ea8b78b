"""Atomic checkpoint directories, the ``latest`` pointer, and RNG state capture.

A checkpoint is written into ``<path>.tmp-XXXX`` next to its final place, every file is fsynced,
and only then is the directory renamed to ``<path>`` (``os.replace``, atomic on POSIX). A crash at
any moment leaves either the previous checkpoint or the new one — never a half-written ``<path>``.
``<parent>/latest`` names the newest complete checkpoint and is itself replaced atomically.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from dsmath.model_folder import LATEST


def fsync_tree(root: Path) -> None:
    """fsync every file, then every directory (so the directory entries are durable too)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp_dir: Path, final: Path) -> None:
    """Make ``tmp_dir`` the checkpoint at ``final`` and point ``final.parent/latest`` at it.

    If ``final`` already exists (a re-save of the same step), the old one is moved aside first and
    removed only after the new one is in place.
    """
    fsync_tree(tmp_dir)
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp_dir, final)
    _fsync_dir(final.parent)
    write_text_atomic(final.parent / LATEST, final.name + "\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
