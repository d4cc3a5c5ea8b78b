"""One reading layer for the files users hand to dsmath: JSONL(.gz), JSON, Parquet, YAML, plain text.

Every way a file can be damaged ends as one :class:`FileError` line (a :class:`UserError`, exit 2 at the CLI)
naming the file and, where known, the 1-based line or the byte offset: a missing file, a directory, an
unreadable file, damaged or unexpected compression (truncated, corrupt, wrong magic, bz2/xz/zstd under a
``.gz`` name), bytes that are not UTF-8 (Latin-1, UTF-16, binary junk), a line longer than
:data:`MAX_LINE_BYTES`. Nothing here raises ``UnicodeDecodeError``, ``EOFError``, ``zlib.error``,
``OSError`` or ``pyarrow`` errors to a caller.

Line-level damage (a line that is not UTF-8 or too long) is a :class:`BadLine` the caller may skip and count;
stream-level damage (the compressed stream breaks) ends the file: :func:`iter_lines` raises
:class:`StreamError`, which says how many lines were read before the break, so ``--skip-bad`` callers can keep
those and count the rest of the file as one skipped entry. Outputs go through :func:`atomic_path`: written
under a temporary name in the same folder, renamed over the target only when complete.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import lzma
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from dsmath.errors import UserError

T = TypeVar("T")

MAX_LINE_BYTES = 64 * 1024 * 1024  # a longer "line" is junk (or a file without newlines), never a record

_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_BOMS = {b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16", b"\xef\xbb\xbf": "UTF-8 with BOM"}
# what a broken compressed stream raises (gzip: EOFError, zlib.error, BadGzipFile; bz2/lzma: OSError, EOFError,
# LZMAError); a plain-file read error (EIO) is an OSError too.
_STREAM_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, OSError, ValueError)


class FileError(UserError):
    """A user file that cannot be read: one line naming the file (and line or byte offset when known)."""


class StreamError(FileError):
    """The file's byte stream broke (damaged compression, an I/O error) after ``lines_read`` good lines."""

    def __init__(self, message: str, lines_read: int) -> None:
        super().__init__(message)
        self.lines_read = lines_read


@dataclass(frozen=True)
class BadLine:
    """A line that is not text: ``lineno`` is 1-based, ``why`` says what is wrong."""

    lineno: int
    why: str


def check_readable(path: str | Path, what: str = "file") -> Path:
    """``path`` as a Path when it is an existing, readable regular file; else a one-line :class:`FileError`."""
    path = Path(path)
    if not path.exists():
        raise FileError(f"{path}: no such file")
    if path.is_dir():
        raise FileError(f"{path}: is a directory, expected a {what}")
    if not os.access(path, os.R_OK):
        raise FileError(f"{path}: permission denied (not readable)")
    return path


def sniff_compression(path: Path) -> str | None:
    """``"gzip"``, ``"bz2"``, ``"xz"``, ``"zstd"`` from the file's first bytes, else None."""
    try:
        with path.open("rb") as fh:
            head = fh.read(6)
    except OSError as exc:
        raise FileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)


def open_binary(path: str | Path, what: str = "file"):
    """A binary stream of the file's content, decompressed by its magic bytes (gzip, bz2, xz).

    A ``.gz`` name whose bytes are not gzip, and zstd (no decoder in the standard library), are a
    :class:`FileError`. Truncation and corruption inside the stream surface while reading (see
    :func:`iter_lines`).
    """
    path = check_readable(path, what)
    kind = sniff_compression(path)
    if path.name.endswith(".gz") and kind != "gzip":
        found = f"{kind}-compressed" if kind else "not gzip-compressed (wrong magic bytes)"
        raise FileError(f"{path}: named .gz but {found}; recompress it with gzip or drop the .gz suffix")
    if kind == "zstd":
        raise FileError(f"{path}: zstd-compressed, which dsmath does not read; decompress it first (zstd -d)")
    opener = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}.get(kind or "", open)
    try:
        return opener(path, "rb")
    except OSError as exc:
        raise FileError(f"{path}: cannot open ({exc.strerror or exc})") from None


def _stream_message(path: Path, fh, kind: str | None, exc: BaseException, lineno: int) -> str:
    where = f"after line {lineno}" if lineno else "at the start"
    offset = ""
    raw = getattr(fh, "fileobj", None)  # gzip: the compressed file object, its position is the damage's
    with contextlib.suppress(Exception):
        offset = f", compressed byte {raw.tell()}" if raw is not None else f", byte {fh.tell()}"
    if isinstance(exc, EOFError):
        why = "truncated: the compressed stream ends early"
    elif kind and not isinstance(exc, PermissionError):
        why = f"damaged {kind} data ({type(exc).__name__}: {exc})"
    else:
        why = f"read error ({type(exc).__name__}: {exc})"
    return f"{path}: {why} {where}{offset}"


