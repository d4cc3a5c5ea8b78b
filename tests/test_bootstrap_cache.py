"""The bootstrap cache: one entry per settings key, reused when the settings match, and ``latest`` naming the
entry the last run built or reused (README's `dsmath eval --model ~/.cache/dsmath/latest/model`)."""

from __future__ import annotations

import os
from pathlib import Path

from dsmath.config import load_config
from tiny_loop import TINY_LOOP
from wiring.bootstrap import ensure_bootstrap

SMALL = TINY_LOOP + ["bootstrap.num_train_problems=120", "bootstrap.num_sft_problems=60",
                     "bootstrap.num_heldout_problems=8", "bootstrap.sft_steps=2"]


def _build(cache: Path, *extra: str):
    cfg = load_config("tiny_cpu", SMALL + [f"bootstrap.data_dir={cache}", *extra])
    said: list[str] = []
    return ensure_bootstrap(cfg.bootstrap, cfg.model, log=said.append), said


def test_latest_names_the_entry_the_last_run_built_or_reused(tmp_path: Path) -> None:
    a, said = _build(tmp_path)
    latest = tmp_path / "latest"
    assert latest.is_symlink() and os.readlink(latest) == a.root.name  # relative: the cache folder can move
    assert (latest / "model" / "config.json").exists() and (latest / "heldout.jsonl").exists()
    b, _ = _build(tmp_path, "bootstrap.sft_steps=3")  # another key: another entry, and latest follows it
    assert b.root != a.root and os.readlink(latest) == b.root.name
    again, said = _build(tmp_path)  # the first settings again: reused, not rebuilt, and latest points back
    assert again.root == a.root and said == [f"bootstrap: reusing {a.root}"]
    assert os.readlink(latest) == a.root.name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.root.name, b.root.name, "latest"])
