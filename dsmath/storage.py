"""Folders to and from a storage URI: any filesystem pyarrow opens (``file:///…``, ``s3://bucket/prefix``,
``gs://…``, ``hdfs://…``), as Ray Train's ``storage_path`` — so that a run's checkpoints and files outlive the
node that wrote them, and a cluster without a shared filesystem can resume a run.

- :func:`upload_dir` copies a local folder's files to a URI, the files named in ``last`` after all the others.
- :func:`download_dir` copies everything under a URI into a local folder.
- :func:`list_dirs` names the folders directly under a URI; :func:`exists` says whether a file is there;
  :func:`remove_dir` deletes a URI's folder and all under it.

Guaranteed: a file named in ``last`` is written only after every other file of the same upload was written
completely (each copy returned), so a reader that finds it knows the upload finished — a checkpoint uploaded with
its manifest last is never complete-looking while half-uploaded (:mod:`learner.checkpoint` verifies it after
download). Not guaranteed: atomicity of one file's copy on every filesystem (object stores write an object whole; a
local or HDFS copy cut short leaves a short file, which a checksum catches), that two uploads to the same URI at
once do not interleave, or that a folder removed by :func:`remove_dir` disappears all at once (a reader listing
it meanwhile may see some of its files). Base layer: pyarrow only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from dsmath.errors import UserError


def open_uri(uri: str, key: str = "storage"):
    """``(filesystem, path)`` for ``uri``; a URI pyarrow cannot open is a one-line :class:`UserError` naming
    ``key`` (the config key that holds it). May contact the store (an S3 bucket's region, credentials)."""
    import pyarrow
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (pyarrow.ArrowException, OSError, ValueError) as exc:
        raise UserError(f"{key}={uri!r}: not a storage URI pyarrow can open ({exc}); use e.g. "
                        "file:///abs/path or s3://bucket/prefix") from None


def join(uri: str, *parts: str) -> str:
    """``uri/part/…`` (one slash between parts; ``uri`` may end with one)."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def _local_files(local: Path, names: Iterable[str] | None) -> list[str]:
    """Files under ``local`` as sorted relative POSIX paths; with ``names``, only under those top-level entries."""
    tops = [local / n for n in names] if names is not None else [local]
    found: list[str] = []
    for top in tops:
        if top.is_file():
            found.append(top.relative_to(local).as_posix())
        elif top.is_dir():
            found += [p.relative_to(local).as_posix() for p in top.rglob("*") if p.is_file()]
    return sorted(found)


def upload_dir(local: str | Path, uri: str, *, last: Iterable[str] = (), names: Iterable[str] | None = None,
               changed_only: bool = False) -> int:
    """Copy the files under ``local`` to ``uri`` (same relative paths; a file already there is overwritten, one
    that is not in ``local`` is left as it is). ``names``: only these top-level files and folders of ``local``.
    ``last``: relative paths copied after every other file (a checkpoint's manifest), in the order given.
    ``changed_only``: skip a file this process already copied to the same place and that has not changed since:
    same size and modification time (the quick check rsync makes; not a content check). A run's per-step sample
    files are then copied once, while a rewritten ``summary.json`` of the same size is copied again. Another
    process (a resumed run) copies everything once.
    Returns the number of files copied. A file that does not exist locally (nor in ``last``) is skipped."""
    import pyarrow.fs as pafs

    local = Path(local)
    fs, root = open_uri(uri)
    last = [rel for rel in last if (local / rel).is_file()]
    files = [rel for rel in _local_files(local, names) if rel not in last] + last
    stamps = {}
    for rel in files:
        st = (local / rel).stat()
        stamps[rel] = (st.st_size, st.st_mtime_ns)  # taken before the copy: a write during it is copied next time
    where = f"{uri.rstrip('/')}/"
    if changed_only:
        files = [rel for rel in files if _COPIED.get(where + rel) != stamps[rel]]
    made: set[str] = set()
    for rel in files:
        dest = f"{root.rstrip('/')}/{rel}"
        parent = dest.rsplit("/", 1)[0]
        if parent not in made:
            fs.create_dir(parent, recursive=True)
            made.add(parent)
        pafs.copy_files(str(local / rel), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        _COPIED[where + rel] = stamps[rel]
    return len(files)


# What this process copied where: destination -> (size, mtime_ns) of the local file when it was copied.
_COPIED: dict[str, tuple[int, int]] = {}


def download_dir(uri: str, local: str | Path) -> int:
    """Copy every file under ``uri`` into ``local`` (created; same relative paths; files already there are
    overwritten). Returns the number of files copied; a ``uri`` that does not exist is a :class:`UserError`.
    Nothing is verified here: a checkpoint's caller checks it against its manifest."""
    import pyarrow.fs as pafs

    fs, root = open_uri(uri)
    root = root.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    files = [i.path for i in infos if i.type == pafs.FileType.File]
    if not files and fs.get_file_info(root).type != pafs.FileType.Directory:
        raise UserError(f"{uri}: nothing there to download")
    local = Path(local)
    for src in files:
        rel = src[len(root):].lstrip("/")
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(src, str(local / rel), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return len(files)


def list_dirs(uri: str) -> list[str]:
    """The names of the folders directly under ``uri``, sorted; [] when ``uri`` does not exist. (On an object
    store a "folder" is a common prefix: it exists while some object is under it.)"""
    import pyarrow.fs as pafs

    fs, root = open_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(root.rstrip("/"), allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def exists(uri: str) -> bool:
    """True when a file is at ``uri``."""
    import pyarrow.fs as pafs

    fs, path = open_uri(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def remove_dir(uri: str) -> None:
    """Delete the folder at ``uri`` and everything under it; nothing there is not an error."""
    import pyarrow.fs as pafs

    fs, root = open_uri(uri)
    if fs.get_file_info(root).type != pafs.FileType.NotFound:
        fs.delete_dir(root)
