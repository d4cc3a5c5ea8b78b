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
  evaluate     judge corpora the paper's way: the same small model, the same token budget on each corpus,
               then held-out loss on math text and few-shot GSM8K/MATH accuracy side by side

examples:
  dsmath corpus run --config data_pipeline/configs/corpus_demo.yaml
  dsmath corpus run --config corpus_demo iterate.max_iterations=2 runner.backend=ray
  dsmath corpus decontam pages.jsonl --out clean.jsonl
  dsmath corpus build-index ../shared/data/decontam_benchmarks --out my_index.npz
  dsmath corpus evaluate --corpus math=../shared/data/math_text/se_math_33votes.jsonl \
      --corpus news=../shared/data/nonmath_text/article_extraction_benchmark_ground_truth.json \
      --heldout math_overflow=../shared/data/math_text/se_math_overflow_40votes.jsonl --steps 150
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
    e = sub.add_parser("evaluate", help="train the same small model on each corpus; compare held-out loss and accuracy",
                       description="The paper's corpus comparison (§2.2): one initial model (and one tokenizer, trained "
                       "on an equal sample of every corpus), the same token budget on each corpus, then held-out "
                       "LM loss and few-shot accuracy side by side. Writes OUT/report.{json,md} and OUT/NAME/ per "
                       "corpus (reused if finished). On a CPU this is a tiny model and budget; with --config "
                       "pointing at a 1.3B model and a GPU cluster it is the paper's comparison.")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of the pretrain config, e.g. optim.lr=1e-3 eval.fewshot_problems=20")
    e.add_argument("--corpus", action="append", default=[], metavar="NAME=PATH[,PATH...]", required=True,
                   help="a corpus to compare (repeat; files, folders or globs of .jsonl/.parquet/.json, e.g. a "
                        "'dsmath corpus run' OUT/corpus folder)")
    e.add_argument("--heldout", action="append", default=[], metavar="NAME=PATH[,PATH...]",
                   help="a held-out text set to score (repeat; default: the config's eval.heldout)")
    e.add_argument("--config", default="pretrain_tiny_cpu", help="pretrain preset or YAML: model, optimizer, eval")
    e.add_argument("--out-dir", default="runs/corpus_eval", help="output folder (default: runs/corpus_eval)")
    e.add_argument("--steps", type=int, help="optimizer steps per corpus (same as optim.steps=N)")
    e.add_argument("--fewshot", type=int, metavar="N", help="few-shot problems per benchmark (eval.fewshot_problems)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")


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
    if cmd == "evaluate":
        return _evaluate(args)
    raise UserError("missing subcommand: dsmath corpus {run,decontam,build-index,evaluate} (see dsmath corpus --help)")


def _run(args: argparse.Namespace) -> int:
    from data_pipeline.config import load_corpus_config
    from data_pipeline.pipeline import run_pipeline

    overrides = list(args.overrides)
    if args.out_dir:
        overrides.append(f"out_dir={args.out_dir}")
    if args.backend:
        overrides.append(f"runner.backend={args.backend}")
    cfg = load_corpus_config(args.config, overrides)
    from dsmath.logs import log_to

    log_to(f"{cfg.out_dir}/logs/driver.log")  # while quiet (the default): Ray Data's lines, opened at the first
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
        if it.get("stopped"):
            print(f"stopped after iter {it['iteration']}: {it['stopped']}")
    print(f"final corpus: {report['final']['pages']} pages, {report['final']['tokens']} tokens -> "
          f"{cfg.out_dir}/corpus/ ; report: {cfg.out_dir}/report.md, report.png")
    return 0


