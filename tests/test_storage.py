"""Checkpoints and run files in a storage URI (``storage=``): :mod:`dsmath.storage` on ``file://`` URIs, the
checkpoint upload's manifest-last order under injected copy failures, and a run resumed from storage alone."""

import json
import os
import shutil
import time

import pytest

from dsmath import storage
from dsmath.errors import ConfigError, UserError


def _checkpoint(root, step: int, payload: bytes = b"weights"):
    """A published checkpoint ``root/step-N`` (files + manifest, as the learner's save leaves it)."""
    from learner.checkpoint import publish

    tmp = root / f"step-{step:06d}.tmp-test"
    (tmp / "deepspeed").mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(payload * 100)
    (tmp / "deepspeed" / "state.pt").write_bytes(b"optimizer %d" % step)
    (tmp / "trainer_state.json").write_text(json.dumps({"extra": {"step": step}}))
    publish(tmp, root / f"step-{step:06d}")
    return root / f"step-{step:06d}"


def _files(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_upload_list_download_round_trip(tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "top.txt").write_text("top")
    (src / "a" / "b" / "deep.bin").write_bytes(bytes(range(256)) * 40)
    (src / "skipped.txt").write_text("not named")
    uri = f"file://{tmp_path}/store/x"
    assert storage.upload_dir(src, uri, names=["top.txt", "a"]) == 2
    assert storage.list_dirs(f"file://{tmp_path}/store") == ["x"]
    assert storage.list_dirs(uri) == ["a"]
    assert storage.exists(storage.join(uri, "top.txt")) and not storage.exists(storage.join(uri, "skipped.txt"))
    assert storage.download_dir(uri, tmp_path / "back") == 2
    assert _files(tmp_path / "back") == {"top.txt": b"top", "a/b/deep.bin": bytes(range(256)) * 40}
    # changed_only: a file copied before and unchanged since is not copied again; a grown, rewritten or new one is.
    assert storage.upload_dir(src, uri, names=["top.txt", "a"], changed_only=True) == 0
    (src / "top.txt").write_text("top, grown")
    (src / "a" / "new.txt").write_text("new")
    assert storage.upload_dir(src, uri, names=["top.txt", "a"], changed_only=True) == 2
    assert storage.download_dir(uri, tmp_path / "back2") == 3 and (tmp_path / "back2" / "top.txt").read_text() == "top, grown"
    # Rewritten with the same size (summary.json's "steps": 2 -> 3): its modification time says it changed.
    (src / "top.txt").write_text("TOP, grown")
    os.utime(src / "top.txt", ns=(time.time_ns() + 10**9,) * 2)  # past the filesystem's timestamp granularity
    assert storage.upload_dir(src, uri, names=["top.txt", "a"], changed_only=True) == 1
    assert storage.download_dir(uri, tmp_path / "back3") == 3 and (tmp_path / "back3" / "top.txt").read_text() == "TOP, grown"
    storage.remove_dir(uri)
    assert storage.list_dirs(f"file://{tmp_path}/store") == []
    storage.remove_dir(uri)  # gone already: not an error
    assert storage.list_dirs(f"file://{tmp_path}/nowhere") == []
    with pytest.raises(UserError, match="nothing there to download"):
        storage.download_dir(uri, tmp_path / "again")


def test_a_uri_pyarrow_cannot_open_is_one_line_naming_the_key(tmp_path):
    from dsmath.config import load_config

    with pytest.raises(UserError, match=r"^storage='nosuch://x': not a storage URI pyarrow can open"):
        storage.open_uri("nosuch://x")
    with pytest.raises(ConfigError, match="storage: 'relative/dir' is not a URI"):
        load_config("tiny_cpu", ["storage=relative/dir"])
    assert load_config("tiny_cpu", [f"storage=file://{tmp_path}/s"]).storage == f"file://{tmp_path}/s"
    assert load_config("tiny_cpu", []).storage == ""


def test_an_upload_cut_short_at_any_file_never_has_its_manifest(tmp_path, monkeypatch):
    """Fault injection: the k-th file copy fails, for every k. The manifest is copied last, so no cut leaves a
    manifest in storage; the newest intact checkpoint is then the previous one, said in one line."""
    import pyarrow.fs as pafs

    from learner.checkpoint import MANIFEST, download_newest, upload

    local = tmp_path / "ckpts"
    first = _checkpoint(local, 1)
    root_uri = f"file://{tmp_path}/store/checkpoints"
    assert upload(first, root_uri, keep=2) == []
    second = _checkpoint(local, 2, payload=b"newer")
    n_files = len(_files(second))
    real_copy = pafs.copy_files
    for k in range(n_files):
        calls = []

        def failing_copy(src, dest, **kw):
            calls.append(dest)
            if len(calls) == k + 1:
                raise OSError(f"injected: copy {k} of {n_files} fails")
            return real_copy(src, dest, **kw)

        monkeypatch.setattr(pafs, "copy_files", failing_copy)
        with pytest.raises(OSError, match="injected"):
            upload(second, root_uri, keep=2)
        monkeypatch.setattr(pafs, "copy_files", real_copy)
        assert calls[-1].endswith("step-000002/" + MANIFEST) == (k == n_files - 1)
        assert not storage.exists(f"{root_uri}/step-000002/{MANIFEST}")
        lines = []
        got = download_newest(root_uri, tmp_path / f"resume-{k}", log=lines.append)
        assert got.name == "step-000001" and _files(got) == _files(first)
        assert lines == [f"storage {root_uri}: step-000002 is incomplete (no {MANIFEST}): took step-000001, "
                         "the newest intact one"]
    assert upload(second, root_uri, keep=2) == []  # whole this time
    got = download_newest(root_uri, tmp_path / "resume-whole", log=print)
    assert got.name == "step-000002" and _files(got) == _files(second)
    assert (tmp_path / "resume-whole" / "latest").read_text().strip() == "step-000002"


def test_a_damaged_stored_checkpoint_is_passed_over_and_none_intact_is_one_line(tmp_path):
    from learner.checkpoint import download_newest, upload

    local, root_uri = tmp_path / "ckpts", f"file://{tmp_path}/store/checkpoints"
    for step in (1, 2):
        upload(_checkpoint(local, step), root_uri, keep=2)
    stored = tmp_path / "store" / "checkpoints" / "step-000002" / "model.safetensors"
    data = bytearray(stored.read_bytes())
    data[7] ^= 1  # one flipped bit: same size, other checksum
    stored.write_bytes(bytes(data))
    lines = []
    assert download_newest(root_uri, tmp_path / "r", log=lines.append).name == "step-000001"
    assert lines == [f"storage {root_uri}: step-000002 is damaged (model.safetensors does not match its "
                     "checksum): took step-000001, the newest intact one"]
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["latest", "step-000001"]  # no .tmp- left behind
    shutil.rmtree(tmp_path / "store" / "checkpoints" / "step-000001")
    with pytest.raises(UserError, match=r"^no intact checkpoint in storage .*: step-000002 is damaged"):
        download_newest(root_uri, tmp_path / "r2")


def test_storage_is_pruned_like_the_local_folder(tmp_path):
    """keep=2 keeps the two newest; a checkpoint newer than the one just uploaded (an abandoned future) goes."""
    from learner.checkpoint import upload

    local, root_uri = tmp_path / "ckpts", f"file://{tmp_path}/store/checkpoints"
    for step in (1, 2, 3):
        upload(_checkpoint(local, step), root_uri, keep=2)
    assert storage.list_dirs(root_uri) == ["step-000002", "step-000003"]
    assert upload(_checkpoint(local, 2, payload=b"resumed"), root_uri, keep=2) == ["step-000003"]
    assert storage.list_dirs(root_uri) == ["step-000002"]
    assert (tmp_path / "store/checkpoints/step-000002/model.safetensors").read_bytes() == b"resumed" * 100


def test_fetch_downloads_a_checkpoint_only_where_it_is_missing(tmp_path):
    from learner.checkpoint import fetch, upload

    ckpt = _checkpoint(tmp_path / "node-a", 4)
    root_uri = f"file://{tmp_path}/store/checkpoints"
    upload(ckpt, root_uri, keep=1)
    assert fetch(ckpt, root_uri) is False  # already here
    elsewhere = tmp_path / "node-b" / "checkpoints" / "step-000004"
    assert fetch(elsewhere, root_uri) is True and _files(elsewhere) == _files(ckpt)
    with pytest.raises(UserError, match="step-000005 is not on this machine and its copy in storage .* is "
                                        "incomplete"):
        fetch(tmp_path / "node-b" / "checkpoints" / "step-000005", root_uri)


def test_restore_brings_back_run_files_and_the_newest_checkpoint_once(tmp_path):
    from learner.checkpoint import upload
    from wiring.run_storage import checkpoints_uri, restore, upload_run_files

    run, uri = tmp_path / "run", f"file://{tmp_path}/store"
    (run / "samples").mkdir(parents=True)
    (run / "logs").mkdir()
    (run / "config.yaml").write_text("steps: 2\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "samples" / "step-1.parquet").write_bytes(b"PAR1")
    (run / "logs" / "driver.log").write_text("not uploaded")
    (run / "status_token").write_text("a secret: not uploaded")
    upload(_checkpoint(run / "checkpoints", 1), checkpoints_uri(uri), keep=1)
    assert upload_run_files(run, uri) == 3
    assert restore(run, uri, log=pytest.fail) is None  # an intact checkpoint here: nothing to do
    shutil.rmtree(run)
    lines = []
    assert restore(run, uri, log=lines.append) == run / "checkpoints" / "step-000001"
    assert lines == [f"--resume: downloaded checkpoint step-000001 and 3 run files from {uri} into {run}"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "samples"]
    assert (run / "samples" / "step-1.parquet").read_bytes() == b"PAR1"


def test_a_fresh_run_refuses_a_storage_holding_a_run_unless_overwrite(tmp_path):
    from wiring.run_storage import claim_fresh, upload_run_files

    uri = f"file://{tmp_path}/store"
    claim_fresh(uri, overwrite=False)  # nothing there yet
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    upload_run_files(tmp_path / "run", uri)
    with pytest.raises(UserError, match=r"already holds a run \(run\): pass --resume to continue it, --overwrite"):
        claim_fresh(uri, overwrite=False)
    claim_fresh(uri, overwrite=True)
    assert storage.list_dirs(uri) == []


def test_cli_resume_with_storage_fetches_the_saved_config_when_the_run_dir_is_gone(tmp_path):
    """`dsmath train --resume --run-dir RUN storage=URI` on a machine without RUN: the saved config and the
    newest checkpoint come from storage before the config is read (resumed_config; no Ray needed to show it)."""
    import argparse

    import yaml

    from dsmath.config import load_config, to_dict
    from learner.checkpoint import upload
    from wiring.commands.train import resumed_config
    from wiring.run_storage import checkpoints_uri, upload_run_files

    run, uri = tmp_path / "run", f"file://{tmp_path}/store"
    saved = load_config("tiny_cpu", [f"run_dir={run}", f"storage={uri}", "steps=7", "algorithm.beta=0.02"])
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(saved), sort_keys=False))
    upload(_checkpoint(run / "checkpoints", 5), checkpoints_uri(uri), keep=1)
    upload_run_files(run, uri)
    shutil.rmtree(run)
    args = argparse.Namespace(config="tiny_cpu")
    with pytest.raises(UserError, match="holds no run to resume"):
        resumed_config(args, [f"run_dir={run}"])  # storage not named: nothing to fetch from
    cfg = resumed_config(args, [f"run_dir={run}", f"storage={uri}", "steps=9"])
    assert (cfg.algorithm.beta, cfg.steps, cfg.storage) == (0.02, 9, uri)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000005"


