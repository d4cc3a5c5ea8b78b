"""The status snapshot of a training run: schema, dict/JSON/protobuf conversion, and rebuilding from files.

:class:`RunSnapshot` is the one schema shared by the driver (which hands the server a plain dict each
step), the gRPC service (``dsmath/proto/status.proto`` mirrors it field for field), ``RUN_DIR/status.json``
and the Prometheus exporter.

Guaranteed: :meth:`RunSnapshot.from_dict` rejects unknown keys and wrong types with a ``ValueError`` that
names the key, so a typo in the driver fails on the first step rather than silently dropping a figure;
``from_dict(s.to_dict()) == s`` and ``from_proto(s.to_proto()) == s`` for every valid snapshot.
Not guaranteed: that the figures are mutually consistent (the driver owns them).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

# How many recent values a trend keeps; older ones are dropped on construction.
TREND_LENGTH = 50

RunStateName = Literal["running", "finished", "failed"]
STATES: tuple[str, ...] = ("running", "finished", "failed")

# metrics.jsonl keys the driver writes (see cluster/README.md) -> the snapshot figure they feed.
METRIC_REWARD = "reward/mean"
METRIC_ACCURACY = "accuracy"
METRIC_TOKENS_PER_S = "tokens_per_s"
METRIC_TIME_KEYS = {
    "generate_s": "time/rollout",
    "reward_s": "time/reward",
    "train_s": "time/update",
    "sync_s": "time/weight_sync",
}


@dataclass(frozen=True)
class GeneratorHealth:
    id: int
    alive: bool = True
    weight_version: int = 0
    requests: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class QueueStats:
    name: str
    depth: int = 0
    timeout_rate: float = 0.0


@dataclass(frozen=True)
class TimeSplit:
    """Seconds spent per stage in the last step."""

    generate_s: float = 0.0
    reward_s: float = 0.0
    train_s: float = 0.0
    sync_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.generate_s + self.reward_s + self.train_s + self.sync_s


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: str


@dataclass(frozen=True)
class EvalResult:
    step: int
    accuracy: float


@dataclass(frozen=True)
class RunSnapshot:
    """Everything ``dsmath status`` shows about one run at one moment.

    ``eta_s`` < 0 means unknown; when the driver does not give it, :meth:`from_dict` estimates it from
    the mean step time since ``started_at``.
    """

    run_name: str = ""
    state: RunStateName = "running"
    step: int = 0
    total_steps: int = 0
    eta_s: float = -1.0
    started_at: float = 0.0
    updated_at: float = 0.0
    reward_trend: tuple[float, ...] = ()
    accuracy_trend: tuple[float, ...] = ()
    tokens_per_s: float = 0.0
    generators: tuple[GeneratorHealth, ...] = ()
    queues: tuple[QueueStats, ...] = ()
    time_split: TimeSplit = field(default_factory=TimeSplit)
    last_checkpoint: Checkpoint | None = None
    last_eval: EvalResult | None = None
    message: str = ""
    metrics: tuple[tuple[str, float], ...] = ()  # sorted (name, value) pairs; a tuple keeps it hashable

    # ------------------------------------------------------------------ dicts / JSON
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, now: float | None = None) -> RunSnapshot:
        """Build and validate a snapshot from a plain dict (the driver's and ``status.json``'s form).

        Missing keys take their defaults; ``updated_at`` defaults to ``now``; ``eta_s`` is estimated when
        absent and the run is running with ``step > 0`` and ``started_at`` set.
        """
        if not isinstance(data, dict):
            raise ValueError(f"status snapshot must be a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"status snapshot: unknown key(s) {unknown}; allowed: {sorted(known)}")
        now = time.time() if now is None else now
        d = dict(data)
        kw: dict[str, Any] = {}
        kw["run_name"] = _str(d.get("run_name", ""), "run_name")
        state = d.get("state", "running")
        if state not in STATES:
            raise ValueError(f"status snapshot: state must be one of {list(STATES)}, got {state!r}")
        kw["state"] = state
        kw["step"] = _int(d.get("step", 0), "step")
        kw["total_steps"] = _int(d.get("total_steps", 0), "total_steps")
        kw["started_at"] = _float(d.get("started_at", 0.0), "started_at")
        kw["updated_at"] = _float(d.get("updated_at", now), "updated_at")
        kw["reward_trend"] = _trend(d.get("reward_trend", ()), "reward_trend")
        kw["accuracy_trend"] = _trend(d.get("accuracy_trend", ()), "accuracy_trend")
        kw["tokens_per_s"] = _float(d.get("tokens_per_s", 0.0), "tokens_per_s")
        kw["generators"] = tuple(
            _sub(GeneratorHealth, g, f"generators[{i}]") for i, g in enumerate(_list(d.get("generators", ()), "generators"))
        )
        kw["queues"] = _queues(d.get("queues", ()))
        kw["time_split"] = _sub(TimeSplit, d.get("time_split") or {}, "time_split")
        ck = d.get("last_checkpoint")
        kw["last_checkpoint"] = None if ck is None else _sub(Checkpoint, ck, "last_checkpoint")
        ev = d.get("last_eval")
        kw["last_eval"] = None if ev is None else _sub(EvalResult, ev, "last_eval")
        kw["message"] = _str(d.get("message", ""), "message")
        kw["metrics"] = _metrics(d.get("metrics", {}))
        if "eta_s" in d and d["eta_s"] is not None:
            kw["eta_s"] = _float(d["eta_s"], "eta_s")
        else:
            kw["eta_s"] = estimate_eta(kw["step"], kw["total_steps"], kw["started_at"], kw["updated_at"], kw["state"])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; the inverse of :meth:`from_dict`."""
        return {
            "run_name": self.run_name,
            "state": self.state,
            "step": self.step,
            "total_steps": self.total_steps,
            "eta_s": self.eta_s,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "reward_trend": list(self.reward_trend),
            "accuracy_trend": list(self.accuracy_trend),
            "tokens_per_s": self.tokens_per_s,
            "generators": [vars(g).copy() for g in self.generators],
            "queues": {q.name: {"depth": q.depth, "timeout_rate": q.timeout_rate} for q in self.queues},
            "time_split": vars(self.time_split).copy(),
            "last_checkpoint": None if self.last_checkpoint is None else vars(self.last_checkpoint).copy(),
            "last_eval": None if self.last_eval is None else vars(self.last_eval).copy(),
            "message": self.message,
            "metrics": dict(self.metrics),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    # ------------------------------------------------------------------ protobuf
    def to_proto(self) -> Any:
        from dsmath.proto import status_pb2 as pb

        msg = pb.RunSnapshot(
            run_name=self.run_name,
            state=_STATE_TO_PB[self.state],
            step=self.step,
            total_steps=self.total_steps,
            eta_s=self.eta_s,
            started_at=self.started_at,
            updated_at=self.updated_at,
            reward_trend=list(self.reward_trend),
            accuracy_trend=list(self.accuracy_trend),
            tokens_per_s=self.tokens_per_s,
            generators=[pb.GeneratorHealth(**vars(g)) for g in self.generators],
            queues=[pb.QueueStats(**vars(q)) for q in self.queues],
            time_split=pb.TimeSplit(**vars(self.time_split)),
            message=self.message,
            metrics=dict(self.metrics),
        )
        if self.last_checkpoint is not None:
            msg.last_checkpoint.CopyFrom(pb.Checkpoint(**vars(self.last_checkpoint)))
        if self.last_eval is not None:
            msg.last_eval.CopyFrom(pb.EvalResult(**vars(self.last_eval)))
        return msg

    @classmethod
    def from_proto(cls, msg: Any) -> RunSnapshot:
        return cls(
            run_name=msg.run_name,
            state=_PB_TO_STATE.get(msg.state, "running"),
            step=msg.step,
            total_steps=msg.total_steps,
            eta_s=msg.eta_s,
            started_at=msg.started_at,
            updated_at=msg.updated_at,
            reward_trend=tuple(msg.reward_trend),
            accuracy_trend=tuple(msg.accuracy_trend),
            tokens_per_s=msg.tokens_per_s,
            generators=tuple(
                GeneratorHealth(g.id, g.alive, g.weight_version, g.requests, g.tokens) for g in msg.generators
            ),
            queues=tuple(QueueStats(q.name, q.depth, q.timeout_rate) for q in msg.queues),
            time_split=TimeSplit(
                msg.time_split.generate_s, msg.time_split.reward_s, msg.time_split.train_s, msg.time_split.sync_s
            ),
            last_checkpoint=(
                Checkpoint(msg.last_checkpoint.step, msg.last_checkpoint.path)
                if msg.HasField("last_checkpoint")
                else None
            ),
            last_eval=(
                EvalResult(msg.last_eval.step, msg.last_eval.accuracy) if msg.HasField("last_eval") else None
            ),
            message=msg.message,
            metrics=tuple(sorted(msg.metrics.items())),
        )


_STATE_TO_PB = {"running": 1, "finished": 2, "failed": 3}
_PB_TO_STATE = {v: k for k, v in _STATE_TO_PB.items()}


def estimate_eta(step: int, total_steps: int, started_at: float, now: float, state: str) -> float:
    """Seconds left at the mean step time so far; 0 when done, -1 when it cannot be estimated."""
    if state != "running":
        return 0.0
    if total_steps <= 0 or step <= 0 or started_at <= 0 or now <= started_at:
        return -1.0
    return max(0, total_steps - step) * (now - started_at) / step


# ---------------------------------------------------------------------- validation helpers
def _str(v: Any, key: str) -> str:
    if not isinstance(v, str):
        raise ValueError(f"status snapshot: {key} must be a string, got {v!r}")
    return v


def _int(v: Any, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError(f"status snapshot: {key} must be an integer, got {v!r}")
    return int(v)


def _float(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        # numpy / torch scalars: accept anything float() takes without loss of meaning
        try:
            return float(v)
        except (TypeError, ValueError):
            raise ValueError(f"status snapshot: {key} must be a number, got {v!r}") from None
    return float(v)


def _list(v: Any, key: str) -> list:
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"status snapshot: {key} must be a list, got {type(v).__name__}")
    return list(v)


def _trend(v: Any, key: str) -> tuple[float, ...]:
    values = [_float(x, f"{key}[{i}]") for i, x in enumerate(_list(v, key))]
    return tuple(values[-TREND_LENGTH:])


def _sub(cls: type, v: Any, key: str) -> Any:
    if isinstance(v, cls):
        return v
    if not isinstance(v, dict):
        raise ValueError(f"status snapshot: {key} must be a dict, got {type(v).__name__}")
    allowed = {f.name: f for f in fields(cls)}
    unknown = sorted(set(v) - set(allowed))
    if unknown:
        raise ValueError(f"status snapshot: {key}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    kw = {}
    for name, f in allowed.items():
        if name not in v:
            continue
        tp = f.type if isinstance(f.type, str) else f.type.__name__
        conv = {"int": _int, "float": _float, "str": _str, "bool": _bool}[tp]
        kw[name] = conv(v[name], f"{key}.{name}")
    try:
        return cls(**kw)
    except TypeError as exc:  # a required field is missing
        raise ValueError(f"status snapshot: {key}: {exc}") from None


def _bool(v: Any, key: str) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"status snapshot: {key} must be true/false, got {v!r}")
    return v


def _queues(v: Any) -> tuple[QueueStats, ...]:
    # Either {"reward": {"depth": 3, "timeout_rate": 0.1}, ...} or [{"name": "reward", ...}, ...].
    if isinstance(v, dict):
        items = []
        for name, q in v.items():
            if not isinstance(q, dict):
                raise ValueError(f"status snapshot: queues.{name} must be a dict, got {type(q).__name__}")
            items.append({"name": name, **q})
    else:
        items = _list(v, "queues")
    return tuple(_sub(QueueStats, q, f"queues[{i}]") for i, q in enumerate(items))


def _metrics(v: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(v, dict):
        raise ValueError(f"status snapshot: metrics must be a dict of name -> number, got {type(v).__name__}")
    out = []
    for k, x in v.items():
        if x is None:
            continue
        out.append((_str(k, "metrics key"), _float(x, f"metrics[{k!r}]")))
    return tuple(sorted(out))


# ---------------------------------------------------------------------- run directories
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
ADDRESS_FILE = "status_address"


def read_metrics_rows(run_dir: str | Path) -> list[dict]:
    """Rows of ``RUN_DIR/metrics.jsonl``; a torn last line (a run killed mid-write: partial JSON, junk or NUL
    bytes) is skipped. Any other damage (a directory, a bad line before the last, broken compression) is one
    :class:`dsmath.errors.UserError` line naming the file and line."""
    from dsmath.errors import UserError
    from dsmath.userfiles import BadLine, iter_lines

    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows: list[dict] = []
    pending: str | None = None  # the last bad line's message: fatal only if a line follows it
    for lineno, line in iter_lines(path, "metrics file"):
        if isinstance(line, str) and not line.strip():
            continue
        if pending is not None:
            raise UserError(pending)
        if isinstance(line, BadLine):
            pending = f"{path}:{lineno}: {line.why}"
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            pending = f"{path}:{lineno}: not valid JSON ({getattr(exc, 'msg', exc)})"
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def snapshot_from_run_dir(run_dir: str | Path) -> RunSnapshot:
    """Rebuild a run's snapshot from ``status.json`` and ``metrics.jsonl`` (either may be missing).

    ``status.json`` gives the structure (state, generators, queues, checkpoint, eval); ``metrics.jsonl``,
    when present, is the authority for the trends, the step, tokens/s and the time split of the last row,
    since it is appended every step while ``status.json`` may lag behind a crash.
    Raises :class:`dsmath.errors.UserError` when neither file exists or ``status.json`` is malformed.
    """
    from dsmath.errors import UserError
    from dsmath.userfiles import read_json

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    status_path = run_dir / STATUS_FILE
    rows = read_metrics_rows(run_dir)
    if not status_path.exists() and not rows:
        raise UserError(f"{run_dir}: neither {STATUS_FILE} nor {METRICS_FILE} found; is this a dsmath run directory?")
    base: dict[str, Any] = {}
    if status_path.exists():
        try:
            base = read_json(status_path, "status file")
            if not isinstance(base, dict):
                raise ValueError(f"expected a JSON object, got {type(base).__name__}")
            snap = RunSnapshot.from_dict(base, now=status_path.stat().st_mtime)
        except (json.JSONDecodeError, ValueError) as exc:
            raise UserError(f"{status_path}: {exc}") from None
    else:
        snap = RunSnapshot(run_name=run_dir.name, state="finished", updated_at=(run_dir / METRICS_FILE).stat().st_mtime)
    if not rows:
        return snap

    rewards = [v for v in (_finite(r.get(METRIC_REWARD)) for r in rows) if v is not None]
    accs = [v for v in (_finite(r.get(METRIC_ACCURACY)) for r in rows) if v is not None]
    last = rows[-1]
    updates: dict[str, Any] = {}
    if rewards:
        updates["reward_trend"] = tuple(rewards[-TREND_LENGTH:])
    if accs:
        updates["accuracy_trend"] = tuple(accs[-TREND_LENGTH:])
    step = _finite(last.get("step"))
    if step is not None and int(step) >= snap.step:
        updates["step"] = int(step)
    tps = _finite(last.get(METRIC_TOKENS_PER_S))
    if tps is not None:
        updates["tokens_per_s"] = tps
    split = {k: _finite(last.get(m)) for k, m in METRIC_TIME_KEYS.items()}
    if any(v is not None for v in split.values()):
        updates["time_split"] = TimeSplit(**{k: v or 0.0 for k, v in split.items()})
    if not snap.started_at:
        t0 = _finite(rows[0].get("time"))
        if t0 is not None:
            updates["started_at"] = t0
    if not snap.metrics:
        extra = {
            k: v
            for k, v in ((k, _finite(x)) for k, x in last.items())
            if v is not None and k not in ("step", "time") and k not in METRIC_TIME_KEYS.values()
        }
        updates["metrics"] = tuple(sorted(extra.items()))
    return replace(snap, **updates)


class SnapshotBuilder:
    """Builds each step's snapshot from the same row the driver appends to ``metrics.jsonl``.

    Keeps the trends (last :data:`TREND_LENGTH` values of ``reward/mean`` and ``accuracy``) so the driver
    only hands over the current step::

        builder = SnapshotBuilder("deepseekmath_7b", total_steps=cfg.steps)
        server.update(builder.step(step, row, generators=[...], queues={...}))
        server.update(builder.finish())            # or builder.finish(failed="reason")

    Keys of ``row`` other than ``step``/``time``, the trend keys, ``tokens_per_s`` and ``time/*`` stage
    timings go to ``metrics`` (numbers only). Not thread-safe: one driver thread calls it.
    """

    def __init__(self, run_name: str, total_steps: int, started_at: float | None = None) -> None:
        self.run_name = run_name
        self.total_steps = int(total_steps)
        self.started_at = time.time() if started_at is None else float(started_at)
        self._rewards: list[float] = []
        self._accs: list[float] = []
        self._last: dict[str, Any] = {}

    def step(
        self,
        step: int,
        row: dict[str, Any],
        *,
        generators: list[dict] | tuple = (),
        queues: dict[str, dict] | None = None,
        last_checkpoint: dict | None = None,
        last_eval: dict | None = None,
        now: float | None = None,
    ) -> RunSnapshot:
        for key, trend in ((METRIC_REWARD, self._rewards), (METRIC_ACCURACY, self._accs)):
            v = _finite(row.get(key))
            if v is not None:
                trend.append(v)
                del trend[:-TREND_LENGTH]
        stage_keys = set(METRIC_TIME_KEYS.values())
        skip = {"step", "time", METRIC_REWARD, METRIC_ACCURACY, METRIC_TOKENS_PER_S} | stage_keys
        self._last = {
            "run_name": self.run_name,
            "step": int(step),
            "total_steps": self.total_steps,
            "started_at": self.started_at,
            "reward_trend": list(self._rewards),
            "accuracy_trend": list(self._accs),
            "tokens_per_s": _finite(row.get(METRIC_TOKENS_PER_S)) or 0.0,
            "generators": list(generators),
            "queues": queues or {},
            "time_split": {k: _finite(row.get(m)) or 0.0 for k, m in METRIC_TIME_KEYS.items()},
            "last_checkpoint": last_checkpoint if last_checkpoint is not None else self._last.get("last_checkpoint"),
            "last_eval": last_eval if last_eval is not None else self._last.get("last_eval"),
            "metrics": {k: v for k, v in ((k, _finite(x)) for k, x in row.items() if k not in skip) if v is not None},
        }
        return RunSnapshot.from_dict(self._last, now=now)

    def finish(self, failed: str | None = None, now: float | None = None) -> RunSnapshot:
        """The final snapshot: state ``finished``, or ``failed`` with the reason as its message."""
        d = dict(self._last) or {"run_name": self.run_name, "total_steps": self.total_steps, "started_at": self.started_at}
        d["state"] = "failed" if failed else "finished"
        d["message"] = failed or ""
        d.pop("eta_s", None)
        return RunSnapshot.from_dict(d, now=now)
