"""A resumed run is the run you started: ``dsmath train --resume`` runs RUN_DIR/config.yaml; a changed key is refused
in one line unless it may change (then recorded with its step); a fresh run into a directory holding a run is
refused; a refused command creates nothing; a finished run is said and left alone; ``<parent>/latest`` names the
most recent run. The end-to-end case resumes a run whose newest checkpoint was truncated through the real CLI and
driver (real Ray, vLLM, DeepSpeed) and gets the uninterrupted run's step back, loss for loss."""

import json
import os
from pathlib import Path

import pytest
import yaml

from dsmath.config import load_config, to_dict
from dsmath.errors import UserError
from dsmath.run_dir import (CHANGES_FILE, claim_fresh, finished_summary, link_latest, record_changes,
                            resume_changes)
from tiny_loop import TINY_LOOP
from wiring.cli import main


def saved_run(run_dir: Path, *overrides: str) -> Path:
    """A run directory as a started run leaves it: its config.yaml and a metrics.jsonl."""
    cfg = load_config("tiny_cpu", [f"run_dir={run_dir}", *overrides])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    return run_dir


def cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """``dsmath ARGV`` in this process: (exit code, stderr lines)."""
    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().err.strip().splitlines()


def test_resume_with_no_overrides_runs_the_saved_steps_lr_and_beta(tmp_path):
    from wiring.cli import build_parser
    from wiring.commands.train import resumed_config

    run = saved_run(tmp_path / "run", "steps=2", "learner.lr=1e-4", "algorithm.beta=0.1")
    args = build_parser().parse_args(["train", "--resume", "--run-dir", str(run)])  # preset default: 20 steps
    cfg = resumed_config(args, [f"run_dir={run}"])
    assert (cfg.steps, cfg.learner.lr, cfg.algorithm.beta) == (2, 1e-4, 0.1)
    assert load_config("tiny_cpu").steps != 2 and load_config("tiny_cpu").algorithm.beta != 0.1
    assert resume_changes(run, to_dict(cfg)) == []


def test_a_changed_beta_on_resume_is_refused_in_one_line_naming_the_key(tmp_path, capsys):
    run = saved_run(tmp_path / "run", "steps=2", "algorithm.beta=0.1")
    before = sorted(p.name for p in run.iterdir())
    rc, err = cli(capsys, "train", "--resume", "--run-dir", str(run), "algorithm.beta=0.5")
    assert rc == 2 and len(err) == 1, err
    assert "algorithm.beta was 0.1 in this run, not 0.5" in err[0] and "start a new run" in err[0]
    assert sorted(p.name for p in run.iterdir()) == before  # no status.json, no checkpoints/, no latest link
    assert not (tmp_path / "latest").exists()


def test_resume_of_a_run_saved_with_the_old_grpo_section_is_refused_naming_the_rename(tmp_path, capsys):
    run = saved_run(tmp_path / "run", "steps=2")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    section = saved.pop("algorithm")
    saved["grpo"] = {"algorithm": section.pop("name"), **section}  # as an earlier version wrote it
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    before = sorted(p.name for p in run.iterdir())
    rc, err = cli(capsys, "train", "--resume", "--run-dir", str(run))
    assert rc == 2 and len(err) == 1, err
    assert f"{run / 'config.yaml'}: the section 'grpo:' is now 'algorithm:' (grpo.algorithm -> algorithm.name; " \
           f"its other {len(section)} keys keep their names, e.g. grpo.beta -> algorithm.beta)" in err[0], err
    assert sorted(p.name for p in run.iterdir()) == before


def test_an_allowed_change_is_recorded_with_the_step_it_takes_effect(tmp_path):
    run = saved_run(tmp_path / "run", "steps=2", "eval_every=0")
    cfg = load_config(str(run / "config.yaml"), ["steps=6", "eval_every=2"])
    changes = resume_changes(run, to_dict(cfg))
    assert changes == [{"key": "eval_every", "old": 0, "new": 2}, {"key": "steps", "old": 2, "new": 6}]
    record_changes(run, changes, from_step=3)
    rows = [json.loads(line) for line in (run / CHANGES_FILE).read_text().splitlines()]
    assert [(r["key"], r["old"], r["new"], r["from_step"]) for r in rows] == [("eval_every", 0, 2, 3),
                                                                             ("steps", 2, 6, 3)]


def test_resume_of_a_mistyped_run_dir_is_one_line_and_creates_nothing(tmp_path, capsys):
    typo = tmp_path / "runs" / "tiny_cpuu"
    rc, err = cli(capsys, "train", "--resume", "--run-dir", str(typo))
    assert rc == 2 and len(err) == 1 and "holds no run to resume (no such directory)" in err[0], err
    assert not typo.exists() and not typo.parent.exists()


