"""Checkpoints that prove themselves: a manifest (sizes + sha256) written last; a resume verifies what it picks and
falls back past a damaged newest checkpoint to the newest intact one with the same losses as an undamaged resume
from it; no intact checkpoint is a one-line error; only the newest ``keep`` checkpoints stay.

The learner is the real DeepSpeed one on the tiny model (as in test_learner.py)."""

import json
import shutil
from pathlib import Path

import pytest

from dsmath.errors import UserError
from learner import checkpoint as ckpt
from test_learner import make_learner, make_tiny_model, rl_batch

STEPS = 4  # train 4 steps, checkpoint after steps 2 and 3: "step-000003" is the newest, "step-000002" the previous


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model dir, checkpoint root, losses of steps 3-4 resumed from step-000002, and of step 4 from step-000003)."""
    base = tmp_path_factory.mktemp("integrity")
    model_dir = make_tiny_model(base / "model")
    root = base / "checkpoints"
    a = make_learner(model_dir)
    for step in range(1, STEPS):
        a.grpo_step(rl_batch(a, 300 + step))
        if step >= 2:
            a.save_checkpoint(root / f"step-{step:06d}", {"step": step})
    return model_dir, root, {2: resume_losses(model_dir, root / "step-000002"),
                             3: resume_losses(model_dir, root / "step-000003")}


def resume_losses(model_dir: Path, path: Path) -> tuple[int, list[float]]:
    """Load ``path`` (a checkpoint or a folder of them) into a fresh learner and train to step 4: (step, losses)."""
    learner = make_learner(model_dir)
    extra = learner.load_checkpoint(path)
    losses = [learner.grpo_step(rl_batch(learner, 300 + step))["loss"] for step in range(extra["step"] + 1, STEPS + 1)]
    return extra["step"], losses


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def optimizer_state(ckpt_dir: Path) -> Path:
    (found,) = list((ckpt_dir / "deepspeed").rglob("*optim_states.pt"))
    return found


DAMAGE = {
    "truncated trainer_state.json": lambda c: truncate(c / "trainer_state.json"),
    "truncated DeepSpeed optimizer state": lambda c: truncate(optimizer_state(c)),
    "truncated RNG file": lambda c: truncate(c / "rng_rank0.pt"),
    "truncated model.safetensors": lambda c: truncate(c / "model.safetensors"),
    "missing manifest": lambda c: (c / ckpt.MANIFEST).unlink(),
    "one flipped bit in model.safetensors": lambda c: flip_bit(c / "model.safetensors"),
}


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 7] ^= 0x01  # a weight's byte, same size: only the checksum finds it
    path.write_bytes(bytes(data))


def test_manifest_lists_every_file_with_size_and_sha256(saved):
    _model_dir, root, _losses = saved
    c = root / "step-000003"
    manifest = json.loads((c / ckpt.MANIFEST).read_text())
    on_disk = {p.relative_to(c).as_posix() for p in c.rglob("*") if p.is_file() and p.name != ckpt.MANIFEST}
    assert set(manifest["files"]) == on_disk
    assert {"model.safetensors", "trainer_state.json", "rng_rank0.pt", "config.json"} <= on_disk
    assert any(name.startswith("deepspeed/") for name in on_disk)
    for rel, entry in manifest["files"].items():
        assert entry["size"] == (c / rel).stat().st_size
        assert len(entry["sha256"]) == 64
    assert ckpt.verify(c) is None
    assert (root / "latest").read_text().strip() == "step-000003"


def fallback_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("checkpoints:")]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_with_the_same_losses(saved, tmp_path, capsys, damage):
    model_dir, root, undamaged = saved
    copy = tmp_path / "checkpoints"
    shutil.copytree(root, copy)
    DAMAGE[damage](copy / "step-000003")
    assert ckpt.verify(copy / "step-000003") is not None
    capsys.readouterr()
    step, losses = resume_losses(model_dir, copy)
    lines = fallback_lines(capsys)
    assert (step, losses) == undamaged[2]  # bit-exact: the previous checkpoint, as if the newest never existed
    assert len(undamaged[2][1]) == 2
    assert len(lines) == 1 and "step-000003 is damaged" in lines[0] and "resuming from step-000002" in lines[0]
    with pytest.raises(UserError, match=r"step-000003: damaged checkpoint \("):  # named explicitly: refused
        make_learner(model_dir).load_checkpoint(copy / "step-000003")


def test_junk_in_latest_is_said_and_the_newest_intact_checkpoint_is_used(saved, tmp_path, capsys):
    model_dir, root, undamaged = saved
    copy = tmp_path / "checkpoints"
    shutil.copytree(root, copy)
    (copy / "latest").write_bytes(b"\x89\xff\xfe\x00junk\x00")
    capsys.readouterr()
    assert resume_losses(model_dir, copy) == undamaged[3]  # the checkpoint itself is whole
    lines = fallback_lines(capsys)
    assert len(lines) == 1 and "latest is unreadable" in lines[0] and "step-000003" in lines[0]


def test_no_intact_checkpoint_is_one_line_naming_each(saved, tmp_path):
    model_dir, root, _ = saved
    copy = tmp_path / "checkpoints"
    shutil.copytree(root, copy)
    truncate(copy / "step-000003" / "trainer_state.json")
    (copy / "step-000002" / ckpt.MANIFEST).unlink()
    with pytest.raises(UserError) as err:
        make_learner(model_dir).load_checkpoint(copy)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"no intact checkpoint under {copy}")
    assert "step-000003 is damaged (trainer_state.json is" in msg and "step-000002 is damaged (no manifest.json)" in msg


def test_prune_keeps_the_newest_and_drops_an_abandoned_future(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 6):
        (root / f"step-{step:06d}").mkdir(parents=True)
    (root / "step-000005.tmp-abcd").mkdir()  # a save in progress is not a checkpoint
    deleted = ckpt.prune(root, keep=2, current=root / "step-000004")
    assert sorted(p.name for p in deleted) == ["step-000001", "step-000002", "step-000006"]
    assert sorted(p.name for p in root.iterdir()) == ["step-000003", "step-000004", "step-000005.tmp-abcd"]
    assert ckpt.prune(root, keep=1, current=root / "step-000004") == [root / "step-000003"]


def test_a_failed_save_leaves_no_manifest_and_no_directory(saved, tmp_path):
    """The manifest is written by publish, after every file: a save that dies before it leaves nothing."""
    model_dir, _root, _ = saved
    learner = make_learner(model_dir)
    real_write = learner.engine._write_checkpoint

    def crash(tmp, extra, tok):
        real_write(tmp, extra, tok)
        raise OSError("node lost power")

    learner.engine._write_checkpoint = crash
    with pytest.raises(OSError, match="node lost power"):
        learner.save_checkpoint(tmp_path / "ck" / "step-000001", {"step": 1})
    assert list((tmp_path / "ck").iterdir()) == []


def test_checksums_cost_on_the_tiny_model_is_small(saved, tmp_path):
    """The manifest's cost: hashing every file of a tiny-model checkpoint, once when saving, once when verifying."""
    import time

    _model_dir, root, _ = saved
    c = tmp_path / "c"
    shutil.copytree(root / "step-000003", c)
    size = sum(p.stat().st_size for p in c.rglob("*") if p.is_file())
    t0 = time.perf_counter()
    ckpt.write_manifest(c)
    t1 = time.perf_counter()
    assert ckpt.verify(c) is None
    t2 = time.perf_counter()
    print(f"checkpoint {size / 1e6:.2f} MB: manifest {1e3 * (t1 - t0):.1f} ms, verify {1e3 * (t2 - t1):.1f} ms")
    assert t1 - t0 < 5.0 and t2 - t1 < 5.0


