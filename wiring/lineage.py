"""Sample lineage: every trained sample of a step, one Parquet file per step under ``RUN_DIR/samples/``.

``write_step_samples`` is called once per step by the driver (after the step's metric row); ``read_step`` and
``available_steps`` are what ``dsmath samples`` reads. One row per trained sample, in the batch's order, with the
columns of :data:`SCHEMA`:

* which sample: ``step``, ``question_id`` (``Problem.uid``), ``question`` (its text), ``request_id``,
  ``sample_index``, ``gold``;
* what it was: ``prompt_tokens``, ``completion_tokens``, ``completion`` (text), ``finish_reason``;
* how it was judged: ``extracted`` (null when no answer was found), ``verdict`` (``right`` | ``wrong`` |
  ``failed`` — failed: the grader timed out or could not judge), ``reason``, ``reward`` (shaped, as trained),
  ``advantage`` (the method's coefficient as the learner got it — GRPO: the group-normalised advantage — as the
  mean over the sample's completion tokens in the batch; 0.0 when none is there),
  ``grader_seconds``, ``timed_out``, ``no_answer``;
* the verifier audit: ``audited``, ``audit_disagrees``, ``audit_reason`` (``reward.audit_fraction``);
* where it came from: ``generator_id``, ``weight_version``, ``reissued`` (generated or graded again after an
  actor died).

Retention (``lineage.keep_full_steps`` = K > 0): when step S is written, step S − K is *reduced*, not dropped:
its file keeps every row and column but ``completion`` is emptied (the text is what makes the files large);
the file's metadata says ``dsmath.completion_text=dropped``. Only the step crossing the boundary is rewritten,
so a run that changes K on resume leaves older steps as they were. Writing step 1 (a fresh run) removes the
files of any later step left by an earlier run in the same directory; a resumed run overwrites the steps it
redoes. Files are written atomically (temporary name, then rename): a reader sees a whole step or none.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dsmath.config import LineageConfig
from dsmath.records import RewardResult, Rollout

SAMPLES_DIR = "samples"
TEXT_KEY = b"dsmath.completion_text"  # file metadata: "full" or "dropped"
_STEP_FILE = re.compile(r"^step-(\d+)\.parquet$")

SCHEMA = pa.schema([
    ("step", pa.int32()), ("question_id", pa.string()), ("question", pa.string()), ("request_id", pa.string()), ("sample_index", pa.int32()),
    ("gold", pa.string()), ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32()),
    ("completion", pa.string()), ("finish_reason", pa.string()), ("extracted", pa.string()),
    ("verdict", pa.string()), ("reason", pa.string()), ("reward", pa.float64()), ("advantage", pa.float64()),
    ("grader_seconds", pa.float64()), ("timed_out", pa.bool_()), ("no_answer", pa.bool_()),
    ("audited", pa.bool_()), ("audit_disagrees", pa.bool_()), ("audit_reason", pa.string()),
    ("generator_id", pa.string()), ("weight_version", pa.int64()), ("reissued", pa.bool_()),
])


def step_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / SAMPLES_DIR / f"step-{step:06d}.parquet"


def verdict_of(result: RewardResult) -> str:
    """``right`` | ``wrong`` | ``failed`` (the grader timed out or could not judge the sample)."""
    if result.grader_failed or result.timed_out:
        return "failed"
    return "right" if result.correct else "wrong"


def sample_advantages(rollouts: list[Rollout], batch: Any) -> list[float]:
    """Per sample: the mean of ``batch.advantages`` over its completion tokens in the batch (0.0 for none)."""
    adv = batch.advantages  # [N, T] float, values at the log-prob positions of completion tokens
    lengths = batch.attention_mask.sum(dim=1).tolist()  # [N] prompt + kept completion tokens
    out = []
    for i, r in enumerate(rollouts):
        p = len(r.prompt_ids)
        k = int(lengths[i]) - p
        out.append(float(adv[i, p - 1:p - 1 + k].mean()) if adv is not None and k > 0 else 0.0)
    return out


def lineage_table(step: int, rollouts: list[Rollout], results: list[RewardResult], advantages: list[float]) -> pa.Table:
    """The step's rows (one per sample, in order) as a table of :data:`SCHEMA`."""
    if not (len(rollouts) == len(results) == len(advantages)):
        raise ValueError(f"{len(rollouts)} rollouts, {len(results)} rewards, {len(advantages)} advantages")
    rows = [{
        "step": step, "question_id": ro.problem.uid, "question": ro.problem.question, "request_id": ro.request_id,
        "sample_index": ro.sample_index, "gold": ro.problem.answer, "prompt_tokens": len(ro.prompt_ids), "completion_tokens": len(ro.completion_ids),
        "completion": ro.completion, "finish_reason": ro.finish_reason, "extracted": res.extracted,
        "verdict": verdict_of(res), "reason": res.reason, "reward": float(res.reward), "advantage": float(a),
        "grader_seconds": float(res.grader_seconds), "timed_out": res.timed_out, "no_answer": res.no_answer,
        "audited": res.audited, "audit_disagrees": res.audit_disagrees, "audit_reason": res.audit_reason,
        "generator_id": ro.generator_id, "weight_version": ro.weight_version, "reissued": ro.reissued or res.reissued,
    } for ro, res, a in zip(rollouts, results, advantages)]
    return pa.Table.from_pylist(rows, schema=SCHEMA).replace_schema_metadata({TEXT_KEY: b"full"})


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def available_steps(run_dir: str | Path) -> list[int]:
    folder = Path(run_dir) / SAMPLES_DIR
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for f in folder.iterdir() if (m := _STEP_FILE.match(f.name)))


