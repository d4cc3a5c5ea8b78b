"""Run a stage function over rows, locally or on Ray Data, into resumable Parquet shards.

A stage function takes ``list[dict]`` and returns ``list[dict]`` (one output per input row, order kept). Rows are
cut into shards of ``shard_size`` in input order; shard *k* of stage *S* is ``OUT/S/shard-0000k.parquet``,
written atomically (temp file, then rename), so a rerun skips finished shards and only computes the rest.
The Ray backend (``ray.data``, num_gpus=0) runs the *same* function with ``map_batches`` and writes the same
shards, so both backends give identical files on identical input (tested).
Not guaranteed: that a shard written by an older version of a stage is recomputed: delete the stage folder.
"""

from __future__ import annotations

import json
import os
import time
from functools import partial
from pathlib import Path
from typing import Callable

StageFn = Callable[..., list[dict]]


def write_shard(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({}), tmp)
    os.replace(tmp, path)


def read_shards(stage_dir: Path) -> list[dict]:
    import pyarrow.parquet as pq

    out: list[dict] = []
    for p in sorted(Path(stage_dir).glob("shard-*.parquet")):
        out.extend(pq.read_table(p).to_pylist())
    return out


def _apply_batch(batch, fn: StageFn, kwargs: dict):
    """Ray Data adapter: a pyarrow batch → rows → the stage function → a pyarrow batch."""
    import pyarrow as pa

    rows = batch.to_pylist()
    meta = [(r.pop("_shard"), r.pop("_pos")) for r in rows]
    out = fn(rows, **kwargs)
    for r, (s, p) in zip(out, meta):
        r["_shard"], r["_pos"] = s, p
    return pa.Table.from_pylist(out)


class Runner:
    """Runs map stages; ``backend`` is "local" or "ray". Call :meth:`close` (or use as a context manager)."""

    def __init__(self, out_dir: str | Path, *, backend: str = "local", shard_size: int = 256, batch_size: int = 64,
                 num_cpus: int = 2, progress: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.backend, self.shard_size, self.batch_size = backend, shard_size, batch_size
        self.num_cpus, self.progress = num_cpus, progress
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self._ray_started = False

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._ray_started:
            import ray

            ray.shutdown()
            self._ray_started = False
            self._reaper.terminate()  # stopped in order: nothing left to end
            self._reaper.wait()

    def _log(self, record: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def map(self, stage: str, rows: list[dict], fn: StageFn, **kwargs) -> list[dict]:
        """Apply ``fn`` to ``rows`` shard by shard; finished shards are read back, not recomputed."""
        stage_dir = self.out_dir / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        shards = [rows[i : i + self.shard_size] for i in range(0, len(rows), self.shard_size)]
        paths = [stage_dir / f"shard-{k:05d}.parquet" for k in range(len(shards))]
        todo = [k for k, p in enumerate(paths) if not p.exists()]
        t0 = time.perf_counter()
        if todo:
            if self.backend == "ray":
                self._map_ray(stage, shards, paths, todo, fn, kwargs)
            else:
                self._map_local(stage, shards, paths, todo, fn, kwargs)
        seconds = time.perf_counter() - t0
        computed = sum(len(shards[k]) for k in todo)
        self._log({"stage": stage, "backend": self.backend, "rows": len(rows), "computed_rows": computed,
                   "skipped_shards": len(shards) - len(todo), "seconds": round(seconds, 4),
                   "docs_per_s": round(computed / seconds, 2) if computed and seconds > 0 else None})
        import pyarrow.parquet as pq

        out: list[dict] = []
        for p in paths:
            out.extend(pq.read_table(p).to_pylist())
        return out

    def _map_local(self, stage, shards, paths, todo, fn, kwargs) -> None:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(shards[k]) for k in todo), desc=stage, unit="doc", disable=not self.progress,
                   leave=False)
        for k in todo:
            out = []
            for i in range(0, len(shards[k]), self.batch_size):
                batch = shards[k][i : i + self.batch_size]
                out.extend(fn(batch, **kwargs))
                bar.update(len(batch))
            write_shard(paths[k], out)
        bar.close()

    def _ensure_ray(self) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=self.num_cpus, num_gpus=0, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            self._ray_started = True
            from dsmath.reaper import start_reaper

            self._reaper = start_reaper()  # what of this cluster outlives a killed driver (Ray's agents) ends too
        if not self.progress:  # quiet: Ray Data logs every dataset execution at INFO
            import logging

            logging.getLogger("ray.data").setLevel(logging.WARNING)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = self.progress
        ctx.execution_options.preserve_order = True

    def _map_ray(self, stage, shards, paths, todo, fn, kwargs) -> None:
        import ray

        self._ensure_ray()
        import pyarrow as pa

        items = [{**r, "_shard": k, "_pos": i} for k in todo for i, r in enumerate(shards[k])]
        # One Arrow table split into blocks (from_items converts row by row in the driver, which on 2 cores
        # competes with the workers).
        table = pa.Table.from_pylist(items)
        n_blocks = max(1, min(len(items), 2 * self.num_cpus))
        step = -(-len(items) // n_blocks)
        ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, len(items), step)])
        ds = ds.map_batches(partial(_apply_batch, fn=fn, kwargs=kwargs), batch_size=self.batch_size,
                            batch_format="pyarrow", num_cpus=1, zero_copy_batch=False)
        results: dict[int, list[tuple[int, dict]]] = {k: [] for k in todo}
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for r in batch.to_pylist():
                k, i = r.pop("_shard"), r.pop("_pos")
                results[k].append((i, r))
        for k in todo:
            write_shard(paths[k], [r for _, r in sorted(results[k], key=lambda x: x[0])])
