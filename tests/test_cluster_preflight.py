"""wiring.jobsubmit.preflight: the working_dir upload estimate honours excludes and ignore files like Ray, agrees
with Ray's own packer byte for byte, and flags an upload that Ray would refuse."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dsmath.errors import UserError
from wiring.jobsubmit import DEFAULT_EXCLUDES, MIB, check_or_raise, preflight, upload_limit_bytes

ROOT = Path(__file__).resolve().parents[1]


def make_tree(root: Path) -> None:
    files = {
        "train.py": b"print('hi')\n" * 10,
        "dsmath/__init__.py": b"",
        "dsmath/data/tiny.txt": b"x" * 300,  # package data: must NOT be hit by the root-anchored /data/
        "data/big.jsonl": b"y" * 5000,
        "runs/r1/metrics.jsonl": b"z" * 4000,
        "ckpt/model.pt": b"w" * 7000,
        "notes/keep.md": b"k" * 100,
        "notes/.rayignore": b"secret.txt\n",
        "notes/secret.txt": b"s" * 50,
        "lib/.gitignore": b"*.log\n",
        "lib/a.log": b"l" * 70,
        "lib/a.py": b"a = 1\n",
        ".git/objects/pack": b"g" * 9000,
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "empty_dir").mkdir()


def test_excludes_and_ignore_files_are_honoured(tmp_path: Path) -> None:
    make_tree(tmp_path)
    report = preflight(tmp_path, DEFAULT_EXCLUDES, include_gitignore=True)
    # Gone: .git, /runs/, /data/ (root only), *.pt, notes/secret.txt (.rayignore), lib/a.log (.gitignore).
    kept = {
        "train.py": 120, "dsmath/__init__.py": 0, "dsmath/data/tiny.txt": 300, "notes/keep.md": 100,
        "notes/.rayignore": 11, "lib/.gitignore": 6, "lib/a.py": 6,
    }
    assert report.ok and report.warnings == ()
    assert report.num_files == len(kept)
    assert report.total_bytes == sum(kept.values()) == 543
    assert dict(report.largest_files) == {k: v for k, v in sorted(kept.items(), key=lambda kv: -kv[1])[:5]}
    # the same tree without ignore files: the .gitignore'd log comes back, the .rayignore'd file does not
    report = preflight(tmp_path, DEFAULT_EXCLUDES, include_gitignore=False)
    assert report.total_bytes == 543 + 70


def test_estimate_matches_rays_own_zip_byte_for_byte(tmp_path: Path) -> None:
    from ray._private.runtime_env.packaging import _zip_files

    work = tmp_path / "work"
    work.mkdir()
    make_tree(work)
    excludes = [".git", "/runs/", "/data/", "*.pt"]
    report = preflight(work, excludes, include_gitignore=True)
    out = tmp_path / "pkg.zip"
    _zip_files(str(work), excludes, str(out), include_gitignore=True)
    with zipfile.ZipFile(out) as zf:
        names = {n for n in zf.namelist() if not n.endswith("/")}
    assert names == {
        "train.py", "dsmath/__init__.py", "dsmath/data/tiny.txt", "notes/keep.md", "notes/.rayignore",
        "lib/.gitignore", "lib/a.py",
    }
    assert report.num_files == len(names)
    assert report.estimated_zip_bytes == out.stat().st_size
    # without the excludes everything but the ignore-file matches goes, and the estimate still agrees
    report = preflight(work, [], include_gitignore=True)
    _zip_files(str(work), [], str(out), include_gitignore=True)
    assert report.estimated_zip_bytes == out.stat().st_size


def test_oversize_upload_is_flagged_and_excluding_it_fixes_it(tmp_path: Path) -> None:
    make_tree(tmp_path)
    # A sparse 600 MiB file: the real size Ray would zip, no disk used.
    with (tmp_path / "runs" / "r1" / "huge.bin").open("wb") as fh:
        fh.truncate(600 * MIB)
    report = preflight(tmp_path, [".git"], include_gitignore=True)
    assert report.limit_bytes == 512 * MIB
    assert not report.ok
    msg = report.message()
    assert "ERROR" in msg and "over Ray's limit (512.0 MiB)" in msg and "runs 600.0 MiB" in msg
    assert "large files (runs/r1/huge.bin 600.0 MiB)" in msg
    assert "uploading data/" in msg and "runs/" in msg  # suspect directories are named
    with pytest.raises(UserError, match="over Ray's limit"):
        check_or_raise(tmp_path, [".git"])
    fixed = preflight(tmp_path, DEFAULT_EXCLUDES, include_gitignore=True)
    assert fixed.ok and fixed.warnings == ()
    assert fixed.estimated_zip_bytes < 10_000


def test_half_limit_warns_but_passes(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"0" * 3000)
    report = preflight(tmp_path, [], limit_bytes=5000)
    assert report.ok and any("over half of Ray's limit" in w for w in report.warnings)


def test_limit_follows_rays_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_max_grpc_message_size", str(100 * MIB))
    assert upload_limit_bytes() == 100 * MIB
    monkeypatch.delenv("RAY_max_grpc_message_size")
    assert upload_limit_bytes() == 512 * MIB


def test_not_a_directory_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a directory"):
        preflight(tmp_path / "missing")


def test_cli_exit_codes(tmp_path: Path) -> None:
    make_tree(tmp_path)
    env = {**os.environ, "RAY_max_grpc_message_size": "8000"}
    cmd = [sys.executable, "-m", "wiring.jobsubmit", str(tmp_path)]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cmd, *extra], capture_output=True, text=True, env=env, cwd=ROOT)

    ok = run()
    assert ok.returncode == 0 and "7 files" in ok.stdout, ok.stderr
    (tmp_path / "extra.bin2").write_bytes(b"e" * 9000)
    bad = run("--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"))
    assert bad.returncode == 1 and "ERROR" in bad.stderr and "extra.bin2" in bad.stderr
    assert run("--exclude", "*.bin2").returncode == 0
    missing = run("--runtime-env", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
