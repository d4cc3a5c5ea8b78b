"""Preflight for ``ray job submit --working-dir``: will the upload fit under Ray's limit?

Ray zips the working directory (``ZIP_STORED``, no compression) and uploads it to the GCS, which refuses
packages of ``RAY_max_grpc_message_size`` bytes or more (512 MiB by default). The failure comes late and
reads obscurely, after the zip has been built; :func:`preflight` predicts it in a second or two.

It walks the tree the way Ray's ``_dir_travel`` does: ``excludes`` are gitwildmatch patterns relative to
``working_dir``; every directory's ``.gitignore`` (unless ``RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1``) and
``.rayignore`` apply below it; an excluded directory is not entered.

Guaranteed: ``estimated_zip_bytes`` is the size of the zip Ray would build, to within the zip headers'
rounding (a test checks it against Ray's own packer); the report's message names the biggest offenders
and the excludes that would fix them.
Not guaranteed: files that change between preflight and submission; symlink loops (Ray follows them too).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dsmath.errors import UserError

MIB = 1024 * 1024
# Ray's defaults (ray/_private/runtime_env/packaging.py): the GCS limit, its warning at half, per-file warning.
DEFAULT_LIMIT_BYTES = 512 * MIB
FILE_SIZE_WARNING_BYTES = 10 * MIB

# What a dsmath checkout holds that a job never needs; cluster/runtime_env.yaml lists the same.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git",
    ".venv",
    "/runs/",
    "checkpoints/",
    "/data/",
    "*.pt",
    "*.safetensors",
    "*.bin",
    "__pycache__/",
    "*.egg-info/",
    ".pytest_cache/",
    "build/",
)
# Directory names that, when they are uploaded, are nearly always a mistake.
SUSPECT_DIRS = (".git", ".venv", "venv", "runs", "checkpoints", "data", "node_modules", "wandb", "outputs")

# Zip overhead per entry (ZIP_STORED, no extra fields): local header 30 + central directory 46 bytes
# plus the name twice; 22 bytes of end-of-central-directory record once.
_ZIP_LOCAL_HEADER = 30
_ZIP_CENTRAL_HEADER = 46
_ZIP_END_RECORD = 22


def upload_limit_bytes() -> int:
    """Ray's GCS package limit in this environment (``RAY_max_grpc_message_size`` overrides it, as in Ray)."""
    raw = os.environ.get("RAY_max_grpc_message_size")
    try:
        return int(raw) if raw else DEFAULT_LIMIT_BYTES
    except ValueError:
        return DEFAULT_LIMIT_BYTES


def _path_spec(lines: Iterable[str]) -> Callable[[str], bool]:
    try:
        import pathspec
    except ImportError:  # Ray vendors the same library
        from ray._private.thirdparty import pathspec  # type: ignore[no-redef]
    with warnings.catch_warnings():
        # 'gitwildmatch' is what Ray uses; newer pathspec deprecates the name but keeps the behaviour.
        warnings.simplefilter("ignore", DeprecationWarning)
        spec = pathspec.PathSpec.from_lines("gitwildmatch", [ln for ln in lines if ln])
    return spec.match_file


@dataclass(frozen=True)
class PreflightReport:
    """What would be uploaded, and whether Ray would accept it."""

    working_dir: str
    excludes: tuple[str, ...]
    num_files: int
    total_bytes: int  # sum of file sizes that would be uploaded
    estimated_zip_bytes: int  # including zip headers: what Ray compares against the limit
    limit_bytes: int
    largest_files: tuple[tuple[str, int], ...]  # (relative path, bytes), biggest first
    largest_dirs: tuple[tuple[str, int], ...]  # top-level entries by uploaded bytes, biggest first
    warnings: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """False when the submission would fail on the size limit."""
        return self.estimated_zip_bytes < self.limit_bytes

    def message(self) -> str:
        """A readable paragraph: the verdict, then each warning on its own line."""
        verdict = (
            f"working_dir {self.working_dir}: {self.num_files} files, {_mib(self.estimated_zip_bytes)} to upload "
            f"(Ray's limit {_mib(self.limit_bytes)})"
        )
        return "\n".join([verdict, *(f"  - {w}" for w in self.warnings)])


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def preflight(
    working_dir: str | Path,
    excludes: Iterable[str] = DEFAULT_EXCLUDES,
    *,
    include_gitignore: bool | None = None,
    limit_bytes: int | None = None,
) -> PreflightReport:
    """Estimate the ``working_dir`` upload honouring ``excludes`` (and ignore files), and warn.

    Raises :class:`UserError` when ``working_dir`` is not a directory. Never raises for a large upload:
    check ``report.ok`` and show ``report.message()``.
    """
    root = Path(working_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"working_dir {working_dir}: not a directory")
    root = root.absolute()
    excludes = tuple(excludes)
    if include_gitignore is None:
        include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    limit = upload_limit_bytes() if limit_bytes is None else int(limit_bytes)

    files, zip_bytes, per_top = _walk_like_ray(root, excludes, include_gitignore)
    total = sum(size for _, size in files)
    largest = tuple(sorted(files, key=lambda f: -f[1])[:5])
    largest_dirs = tuple(sorted(per_top.items(), key=lambda kv: -kv[1])[:5])
    return PreflightReport(
        working_dir=str(root),
        excludes=excludes,
        num_files=len(files),
        total_bytes=total,
        estimated_zip_bytes=zip_bytes,
        limit_bytes=limit,
        largest_files=largest,
        largest_dirs=largest_dirs,
        warnings=tuple(_upload_warnings(zip_bytes, limit, largest, largest_dirs, per_top)),
    )


