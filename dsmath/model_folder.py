"""Where a model is on disk: an HF model folder, a dsmath checkpoint, or a run's ``checkpoints/`` folder whose
``latest`` file names its newest checkpoint. One check, one error line, for every command and layer."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dsmath.errors import UserError
from dsmath.records import ModelFiles, check_schema

LATEST = "latest"


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a folder whose ``latest`` file names one (then that one)."""
    path = Path(path)
    pointer = path / LATEST
    if pointer.is_file():
        return path / pointer.read_text().strip()
    return path


def has_model_folder(path: str | Path) -> bool:
    """Whether ``path`` (``~`` expanded, ``latest`` followed) holds a model's ``config.json`` on this machine."""
    return (resolve(Path(path).expanduser()) / "config.json").is_file()


def model_folder(path: str | Path, what: str, hint: str = "") -> Path:
    """``path`` resolved (``~`` expanded, ``latest`` followed) when it holds a model's ``config.json``; else a
    one-line UserError naming ``what`` (e.g. ``"--model runs/x"``) and ending with ``hint``."""
    if not has_model_folder(path):
        raise UserError(f"{what}: not a model folder or checkpoint (no config.json){hint}")
    return resolve(Path(path).expanduser())


# Weight files (and their shard indexes) stay behind: the receiver's weights come from the learner.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
MAX_MODEL_FILES_BYTES = 256 * 2**20


def model_files(path: str | Path, *, weights: bool = False) -> ModelFiles:
    """The top-level files of model folder ``path``: without its weights (config, tokenizer, generation config), or
    with them (``weights=True``: the whole model, for a node that has no copy of it).

    Guaranteed: every regular top-level file (not ending in one of ``WEIGHT_SUFFIXES`` unless ``weights``), in
    name order. Not included: sub-folders (a checkpoint's optimizer state). Without weights, over
    ``MAX_MODEL_FILES_BYTES`` in all is a one-line UserError (a folder that holds more than a model's small files).
    """
    folder = model_folder(path, "model.path")
    files, total = [], 0
    for f in sorted(folder.iterdir()):
        if not f.is_file() or (f.name.endswith(WEIGHT_SUFFIXES) and not weights):
            continue
        data = f.read_bytes()
        total += len(data)
        if total > MAX_MODEL_FILES_BYTES and not weights:
            raise UserError(f"model.path {folder}: its non-weight files pass {MAX_MODEL_FILES_BYTES >> 20} MiB "
                            f"(at {f.name}); keep only the config and tokenizer files beside the weights")
        files.append((f.name, data))
    return ModelFiles(files=tuple(files), source=str(folder))


def write_model_files(bundle: ModelFiles, dest: str | Path) -> Path:
    """Write ``bundle`` into folder ``dest`` (created); returns it. Names are checked to stay inside ``dest``."""
    check_schema(bundle)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in bundle.files:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"model file name {name!r} is not a plain file name")
        (dest / name).write_bytes(data)
    return dest


# Model files an actor writes because its node has no copy (``rollout.weights_from=learner``; a learner rank or a
# reward worker on a node without the folder: the whole model, weights included) go to a scratch folder named
# ``dsmath-scratch-<ns>-<pid>-<role>-*`` in the node's temp dir, ``ns`` naming the pid namespace of the process.
SCRATCH_PREFIX = "dsmath-scratch-"


def scratch_folder(role: str) -> Path:
    """A fresh, empty folder in this node's temp dir for the model files this process writes as ``role``.

    Guaranteed: the folder is removed when this process exits normally, or by :func:`remove_scratch_folder`. Ray
    ends actors with ``ray.kill`` without running exit handlers, so the folders of processes that are gone are
    removed too: every call first sweeps the ones this node's dead processes left (:func:`sweep_scratch_folders`).
    A folder is never removed while the process that made it is alive. Not guaranteed: a folder left by a killed
    process stays until the next call (or sweep) on the same node.
    """
    import atexit
    import os
    import tempfile

    sweep_scratch_folders()
    folder = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{_pid_namespace()}-{os.getpid()}-{role}-"))
    atexit.register(remove_scratch_folder, folder)
    return folder


def remove_scratch_folder(folder: str | Path | None) -> None:
    """Remove ``folder`` (a :func:`scratch_folder`) and all it holds; nothing when it is None or already gone."""
    import shutil

    if folder:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def temp_files_in(folder: str | Path) -> Iterator[None]:
    """Within the block, temporary files go to ``folder`` (a :func:`scratch_folder`, so they go with it): those this
    process makes through ``tempfile``, and those of child processes started in the block (``TMPDIR``). The temp dir
    and ``TMPDIR`` before the block are restored after it.

    For libraries that leave a temporary file behind: vLLM's engine makes its rendezvous file (``vllm_dist_*``) in
    the temp dir, in this process or in the engine-core process it starts, and never removes it. Caches are not
    affected: vLLM points the compile caches at its own cache folder (``~/.cache/vllm``). Not guaranteed: a file made
    after the block, or by another thread during it, goes where that moment's temp dir says."""
    import os
    import tempfile

    previous, previous_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = previous
        if previous_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous_env


def sweep_scratch_folders() -> int:
    """Remove the scratch folders in this node's temp dir whose process (same pid namespace) is gone; returns how
    many. Folders of other pid namespaces (another container sharing the temp dir) are left alone."""
    import os
    import tempfile

    mine = f"{SCRATCH_PREFIX}{_pid_namespace()}-"
    removed = 0
    for path in Path(tempfile.gettempdir()).glob(f"{mine}*"):
        pid = path.name[len(mine):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            remove_scratch_folder(path)
            removed += 1
    return removed


def _pid_namespace() -> str:
    """This process's pid namespace as a short token (its inode on Linux; the host name elsewhere)."""
    import os
    import re
    import socket

    try:
        return re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))  # 'pid:[4026531836]' -> '4026531836'
    except OSError:
        return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def pad_token_id(folder: str | Path) -> int | None:
    """The pad token id transformers' ``AutoTokenizer`` gives for model folder ``folder``, read from its
    ``tokenizer_config.json`` (or ``special_tokens_map.json``) and ``tokenizer.json`` without importing
    transformers (about 2 CPU-seconds in a process that needs nothing else of it, such as the driver).

    Guaranteed equal to ``AutoTokenizer.from_pretrained(folder).pad_token_id``: a folder this reader does not
    settle (no ``tokenizer.json``, no pad token named, a pad token outside the vocabulary) is answered by
    ``AutoTokenizer`` itself.
    """
    import json

    folder = Path(folder)
    pad = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the first file that names the key decides
        path = folder / name
        named = json.loads(path.read_text()) if path.is_file() else {}
        if "pad_token" in named:
            pad = named["pad_token"]
            break
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if isinstance(pad, str) and (folder / "tokenizer.json").is_file():
        spec = json.loads((folder / "tokenizer.json").read_text())
        for added in spec.get("added_tokens") or []:
            if added.get("content") == pad:
                return int(added["id"])
        vocab = (spec.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and pad in vocab:
            return int(vocab[pad])
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).pad_token_id
