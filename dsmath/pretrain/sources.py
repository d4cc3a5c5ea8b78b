"""Streaming document sources for pre-training: JSONL(.gz), Parquet and JSON shards with a text field.

A *source* is an ordered list of shard files. :func:`iter_records` walks one file record by record
(JSONL line by line, Parquet batch by batch, so memory does not grow with the shard); a ``.json``
file (a list of records or an ``{id: record}`` mapping, e.g. a benchmark's ground truth) is loaded
whole, so keep big corpora in JSONL or Parquet. The corpus pipeline's output
(``OUT/corpus/*.parquet`` with a ``text`` column) is read as is.

:class:`TokenStream` turns a source into an endless token stream (documents in file order, each
followed by EOS, the files repeated epoch after epoch). Its position — epoch, file, record, token
offset inside the current document — is a small JSON-able dict, so a resumed stream continues
exactly where the saved one stopped: the resumed stream re-reads the file up to the saved record
(cost linear in the shard, memory constant).

Guaranteed: a malformed record raises :class:`dsmath.datasets.DataError` naming ``file:line``
unless ``skip_bad`` is set, in which case it is counted in :attr:`TokenStream.skipped`; a record
with no text is skipped and counted, never silently dropped.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from dsmath.datasets import DataError
from dsmath.errors import UserError
from dsmath.userfiles import BadLine, iter_lines, iter_parquet_rows, read_json, until_broken

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".json")
# With no explicit text fields: the first of these that a record has is its text ...
AUTO_TEXT_FIELDS = ("text", "content", "articleBody", "raw_content")
# ... else these, joined with a blank line (question/answer dumps such as Stack Exchange).
AUTO_PAIR_FIELDS = (("input", "output"), ("question", "answer"), ("problem", "solution"))


def expand_paths(patterns: Sequence[str], *, base_dir: str | Path | None = None) -> list[Path]:
    """Files named by ``patterns`` (files, folders or globs), sorted within each pattern.

    A folder contributes its ``*.jsonl``, ``*.jsonl.gz``, ``*.parquet`` and ``*.json`` files.
    Relative patterns are taken from ``base_dir`` (default: the working directory). A pattern
    matching nothing is a :class:`UserError`.
    """
    out: list[Path] = []
    for pattern in patterns:
        p = Path(pattern).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = Path(base_dir) / p
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(SUFFIXES))
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(str(p)) if Path(f).is_file())
        if not found:
            raise UserError(f"{pattern}: no such file, or no .jsonl/.parquet/.json files there")
        for f in found:
            if not f.name.endswith(SUFFIXES):
                raise UserError(f"{f}: unknown shard format (expected .jsonl, .jsonl.gz, .parquet or .json)")
        out.extend(found)
    return out


def record_text(obj: dict, text_fields: Sequence[str] = ()) -> str | None:
    """The document text of one record, or None when it has none.

    ``text_fields`` given: the string fields among them, joined by a blank line. Empty: the first of
    :data:`AUTO_TEXT_FIELDS`, else a question/answer pair from :data:`AUTO_PAIR_FIELDS`.
    """
    if text_fields:
        parts = [obj[k] for k in text_fields if isinstance(obj.get(k), str) and obj[k].strip()]
        return "\n\n".join(parts) if parts else None
    for k in AUTO_TEXT_FIELDS:
        if isinstance(obj.get(k), str) and obj[k].strip():
            return obj[k]
    for pair in AUTO_PAIR_FIELDS:
        parts = [obj[k] for k in pair if isinstance(obj.get(k), str) and obj[k].strip()]
        if parts:
            return "\n\n".join(parts)
    return None


def iter_records(path: Path, *, start: int = 0) -> Iterator[tuple[int, dict | str]]:
    """``(index, record)`` pairs of one shard from record ``start`` on.

    ``index`` is the 0-based line (JSONL), row (Parquet) or element (JSON) number. A record that
    is not a JSON object (or a line that is not UTF-8) is yielded as a string saying why, so the caller
    decides to raise or count; so is a compressed stream or Parquet row group that breaks mid-file (then
    the shard ends there). A shard that cannot be opened at all is a one-line :class:`FileError`.
    """
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from _jsonl_records(path, start)
    elif name.endswith(".parquet"):
        yield from until_broken(iter_parquet_rows(path, start=start, what="shard"), _rest_unreadable(start))
    elif name.endswith(".json"):
        data = read_json(path, "shard")
        items = list(data.values()) if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON list of records or an {{id: record}} mapping")
        for i, obj in enumerate(items):
            if i >= start:
                yield i, obj if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"
    else:
        raise UserError(f"{path}: unknown shard format")


def _rest_unreadable(start: int):
    """The shard's last entry when its stream breaks: the rest of it, as one bad record."""
    return lambda exc: (max(exc.lines_read, start), f"rest of the shard unreadable: {exc}")