def _walk_like_ray(
    root: Path, excludes: tuple[str, ...], include_gitignore: bool
) -> tuple[list[tuple[str, int]], int, dict[str, int]]:
    """Walk ``root`` as Ray's ``_dir_travel`` does; returns (files as (relative path, bytes) in walk order,
    estimated zip bytes, uploaded bytes per top-level entry)."""
    # (base directory, matcher) pairs, like Ray's stack of exclude callables.
    matchers: list[tuple[Path, Callable[[str], bool]]] = [(root, _path_spec(excludes))]
    files: list[tuple[str, int]] = []
    zip_bytes = _ZIP_END_RECORD
    per_top: dict[str, int] = {}

    def excluded(p: Path) -> bool:
        return any(m(str(p.relative_to(base))) for base, m in matchers)

    def visit(p: Path) -> None:
        nonlocal zip_bytes
        pushed = 0
        if p.is_dir():
            for name in ((".gitignore",) if include_gitignore else ()) + (".rayignore",):
                ignore = p / name
                if ignore.is_file():
                    matchers.append((p, _path_spec(ignore.read_text(encoding="utf-8", errors="replace").splitlines())))
                    pushed += 1
        # Ray checks the directory against its own ignore files too (they are pushed before the check).
        if p == root or not excluded(p):
            if p.is_file():
                rel = p.relative_to(root).as_posix()
                size = p.stat().st_size
                files.append((rel, size))
                zip_bytes += size + _ZIP_LOCAL_HEADER + _ZIP_CENTRAL_HEADER + 2 * len(rel.encode())
                top = rel.split("/", 1)[0]
                per_top[top] = per_top.get(top, 0) + size
            elif p.is_dir():
                children = list(p.iterdir())
                if not children and p != root:  # Ray stores empty directories as "name/" entries
                    rel = p.relative_to(root).as_posix() + "/"
                    zip_bytes += _ZIP_LOCAL_HEADER + _ZIP_CENTRAL_HEADER + 2 * len(rel.encode())
                for child in children:
                    visit(child)
        for _ in range(pushed):
            matchers.pop()

    visit(root)
    return files, zip_bytes, per_top


def _upload_warnings(
    zip_bytes: int,
    limit: int,
    largest: tuple[tuple[str, int], ...],
    largest_dirs: tuple[tuple[str, int], ...],
    per_top: dict[str, int],
) -> list[str]:
    """The report's warnings, in this order: over the limit (an ERROR) or over half of it; large files;
    suspect top-level directories (``SUSPECT_DIRS``) being uploaded."""
    notes: list[str] = []
    if zip_bytes >= limit:
        notes.append(
            f"ERROR: the upload ({_mib(zip_bytes)}) is over Ray's limit ({_mib(limit)}); `ray job submit` would "
            f"fail. Exclude the biggest entries: {_fmt_sizes(largest_dirs)}"
        )
    elif zip_bytes >= limit // 2:
        notes.append(
            f"the upload ({_mib(zip_bytes)}) is over half of Ray's limit ({_mib(limit)}); biggest entries: "
            f"{_fmt_sizes(largest_dirs)}"
        )
    big = [(p, s) for p, s in largest if s >= FILE_SIZE_WARNING_BYTES]
    if big:
        notes.append(
            f"large files ({_fmt_sizes(big)}): put them on shared storage and exclude them "
            f"(runtime_env excludes, .rayignore)"
        )
    suspects = sorted(top for top in per_top if top in SUSPECT_DIRS)
    if suspects:
        notes.append(
            "uploading " + ", ".join(f"{s}/ ({_mib(per_top[s])})" for s in suspects) + ": jobs rarely need these; "
            "add them to the excludes"
        )
    return notes


def _fmt_sizes(items: Iterable[tuple[str, int]]) -> str:
    return ", ".join(f"{p} {_mib(s)}" for p, s in items)


def check_or_raise(working_dir: str | Path, excludes: Iterable[str] = DEFAULT_EXCLUDES) -> PreflightReport:
    """:func:`preflight`, raising :class:`UserError` with the report's message when the upload would fail."""
    report = preflight(working_dir, excludes)
    if not report.ok:
        raise UserError(report.message().replace("\n", " "))
    return report


def excludes_from_runtime_env(path: str | Path) -> tuple[str, ...]:
    """The ``excludes`` list of a runtime_env YAML (e.g. ``cluster/runtime_env.yaml``)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"runtime env {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise UserError(f"runtime env {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    excludes = data.get("excludes", []) if isinstance(data, dict) else None
    if not isinstance(excludes, list) or not all(isinstance(e, str) for e in excludes):
        raise UserError(f"runtime env {path}: 'excludes' must be a list of strings")
    return tuple(excludes)


def main(argv: list[str] | None = None) -> int:
    """``python -m wiring.jobsubmit [WORKING_DIR] [--runtime-env FILE] [--exclude PAT ...]``: exit 1 if too big."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m wiring.jobsubmit", description="Check a ray job working_dir upload against Ray's size limit."
    )
    parser.add_argument("working_dir", nargs="?", default=".")
    parser.add_argument("--runtime-env", default=None, help="take the excludes from this runtime_env YAML")
    parser.add_argument("--exclude", action="append", default=[], help="an extra gitwildmatch pattern (repeatable)")
    args = parser.parse_args(argv)
    try:
        excludes = excludes_from_runtime_env(args.runtime_env) if args.runtime_env else DEFAULT_EXCLUDES
        report = preflight(args.working_dir, (*excludes, *args.exclude))
    except UserError as exc:
        print(f"preflight: error: {exc}", file=sys.stderr)
        return 2
    print(report.message(), file=sys.stderr if not report.ok else sys.stdout)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
