"""Page readers: WARC (response → HTML), WET (conversion → text), JSONL/Parquet of ``{url, text | html}``.

Every reader yields plain dict rows ``{id, url, source, label, html, text}`` and appends one
:class:`ReadError` (file, byte offset or line, reason) per record it cannot parse; a bad record
never stops the run. WARCs are read with FastWARC when it is installed, else warcio.
The ``<https://...>`` WARC-Target-URI form written by wget (seen in the dolma samples) is unwrapped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dsmath.errors import UserError
from dsmath.userfiles import BadLine, StreamError, check_readable, iter_lines, iter_parquet_rows, until_broken


@dataclass(frozen=True)
class ReadError:
    path: str
    offset: int  # byte offset of the WARC record, or 1-based line for JSONL, row for Parquet
    reason: str

    def __str__(self) -> str:
        return f"{self.path}@{self.offset}: {self.reason}"


def clean_uri(uri: str | None) -> str:
    """Strip whitespace and the ``<...>`` brackets wget puts around WARC-Target-URI."""
    uri = (uri or "").strip()
    if uri.startswith("<") and uri.endswith(">"):
        uri = uri[1:-1].strip()
    return uri


def page(url: str, *, html: str = "", text: str = "", source: str = "", label: str = "", id: str = "") -> dict:
    """One page row; the schema every stage reads and writes."""
    return {"id": id or url, "url": url, "source": source, "label": label, "html": html, "text": text}


def _decode(body: bytes, charset: str | None) -> str:
    if not charset:
        try:  # no declared charset: sniff it (the CC-2020 sample holds GBK pages without one)
            from resiliparse.parse.encoding import bytes_to_str, detect_encoding

            return bytes_to_str(body, detect_encoding(body))
        except ImportError:
            pass
    for enc in (charset, "utf-8"):
        if enc:
            try:
                return body.decode(enc)
            except (LookupError, UnicodeDecodeError):
                pass
    return body.decode("utf-8", errors="replace")


def read_warc(path: str | Path, errors: list[ReadError], *, source: str = "", label: str = "") -> Iterator[dict]:
    """Response records with an HTML body become ``html`` rows; WET conversion records become ``text`` rows."""
    path = Path(path)
    try:
        from fastwarc.warc import ArchiveIterator, WarcRecordType
    except ImportError:  # pragma: no cover - exercised only where fastwarc is absent
        yield from _read_warc_warcio(path, errors, source=source, label=label)
        return
    with path.open("rb") as fh:
        it = ArchiveIterator(fh, record_types=WarcRecordType.response | WarcRecordType.conversion, parse_http=True)
        last_good = 0
        while True:
            try:
                rec = next(it)
            except StopIteration:
                break
            except Exception as exc:  # a corrupt header: FastWARC cannot resync, so the rest of this file is lost
                errors.append(ReadError(str(path), last_good, f"unreadable WARC stream after the record at this "
                                                              f"offset ({exc}); rest of the file skipped"))
                break
            offset = last_good = rec.stream_pos
            try:
                url = clean_uri(rec.headers.get("WARC-Target-URI"))
                body = rec.reader.read()
                if rec.content_length and len(body) < rec.content_length:
                    errors.append(ReadError(str(path), offset, f"truncated record: {len(body)} of "
                                                               f"{rec.content_length} bytes"))
                    continue
                if rec.record_type == WarcRecordType.conversion:
                    yield page(url, text=_decode(body, "utf-8"), source=source, label=label, id=f"{url}")
                    continue
                ctype = (rec.http_headers.get("Content-Type") or "") if rec.http_headers else ""
                if ctype and "html" not in ctype.lower():
                    continue
                yield page(url, html=_decode(body, rec.http_charset), source=source, label=label)
            except Exception as exc:
                errors.append(ReadError(str(path), offset, f"{type(exc).__name__}: {exc}"))


def _read_warc_warcio(path: Path, errors: list[ReadError], *, source: str, label: str) -> Iterator[dict]:
    from warcio.archiveiterator import ArchiveIterator

    with path.open("rb") as fh:
        it = ArchiveIterator(fh)
        for rec in it:
            offset = it.get_record_offset()
            try:
                if rec.rec_type not in ("response", "conversion"):
                    continue
                url = clean_uri(rec.rec_headers.get_header("WARC-Target-URI"))
                body = rec.content_stream().read()
                if rec.rec_type == "conversion":
                    yield page(url, text=_decode(body, "utf-8"), source=source, label=label)
                else:
                    ctype = rec.http_headers.get_header("Content-Type") or "" if rec.http_headers else ""
                    if not ctype or "html" in ctype.lower():
                        yield page(url, html=_decode(body, None), source=source, label=label)
            except Exception as exc:
                errors.append(ReadError(str(path), offset, f"{type(exc).__name__}: {exc}"))


def _row_to_page(obj: dict, where: str, source: str, label: str) -> dict:
    url = obj.get("url") or obj.get("id") or ""
    if not isinstance(url, str) or not url:
        raise ValueError("missing 'url'")
    html, text = obj.get("html") or "", obj.get("text") or ""
    if not isinstance(html, str) or not isinstance(text, str) or not (html or text):
        raise ValueError("needs a non-empty string 'text' or 'html'")
    return page(url, html=html, text=text, source=obj.get("source") or source, label=obj.get("label") or label,
                id=str(obj.get("id") or url))


def read_jsonl(path: str | Path, errors: list[ReadError], *, source: str = "", label: str = "") -> Iterator[dict]:
    """Rows of a JSONL file (gzip by magic bytes). A line that is not UTF-8 or not a page is one read error; a
    compressed stream that breaks mid-file is one read error for the rest of the file (the lines before it are
    kept). A file that cannot be opened at all (a directory, wrong magic) is a one-line ``UserError``."""
    path = Path(path)
    def on_break(exc: StreamError) -> None:
        errors.append(ReadError(str(path), exc.lines_read + 1, f"{exc}; rest of the file skipped"))

    for lineno, line in until_broken(iter_lines(path, "input file"), on_break):
        if isinstance(line, BadLine):
            errors.append(ReadError(str(path), lineno, line.why))
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            row = _row_to_page(obj, f"{path}:{lineno}", source, label)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            errors.append(ReadError(str(path), lineno, f"{type(exc).__name__}: {exc}"))
            continue
        yield row


def read_parquet(path: str | Path, errors: list[ReadError], *, source: str = "", label: str = "") -> Iterator[dict]:
    """Rows of a Parquet file; a damaged row group is one read error (the rows before it are kept)."""
    def on_break(exc: StreamError) -> None:
        errors.append(ReadError(str(path), exc.lines_read, f"{exc}; rest of the file skipped"))

    for i, obj in until_broken(iter_parquet_rows(path, what="input file"), on_break):
        try:
            yield _row_to_page(obj, f"{path}#{i}", source, label)
        except (ValueError, TypeError, AttributeError) as exc:
            errors.append(ReadError(str(path), i, f"{type(exc).__name__}: {exc}"))


def read_any(path: str | Path, errors: list[ReadError], *, source: str = "", label: str = "") -> Iterator[dict]:
    """Dispatch on the file name: ``*.warc[.gz]``, ``*.wet[.gz]``, ``*.jsonl[.gz]``, ``*.parquet``."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such input file")
    check_readable(p, "input file")  # a directory or an unreadable file: one line, before any reading
    name = p.name.lower()
    src = source or p.name
    if ".warc" in name or ".wet" in name or name.endswith(".arc.gz"):
        return read_warc(p, errors, source=src, label=label)
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        return read_jsonl(p, errors, source=src, label=label)
    if name.endswith(".parquet"):
        return read_parquet(p, errors, source=src, label=label)
    raise UserError(f"{p}: unknown input format (expected .warc[.gz], .wet[.gz], .jsonl[.gz] or .parquet)")
