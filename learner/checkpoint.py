"""Atomic checkpoint directories, the ``latest`` pointer, and RNG state capture.

A checkpoint is written into ``<path>.tmp-XXXX`` next to its final place, every file is fsynced,
and only then is the directory renamed to ``<path>`` (``os.replace``, atomic on POSIX). A crash at
any moment leaves either the previous checkpoint or the new one — never a half-written ``<path>``.
``<parent>/latest`` names the newest complete checkpoint and is itself replaced atomically.

Every checkpoint proves itself: ``manifest.json``, written last (atomically, after every other file is fsynced and
before the rename), lists each file's size and sha256. :func:`verify` re-reads a checkpoint against it;
:func:`pick_intact` picks the newest checkpoint that verifies, saying in one line which newer ones are damaged;
:func:`prune` keeps the newest ``keep`` after a new one is published. With a storage URI (:mod:`dsmath.storage`),
:func:`upload` copies a published checkpoint there (manifest last) and prunes it alike; :func:`download_newest`
brings back the newest one that verifies. What is guaranteed: a checkpoint that
verifies holds, byte for byte, what the save wrote. What is not: that the save itself was correct, or that a
checkpoint without a manifest (saved before manifests existed) is sound — it is refused as damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
import torch

from dsmath import storage
from dsmath.errors import UserError
from dsmath.model_folder import LATEST
from dsmath.records import ModelFiles, check_schema

MANIFEST = "manifest.json"
_CHUNK = 8 << 20  # bytes read per hashing call
_NOT_CHECKPOINTS = (".tmp-", ".old-")  # a save in progress, or a re-saved step's previous copy


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
    write_manifest(tmp_dir)
    _swap_in(tmp_dir, final)


def _swap_in(tmp_dir: Path, final: Path) -> None:
    """Rename the durable ``tmp_dir`` to ``final`` (a folder already there is moved aside, then removed) and point
    ``latest`` at it."""
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp_dir, final)
    _fsync_dir(final.parent)
    write_text_atomic(final.parent / LATEST, final.name + "\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt_dir: Path) -> dict:
    """``ckpt_dir/manifest.json``: every other file's size and sha256 (call after the files are durable)."""
    files = {}
    for path in sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(ckpt_dir).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": 1, "hash": "sha256", "written_at": time.time(), "files": files}
    write_text_atomic(ckpt_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def verify(ckpt_dir: Path, checksums: bool = True) -> str | None:
    """None when ``ckpt_dir`` matches its manifest (every listed file present, same size, same sha256); else the
    first problem found, in a few words naming the file. Files not in the manifest are ignored. ``checksums``
    False: sizes only (a missing or truncated file is found, a flipped bit is not)."""
    try:
        manifest = json.loads((ckpt_dir / MANIFEST).read_bytes())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for rel, want in sorted(files.items()):  # sizes first: a truncated file is found without hashing anything
        path = ckpt_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != want["size"]:
            return f"{rel} is {path.stat().st_size} bytes, {want['size']} were saved"
    for rel, want in sorted(files.items()) if checksums else []:
        if _sha256(ckpt_dir / rel) != want["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def _step_of(path: Path) -> int:
    match = re.search(r"(\d+)$", path.name)
    return int(match.group(1)) if match else -1


def checkpoints(root: Path) -> list[Path]:
    """The checkpoint directories under ``root``, newest (highest trailing step number) first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not any(m in p.name for m in _NOT_CHECKPOINTS)]
    return sorted(found, key=lambda p: (_step_of(p), p.name), reverse=True)


def read_latest(root: Path) -> str | None:
    """The name in ``root/latest`` when it is one readable line naming a directory under ``root``; else None."""
    try:
        name = (root / LATEST).read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not name or "/" in name or not (root / name).is_dir():
        return None
    return name


def is_checkpoint_root(path: Path) -> bool:
    """True for a folder of checkpoints (a ``latest`` file, or checkpoint subfolders), not a checkpoint itself."""
    if (path / MANIFEST).exists() or (path / "trainer_state.json").exists():
        return False
    return (path / LATEST).exists() or any((p / MANIFEST).exists() for p in checkpoints(path))


def pick_intact(root: Path, log: Callable[[str], None] = print) -> Path:
    """The newest checkpoint under ``root`` that :func:`verify` accepts. Damaged newer ones (and an unreadable or
    dangling ``latest``) are said in one line; none intact is a one-line :class:`UserError`."""
    root = Path(root)
    damaged = []
    if (root / LATEST).exists() and read_latest(root) is None:
        damaged.append(f"{LATEST} is unreadable or names no checkpoint")
    for candidate in checkpoints(root):
        reason = verify(candidate)
        if reason is None:
            if damaged:
                log(f"checkpoints: {'; '.join(damaged)}: resuming from {candidate.name}, the newest intact one")
            return candidate
        damaged.append(f"{candidate.name} is damaged ({reason})")
    raise UserError(f"no intact checkpoint under {root}" + (f": {'; '.join(damaged)}" if damaged else "")
                    + " (start the run again without --resume)")


def _doomed(found: list[Path], keep: int, current: str) -> list[Path]:
    """Of ``found`` (checkpoints, newest first), those :func:`prune` deletes after ``current`` was published."""
    if keep <= 0:
        return []
    step = _step_of(Path(current))
    newer = [p for p in found if _step_of(p) > step]
    older = [p for p in found if _step_of(p) <= step and p.name != current]
    return newer + older[max(0, keep - 1):]


def prune(root: Path, keep: int, current: Path) -> list[Path]:
    """After ``current`` was published: delete checkpoints newer than it (an abandoned or damaged future) and all
    but the newest ``keep`` (``current`` included) older ones. ``keep`` <= 0 keeps everything. Returns the deleted."""
    doomed = _doomed(checkpoints(root), keep, current.name)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# ------------------------------------------------------------------------------------------------ storage URIs


def _stored(root_uri: str) -> list[Path]:
    """The checkpoint folders under a storage URI as :func:`checkpoints` orders them (names only; newest first)."""
    names = [n for n in storage.list_dirs(root_uri) if not any(m in n for m in _NOT_CHECKPOINTS)]
    return sorted((Path(n) for n in names), key=lambda p: (_step_of(p), p.name), reverse=True)


def upload(ckpt_dir: Path, root_uri: str, keep: int) -> list[str]:
    """Copy the published checkpoint ``ckpt_dir`` to ``root_uri/<its name>`` with its manifest last (a copy cut
    short has no manifest there, and :func:`download_newest` passes over it), then prune ``root_uri`` as
    :func:`prune` prunes a local folder. A same-named copy already there (from an abandoned future) is removed
    first. Returns the names pruned from storage. Call it where ``ckpt_dir`` is (learner rank 0's node)."""
    ckpt_dir = Path(ckpt_dir)
    dest = storage.join(root_uri, ckpt_dir.name)
    storage.remove_dir(dest)
    storage.upload_dir(ckpt_dir, dest, last=[MANIFEST])
    doomed = _doomed(_stored(root_uri), keep, ckpt_dir.name)
    for path in doomed:
        storage.remove_dir(storage.join(root_uri, path.name))
    return [p.name for p in doomed]


def download_newest(root_uri: str, root: Path, log: Callable[[str], None] = print) -> Path:
    """Download the newest checkpoint under ``root_uri`` that verifies into ``root/<its name>`` (through a
    ``.tmp-`` folder, renamed when it verified) and return it. Copies without a manifest (an upload cut short) are
    passed over without downloading; one that fails :func:`verify` after download is said in one line and the
    next older tried. None intact is a one-line :class:`UserError`."""
    passed = []
    for name in (p.name for p in _stored(root_uri)):
        reason = _download(root_uri, name, Path(root))
        if reason is None:
            if passed:
                log(f"storage {root_uri}: {'; '.join(passed)}: took {name}, the newest intact one")
            return Path(root) / name
        passed.append(f"{name} is {reason}")
    raise UserError(f"no intact checkpoint in storage {root_uri}" + (f": {'; '.join(passed)}" if passed else ""))


def fetch(ckpt_dir: Path, root_uri: str) -> bool:
    """Make sure checkpoint ``ckpt_dir`` is on this machine: when no copy whose files have the manifest's sizes is
    there, download ``root_uri/<its name>`` (verified) into its place. Returns whether it downloaded; a stored copy
    that is missing or fails :func:`verify` is a one-line :class:`UserError`. Not safe for two processes fetching
    the same checkpoint on one machine at once (call it rank after rank)."""
    ckpt_dir = Path(ckpt_dir)
    if verify(ckpt_dir, checksums=False) is None:
        return False
    reason = _download(root_uri, ckpt_dir.name, ckpt_dir.parent)
    if reason is not None:
        raise UserError(f"{ckpt_dir} is not on this machine and its copy in storage {root_uri} is {reason}")
    return True


def _download(root_uri: str, name: str, root: Path) -> str | None:
    """Download ``root_uri/name`` into ``root/name`` through a ``.tmp-`` folder that is renamed only once it
    verifies (``latest`` then names it). None when done; else why not, in a few words (nothing is left behind)."""
    src = storage.join(root_uri, name)
    if not storage.exists(storage.join(src, MANIFEST)):
        return f"incomplete (no {MANIFEST})"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        storage.download_dir(src, tmp)
        reason = verify(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if reason is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        return f"damaged ({reason})"
    fsync_tree(tmp)
    _swap_in(tmp, root / name)
    return None


def checkpoint_files(ckpt_dir: Path) -> ModelFiles:
    """Every file of the published checkpoint ``ckpt_dir`` (its manifest included), names relative to it: what
    :func:`write_checkpoint_files` puts back on another node. Read into memory whole."""
    ckpt_dir = Path(ckpt_dir)
    if verify(ckpt_dir, checksums=False) is not None:
        raise UserError(f"checkpoint {ckpt_dir}: {verify(ckpt_dir, checksums=False)}")
    files = tuple((p.relative_to(ckpt_dir).as_posix(), p.read_bytes())
                  for p in sorted(ckpt_dir.rglob("*")) if p.is_file())
    return ModelFiles(files=files, source=str(ckpt_dir))


def write_checkpoint_files(bundle: ModelFiles, final: Path) -> Path:
    """Put checkpoint ``bundle`` (:func:`checkpoint_files`) at ``final`` as a save would: into a ``.tmp-`` folder
    beside it, verified against its own manifest, then renamed into place with ``latest`` pointing at it. A file
    name that would leave the folder, or a bundle that does not verify, is refused and nothing is published."""
    check_schema(bundle)
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-home-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name, data in bundle.files:
            rel = PurePosixPath(name)
            if rel.is_absolute() or not rel.parts or any(part in ("", ".", "..") for part in rel.parts):
                raise ValueError(f"checkpoint file name {name!r} leaves the checkpoint folder")
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        problem = verify(tmp)
        if problem is not None:
            raise UserError(f"checkpoint {final.name} from {bundle.source}: {problem}")
        fsync_tree(tmp)
        _swap_in(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


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
