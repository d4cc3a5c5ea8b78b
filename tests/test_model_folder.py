"""``dsmath.model_folder.pad_token_id``: the driver's pad id without transformers, equal to AutoTokenizer's on
every way a tokenizer folder can name (or not name) its pad token."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
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