def test_a_fresh_run_into_a_directory_holding_a_run_is_refused(tmp_path, capsys):
    run = saved_run(tmp_path / "run", "steps=2")
    rc, err = cli(capsys, "train", "--run-dir", str(run))
    assert rc == 2 and len(err) == 1 and "already holds a run" in err[0] and "--overwrite" in err[0], err
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'  # the old run's curve is untouched
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    claim_fresh(run, overwrite=True)  # --overwrite: the run's files go, nothing else
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    claim_fresh(run, overwrite=False)  # now it holds no run
    with pytest.raises(UserError, match="already holds a run"):
        (run / "iter-1").mkdir()  # an iterate run's iteration counts too
        claim_fresh(run, overwrite=False)


def test_resuming_a_finished_run_says_so_and_sets_nothing_up(tmp_path, capsys):
    run = saved_run(tmp_path / "run", "steps=2")
    summary = {"heldout_accuracy_before": 0.25, "heldout_accuracy_after": 0.5, "heldout_size": 24, "steps": 2,
               "wall_seconds": 12.0, "summary_path": str(run / "summary.json")}
    (run / "summary.json").write_text(json.dumps(summary))
    capsys.readouterr()
    assert main(["train", "--resume", "--run-dir", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "already finished its 2 steps" in out and "25.0% before RL -> 50.0% after 2 GRPO steps" in out
    assert json.loads((run / "summary.json").read_text()) == summary
    assert not (run / "status.json").exists()
    assert finished_summary(run, 3) is None  # steps=3 on resume would continue it


def test_latest_link_names_the_most_recent_run(tmp_path):
    runs = tmp_path / "runs"
    for name in ("a", "b"):
        (runs / name).mkdir(parents=True)
        assert link_latest(runs / name) == runs / "latest"
    assert os.readlink(runs / "latest") == "b" and (runs / "latest").resolve() == (runs / "b").resolve()
    real = tmp_path / "other" / "latest"
    real.mkdir(parents=True)
    (tmp_path / "other" / "c").mkdir()
    assert link_latest(tmp_path / "other" / "c") is None and real.is_dir() and not real.is_symlink()


def test_iterate_has_its_own_default_run_dir():
    from wiring.commands.iterate import own_run_dir

    train_dir = load_config("tiny_cpu").run_dir
    assert own_run_dir(train_dir) == str(Path(train_dir).parent / f"iterate_{Path(train_dir).name}") != train_dir


@pytest.mark.slow
def test_resume_past_a_truncated_checkpoint_through_the_cli(tmp_path, ray_cluster, cache_dir, capsys):
    """3 steps (checkpoint every step, 2 kept, non-default lr and beta), killed after its step-3 checkpoint with that
    checkpoint's model.safetensors truncated: `dsmath train --resume` with no overrides says so in one line,
    resumes from step 2 with the saved config, and step 3 equals the original step 3, loss for loss."""
    from dsmath.utils.metrics import read_metrics
    from wiring.driver import train

    run = tmp_path / "runs" / "r"
    cfg = load_config("tiny_cpu", TINY_LOOP + [f"run_dir={run}", f"bootstrap.data_dir={cache_dir}", "steps=3",
                                               "checkpoint_every=1", "eval_size=8", "learner.lr=2e-3",
                                               "algorithm.beta=0.02"])
    train(cfg, progress=False)
    original = read_metrics(run)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000002", "step-000003"]  # keep_checkpoints=2
    assert os.readlink(tmp_path / "runs" / "latest") == "r"
    (run / "summary.json").unlink()  # as a driver killed after its last checkpoint leaves it
    safetensors = ckpts / "step-000003" / "model.safetensors"
    safetensors.write_bytes(safetensors.read_bytes()[:1000])

    capsys.readouterr()
    assert main(["train", "--resume", "--run-dir", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "is damaged" in line]
    assert len(said) == 1, out[-3000:]
    assert said[0].startswith("[dsmath] checkpoints: step-000003 is damaged (model.safetensors is 1000 bytes, ")
    assert said[0].endswith(" were saved): resuming from step-000002, the newest intact one")
    resumed = read_metrics(run)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for key in ("reward/mean", "response_length/mean", "train/loss", "train/kl", "train/grad_norm"):
        assert resumed[2][key] == original[2][key], key
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["steps"], saved["learner"]["lr"], saved["algorithm"]["beta"]) == (3, 2e-3, 0.02)
    assert not (run / CHANGES_FILE).exists()
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert ckpts.joinpath("latest").read_text().strip() == "step-000003" and ckpts.joinpath("step-000003").is_dir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["resumed"]

    # Resumed again: finished, said, nothing rerun.
    rc, err = cli(capsys, "train", "--resume", "--run-dir", str(run), "--no-progress")
    assert rc == 0 and json.loads((run / "summary.json").read_text()) == summary

    # No intact checkpoint left: one line, exit 2, and status.json says failed (it said finished).
    (run / "summary.json").unlink()
    for c in ("step-000002", "step-000003"):
        (ckpts / c / "manifest.json").unlink()
    rc, err = cli(capsys, "train", "--resume", "--run-dir", str(run), "--no-progress")
    assert rc == 2 and len(err) == 1 and "no intact checkpoint under" in err[0], err
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "no intact checkpoint" in status["message"]
