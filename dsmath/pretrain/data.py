"""From a :class:`~dsmath.pretrain.config.DataConfig` and a tokenizer to packed rows (training and held-out)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from dsmath.errors import UserError
from dsmath.model_folder import model_folder
from dsmath.pretrain.config import DataConfig, PretrainConfig, SourceConfig
from dsmath.pretrain.mixture import MixtureSampler
from dsmath.pretrain.packing import Packer, pack_documents
from dsmath.pretrain.sources import SkipCounts, TokenStream, expand_paths, iter_documents


def tokenize_fn(tokenizer):
    """Text -> token ids without special tokens (documents get their EOS from the stream)."""
    def tokenize(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return tokenize


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def build_packer(data: DataConfig, tokenizer, *, seed: int) -> Packer:
    """The endless training stream: every source (weight > 0 or not: a zero weight is never drawn but
    keeps its index) mixed by weight, packed into ``data.seq_len`` rows."""
    tokenize = tokenize_fn(tokenizer)
    streams = {name: TokenStream(name, expand_paths(s.paths), tokenize, tokenizer.eos_token_id,
                                 text_fields=s.text_fields, skip_bad=data.skip_bad, max_docs=s.max_docs)
               for name, s in data.sources.items()}
    sampler = MixtureSampler(streams, {n: s.weight for n, s in data.sources.items()}, seed=seed,
                             chunk_tokens=data.chunk_tokens)
    return Packer(sampler, data.seq_len, pad_id_of(tokenizer))


def heldout_rows(source: SourceConfig, tokenizer, seq_len: int, *, max_docs: int, skip_bad: bool = False,
                 skipped: SkipCounts | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The first ``max_docs`` documents of a held-out set (``source.max_docs`` wins when set), packed once."""
    tokenize = tokenize_fn(tokenizer)
    docs = iter_documents(expand_paths(source.paths), text_fields=source.text_fields, skip_bad=skip_bad,
                          skipped=skipped, max_docs=source.max_docs or max_docs)
    return pack_documents((tokenize(t) for t in docs), seq_len, pad_id_of(tokenizer), tokenizer.eos_token_id)


def sample_texts(data: DataConfig, chars_per_source: int) -> Iterator[str]:
    """Up to ``chars_per_source`` characters of each source's first documents (to train a tokenizer)."""
    for s in data.sources.values():
        used = 0
        for text in iter_documents(expand_paths(s.paths), text_fields=s.text_fields, skip_bad=True):
            yield text[: chars_per_source - used]
            used += len(text)
            if used >= chars_per_source:
                break


def check_paths(cfg: PretrainConfig) -> None:
    """Every source, held-out set, benchmark and model path exists (one-line UserError otherwise),
    checked before anything slow starts."""
    for section, sources in (("data.sources", cfg.data.sources), ("eval.heldout", cfg.eval.heldout)):
        for name, src in sources.items():
            try:
                expand_paths(src.paths)
            except UserError as exc:
                raise UserError(f"{section}.{name}.paths: {exc}") from None
    if cfg.model.path:
        model_folder(cfg.model.path, f"model.path={cfg.model.path}")
    if cfg.eval.fewshot_problems:
        for key in ("gsm8k_path", "math_path"):
            path = getattr(cfg.eval, key)
            if path and not Path(path).is_file():
                raise UserError(f"eval.{key}: {path}: no such file")


def check_run_dir(cfg: PretrainConfig, resume: bool) -> None:
    """``resume`` needs a checkpoint in ``run_dir``; a fresh run refuses a folder that has one."""
    has_ckpt = (Path(cfg.run_dir) / "checkpoints" / "latest").is_file()
    if resume and not has_ckpt:
        raise UserError(f"{cfg.run_dir}: no checkpoint to resume from (checkpoints/latest is missing)")
    if not resume and has_ckpt:
        raise UserError(f"{cfg.run_dir} already holds checkpoints; pass --resume or choose another --run-dir")
