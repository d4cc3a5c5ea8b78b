"""The frozen config tree of ``dsmath pretrain`` / ``dsmath corpus evaluate`` (same loader as ``dsmath train``).

``load_pretrain_config("pretrain_tiny_cpu", ["data.sources.math.weight=0.5", "optim.steps=100"])``
reads a preset (``dsmath/configs/pretrain_*.yaml``) or a YAML path, applies dotted overrides and
validates; every mistake is a one-line :class:`dsmath.config.ConfigError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dsmath.config import PRESET_DIR, ConfigError, ModelConfig, load_tree, to_dict


@dataclass(frozen=True)
class SourceConfig:
    """One named source: shard files (files, folders or globs of .jsonl[.gz]/.parquet/.json) and its weight.

    ``text_fields`` empty = automatic (``text``/``content``/``articleBody``, else a question/answer pair).
    ``max_docs`` > 0 uses only the first that many documents (per epoch)."""

    paths: tuple[str, ...] = ()
    weight: float = 1.0
    text_fields: tuple[str, ...] = ()
    max_docs: int = 0


@dataclass(frozen=True)
class DataConfig:
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    seq_len: int = 128  # tokens per packed row
    chunk_tokens: int = 64  # the mixture picks a source per chunk of this many tokens
    skip_bad: bool = False  # count and skip malformed records instead of stopping
    tokenizer_sample_chars: int = 300_000  # per source, to train the tiny model's tokenizer (model.path empty)


@dataclass(frozen=True)
class OptimConfig:
    steps: int = 200
    batch_size: int = 16  # packed rows per optimizer step (all ranks together)
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    zero_stage: int = 0
    micro_batch_size: int = 16
    backend: Literal["auto", "gloo", "nccl"] = "auto"


@dataclass(frozen=True)
class EvalConfig:
    """Held-out LM loss per named text set, and few-shot accuracy (0 problems = skipped)."""

    heldout: dict[str, SourceConfig] = field(default_factory=dict)  # weight unused here
    heldout_max_docs: int = 100  # per set, when the set's own max_docs is 0
    eval_every: int = 0  # steps; 0 = only at the end
    gsm8k_path: str = ""
    math_path: str = ""
    fewshot_problems: int = 0  # per benchmark
    fewshot_shots: int = 4
    max_new_tokens: int = 96


@dataclass(frozen=True)
class PretrainConfig:
    run_dir: str = "runs/pretrain"
    seed: int = 0
    checkpoint_every: int = 0  # steps; the last step is always checkpointed
    keep_checkpoints: int = 2  # the newest N checkpoints are kept (a damaged latest falls back to the one before)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def validate(cfg: PretrainConfig) -> None:
    """One line per impossible setting."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    d, o, e = cfg.data, cfg.optim, cfg.eval
    need(bool(d.sources), "data.sources: name at least one source (data.sources.NAME.paths=[...])")
    for name, s in d.sources.items():
        need(bool(s.paths), f"data.sources.{name}.paths: must name at least one file, folder or glob")
        need(s.weight >= 0, f"data.sources.{name}.weight: must be >= 0")
        need(s.max_docs >= 0, f"data.sources.{name}.max_docs: must be >= 0")
    need(sum(s.weight for s in d.sources.values()) > 0, "data.sources: at least one weight must be > 0")
    for name, s in e.heldout.items():
        need(bool(s.paths), f"eval.heldout.{name}.paths: must name at least one file")
    need(d.seq_len >= 2, "data.seq_len: must be >= 2")
    need(d.seq_len <= cfg.model.max_position_embeddings or bool(cfg.model.path),
         f"data.seq_len: {d.seq_len} exceeds model.max_position_embeddings={cfg.model.max_position_embeddings}")
    need(d.chunk_tokens >= 1, "data.chunk_tokens: must be >= 1")
    need(o.steps >= 1, "optim.steps: must be >= 1")
    need(o.batch_size >= 1 and o.micro_batch_size >= 1, "optim.batch_size, optim.micro_batch_size: must be >= 1")
    need(o.lr > 0, "optim.lr: must be > 0")
    need(o.zero_stage in (0, 1, 2, 3), "optim.zero_stage: must be 0, 1, 2 or 3")
    need(cfg.checkpoint_every >= 0 and e.eval_every >= 0, "checkpoint_every, eval.eval_every: must be >= 0")
    need(cfg.keep_checkpoints >= 1, "keep_checkpoints: must be >= 1 (2 or more lets --resume fall back past a "
                                    "damaged latest checkpoint)")
    need(e.fewshot_problems >= 0 and e.fewshot_shots >= 0, "eval.fewshot_problems, eval.fewshot_shots: must be >= 0")
    need(e.fewshot_problems == 0 or bool(e.gsm8k_path or e.math_path),
         "eval.fewshot_problems > 0 needs eval.gsm8k_path and/or eval.math_path")


def load_pretrain_config(name_or_path: str | None = "pretrain_tiny_cpu", overrides: list[str] | None = None) -> PretrainConfig:
    """A preset name (``pretrain_tiny_cpu``, ``pretrain_deepseekmath_base``) or YAML path, plus overrides."""
    return load_tree(PretrainConfig, name_or_path, overrides, preset_dir=PRESET_DIR, check=validate,
                     env_var="DSMATH_PRETRAIN_OVERRIDES")


__all__ = ["ConfigError", "DataConfig", "EvalConfig", "OptimConfig", "PretrainConfig", "SourceConfig",
           "load_pretrain_config", "to_dict", "validate"]
