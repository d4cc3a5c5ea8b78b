"""SFT: data errors name file:line, --skip-bad counts, tool output is masked, loss is response-only, it learns."""

import json
from pathlib import Path

import pytest
import torch

from dsmath.datasets import DataError

EXAMPLES = [
    {"question": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."}
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]
]
TOOL = {"prompt": "Q: 6*7?\nA:", "response": "```python\nprint(6*7)\n```\n```output\n42\n```\nSo \\boxed{42}."}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from dsmath.config import ModelConfig
    from dsmath.prompts import format_prompt
    from dsmath.tiny import build_model, train_tokenizer

    out = tmp_path_factory.mktemp("sft") / "model"
    texts = [format_prompt(e["question"]) + e["response"] for e in EXAMPLES] + [TOOL["prompt"] + TOOL["response"]]
    tok = train_tokenizer(texts * 4, vocab_size=300, out_dir=out)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                      max_position_embeddings=256, vocab_size=300)
    build_model(cfg, tok, seed=0).save_pretrained(str(out))
    return out


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_line_is_an_error_naming_file_and_line(tmp_path, capsys):
    from wiring.cli import main
    from learner.sft import load_sft_jsonl

    data = write_lines(tmp_path / "d.jsonl", [json.dumps(EXAMPLES[0]), json.dumps(EXAMPLES[1]), '{"question": "x", "resp'])
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        load_sft_jsonl(data)
    wrong_type = write_lines(tmp_path / "t.jsonl", [json.dumps(EXAMPLES[0]), "", json.dumps({"question": "q", "response": 5})])
    with pytest.raises(DataError, match=r"t\.jsonl:3: 'response\|solution\|output' must be a non-empty string"):
        load_sft_jsonl(wrong_type)
    rc = main(["sft", "--data", str(data), "--model", str(tmp_path / "nomodel"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "d.jsonl:3" in err[0]  # one line, no traceback


def test_skip_bad_counts_and_reports(tmp_path):
    from learner.sft import load_sft_jsonl

    data = write_lines(tmp_path / "d.jsonl", [
        json.dumps(EXAMPLES[0]), "not json", json.dumps({"question": "only a question"}),
        json.dumps({"prompt": "p", "response": ""}), json.dumps(TOOL),
    ])
    examples, report = load_sft_jsonl(data, skip_bad=True)
    assert len(examples) == 2 and report.records == 2
    assert [n for n, _ in report.skipped] == [2, 3, 4]
    assert "SKIPPED 3 bad lines: line 2 (not valid JSON" in report.summary()


def test_tool_output_blocks_are_masked(model_dir):
    from transformers import AutoTokenizer

    from learner.sft import SFTExample, tokenize_example

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ex = SFTExample(TOOL["prompt"], TOOL["response"])
    prompt_ids, resp_ids, mask = tokenize_example(tok, ex, "tool")
    assert resp_ids[-1] == tok.eos_token_id and mask[-1] == 1
    masked = tok.decode([t for t, m in zip(resp_ids, mask) if m == 0])
    trained = tok.decode([t for t, m in zip(resp_ids[:-1], mask[:-1]) if m == 1])
    assert "42\n" in masked and "```output" in masked and "print(6*7)" not in masked
    assert "print(6*7)" in trained and "\\boxed{42}" in trained and "```output" not in trained
    assert tok.decode(prompt_ids) == TOOL["prompt"]
    _, _, cot_mask = tokenize_example(tok, ex, "cot")
    assert all(cot_mask)  # CoT/PoT formats train on everything


def test_sft_loss_is_response_token_nll(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsmath.config import LearnerConfig
    from learner.policy import PolicyLearner
    from learner.sft import build_batch, example_from_record, tokenize_example

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [tokenize_example(tok, example_from_record(e)) for e in EXAMPLES[:3]]
    batch = build_batch(rows, tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    nll, count = 0.0, 0
    with torch.no_grad():
        for p, r, _ in rows:
            ids = torch.tensor([p + r])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            for k in range(len(r)):  # response token k sits at position len(p)+k, predicted from position len(p)-1+k
                nll -= float(lp[len(p) - 1 + k, r[k]])
                count += 1
    learner = PolicyLearner(model_dir, LearnerConfig(lr=1e-3, zero_stage=0, micro_batch_size=2), with_reference=False)
    metrics = learner.sft_step(batch)
    assert metrics["tokens"] == count
    assert metrics["loss"] == pytest.approx(nll / count, abs=1e-5)


def test_dsmath_sft_cli_learns_and_saves(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from wiring.cli import main

    data = write_lines(tmp_path / "d.jsonl", [json.dumps(e) for e in EXAMPLES] + ["{broken", json.dumps(TOOL)])
    out = tmp_path / "out"
    rc = main(["sft", "--data", str(data), "--model", str(model_dir), "--out", str(out), "--steps", "60",
               "--lr", "1e-2", "--batch-size", "7", "--skip-bad", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "SKIPPED 1 bad lines: line 7" in text
    info = json.loads(text.strip().splitlines()[-1])
    assert info["skipped_bad_lines"] == 1 and info["examples"] == 7
    assert info["final_loss"] < 0.5 * info["first_loss"], info
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and rows[-1]["sft/loss"] < rows[0]["sft/loss"]
    AutoModelForCausalLM.from_pretrained(str(out))  # HF-loadable
    assert (out / "tokenizer.json").exists()
