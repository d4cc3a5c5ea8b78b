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