def test_a_checkpoint_sent_as_files_is_published_on_the_other_side_and_resumes_alike(saved, tmp_path):
    """No shared filesystem: the driver's copy of a checkpoint the learner published on its node (every file, the
    optimizer state's sub-folders too) verifies, is what ``latest`` names, and resumes with the same losses; a
    name that leaves the folder, or a damaged file, publishes nothing."""
    from dataclasses import replace

    model_dir, root, want = saved
    bundle = ckpt.checkpoint_files(root / "step-000003")
    assert any("/" in name for name, _ in bundle.files)  # the DeepSpeed state lives in a sub-folder
    home = tmp_path / "home" / "checkpoints"
    ckpt.write_checkpoint_files(bundle, home / "step-000003")
    assert ckpt.verify(home / "step-000003") is None and ckpt.read_latest(home) == "step-000003"
    assert resume_losses(model_dir, home) == want[3]

    for name in ("../escape.bin", "/abs.bin"):
        with pytest.raises(ValueError, match="leaves the checkpoint folder"):
            ckpt.write_checkpoint_files(replace(bundle, files=bundle.files + ((name, b"x"),)), tmp_path / "x" / "s")
    damaged = tuple((n, d[:-1] if n.endswith(".safetensors") else d) for n, d in bundle.files)
    with pytest.raises(UserError, match=r"checkpoint step-000009 from .*step-000003: .*safetensors is \d+ bytes"):
        ckpt.write_checkpoint_files(replace(bundle, files=damaged), tmp_path / "y" / "step-000009")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
    assert list((tmp_path / "y").iterdir()) == []


@pytest.mark.parametrize("logged", [(1,), (1, 2, 3, 4)], ids=["killed-before-logging", "logged-past-it"])
def test_resume_restores_the_rows_its_checkpoint_carries_or_keeps_the_logged_ones(saved, tmp_path, capsys, logged):
    """A GRPO checkpoint carries the metrics rows since the previous one, its own step's included: a driver killed
    between saving step 3's checkpoint and logging step 3's row (or a metrics.jsonl fetched from storage before rows
    2-3 reached it) resumes with rows 1-3, rows 2-3 as the checkpoint holds them; a driver that logged rows past
    the checkpoint keeps its own rows once, and loses the row it never saved."""
    from dsmath.utils.metrics import MetricsWriter, read_metrics
    from wiring.driver import resume_state

    model_dir, _root, _ = saved
    run_dir = tmp_path / "run"
    carried = [{"step": 2, "time": 1000.25, "reward/mean": 0.25, "train/loss": -0.0123456789012345, "samples": 16},
               {"step": 3, "time": 1234.5, "reward/mean": 0.375, "train/kl": None, "samples": 16}]
    make_learner(model_dir).save_checkpoint(
        run_dir / "checkpoints" / "step-000003",
        {"step": 3, "weight_version": 3, "data_position": 12, "samples_trained": 48, "metrics_rows": carried})
    out = MetricsWriter(run_dir, tensorboard=False)
    for step in logged:
        out.write(step, {"reward/mean": step / 10, "train/loss": 0.5, "samples": 16})
    out.close()
    capsys.readouterr()

    state, path = resume_state(run_dir)
    rows = read_metrics(run_dir)
    said = [line for line in capsys.readouterr().out.splitlines() if "restored" in line]
    assert (state.step, state.weight_version, state.samples_trained, path.name) == (3, 3, 48, "step-000003")
    assert [r["step"] for r in rows] == [1, 2, 3]
    if logged == (1,):
        assert rows[1:] == carried
        assert len(said) == 1 and "the rows of step 2, 3 restored from step-000003" in said[0]
    else:
        assert [r["reward/mean"] for r in rows] == [0.1, 0.2, 0.3] and said == []