def iter_lines(path: str | Path, what: str = "file") -> Iterator[tuple[int, str | BadLine]]:
    """``(lineno, text)`` for each line (1-based, newline stripped), or ``(lineno, BadLine)`` for a line that
    is not UTF-8 or is longer than :data:`MAX_LINE_BYTES`.

    Raises :class:`FileError` for a file that cannot be opened, :class:`StreamError` when the byte stream
    breaks mid-file (lines already yielded stay valid). A UTF-16 file (BOM) is one :class:`FileError`: every
    line of it would be bad.
    """
    path = check_readable(path, what)
    kind = sniff_compression(path)
    fh = open_binary(path, what)
    lineno = 0
    with fh:
        while True:
            try:
                raw = fh.readline(MAX_LINE_BYTES + 1)
            except _STREAM_ERRORS as exc:
                raise StreamError(_stream_message(path, fh, kind, exc, lineno), lineno) from None
            if not raw:
                return
            lineno += 1
            if lineno == 1:
                bom = next((name for b, name in _BOMS.items() if raw.startswith(b)), None)
                if bom == "UTF-16":
                    raise FileError(f"{path}: UTF-16 encoded; dsmath reads UTF-8 (convert it: iconv -f UTF-16 -t UTF-8)")
                if bom:
                    raw = raw[3:]
            if len(raw) > MAX_LINE_BYTES:
                yield lineno, BadLine(lineno, f"line longer than {MAX_LINE_BYTES // 2**20} MiB")
                while raw and not raw.endswith(b"\n"):  # drop the rest of that line
                    try:
                        raw = fh.readline(MAX_LINE_BYTES)
                    except _STREAM_ERRORS as exc:
                        raise StreamError(_stream_message(path, fh, kind, exc, lineno), lineno) from None
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, BadLine(lineno, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
                continue
            if "\x00" in text:
                yield lineno, BadLine(lineno, "binary data (NUL bytes)")
                continue
            yield lineno, text.rstrip("\r\n")


def read_bytes(path: str | Path, what: str = "file") -> bytes:
    """The whole (decompressed) content; :class:`FileError` on any damage."""
    path = check_readable(path, what)
    kind = sniff_compression(path)
    fh = open_binary(path, what)
    with fh:
        try:
            return fh.read()
        except _STREAM_ERRORS as exc:
            raise FileError(_stream_message(path, fh, kind, exc, 0)) from None


def read_text(path: str | Path, what: str = "file") -> str:
    """The whole file as UTF-8 text (a UTF-8 BOM is dropped); :class:`FileError` naming the byte offset of the
    first byte that is not UTF-8, and for NUL bytes (binary data)."""
    path = Path(path)
    data = read_bytes(path, what)
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise FileError(f"{path}: UTF-16 encoded; dsmath reads UTF-8 (convert it: iconv -f UTF-16 -t UTF-8)")
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise FileError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at byte offset {exc.start})") from None
    if "\x00" in text:
        raise FileError(f"{path}: binary data (NUL bytes), not a text file")
    return text


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """The file's one JSON value; :class:`FileError` naming the line and column of a syntax error."""
    path = Path(path)
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise FileError(f"{path}: JSON nested too deeply") from None


def read_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """The file's YAML document (``safe_load``); :class:`FileError` naming the line of a syntax error."""
    import yaml

    path = Path(path)
    text = read_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FileError(f"{path}{where}: not valid YAML ({first})") from None
    except RecursionError:
        raise FileError(f"{path}: YAML nested too deeply") from None


def parquet_file(path: str | Path, what: str = "Parquet file"):
    """A ``pyarrow.parquet.ParquetFile`` whose footer has been read; :class:`FileError` when the file is not
    Parquet or is damaged (``iter_parquet_rows`` catches damage inside row groups)."""
    import pyarrow.parquet as pq

    path = check_readable(path, what)
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # ArrowInvalid, OSError, ...: pyarrow's errors have no common base worth naming
        raise FileError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None


def iter_parquet_rows(path: str | Path, *, start: int = 0, what: str = "Parquet file") -> Iterator[tuple[int, dict]]:
    """``(row index, row dict)`` from row ``start`` on, row group by row group; :class:`StreamError` naming the
    row group when one cannot be decoded."""
    path = Path(path)
    pf = parquet_file(path, what)
    first = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if first + n <= start:  # whole row group before the saved position: not even read
            first += n
            continue
        try:
            rows = pf.read_row_group(rg).to_pylist()
        except Exception as exc:
            raise StreamError(f"{path}: row group {rg} (rows {first}-{first + n - 1}) is damaged "
                              f"({_first_line(exc)})", first) from None
        for j, obj in enumerate(rows):
            if first + j >= start:
                yield first + j, obj
        first += n


def until_broken(items: Iterator[T], on_break: Callable[[StreamError], T | None]) -> Iterator[T]:
    """``items`` until its stream breaks: a :class:`StreamError` calls ``on_break(exc)`` and ends the iteration.

    ``on_break`` may raise (no ``--skip-bad``), record the break and return ``None``, or return one last item to
    yield (e.g. a "rest of the file unreadable" entry). Everything read before the break has been yielded.
    """
    try:
        yield from items
    except StreamError as exc:
        last = on_break(exc)
        if last is not None:
            yield last


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends without an
    error, deleted when it raises. Readers never see a half-written ``path``."""
    path = Path(path)
    if path.is_dir():
        raise FileError(f"{path}: is a directory, expected an output file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
