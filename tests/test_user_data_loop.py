"""`dsmath train` on the user's own model and question files (model.path + data.train/heldout), not the built-in
task: the real loop (Ray, vLLM, DeepSpeed) on a tiny model folder and a JSONL of questions."""

import json

import pytest

from dsmath.config import ConfigError, load_config
from dsmath.utils.metrics import read_metrics

pytestmark = pytest.mark.slow


def _questions(path, n, offset=0):
    with open(path, "w") as fh:
        for i in range(offset, offset + n):
            a, b = i % 9 + 1, i % 7 + 2
            fh.write(json.dumps({"question": f"what is {a} plus {b}?", "answer": str(a + b), "level": 1 + i % 2}) + "\n")


def test_train_on_a_model_folder_and_question_files(tmp_path, ray_cluster):
    from test_generator import tiny_model_dir

    from wiring.driver import train

    tiny_model_dir(tmp_path / "model")
    _questions(tmp_path / "train.jsonl", 40)
    _questions(tmp_path / "heldout.jsonl", 6, offset=100)
    cfg = load_config("tiny_cpu", [
        f"run_dir={tmp_path / 'run'}", f"model.path={tmp_path / 'model'}", f"data.train={tmp_path / 'train.jsonl'}",
        f"data.heldout={tmp_path / 'heldout.jsonl'}", "rollout.mode=cot", "steps=2", "eval_size=6",
        "rollout.questions_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=16",
        "learner.micro_batch_size=8", "checkpoint_every=0"])
    summary = train(cfg, progress=False)
    assert summary["steps"] == 2 and summary["samples_trained"] == 2 * 4 * 4
    assert summary["heldout_size"] == 6
    assert set(summary["heldout_accuracy_after_by_level"]) == {"1", "2"}  # the files' levels, not the built-in task
    rows = read_metrics(tmp_path / "run")
    assert [r["weight_version"] for r in rows] == [1, 2]
    assert all(r["rollout/logprob_abs_diff_max"] < 1e-3 for r in rows)
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "train.jsonl" in config


def test_question_files_need_a_model_and_existing_paths(tmp_path, capsys):
    with pytest.raises(ConfigError, match="data.train: .*set model.path"):
        load_config("tiny_cpu", ["data.train=q.jsonl"])
    with pytest.raises(ConfigError, match="data.heldout: set data.train"):
        load_config("tiny_cpu", ["data.heldout=q.jsonl"])
    from wiring.cli import main

    assert main(["train", f"model.path={tmp_path}", f"data.train={tmp_path / 'missing.jsonl'}"]) == 2
    assert "not a model folder" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["train", f"model.path={tmp_path}", f"data.train={tmp_path / 'missing.jsonl'}"]) == 2
    err = capsys.readouterr().err
    assert "data.train=" in err and "no such file" in err and "Traceback" not in err
