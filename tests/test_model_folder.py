"""``dsmath.model_folder``: ``pad_token_id``, the driver's pad id without transformers, equal to AutoTokenizer's on
every way a tokenizer folder can name (or not name) its pad token; and the scratch folders actors write models into,
which outlive no process: removed at a normal exit, and swept once their process was killed (as ``ray.kill`` does)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dsmath.model_folder import pad_token_id


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from dsmath.tiny import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([f"{a} + {b} = {a + b}" for a in range(30) for b in range(30)], 320, out)
    return out


def _variant(src: Path, dest: Path, config_pad, special_map_pad=None) -> Path:
    shutil.copytree(src, dest)
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token", None)
    if config_pad is not None:
        cfg["pad_token"] = None if config_pad == "null" else config_pad
    cfg_path.write_text(json.dumps(cfg))
    (dest / "special_tokens_map.json").unlink(missing_ok=True)
    if special_map_pad is not None:
        (dest / "special_tokens_map.json").write_text(json.dumps({"pad_token": special_map_pad}))
    return dest


@pytest.mark.parametrize("config_pad, special_map_pad", [
    ("<|pad|>", None),                                  # as dsmath's tiny tokenizer and most fast ones write it
    ({"__type": "AddedToken", "content": "<|endoftext|>", "special": True}, None),  # older files: a dict
    (None, "<|pad|>"),                                  # named only in special_tokens_map.json
    ("a", None),                                        # a plain vocabulary entry, not an added token
    ("<|not-in-the-vocab|>", None),                     # AutoTokenizer's own answer (it adds the token)
    (None, None),                                       # no pad token at all
    ("null", "<|pad|>"),                                # null in the config, named in the special-tokens map
], ids=["config", "dict", "special-map", "vocab-entry", "unknown-token", "none", "null-then-map"])
def test_pad_token_id_equals_autotokenizers(tokenizer_dir, tmp_path, config_pad, special_map_pad) -> None:
    from transformers import AutoTokenizer

    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert cfg.get("pad_token") == "<|pad|>"  # the tiny tokenizer names it where the first case reads it
    folder = _variant(tokenizer_dir, tmp_path / "tok", config_pad, special_map_pad)
    want = AutoTokenizer.from_pretrained(str(folder)).pad_token_id
    assert pad_token_id(folder) == want
    if config_pad is None and special_map_pad is None:
        assert want is None


def test_pad_token_id_reads_a_usual_folder_without_importing_transformers(tokenizer_dir) -> None:
    code = ("import sys; from dsmath.model_folder import pad_token_id; "
            f"print(pad_token_id({str(tokenizer_dir)!r}), 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    from transformers import AutoTokenizer

    assert out == [str(AutoTokenizer.from_pretrained(str(tokenizer_dir)).pad_token_id), "False"]


_MAKE_SCRATCH = ("import sys, time; from dsmath.model_folder import scratch_folder; "
                 "f = scratch_folder('generator-0'); (f / 'model.safetensors').write_bytes(b'x' * 1000); "
                 "print(f, flush=True); time.sleep(float(sys.argv[1]))")


def _scratch_in_child(tmp: Path, sleep_s: float) -> tuple[subprocess.Popen, Path]:
    """A process that makes a scratch folder (under ``tmp``), writes a file into it and sleeps ``sleep_s``."""
    child = subprocess.Popen([sys.executable, "-c", _MAKE_SCRATCH, str(sleep_s)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "TMPDIR": str(tmp)})
    return child, Path(child.stdout.readline().strip())


def test_a_scratch_folder_goes_with_a_normal_exit_and_a_killed_ones_goes_at_the_next_sweep(tmp_path, monkeypatch):
    from dsmath.model_folder import SCRATCH_PREFIX, scratch_folder, sweep_scratch_folders

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    done, folder = _scratch_in_child(tmp_path, 0)
    assert folder.name.startswith(SCRATCH_PREFIX) and folder.parent == tmp_path and done.wait(60) == 0
    assert not folder.exists()  # exit handlers ran

    killed, left = _scratch_in_child(tmp_path, 600)
    alive, kept = _scratch_in_child(tmp_path, 600)
    try:
        killed.send_signal(signal.SIGKILL)  # what ray.kill does to an actor: no exit handlers
        killed.wait(60)
        assert (left / "model.safetensors").is_file()
        other = tmp_path / f"{SCRATCH_PREFIX}999999-{killed.pid}-learner0-x"  # another pid namespace's
        other.mkdir()
        assert sweep_scratch_folders() == 1
        assert not left.exists() and kept.is_dir() and other.is_dir()
        mine = scratch_folder("learner0")  # making one sweeps too, and never its own process's
        assert mine.is_dir() and sweep_scratch_folders() == 0 and mine.is_dir()
    finally:
        alive.kill()
        alive.wait(60)
    assert sweep_scratch_folders() == 1 and not kept.exists()


def test_temporary_files_of_this_process_and_its_children_go_to_the_folder_within_the_block(tmp_path):
    from dsmath.model_folder import temp_files_in

    before, before_env = tempfile.gettempdir(), os.environ.get("TMPDIR")
    with temp_files_in(tmp_path):
        fd, mine = tempfile.mkstemp(prefix="x-")
        os.close(fd)
        child = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.mkdtemp(prefix='y-'))"],
                               capture_output=True, text=True, check=True).stdout.strip()
    assert Path(mine).parent == tmp_path and Path(child).parent == tmp_path
    assert tempfile.gettempdir() == before and os.environ.get("TMPDIR") == before_env
