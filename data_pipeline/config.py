"""Frozen, typed config for the math-corpus pipeline (same loader and error style as :mod:`dsmath.config`).

``load_corpus_config(path, ["select.token_budget=500000"])`` reads YAML, applies dotted overrides and
validates. An unknown key or a wrong type is a one-line :class:`dsmath.config.ConfigError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


from dsmath.config import ConfigError, load_tree, to_dict

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class InputConfig:
    """Where pages come from. ``demo_data_dir`` builds the demo corpus from shared/data; ``paths`` adds files
    (WARC/WET, JSONL or Parquet of {url, text|html}, gzip allowed)."""

    demo_data_dir: str = ""
    paths: tuple[str, ...] = ()
    seed_fraction: float = 0.3  # of the seed-domain math pages
    seed_domains: tuple[str, ...] = ("math.stackexchange.com",)
    heldout_fraction: float = 0.2
    max_pages_per_source: int = 0  # 0 = all
    seed: int = 0


@dataclass(frozen=True)
class ExtractConfig:
    main_content: bool = True
    min_chars: int = 200


@dataclass(frozen=True)
class DedupConfig:
    exact_url: bool = True
    near_dup: bool = True
    num_perm: int = 128
    bands: int = 16  # rows per band = num_perm / bands
    shingle_words: int = 5
    threshold: float = 0.8  # estimated Jaccard at which a candidate pair counts as a duplicate
    seed: int = 1


@dataclass(frozen=True)
class ClassifierConfig:
    """The paper's fastText recall model (dim 256, lr 0.1, wordNgrams 3, minCount 3, epoch 3)."""

    dim: int = 256
    lr: float = 0.1
    word_ngrams: int = 3
    min_count: int = 3
    epoch: int = 3
    bucket: int = 200000
    negatives_per_positive: float = 1.0
    max_chars: int = 20000
    threads: int = 1
    seed: int = 0


@dataclass(frozen=True)
class SelectConfig:
    """Keep the top pages by score until ``token_budget`` whitespace tokens (rank and keep, not a threshold).
    ``token_budget_fraction`` > 0 sets the budget as a fraction of the scored pool's tokens instead."""

    token_budget: int = 0
    token_budget_fraction: float = 0.5


@dataclass(frozen=True)
class DomainConfig:
    granularity: Literal["host", "registered"] = "host"
    min_kept_fraction: float = 0.10
    min_pages: int = 5
    path_depth: int = 1
    annotation_file: str = ""  # a person's YAML; overrides the automatic annotator
    auto_annotate: bool = True
    auto_min_mean_score: float = 0.5
    auto_min_kept_fraction: float = 0.5


@dataclass(frozen=True)
class IterateConfig:
    max_iterations: int = 4
    stop_overlap: float = 0.98


@dataclass(frozen=True)
class DecontamConfig:
    enabled: bool = True
    ngram: int = 10
    min_ngram: int = 3
    index_path: str = ""  # empty: the index shipped in dsmath/data
    benchmark_dir: str = ""  # set to build the index from benchmark JSONL files instead


@dataclass(frozen=True)
class RunnerConfig:
    backend: Literal["local", "ray"] = "local"
    shard_size: int = 256
    num_cpus: int = 2
    batch_size: int = 64
    progress: bool = True


@dataclass(frozen=True)
class CorpusConfig:
    out_dir: str = "runs/corpus"
    input: InputConfig = field(default_factory=InputConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    domains: DomainConfig = field(default_factory=DomainConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)


def validate(cfg: CorpusConfig) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    d = cfg.dedup
    need(d.num_perm >= 1 and d.bands >= 1, "dedup.num_perm and dedup.bands: must be >= 1")
    need(d.num_perm % d.bands == 0, f"dedup.bands: {d.bands} does not divide dedup.num_perm={d.num_perm}")
    need(0 < d.threshold <= 1, "dedup.threshold: must be in (0, 1]")
    need(d.shingle_words >= 1, "dedup.shingle_words: must be >= 1")
    need(0 < cfg.input.seed_fraction <= 1, "input.seed_fraction: must be in (0, 1]")
    need(0 <= cfg.input.heldout_fraction < 1, "input.heldout_fraction: must be in [0, 1)")
    need(cfg.select.token_budget > 0 or 0 < cfg.select.token_budget_fraction <= 1,
         "select: set token_budget > 0 or token_budget_fraction in (0, 1]")
    need(cfg.iterate.max_iterations >= 1, "iterate.max_iterations: must be >= 1")
    need(0 < cfg.iterate.stop_overlap <= 1, "iterate.stop_overlap: must be in (0, 1]")
    need(cfg.decontam.min_ngram >= 1 and cfg.decontam.min_ngram <= cfg.decontam.ngram,
         "decontam.min_ngram: must be in [1, decontam.ngram]")
    need(cfg.classifier.bucket <= 2_000_000, "classifier.bucket: keep it <= 2000000 (the model grows as bucket × dim)")
    need(cfg.runner.shard_size >= 1 and cfg.runner.batch_size >= 1, "runner.shard_size/batch_size: must be >= 1")
    need(0 < cfg.domains.min_kept_fraction <= 1, "domains.min_kept_fraction: must be in (0, 1]")


def load_corpus_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> CorpusConfig:
    """Load a preset name or YAML path, apply ``key=value`` overrides, validate, freeze."""
    return load_tree(CorpusConfig, name_or_path, overrides, preset_dir=PRESET_DIR, check=validate,
                     env_var="DSMATH_CORPUS_OVERRIDES")


__all__ = ["CorpusConfig", "ConfigError", "load_corpus_config", "to_dict", "validate"]