def reduce_step(run_dir: str | Path, step: int) -> bool:
    """Empty ``completion`` in step ``step``'s file (every other column kept); False if there is no full file."""
    path = step_path(run_dir, step)
    if not path.exists():
        return False
    table = pq.read_table(path)
    if (table.schema.metadata or {}).get(TEXT_KEY) == b"dropped":
        return False
    col = table.schema.get_field_index("completion")
    table = table.set_column(col, "completion", pa.array([""] * table.num_rows, pa.string()))
    _write_atomic(table.replace_schema_metadata({TEXT_KEY: b"dropped"}), path)
    return True


def write_step_samples(run_dir: str | Path, cfg: LineageConfig, step: int, samples: Any, batch: Any) -> Path | None:
    """Write step ``step``'s trained samples (``samples``: the step's ``StepSamples``; ``batch``: the learner batch
    built from them, for the advantages), then apply the retention rule. None when ``lineage.enabled`` is off."""
    if not cfg.enabled:
        return None
    path = step_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    if step == 1:  # a fresh run: no later step of an earlier run in this directory may pass for ours
        for old in available_steps(run_dir):
            if old > 1:
                step_path(run_dir, old).unlink()
    table = lineage_table(step, samples.rollouts, samples.results, sample_advantages(samples.rollouts, batch))
    _write_atomic(table, path)
    if cfg.keep_full_steps and step - cfg.keep_full_steps >= 1:
        reduce_step(run_dir, step - cfg.keep_full_steps)
    return path


def read_step(run_dir: str | Path, step: int) -> tuple[list[dict], bool]:
    """(rows, completion text kept) of step ``step``; FileNotFoundError if that step has no file. A column of
    :data:`SCHEMA` that the file lacks (written by an older dsmath) reads as None in every row."""
    path = step_path(run_dir, step)
    if not path.exists():
        raise FileNotFoundError(path)
    table = pq.read_table(path)
    for name in SCHEMA.names:
        if name not in table.column_names:
            table = table.append_column(SCHEMA.field(name), pa.nulls(table.num_rows, SCHEMA.field(name).type))
    return table.to_pylist(), (table.schema.metadata or {}).get(TEXT_KEY) != b"dropped"
