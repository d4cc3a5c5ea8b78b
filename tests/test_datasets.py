import json

import pytest

from dsmath.datasets import DataError, ReadReport, iter_jsonl, load_problems


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n\n{not json}\n")
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        list(iter_jsonl(p))


def test_skipping_is_counted_and_reported(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "a", "answer": "1"}\n[1]\n{"question": "b"}\n{"question": "c", "answer": "3"}\n')
    report = ReadReport(str(p))
    rows = list(iter_jsonl(p, required=("question", "answer"), skip_bad=True, report=report))
    assert [r["question"] for r in rows] == ["a", "c"]
    assert [n for n, _ in report.skipped] == [2, 3]
    assert "SKIPPED 2 bad lines" in report.summary()


def test_gsm8k_answers_are_the_final_number(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_text(json.dumps({"question": "q", "answer": "Some work <<2*3=6>>\n#### 6"}) + "\n")
    problems, _ = load_problems(p)
    assert problems[0].answer == "6"


# ---------------------------------------------------------------------- damaged files (dsmath.userfiles)
import bz2  # noqa: E402
import gzip  # noqa: E402
import zlib  # noqa: E402

from dsmath.userfiles import FileError, StreamError, atomic_path, iter_lines, read_json, read_yaml  # noqa: E402

ROWS = [{"question": f"q{i}", "answer": str(i)} for i in range(30)]
GOOD = ("\n".join(json.dumps(r) for r in ROWS) + "\n").encode()


def test_truncated_gzip_names_the_file_and_keeps_the_lines_before_the_cut_with_skip_bad(tmp_path):
    gz = gzip.compress(GOOD, mtime=0)
    p = tmp_path / "d.jsonl.gz"
    p.write_bytes(gz[: len(gz) // 2])
    with pytest.raises(StreamError, match=r"d\.jsonl\.gz: truncated: the compressed stream ends early after line \d+"):
        list(iter_jsonl(p))
    report = ReadReport(str(p))
    rows = list(iter_jsonl(p, skip_bad=True, report=report))
    complete = zlib.decompressobj(31).decompress(gz[: len(gz) // 2]).count(b"\n")
    assert 0 < len(rows) == complete < len(ROWS)
    assert rows == ROWS[:complete]
    assert len(report.skipped) == 1 and report.skipped[0][0] == complete + 1
    assert "rest of the file unreadable" in report.summary()


def test_corrupt_gzip_is_a_one_line_error_never_zlib_error(tmp_path):
    gz = bytearray(gzip.compress(GOOD, mtime=0))
    gz[len(gz) // 2] ^= 0xFF
    p = tmp_path / "d.jsonl.gz"
    p.write_bytes(bytes(gz))
    with pytest.raises(FileError, match=r"d\.jsonl\.gz"):
        list(iter_jsonl(p))


@pytest.mark.parametrize("content, message", [
    (GOOD, "named .gz but not gzip-compressed"),
    (bz2.compress(GOOD), "named .gz but bz2-compressed"),
    (b"", "named .gz but not gzip-compressed"),
])
def test_wrong_magic_under_a_gz_name(tmp_path, content, message):
    p = tmp_path / "d.jsonl.gz"
    p.write_bytes(content)
    with pytest.raises(FileError, match=message):
        list(iter_jsonl(p, skip_bad=True))


def test_compression_is_read_by_magic_bytes(tmp_path):
    p = tmp_path / "d.jsonl"  # gzip and bz2 content without the suffix: read, not refused
    p.write_bytes(gzip.compress(GOOD))
    assert list(iter_jsonl(p)) == ROWS
    p.write_bytes(bz2.compress(GOOD))
    assert list(iter_jsonl(p)) == ROWS


def test_latin1_line_names_line_and_column_and_is_skippable(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(GOOD + '{"question": "café", "answer": "1"}\n'.encode("latin-1") + GOOD[:33])
    with pytest.raises(DataError, match=r"d\.jsonl:31: not UTF-8 text \(byte 0xe9 at column 18\)"):
        list(iter_jsonl(p))
    report = ReadReport(str(p))
    assert len(list(iter_jsonl(p, skip_bad=True, report=report))) == 31
    assert [n for n, _ in report.skipped] == [31]


def test_utf16_directory_and_binary_are_one_line_errors(tmp_path):
    u16 = tmp_path / "u16.jsonl"
    u16.write_bytes(GOOD.decode().encode("utf-16"))
    with pytest.raises(FileError, match="u16.jsonl: UTF-16 encoded"):
        list(iter_jsonl(u16, skip_bad=True))
    with pytest.raises(FileError, match="is a directory"):
        list(iter_jsonl(tmp_path))
    junk = tmp_path / "junk.jsonl"
    junk.write_bytes(b"\x00\x01\x02" * 100 + b"\n" + GOOD)
    with pytest.raises(DataError, match=r"junk\.jsonl:1: binary data"):
        list(iter_jsonl(junk))
    report = ReadReport(str(junk))
    assert len(list(iter_jsonl(junk, skip_bad=True, report=report))) == len(ROWS)
    assert len(report.skipped) == 1


def test_a_line_over_the_limit_is_one_bad_line(tmp_path, monkeypatch):
    import dsmath.userfiles as uf

    monkeypatch.setattr(uf, "MAX_LINE_BYTES", 1000)
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"question": "' + b"x" * 5000 + b'", "answer": "1"}\n' + GOOD)
    lines = list(iter_lines(p))
    assert len(lines) == 1 + len(ROWS)
    assert lines[0][1].why.startswith("line longer than") and lines[1] == (2, json.dumps(ROWS[0]))


def test_read_json_and_yaml_name_the_line(tmp_path):
    j = tmp_path / "s.json"
    j.write_text('{"a": 1,\n "b": }\n')
    with pytest.raises(FileError, match=r"s\.json:2: not valid JSON"):
        read_json(j)
    y = tmp_path / "c.yaml"
    y.write_text("a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(FileError, match=r"c\.yaml:\d+: not valid YAML"):
        read_yaml(y)
    y.write_bytes(b"a: \xff\xfe\n")
    with pytest.raises(FileError, match=r"c\.yaml:1: not UTF-8 text \(byte 0xff at byte offset 3\)"):
        read_yaml(y)


def test_config_yaml_damage_is_a_config_error(tmp_path):
    from dsmath.config import ConfigError, read_yaml_mapping

    p = tmp_path / "cfg.yaml"
    p.write_bytes(gzip.compress(b"steps: 2\n")[:10])
    with pytest.raises(ConfigError, match="cfg.yaml: truncated"):
        read_yaml_mapping(p)
    p.unlink()
    p.mkdir()
    with pytest.raises(ConfigError, match="cfg.yaml: is a directory"):
        read_yaml_mapping(p)


def test_atomic_path_leaves_the_old_file_when_the_writer_fails(tmp_path):
    from dsmath.datasets import write_jsonl

    out = tmp_path / "o.jsonl"
    assert write_jsonl(out, ROWS[:2]) == 2

    def rows():
        yield ROWS[5]
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(out, rows())
    assert list(iter_jsonl(out)) == ROWS[:2]  # the old, complete file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl"]  # no temporary left behind
    with pytest.raises(FileError, match="is a directory"):
        with atomic_path(tmp_path):
            pass


def test_pretrain_shards_count_damage_as_bad_records(tmp_path):
    from dsmath.pretrain.sources import SkipCounts, iter_documents, iter_records

    texts = ("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(20)) + "\n").encode()
    gz = gzip.compress(texts, mtime=0)
    shard = tmp_path / "s.jsonl.gz"
    shard.write_bytes(gz[: len(gz) * 2 // 3])
    with pytest.raises(DataError, match=r"s\.jsonl\.gz:\d+: rest of the shard unreadable"):
        list(iter_documents([shard]))
    skipped = SkipCounts()
    docs = list(iter_documents([shard], skip_bad=True, skipped=skipped))
    assert docs == [f"doc {i}" for i in range(len(docs))] and 0 < len(docs) < 20
    assert skipped.bad == 1
    latin = tmp_path / "l.jsonl"
    latin.write_bytes('{"text": "é"}\n'.encode("latin-1") + texts)
    assert isinstance(next(iter_records(latin))[1], str)  # the reason, for the caller to raise or count
    pq = tmp_path / "p.parquet"
    pq.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(FileError, match=r"p\.parquet: not a readable Parquet file"):
        list(iter_records(pq))
    js = tmp_path / "j.json"
    js.write_bytes(b'[{"text": "a"}, {"text": "b"')
    with pytest.raises(FileError, match=r"j\.json:1: not valid JSON"):
        list(iter_records(js))