def _decontam(args: argparse.Namespace) -> int:
    """Damaged records inside a readable input are read errors (counted, the first few shown, the rest of the
    file read); an input that cannot be opened is a one-line error before anything is written. Both outputs
    are written under temporary names and renamed only when complete."""
    from pathlib import Path

    from data_pipeline.decontam import decontam_batch
    from data_pipeline.readers import read_any
    from data_pipeline.stages import extract_batch
    from dsmath.errors import UserError
    from dsmath.userfiles import atomic_path

    out = Path(args.out)
    dropped_path = out.with_suffix(".dropped.jsonl")
    for p in args.inputs:
        if Path(p).resolve() in (out.resolve(), dropped_path.resolve()):
            raise UserError(f"--out {out}: would overwrite the input {p}; write elsewhere")
    errors: list = []
    rows = [r for p in args.inputs for r in read_any(p, errors)]
    rows = extract_batch(rows)
    rows = decontam_batch(rows, index_path=args.index)
    dropped = [r for r in rows if r["contaminated_by"]]
    with atomic_path(out) as tmp_out, atomic_path(dropped_path) as tmp_dropped:
        with tmp_out.open("w", encoding="utf-8") as fh:
            for r in rows:
                if not r["contaminated_by"]:
                    fh.write(json.dumps({"id": r["id"], "url": r["url"], "text": r["text"]}, ensure_ascii=False) + "\n")
        with tmp_dropped.open("w", encoding="utf-8") as fh:
            for r in dropped:
                fh.write(json.dumps({"id": r["id"], "url": r["url"], "benchmark_item": r["contaminated_by"],
                                     "ngram": r["contaminated_ngram"]}, ensure_ascii=False) + "\n")
    for e in errors[:5]:
        print(f"read error: {e}")
    if len(errors) > 5:
        print(f"... and {len(errors) - 5} more read errors")
    print(f"{len(rows)} pages: kept {len(rows) - len(dropped)}, dropped {len(dropped)} -> {out}, {dropped_path}"
          + (f"; SKIPPED {len(errors)} unreadable records (read errors above)" if errors else ""))
    return 0


def _named_paths(items: list[str], flag: str) -> dict:
    """``["math=a.jsonl,b.jsonl", ...]`` -> ``{"math": SourceConfig(paths=(...))}``; one-line errors."""
    from dsmath.errors import UserError
    from dsmath.pretrain.config import SourceConfig

    out: dict = {}
    for item in items:
        name, sep, paths = item.partition("=")
        name = name.strip()
        if not sep or not name or not paths.strip():
            raise UserError(f"{flag} {item!r}: expected NAME=PATH[,PATH...]")
        if name in out:
            raise UserError(f"{flag} {name!r} is given twice")
        out[name] = SourceConfig(paths=tuple(p.strip() for p in paths.split(",") if p.strip()))
    return out


def _evaluate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from dsmath.errors import UserError
    from dsmath.pretrain.config import load_pretrain_config
    from dsmath.pretrain.data import check_paths

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"optim.steps={args.steps}")
    if args.fewshot is not None:
        overrides.append(f"eval.fewshot_problems={args.fewshot}")
    cfg = load_pretrain_config(args.config, overrides)
    corpora = _named_paths(args.corpus, "--corpus")
    if len(corpora) < 2:
        raise UserError("--corpus: name at least two corpora to compare")
    heldout = _named_paths(args.heldout, "--heldout") if args.heldout else cfg.eval.heldout
    if not heldout:
        raise UserError("--heldout: name at least one held-out text set (or set eval.heldout in the config)")
    cfg = replace(cfg, data=replace(cfg.data, sources=corpora), eval=replace(cfg.eval, heldout=heldout))
    check_paths(cfg)  # before the slow imports
    from dsmath.logs import log_to
    from learner.pretrain import evaluate_corpora

    log_to(f"{args.out_dir}/logs/driver.log")  # while quiet (the default): the libraries' lines

    report = evaluate_corpora(cfg, corpora, args.out_dir, progress=not args.no_progress)
    print(f"same initial model ({report['model_dir']}), {report['steps']} steps x {report['rows_per_step']} rows x "
          f"{report['seq_len']} tokens per corpus:")
    print(report["table"])
    print(f"report: {args.out_dir}/report.json, report.md")
    return 0
