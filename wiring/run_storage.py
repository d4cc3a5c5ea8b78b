"""A training run kept in a storage URI (config key ``storage``): what goes where, and how ``--resume`` gets it back.

    STORAGE/checkpoints/step-N/   each checkpoint, uploaded by learner rank 0 after its atomic save, manifest last
                                  (:func:`learner.checkpoint.upload`); pruned there to ``keep_checkpoints`` as well
    STORAGE/run/                  the run directory's top-level files (config.yaml, metrics.jsonl, summary.json,
                                  …) and ``samples/``, uploaded by the driver after each checkpointed step's
                                  metrics row and at the end of the run

Guaranteed: a checkpoint in storage that has its manifest was uploaded whole, and one is taken on resume only after
it verifies. Not guaranteed: that the run files in storage are as new as its newest checkpoint (a driver that dies
between the two uploads leaves ``metrics.jsonl`` a row short; the resumed run's rows follow it all the same), and
``logs/``, ``tensorboard/`` and :data:`LOCAL_ONLY` are not uploaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from dsmath import storage

CHECKPOINTS = "checkpoints"
RUN = "run"
# Not uploaded: the status server's secret token and live address (this attempt's, meaningless to the next).
LOCAL_ONLY = ("status_token", "status_address")


def checkpoints_uri(uri: str) -> str:
    return storage.join(uri, CHECKPOINTS)


def upload_run_files(run_dir: str | Path, uri: str) -> int:
    """Copy ``run_dir``'s top-level regular files (but :data:`LOCAL_ONLY`) and its ``samples/`` folder to
    ``STORAGE/run``; returns how many files were copied: those not there yet or of another size (sample files
    are written once, ``metrics.jsonl`` only grows), so a long run does not copy its whole history every time."""
    run_dir = Path(run_dir)
    names = [p.name for p in run_dir.iterdir() if p.is_file() and not p.is_symlink() and p.name not in LOCAL_ONLY]
    if (run_dir / "samples").is_dir():
        names.append("samples")
    return storage.upload_dir(run_dir, storage.join(uri, RUN), names=names, changed_only=True)


def claim_fresh(uri: str, *, overwrite: bool) -> None:
    """A fresh run's storage: one that holds a run (``run/`` or ``checkpoints/``) is refused in one line unless
    ``overwrite``, and then that run is removed first (its ``summary.json`` would otherwise make a resume of the new
    run from storage look finished)."""
    from dsmath.errors import UserError

    held = [name for name in (RUN, CHECKPOINTS) if name in storage.list_dirs(uri)]
    if held and not overwrite:
        raise UserError(f"storage={uri} already holds a run ({', '.join(held)}): pass --resume to continue it, "
                        "--overwrite to replace it, or choose another storage")
    for name in held:
        storage.remove_dir(storage.join(uri, name))


def restore(run_dir: str | Path, uri: str, log: Callable[[str], None]) -> Path | None:
    """Before a resume: when ``run_dir/checkpoints`` holds no checkpoint whose files have its manifest's sizes,
    download the run files from ``STORAGE/run`` and the newest intact checkpoint from ``STORAGE/checkpoints`` into
    ``run_dir`` (said in one line) and return that checkpoint; otherwise do nothing and return None. No intact
    checkpoint in storage is a one-line :class:`~dsmath.errors.UserError`."""
    from learner.checkpoint import checkpoints, download_newest, verify

    run_dir = Path(run_dir)
    if any(verify(c, checksums=False) is None for c in checkpoints(run_dir / CHECKPOINTS)):
        return None
    storage.open_uri(uri)  # a URI that cannot be opened: one line naming the key
    ckpt = download_newest(checkpoints_uri(uri), run_dir / CHECKPOINTS, log=log)
    files = storage.download_dir(storage.join(uri, RUN), run_dir) if storage.list_dirs(uri).count(RUN) else 0
    log(f"--resume: downloaded checkpoint {ckpt.name} and {files} run files from {uri} into {run_dir}")
    return ckpt