def _jsonl_records(path: Path, start: int) -> Iterator[tuple[int, dict | str]]:
    broke: list = []  # the StreamError that ended the file, if one did
    for lineno, line in until_broken(iter_lines(path, "shard"), broke.append):
        i = lineno - 1
        if i < start:
            continue  # skipping to a saved position parses nothing
        if isinstance(line, BadLine):
            yield i, line.why
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield i, f"not valid JSON: {exc.msg} at column {exc.colno}"
            continue
        except RecursionError:
            yield i, "not valid JSON: nested too deeply"
            continue
        yield i, obj if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"
    if broke:
        yield _rest_unreadable(start)(broke[0])


@dataclass
class SkipCounts:
    """Records a source did not train on, by reason; ``examples`` keeps the first few ``file:line: why``."""

    bad: int = 0
    no_text: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, where: str, why: str, *, bad: bool) -> None:
        if bad:
            self.bad += 1
        else:
            self.no_text += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {why}")


def iter_documents(files: Sequence[Path], *, text_fields: Sequence[str] = (), skip_bad: bool = False,
                   skipped: SkipCounts | None = None, max_docs: int = 0) -> Iterator[str]:
    """Every document text of ``files`` once, in order (at most ``max_docs`` when > 0)."""
    skipped = skipped if skipped is not None else SkipCounts()
    n = 0
    for f in files:
        for i, obj in iter_records(f):
            text = _text_or_skip(f, i, obj, text_fields, skip_bad, skipped)
            if text is None:
                continue
            yield text
            n += 1
            if max_docs and n >= max_docs:
                return


def _text_or_skip(f: Path, i: int, obj, text_fields, skip_bad: bool, skipped: SkipCounts) -> str | None:
    where = f"{f}:{i + 1}"
    if isinstance(obj, str):  # a malformed record, described
        if not skip_bad:
            raise DataError(f"{where}: {obj}")
        skipped.note(where, obj, bad=True)
        return None
    text = record_text(obj, text_fields)
    if text is None:
        skipped.note(where, f"no text in fields {list(text_fields) or 'auto'}", bad=False)
    return text


