"""Where a model is on disk: an HF model folder, a dsmath checkpoint, or a run's ``checkpoints/`` folder whose
``latest`` file names its newest checkpoint. One check, one error line, for every command and layer."""

from __future__ import annotations

from pathlib import Path

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
