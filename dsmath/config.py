"""One typed, frozen config tree for every dsmath job.

Loaded from YAML (a preset name such as ``tiny_cpu`` or a path) plus dotted overrides
(``algorithm.beta=0.04 rollout.group_size=64``). Every error a user can cause is a
:class:`ConfigError` whose one-line message names the key and what is allowed.

Guaranteed: the returned tree is immutable and has passed :func:`validate`.
Not guaranteed: that the hardware it asks for exists; the driver checks that.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, get_args, get_origin

import yaml

from dsmath import transports
from dsmath.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class ModelConfig:
    """The policy. ``path`` empty means the built-in tiny Qwen2 model made by the bootstrap."""

    path: str = ""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 512
    vocab_size: int = 512
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # The memory plan's shape when model.path has no config.json on this machine (dsmath.memory_plan.KNOWN_SHAPES).
    shape: str = ""


@dataclass(frozen=True)
class BootstrapConfig:
    """Tiny-model warm-up on generated arithmetic word problems (wiring/bootstrap.py)."""

    data_dir: str = "~/.cache/dsmath"
    num_train_problems: int = 20000
    num_sft_problems: int = 10000
    num_heldout_problems: int = 500
    levels: tuple[int, ...] = (1, 2, 3)
    stepwise_fraction: float = 0.3
    sft_steps: int = 1000
    sft_lr: float = 3e-3
    sft_batch_size: int = 64
    seed: int = 1234


@dataclass(frozen=True)
class RolloutConfig:
    questions_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 96
    max_prompt_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    mode: Literal["cot", "pot", "tool"] = "cot"
    num_generators: int = 1
    # Where generators get their starting weights: "path" loads model.path (or the resumed checkpoint) from the
    # generator's own node; "learner" sends config and tokenizer through the object store and the weights from the
    # learner, so the generators' nodes need no copy of the model (clusters without a shared filesystem).
    weights_from: Literal["path", "learner"] = "path"
    gpus_per_generator: float = 0.0
    cpus_per_generator: float = 1.0
    tensor_parallel_size: int = 1
    max_tool_rounds: int = 3
    gpu_memory_utilization: float = 0.85
    kv_cache_space_gib: int = 1
    # DAPO dynamic sampling: drop groups whose rewards are all equal and sample more questions, up to
    # ``dynamic_sampling_max_rounds`` rounds per step (then train on what was kept).
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 3
    # Completions that hit max_new_tokens: "mask" drops them from the loss, "penalty" adds DAPO's soft
    # length penalty (0 → −overlong_penalty over the last overlong_buffer tokens) to the reward.
    overlong: Literal["none", "mask", "penalty"] = "none"
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    # Memory of one generator GPU, in GB (1e9 bytes), for the memory plan (dsmath train --dry-run).
    gpu_memory_gb: float = 80.0


@dataclass(frozen=True)
class AlgorithmConfig:
    """The RL method and its knobs (the ``algorithm:`` section). Paper defaults: GRPO, β = 0.04 with the k3
    estimator in the loss, one update per sampling stage."""

    name: str = "grpo"  # a method of dsmath.methods: grpo | online_rft | rft | ppo | dpo
    beta: float = 0.04
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    adv_eps: float = 1e-6
    advantage: Literal["outcome", "process"] = "outcome"
    loss_agg: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"] = "seq_mean_token_mean"
    updates_per_step: int = 1
    step_delimiter: str = "\n"
    # The unified paradigm's switches (paper §5.2, dsmath/methods/). sampling: where samples come from —
    # online (the current policy) or offline (drawn once from the starting policy); auto = the method's own.
    sampling: Literal["auto", "online", "offline"] = "auto"
    dpo_beta: float = 0.1
    gae_gamma: float = 1.0
    gae_lambda: float = 0.95
    value_lr: float = 1e-5
    value_clip: float = 0.2
    whiten_advantages: bool = True


@dataclass(frozen=True)
class LearnerConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    zero_stage: int = 1
    num_ranks: int = 1
    micro_batch_size: int = 16
    gpus_per_rank: float = 0.0
    cpus_per_rank: float = 1.0
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Token-budget micro-batches: at most this many (padded) tokens per micro-batch, sequences sorted by
    # length, so short completions are not padded to the longest one in the batch. 0 = micro_batch_size only.
    max_tokens_per_micro_batch: int = 0
    # The frozen reference: "copy" = a second model on the device; "host" = its weights in host memory,
    # swapped into the policy module for the reference pass (no second copy on the accelerator; ZeRO <= 2).
    reference: Literal["copy", "host"] = "copy"
    # Compute precision. "fp32": everything in float32. "bf16": DeepSpeed's bf16 mode (bf16 weights and
    # compute, fp32 master weights and Adam state), the reference model in bf16; log-prob, ratio and KL
    # arithmetic stays in float32 either way.
    precision: Literal["fp32", "bf16"] = "fp32"
    # Activation checkpointing (recompute each layer's activations in backward): less memory, same gradients.
    gradient_checkpointing: bool = False
    # Log-probs and entropy from the final hidden states through the LM head this many tokens at a time
    # (recomputed in backward), so no [N, T, V] logits are kept. 0 = the full logits at once.
    logprob_chunk_tokens: int = 0
    # Memory of one learner GPU, in GB (1e9 bytes), for the memory plan (dsmath train --dry-run).
    gpu_memory_gb: float = 80.0


@dataclass(frozen=True)
class RewardConfig:
    num_workers: int = 1
    strict: bool = True
    timeout_s: float = 5.0
    correct_reward: float = 1.0
    incorrect_reward: float = 0.0
    format_penalty: float = 0.0
    # HOST:PORT of `dsmath sandbox serve` (token from $DSMATH_SANDBOX_TOKEN): PoT rewards and tool calls
    # (rollout.mode=tool) run there; empty = a sandbox pool in each reward worker / generator process.
    sandbox_address: str = ""
    # Which reward (dsmath/rewards/, one file per kind): auto = combined when model_path is set or
    # algorithm.advantage=process, else sandbox for rollout.mode=pot, else rule.
    kind: str = "auto"
    # Reward models (dsmath/rewards/model.py): empty model_path = rule rewards only; otherwise each of the
    # num_workers reward actors grades by rule and scores with the model (the combined reward).
    model_path: str = ""
    model_kind: Literal["outcome", "process"] = "outcome"
    combine: Literal["weighted", "gate"] = "weighted"  # dsmath.rewards.combined.combine_rewards
    rule_weight: float = 1.0
    model_weight: float = 1.0
    model_batch_size: int = 32
    # Verifier audit (dsmath/rewards/rule.py): this share of the samples is judged a second time, by the same
    # grader in the other mode (strict <-> lenient) or by math-verify; the disagreement rate is a step metric.
    audit_fraction: float = 0.1
    audit_check: Literal["other_mode", "math_verify"] = "other_mode"


@dataclass(frozen=True)
class RewardModelTrainConfig:
    """``dsmath rm train`` and the reward-model half of iterative GRPO (``dsmath iterate``)."""

    questions: int = 64  # questions sampled from the current policy per round of RM training
    samples_per_question: int = 4
    completions_per_prefix: int = 4  # Math-Shepherd: K completions from each step prefix
    label: Literal["any", "most"] = "any"  # a step is good if any / most of its K completions are correct
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 32
    replay_fraction: float = 0.1  # share of historical examples in each later round's training set
    seed: int = 0


@dataclass(frozen=True)
class WeightSyncConfig:
    transport: str = "object_store"  # a name registered in dsmath.transports (checked by validate)
    bucket_mb: float = 64.0
    timeout_s: float = 120.0


@dataclass(frozen=True)
class AsyncConfig:
    enabled: bool = False
    max_staleness: int = 1
    is_correction_clip: float = 2.0


@dataclass(frozen=True)
class DataConfig:
    """Question/answer JSONL (GSM8K, MATH or {question, answer}) for RL; empty = the built-in arithmetic task.

    ``heldout`` empty: the first ``eval_size`` training questions are held out (and not trained on).
    """

    train: str = ""
    heldout: str = ""


@dataclass(frozen=True)
class LineageConfig:
    """Every trained sample, per step, as Parquet under RUN_DIR/samples/ (wiring/lineage.py; ``dsmath samples``)."""

    enabled: bool = True
    # Steps kept in full; older steps keep every column but the completion text (emptied). 0 = keep all in full.
    keep_full_steps: int = 100


@dataclass(frozen=True)
class StatusConfig:
    """The run's live status service (gRPC), its Prometheus exporter and its Ray metrics.

    ``token``: ``auto`` = ``$DSMATH_STATUS_TOKEN`` if set, else none on a loopback ``host`` and a generated one
    (``RUN_DIR/status_token``, mode 0600) on any other; ``generate`` = always a generated one; ``env`` =
    ``$DSMATH_STATUS_TOKEN`` (refused when unset); ``none`` = no check, loopback hosts only.
    ``tls_cert``/``tls_key``: PEM files; with both, the service speaks TLS (clients dial ``grpcs://HOST:PORT``).
    ``prometheus_port``: -1 off, 0 any free port; ``prometheus_host`` empty = ``host``.
    ``ray_metrics``: also record the step figures through ``ray.util.metrics`` (Ray's own Prometheus/Grafana).
    """

    host: str = "127.0.0.1"
    port: int = 0
    token: Literal["auto", "generate", "env", "none"] = "auto"
    tls_cert: str = ""
    tls_key: str = ""
    prometheus_port: int = -1
    prometheus_host: str = ""
    ray_metrics: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """The root of the tree.

    ``storage``: a URI of any pyarrow filesystem (``file:///abs/path``, ``s3://bucket/prefix``), "" = off. Learner
    rank 0 copies every checkpoint to ``STORAGE/checkpoints`` (keeping the newest ``keep_checkpoints`` there too)
    and the driver the run's files to ``STORAGE/run``; ``--resume`` fetches both when the run directory has no
    intact checkpoint, so a cluster needs no shared filesystem to resume (:mod:`wiring.run_storage`)."""

    run_dir: str = "runs/latest"
    seed: int = 0
    steps: int = 20
    eval_every: int = 0
    eval_size: int = 500
    checkpoint_every: int = 0
    keep_checkpoints: int = 2  # the newest N checkpoints are kept (a damaged latest falls back to the one before)
    storage: str = ""
    ray_address: str = ""
    max_actor_restarts: int = 3  # per pool (generators, reward workers) per run; a learner failure ends the run
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    async_: AsyncConfig = field(default_factory=AsyncConfig)
    rm: RewardModelTrainConfig = field(default_factory=RewardModelTrainConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    lineage: LineageConfig = field(default_factory=LineageConfig)


# Keys that moved: the old dotted key or section -> the new one (refused in one line naming the new key). A key
# under a moved section moves with it (grpo.beta -> algorithm.beta) unless it is listed itself.
_RENAMED = {"status_port": "status.port", "grpo": "algorithm", "grpo.algorithm": "algorithm.name"}

# YAML key -> dataclass field name, for keys that are Python keywords.
_ALIASES = {"async": "async_"}
_REVERSE_ALIASES = {v: k for k, v in _ALIASES.items()}


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (tuple,):
        return f"a list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it in the right Python type."""
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; expected {_type_name(tp)}")
        return value
    if origin is tuple:
        (inner, *_rest) = get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__}")
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:  # named entries, e.g. a data mixture's sources (dotted overrides reach into them)
        key_tp, value_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of names, got {type(value).__name__}")
        return {_coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if is_dataclass(tp):
        return _build(tp, value, key)
    return value


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for raw_key, value in data.items():
        name = _ALIASES.get(raw_key, raw_key)
        dotted = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if name not in known:
            allowed = sorted(_REVERSE_ALIASES.get(k, k) for k in known)
            close = difflib.get_close_matches(str(raw_key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {dotted!r}{hint}; allowed here: {', '.join(allowed)}")
        kwargs[name] = _coerce(value, hints[name], dotted)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-able data (keyword aliases restored)."""
    out = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        key = _REVERSE_ALIASES.get(f.name, f.name)
        if is_dataclass(value):
            out[key] = to_dict(value)
        elif isinstance(value, tuple):
            out[key] = list(value)
        elif isinstance(value, dict):
            out[key] = {k: (to_dict(v) if is_dataclass(v) else list(v) if isinstance(v, tuple) else v)
                        for k, v in value.items()}
        else:
            out[key] = value
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def new_name(dotted: str, renamed: dict[str, str] = _RENAMED) -> str | None:
    """The current name of an old dotted key (``grpo.beta`` -> ``algorithm.beta``); None when it did not move."""
    if dotted in renamed:
        return renamed[dotted]
    section, _, rest = dotted.partition(".")
    return f"{renamed[section]}.{rest}" if rest and section in renamed else None


def refuse_renamed_overrides(overrides: list[str], renamed: dict[str, str] = _RENAMED) -> None:
    """A one-line :class:`ConfigError` for the first override whose key moved, naming the new key with the value as
    typed: ``grpo.beta=0.0`` -> ``'grpo.beta' is now 'algorithm.beta' (e.g. algorithm.beta=0.0)``."""
    for item in overrides:
        key, eq, raw = item.partition("=")
        new = new_name(key.strip(), renamed) if eq else None  # no "=": parse_overrides says what an override is
        if new is not None:
            raise ConfigError(f"{key.strip()!r} is now {new!r} (e.g. {new}={raw.strip()})")


def refuse_renamed_keys(data: dict, where: str, renamed: dict[str, str] = _RENAMED) -> None:
    """A one-line :class:`ConfigError` naming ``where`` (the YAML file) when ``data`` holds a key or section that
    moved; a moved section's message maps its keys to their new names. Nothing is rewritten."""
    for key, value in data.items():
        key = str(key)
        if key not in renamed:
            continue
        if not isinstance(value, dict) or not value:
            raise ConfigError(f"{where}: {key!r} is now {renamed[key]!r}; rename it in that file")
        moves = [(f"{key}.{k}", new_name(f"{key}.{k}", renamed)) for k in value]
        # Every key when there are a few; else the keys whose own name changes, one example, and a count.
        shown = moves if len(moves) <= 3 else [m for m in moves if m[0].split(".")[-1] != m[1].split(".")[-1]]
        rest = [m for m in moves if m not in shown]
        text = ", ".join(f"{old} -> {new}" for old, new in shown)
        if rest:
            text += (f"{'; its other' if shown else 'its'} {len(rest)} keys keep their names, "
                     f"e.g. {rest[0][0]} -> {rest[0][1]}")
        raise ConfigError(f"{where}: the section '{key}:' is now '{renamed[key]}:' ({text}); rename it in that file")


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["algorithm.beta=0.04", "rollout.stop=[a,b]"]`` -> ``[("algorithm.beta", 0.04), ...]`` (YAML-typed
    values)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key, value))
    return parsed


def resolve_preset(name_or_path: str, preset_dir: Path = PRESET_DIR) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file {name_or_path!r} does not exist")
        return path
    preset = preset_dir / f"{name_or_path}.yaml"
    if not preset.exists():
        names = sorted(p.stem for p in preset_dir.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name_or_path!r}; presets: {', '.join(names)} (or a path to a .yaml file)")
    return preset


def read_yaml_mapping(path: Path) -> dict:
    """A config YAML file's top-level mapping; a one-line :class:`ConfigError` if it is not valid YAML or not a
    mapping."""
    from dsmath.userfiles import FileError, read_yaml

    try:  # a directory, binary junk, bad encoding or damaged YAML: one line naming the file (and line)
        data = read_yaml(path, "config YAML file") or {}
    except FileError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def env_overrides(env_var: str | None) -> list[str]:
    """Dotted overrides from the environment variable ``env_var`` (shell words), applied after the command line's.

    ``DSMATH_OVERRIDES="steps=2 eval_size=24" dsmath train`` is ``dsmath train steps=2 eval_size=24``: a way to
    shrink or pin every run a script or a job starts without editing its commands (the docs' commands run in
    the test suite this way). Said on stderr when used, so it never changes a run unseen.
    """
    raw = os.environ.get(env_var, "") if env_var else ""
    if not raw.strip():
        return []
    import shlex

    words = shlex.split(raw)
    print(f"[dsmath] {env_var} adds overrides: {' '.join(words)}", file=sys.stderr, flush=True)
    return words


def load_tree(cls: type, name_or_path: str | None, overrides: list[str] | None, *, preset_dir: Path,
              check: Callable[[Any], None], env_var: str | None = None, renamed: dict[str, str] | None = None) -> Any:
    """Any frozen config tree ``cls``: a preset in ``preset_dir`` or a YAML path, dotted overrides, then those of
    ``$env_var`` (:func:`env_overrides`), ``check``. A key of ``renamed`` (old -> new) in the file or an override
    is refused in one line naming the new key."""
    data: dict = {}
    if name_or_path:
        path = resolve_preset(name_or_path, preset_dir)
        data = read_yaml_mapping(path)
        refuse_renamed_keys(data, str(path), renamed or {})
    items = list(overrides or []) + env_overrides(env_var)
    refuse_renamed_overrides(items, renamed or {})
    for key, value in parse_overrides(items):
        _set_dotted(data, key, value)
    cfg = _build(cls, data)
    check(cfg)
    return cfg


def load_config(name_or_path: str | None = "tiny_cpu", overrides: list[str] | None = None) -> TrainConfig:
    """Load a preset or YAML file, apply dotted overrides, validate, and freeze."""
    return load_tree(TrainConfig, name_or_path, overrides, preset_dir=PRESET_DIR, check=validate,
                     env_var="DSMATH_OVERRIDES", renamed=_RENAMED)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: TrainConfig) -> None:
    """Reject impossible combinations with one line each: the first problem found, section by section.

    Guaranteed: a ``ConfigError`` naming the key(s) and what they must be; nothing is changed or defaulted here.
    """
    for check in (_check_run, _check_rollout, _check_algorithm, _check_learner, _check_model,
                  _check_sync_and_shaping, _check_reward, _check_status, _check_bootstrap):
        check(cfg)


def _check_run(cfg: TrainConfig) -> None:
    """The run as a whole: steps, restarts, checkpoints kept, question files."""
    _need(cfg.steps >= 0, "steps: must be >= 0")
    _need(cfg.max_actor_restarts >= 0, "max_actor_restarts: must be >= 0")
    _need(cfg.keep_checkpoints >= 1, "keep_checkpoints: must be >= 1 (2 or more lets --resume fall back past a "
                                     "damaged checkpoint)")
    _need(not cfg.storage or bool(re.match(r"[A-Za-z][A-Za-z0-9+.-]*:/", cfg.storage)) or cfg.storage.startswith("/"),
          f"storage: {cfg.storage!r} is not a URI; use e.g. file:///abs/path, s3://bucket/prefix, or an absolute path")
    _need(not cfg.data.train or bool(cfg.model.path),
          "data.train: questions from files need the model that answers them: set model.path too")
    _need(not cfg.data.heldout or bool(cfg.data.train), "data.heldout: set data.train too")


def _check_rollout(cfg: TrainConfig) -> None:
    """Sampling: group size, questions per step, lengths, temperature, generators."""
    r = cfg.rollout
    _need(r.group_size >= 1, "rollout.group_size: must be >= 1")
    _need(r.questions_per_step >= 1, "rollout.questions_per_step: must be >= 1")
    _need(r.max_new_tokens >= 1, "rollout.max_new_tokens: must be >= 1")
    _need(r.temperature >= 0, "rollout.temperature: must be >= 0")
    _need(0 < r.top_p <= 1, "rollout.top_p: must be in (0, 1]")
    _need(r.num_generators >= 1, "rollout.num_generators: must be >= 1")


def _check_algorithm(cfg: TrainConfig) -> None:
    """The method and its knobs (the method's own refusals come from dsmath/methods/<name>.py)."""
    g = cfg.algorithm
    _need(g.beta >= 0, "algorithm.beta: must be >= 0")
    _need(0 <= g.clip_eps_low < 1, "algorithm.clip_eps_low: must be in [0, 1)")
    _need(g.clip_eps_high >= 0, "algorithm.clip_eps_high: must be >= 0")
    _need(g.updates_per_step >= 1, "algorithm.updates_per_step: must be >= 1")
    from dsmath import methods

    refusal = methods.get(g.name).check(cfg)  # the method's own rules (dsmath/methods/<name>.py)
    _need(refusal is None, refusal or "")
    _need(g.dpo_beta > 0, "algorithm.dpo_beta: must be > 0")
    _need(0 <= g.gae_gamma <= 1, "algorithm.gae_gamma: must be in [0, 1]")
    _need(0 <= g.gae_lambda <= 1, "algorithm.gae_lambda: must be in [0, 1]")
    _need(g.value_lr > 0, "algorithm.value_lr: must be > 0")


def _check_learner(cfg: TrainConfig) -> None:
    """The learner: optimiser, ZeRO stage, ranks, micro-batches, memory, the reference's home."""
    r = cfg.rollout
    lr = cfg.learner
    _need(lr.lr > 0, "learner.lr: must be > 0")
    _need(lr.zero_stage in (0, 1, 2, 3), f"learner.zero_stage: {lr.zero_stage} is not one of 0, 1, 2, 3")
    _need(lr.num_ranks >= 1, "learner.num_ranks: must be >= 1")
    _need(lr.micro_batch_size >= 1, "learner.micro_batch_size: must be >= 1")
    _need(lr.max_tokens_per_micro_batch >= 0, "learner.max_tokens_per_micro_batch: must be >= 0 (0 = off)")
    _need(lr.logprob_chunk_tokens >= 0, "learner.logprob_chunk_tokens: must be >= 0 (0 = full logits)")
    _need(lr.gpu_memory_gb > 0, "learner.gpu_memory_gb: must be > 0")
    _need(r.gpu_memory_gb > 0, "rollout.gpu_memory_gb: must be > 0")
    _need(lr.reference != "host" or lr.zero_stage <= 2,
          "learner.reference: 'host' swaps full weights into the module, which ZeRO-3 partitions; use zero_stage <= 2")
    samples = r.questions_per_step * r.group_size
    _need(
        samples % lr.num_ranks == 0,
        f"learner.num_ranks: {lr.num_ranks} does not divide the {samples} samples per step "
        f"(rollout.questions_per_step × rollout.group_size)",
    )


def _check_model(cfg: TrainConfig) -> None:
    """The model's shape, as vLLM's kernels and the position embeddings need it."""
    r = cfg.rollout
    _need(
        cfg.model.hidden_size % cfg.model.num_heads == 0,
        "model.hidden_size: must be divisible by model.num_heads",
    )
    head_dim = cfg.model.hidden_size // cfg.model.num_heads
    _need(
        bool(cfg.model.path) or head_dim in (32, 64, 80, 96, 112, 128, 256),
        f"model.hidden_size / model.num_heads = {head_dim}: vLLM's attention kernels need a head size of "
        "32, 64, 80, 96, 112, 128 or 256",
    )
    _need(
        cfg.model.num_heads % cfg.model.num_kv_heads == 0,
        "model.num_kv_heads: must divide model.num_heads",
    )
    _need(
        r.max_prompt_tokens + r.max_new_tokens <= cfg.model.max_position_embeddings or bool(cfg.model.path),
        "rollout.max_prompt_tokens + rollout.max_new_tokens: exceeds model.max_position_embeddings",
    )


def _check_sync_and_shaping(cfg: TrainConfig) -> None:
    """Weight sync (the transport read from dsmath/transports/), asynchronous sampling and reward shaping."""
    r = cfg.rollout
    _need(cfg.weight_sync.bucket_mb > 0, "weight_sync.bucket_mb: must be > 0")
    _need(cfg.weight_sync.timeout_s > 0, "weight_sync.timeout_s: must be > 0")
    transport = cfg.weight_sync.transport
    _need(transport in transports.names(), f"weight_sync.transport: {transport!r} is not allowed; expected one of "
          + ", ".join(repr(n) for n in transports.names()))
    _need(
        not transports.info(transport).needs_gpu or r.gpus_per_generator > 0,
        f"weight_sync.transport: {transport!r} needs GPUs (rollout.gpus_per_generator > 0); "
        "use 'gloo' or 'object_store' on CPU",
    )
    _need(cfg.async_.max_staleness >= 0, "async.max_staleness: must be >= 0")
    _need(not cfg.async_.enabled or cfg.async_.max_staleness >= 1,
          "async.max_staleness: must be >= 1 when async.enabled (generation of step k+1 overlaps the update of step k)")
    _need(r.dynamic_sampling_max_rounds >= 1, "rollout.dynamic_sampling_max_rounds: must be >= 1")
    _need(0 <= r.overlong_buffer < r.max_new_tokens, "rollout.overlong_buffer: must be in [0, rollout.max_new_tokens)")
    _need(r.overlong_penalty >= 0, "rollout.overlong_penalty: must be >= 0")


def _check_reward(cfg: TrainConfig) -> None:
    """Reward workers, audits, lineage, process supervision and reward-model rounds."""
    g = cfg.algorithm
    from dsmath import rewards

    if cfg.reward.kind != rewards.AUTO:
        rewards.get(cfg.reward.kind)  # a ConfigError naming the kinds; the kind's own refusal comes at the driver
    _need(cfg.reward.num_workers >= 1, "reward.num_workers: must be >= 1")
    _need(cfg.reward.timeout_s > 0, "reward.timeout_s: must be > 0")
    _need(cfg.reward.model_batch_size >= 1, "reward.model_batch_size: must be >= 1")
    _need(0 <= cfg.reward.audit_fraction <= 1, "reward.audit_fraction: must be in [0, 1]")
    _need(cfg.reward.audit_check != "math_verify" or importlib.util.find_spec("math_verify") is not None,
          "reward.audit_check: math_verify is not installed (pip install math-verify, or use other_mode)")
    _need(cfg.lineage.keep_full_steps >= 0, "lineage.keep_full_steps: must be >= 0 (0 = keep every step in full)")
    _need(
        g.advantage != "process" or cfg.reward.model_kind == "process",
        "algorithm.advantage=process needs step rewards: set reward.model_kind=process and reward.model_path to a "
        "PRM",
    )
    _need(bool(g.step_delimiter), "algorithm.step_delimiter: must not be empty")
    _need(0 <= cfg.rm.replay_fraction < 1, "rm.replay_fraction: must be in [0, 1)")
    _need(cfg.rm.questions >= 1 and cfg.rm.samples_per_question >= 1 and cfg.rm.completions_per_prefix >= 1,
          "rm.questions, rm.samples_per_question, rm.completions_per_prefix: must be >= 1")


def _check_status(cfg: TrainConfig) -> None:
    """The live status service: ports, TLS, and a token whenever it listens beyond loopback."""
    st = cfg.status
    _need(0 <= st.port <= 65535, "status.port: must be in [0, 65535] (0 = any free port)")
    _need(-1 <= st.prometheus_port <= 65535, "status.prometheus_port: must be in [-1, 65535] (-1 = off, 0 = any)")
    _need(bool(st.tls_cert) == bool(st.tls_key), "status.tls_cert, status.tls_key: give both PEM files or neither")
    _need(bool(st.host), "status.host: must not be empty (127.0.0.1 = this machine only, 0.0.0.0 = every interface)")
    from dsmath.status.auth import is_loopback

    _need(st.token != "none" or is_loopback(st.host),
          f"status.token=none with status.host={st.host}: anyone who reaches the port could read the run; "
          "use status.token=auto (a generated token in RUN_DIR/status_token) or bind 127.0.0.1")


def _check_bootstrap(cfg: TrainConfig) -> None:
    """The tiny-model bootstrap's problem splits."""
    b = cfg.bootstrap
    _need(b.num_heldout_problems >= 1, "bootstrap.num_heldout_problems: must be >= 1")
    _need(0 <= b.stepwise_fraction <= 1, "bootstrap.stepwise_fraction: must be in [0, 1]")
    _need(
        0 < b.num_sft_problems < b.num_train_problems,
        "bootstrap.num_sft_problems: must be > 0 and < bootstrap.num_train_problems (RL draws from the rest)",
    )
    _need(all(level in (1, 2, 3) for level in b.levels) and b.levels, "bootstrap.levels: a non-empty list of 1, 2, 3")


def with_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply dotted overrides to an existing config (re-validated)."""
    refuse_renamed_overrides(overrides)
    data = to_dict(cfg)
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    out = _build(TrainConfig, data)
    validate(out)
    return out


__all__ = [
    "AlgorithmConfig",
    "AsyncConfig",
    "BootstrapConfig",
    "ConfigError",
    "LearnerConfig",
    "ModelConfig",
    "RewardConfig",
    "RewardModelTrainConfig",
    "RolloutConfig",
    "StatusConfig",
    "TrainConfig",
    "WeightSyncConfig",
    "load_config",
    "parse_overrides",
    "replace",
    "to_dict",
    "validate",
    "with_overrides",
    "dataclasses",
]