class TokenStream:
    """One source as an endless, resumable stream of ``(token id, document number)`` runs.

    Each document is ``tokenize(text) + [eos_id]``. ``document number`` counts documents this
    stream has produced since epoch 0 (it keeps growing across epochs), so two tokens share it
    exactly when they come from the same document occurrence. ``max_docs`` > 0 uses only the first
    ``max_docs`` documents per epoch. A source with no document at all is a :class:`UserError`.
    """

    def __init__(self, name: str, files: Sequence[Path], tokenize: Callable[[str], list[int]], eos_id: int, *,
                 text_fields: Sequence[str] = (), skip_bad: bool = False, max_docs: int = 0) -> None:
        if not files:
            raise UserError(f"source {name!r}: no files")
        self.name, self.files = name, [Path(f) for f in files]
        self.tokenize, self.eos_id = tokenize, eos_id
        self.text_fields, self.skip_bad, self.max_docs = tuple(text_fields), skip_bad, max_docs
        self.skipped = SkipCounts()
        # Position: the current document is record `record` of file `file`; `offset` of its tokens are used.
        self.epoch, self.file, self.record, self.offset = 0, 0, 0, 0
        self.doc_number = 0  # of the current document
        self.docs_in_epoch = 0  # documents started in this epoch (for max_docs)
        self.started = False  # whether any document has been started
        self._doc: list[int] | None = None  # tokens of the current document (+ EOS)
        self._records: Iterator | None = None  # the current file, positioned after the current record

    # ------------------------------------------------------------------ position

    def state(self) -> dict:
        """The position, JSON-able. Loading it into a fresh stream over the same files continues exactly."""
        return {"epoch": self.epoch, "file": self.file, "record": self.record, "offset": self.offset,
                "doc_number": self.doc_number, "docs_in_epoch": self.docs_in_epoch, "started": self.started,
                "skipped_bad": self.skipped.bad, "skipped_no_text": self.skipped.no_text}

    def load_state(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state` of a stream over the same files)."""
        self.epoch, self.file, self.record = int(state["epoch"]), int(state["file"]), int(state["record"])
        self.offset, self.doc_number = int(state["offset"]), int(state["doc_number"])
        self.docs_in_epoch, self.started = int(state["docs_in_epoch"]), bool(state["started"])
        self.skipped.bad, self.skipped.no_text = int(state.get("skipped_bad", 0)), int(state.get("skipped_no_text", 0))
        self._doc, self._records = None, None
        if not self.started:
            return
        if self.file >= len(self.files):
            raise UserError(f"source {self.name!r}: the saved position names file {self.file + 1}, the source "
                            f"has {len(self.files)} (were files removed?)")
        # Re-open at the saved record and re-tokenise the current document (tokenisation is deterministic).
        self._records = iter_records(self.files[self.file], start=self.record)
        got = self._next_text()
        if got is None or got[0] != self.record:
            raise UserError(f"source {self.name!r}: {self.files[self.file]} changed since the checkpoint "
                            f"(record {self.record + 1} is gone or has no text)")
        self._doc = self.tokenize(got[1]) + [self.eos_id]
        if self.offset > len(self._doc):
            raise UserError(f"source {self.name!r}: {self.files[self.file]} record {self.record + 1} changed "
                            "since the checkpoint")

    # ------------------------------------------------------------------ reading

    def _next_text(self) -> tuple[int, str] | None:
        """The next record with text in the current file, or None at the file's end."""
        f = self.files[self.file]
        for i, obj in self._records:
            text = _text_or_skip(f, i, obj, self.text_fields, self.skip_bad, self.skipped)
            if text is not None:
                return i, text
        return None

    def _new_epoch(self) -> None:
        if self.docs_in_epoch == 0:
            raise UserError(f"source {self.name!r}: no document with text in {len(self.files)} file(s) "
                            f"({self.skipped.no_text} records without text, {self.skipped.bad} malformed)")
        self.epoch += 1
        self.file, self.docs_in_epoch = 0, 0
        self._records = iter_records(self.files[0])

    def _advance_document(self) -> None:
        """Make the next document current: the next record, the next file, or the next epoch."""
        while True:
            if self.max_docs and self.docs_in_epoch >= self.max_docs:
                self._new_epoch()
            if self._records is None:
                self._records = iter_records(self.files[self.file])
            got = self._next_text()
            if got is not None:
                self.record, text = got
                if self.started:
                    self.doc_number += 1
                self.started = True
                self._doc, self.offset = self.tokenize(text) + [self.eos_id], 0
                self.docs_in_epoch += 1
                return
            if self.file + 1 < len(self.files):
                self.file += 1
                self._records = iter_records(self.files[self.file])
            else:
                self._new_epoch()

    def take(self, n: int) -> tuple[list[int], list[int]]:
        """The next ``n`` tokens and, for each, the number of the document it belongs to."""
        ids: list[int] = []
        docs: list[int] = []
        while len(ids) < n:
            if self._doc is None or self.offset >= len(self._doc):
                self._advance_document()
            piece = self._doc[self.offset: self.offset + (n - len(ids))]
            ids.extend(piece)
            docs.extend([self.doc_number] * len(piece))
            self.offset += len(piece)
        return ids, docs
