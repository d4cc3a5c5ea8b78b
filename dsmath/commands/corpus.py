"""``dsmath corpus``: the DeepSeekMath math-corpus pipeline (iterative fastText recall, dedup, decontamination)."""

from __future__ import annotations

import argparse
import json

HELP = "math web-corpus pipeline: extract, dedup, decontaminate, iterative fastText recall"
DESCRIPTION = """The DeepSeekMath corpus pipeline (paper §2.1), local or on Ray Data.

subcommands:
  run          the whole loop; writes OUT/report.{json,md,png}, OUT/corpus/*.parquet, OUT/removed/*.jsonl
  decontam     drop pages sharing a benchmark 10-gram (shipped index) from JSONL/Parquet/WARC inputs
  build-index  rebuild the hashed benchmark n-gram index from a folder of benchmark JSONL files

examples:
  dsmath corpus run --config data_pipeline/configs/corpus_demo.yaml
  dsmath corpus run --config corpus_demo iterate.max_iterations=2 runner.backend=ray
  dsmath corpus decontam pages.jsonl --out clean.jsonl
  dsmath corpus build-index ../shared/data/decontam_benchmarks --out my_index.npz
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="corpus_command", metavar="SUBCOMMAND")
    r = sub.add_parser("run", help="run the iterative pipeline from a config")
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. select.token_budget=1e6")
    r.add_argument("--config", default="corpus_demo", help="preset name (corpus_demo) or a YAML path")
    r.add_argument("--out-dir", help="output folder (same as out_dir=...)")
    r.add_argument("--backend", choices=["local", "ray"], help="same as runner.backend=...")
    d = sub.add_parser("decontam", help="benchmark decontamination of page files")
    d.add_argument("inputs", nargs="+", help="JSONL/Parquet of {url, text} or WARC/WET files")
    d.add_argument("--out", required=True, help="JSONL of the clean pages; dropped ones go to OUT.dropped.jsonl")
    d.add_argument("--index", default="", help="n-gram index .npz (default: the one shipped with dsmath)")
    b = sub.add_parser("build-index", help="build the hashed benchmark n-gram index")
    b.add_argument("benchmark_dir")
    b.add_argument("--out", required=True)
    b.add_argument("--ngram", type=int, default=10)
    b.add_argument("--min-ngram", type=int, default=3)


def run(args: argparse.Namespace) -> int:
    from dsmath.errors import UserError

    cmd = getattr(args, "corpus_command", None)
    if cmd == "run":
        return _run(args)
    if cmd == "decontam":
        return _decontam(args)
    if cmd == "build-index":
        from data_pipeline.decontam import build_index, load_benchmarks

        benches = load_benchmarks(args.benchmark_dir)
        if not benches:
            raise UserError(f"{args.benchmark_dir}: no known benchmark files (gsm8k_test.jsonl, math_test.jsonl, ...)")
        idx = build_index(benches, ngram=args.ngram, min_ngram=args.min_ngram)
        idx.save(args.out)
        print(f"wrote {args.out}: {len(idx.hashes)} n-gram hashes from {', '.join(idx.benchmarks)}")
        return 0
    raise UserError("missing subcommand: dsmath corpus {run,decontam,build-index} (see dsmath corpus --help)")


def _run(args: argparse.Namespace) -> int:
    from data_pipeline.config import load_corpus_config
    from data_pipeline.pipeline import run_pipeline

    overrides = list(args.overrides)
    if args.out_dir:
        overrides.append(f"out_dir={args.out_dir}")
    if args.backend:
        overrides.append(f"runner.backend={args.backend}")
    cfg = load_corpus_config(args.config, overrides)
    report = run_pipeline(cfg)
    st = report["stages"]
    print(f"pages read {st['ingest']['pages']} (read errors {st['ingest']['read_errors']}), after extract "
          f"{st['extract']['kept']}, after dedup {st['dedup']['kept']} (exact URL {st['dedup']['exact_url']}, "
          f"near-dup {st['dedup']['near_dup']})" + (f", decontam dropped {st['decontam']['dropped']} "
                                                     f"{st['decontam']['by_benchmark']}" if "decontam" in st else ""))
    for it in report["iterations"]:
        h, hc = it["heldout"], it["heldout_at_budget_cut"]
        ov = "-" if it["overlap_with_previous"] is None else f"{it['overlap_with_previous']:.3f}"
        print(f"iter {it['iteration']}: seed {it['seed_pages']}, kept {it['kept_pages']} pages / {it['kept_tokens']} "
              f"tokens / {it['kept_domains']} domains, overlap {ov}; held-out precision {h['precision']:.3f} "
              f"recall {h['recall']:.3f} (P(math)>=0.5), at the budget cut {it['budget_score_cut']:.3f}: precision "
              f"{hc['precision']:.3f} recall {hc['recall']:.3f}; recall of non-seed math pages in the pool "
              f"{it['corpus_recall_nonseed_math']:.3f}; flagged domains {it['flagged_domains']}")
    print(f"final corpus: {report['final']['pages']} pages, {report['final']['tokens']} tokens -> "
          f"{cfg.out_dir}/corpus/ ; report: {cfg.out_dir}/report.md, report.png")
    return 0


def _decontam(args: argparse.Namespace) -> int:
    from pathlib import Path

    from data_pipeline.decontam import decontam_batch
    from data_pipeline.readers import read_any
    from data_pipeline.stages import extract_batch

    errors: list = []
    rows = [r for p in args.inputs for r in read_any(p, errors)]
    rows = extract_batch(rows)
    rows = decontam_batch(rows, index_path=args.index)
    out = Path(args.out)
    dropped = [r for r in rows if r["contaminated_by"]]
    with out.open("w") as fh:
        for r in rows:
            if not r["contaminated_by"]:
                fh.write(json.dumps({"id": r["id"], "url": r["url"], "text": r["text"]}, ensure_ascii=False) + "\n")
    with out.with_suffix(".dropped.jsonl").open("w") as fh:
        for r in dropped:
            fh.write(json.dumps({"id": r["id"], "url": r["url"], "benchmark_item": r["contaminated_by"],
                                 "ngram": r["contaminated_ngram"]}, ensure_ascii=False) + "\n")
    for e in errors:
        print(f"read error: {e}")
    print(f"{len(rows)} pages: kept {len(rows) - len(dropped)}, dropped {len(dropped)} -> {out}, "
          f"{out.with_suffix('.dropped.jsonl')}")
    return 0