@pytest.mark.slow
def test_a_run_resumes_from_storage_alone_after_its_run_dir_is_deleted(tmp_path, ray_cluster, cache_dir):
    """Real Ray + vLLM + DeepSpeed: 2 steps with storage=file://…, the run directory deleted, then --resume to 3
    steps with the same storage: it continues from the step-2 checkpoint (rows 1–2 are the first run's, row 3
    trains at weight version 3), and storage holds only the newest checkpoint (keep_checkpoints=1)."""
    from dsmath.config import load_config
    from dsmath.utils.metrics import read_metrics
    from tiny_loop import TINY_LOOP
    from wiring.driver import train

    run, uri = tmp_path / "run", f"file://{tmp_path}/store"
    overrides = TINY_LOOP + [f"bootstrap.data_dir={cache_dir}", f"run_dir={run}", f"storage={uri}",
                             "checkpoint_every=1", "keep_checkpoints=1", "eval_size=8"]
    first = train(load_config("tiny_cpu", overrides + ["steps=2"]), progress=False)
    assert first["steps"] == 2
    assert storage.list_dirs(f"{uri}/checkpoints") == ["step-000002"]
    first_rows = read_metrics(run)
    shutil.rmtree(run)

    resumed = train(load_config("tiny_cpu", overrides + ["steps=3"]), resume=True, progress=False)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[:2] == first_rows  # brought back from storage, not re-run
    assert rows[2]["weight_version"] == 3 and rows[2]["samples_trained"] == 3 * 16
    assert resumed["resumed"] and resumed["steps"] == 3 and resumed["samples_trained"] == 48
    assert resumed["heldout_accuracy_before"] == first["heldout_accuracy_before"]  # the saved history, not re-measured
    assert storage.list_dirs(f"{uri}/checkpoints") == ["step-000003"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000003"]
    stored_summary = json.loads((tmp_path / "store" / "run" / "summary.json").read_text())
    assert stored_summary["steps"] == 3 and stored_summary["resumed"] is True
    stored_rows = (tmp_path / "store" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in stored_rows] == [1, 2, 3]
