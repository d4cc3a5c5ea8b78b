"""The iterative DeepSeekMath corpus loop, end to end (``dsmath corpus run``).

ingest → extract (HTML→text, math kept) → exact-URL + MinHash-LSH dedup → decontamination → split
(held-out labelled split; seed; pool) → iterations of [train fastText on seed vs random pool negatives →
score pool + held-out → keep top pages by token budget → domain discovery → annotate (auto, overridden by a
person's file) → grow the seed] until ``max_iterations`` or kept-set overlap ≥ ``stop_overlap``.

Every map stage goes through :class:`data_pipeline.runner.Runner` (local or Ray Data, resumable shards).
Outputs in ``out_dir``: stage shards, ``removed/*.jsonl`` (dedup, decontam, read errors),
``iter_<i>/{model.bin, domains.json, review.yaml, annotations.yaml}``, ``corpus/`` (final kept pages),
``report.json``, ``report.md``, ``report.png``, ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml

from data_pipeline import classifier, domains
from data_pipeline.config import CorpusConfig, to_dict
from data_pipeline.readers import ReadError, read_any
from data_pipeline.runner import Runner
from data_pipeline.stages import extract_batch, minhash_batch
from dsmath.datasets import write_jsonl
from dsmath.errors import UserError
from dsmath.userfiles import atomic_path, read_yaml


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_jsonl(path, rows)  # temp name + rename: a killed run never leaves a half-written file


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def ingest(cfg: CorpusConfig, errors: list[ReadError]) -> list[dict]:
    from data_pipeline.demo_corpus import demo_pages

    rows: list[dict] = []
    if cfg.input.demo_data_dir:
        d = Path(cfg.input.demo_data_dir).expanduser()
        if not d.exists():
            raise UserError(f"input.demo_data_dir: {d} does not exist (it should be shared/data)")
        rows += demo_pages(d, errors, cfg.input.max_pages_per_source)
    for p in cfg.input.paths:
        rows += list(read_any(Path(p).expanduser(), errors))
    if not rows and errors:
        raise UserError(f"no readable input pages: {len(errors)} read errors, the first {errors[0]}")
    if not rows:
        raise UserError("no input pages: set input.demo_data_dir or input.paths")
    if errors:  # said before any stage runs, and kept in removed/read_errors.jsonl
        print(f"corpus: read {len(rows)} pages; SKIPPED {len(errors)} unreadable records (first: {errors[0]})",
              flush=True)
    return rows


def dedup_stage(cfg: CorpusConfig, runner: Runner, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    from data_pipeline.dedup import exact_url_dedup, near_duplicates

    removed: list[dict] = []
    if cfg.dedup.exact_url:
        rows, rem = exact_url_dedup(rows)
        removed += rem
    if cfg.dedup.near_dup and rows:
        d = cfg.dedup
        sig_rows = runner.map("03_minhash", rows, minhash_batch, num_perm=d.num_perm, seed=d.seed,
                              shingle_words=d.shingle_words)
        sigs = np.array([r["minhash"] for r in sig_rows], dtype=np.uint32)
        dups = near_duplicates([r["id"] for r in rows], sigs, bands=d.bands, threshold=d.threshold)
        url_of = {r["id"]: r["url"] for r in rows}
        removed += [{"id": i, "url": url_of[i], "duplicate_of": k, "jaccard_estimate": round(j, 3), "reason": "near_dup"}
                    for i, (k, j) in dups.items()]
        rows = [r for r in rows if r["id"] not in dups]
    return rows, removed


def split(cfg: CorpusConfig, rows: list[dict]) -> tuple[list[dict], list[dict], set[str]]:
    """(pool, heldout, seed ids). Held-out: a random ``heldout_fraction`` of the labelled pages, never trained on.
    Seed: ``seed_fraction`` of the remaining pages on ``seed_domains`` (the OpenWebMath stand-in)."""
    rng = random.Random(cfg.input.seed)
    labelled = sorted(r["id"] for r in rows if r.get("label"))
    held = set(rng.sample(labelled, int(round(cfg.input.heldout_fraction * len(labelled)))))
    pool = [r for r in rows if r["id"] not in held]
    heldout = [r for r in rows if r["id"] in held]
    seed_dom = set(cfg.input.seed_domains)
    candidates = sorted(r["id"] for r in pool if domains.host_of(r["url"]) in seed_dom)
    seed = set(rng.sample(candidates, int(round(cfg.input.seed_fraction * len(candidates)))))
    if not seed:
        raise UserError(f"input.seed_domains: no pool page is on {sorted(seed_dom)}; the classifier needs a seed")
    return pool, heldout, seed


def _budget(cfg: CorpusConfig, pool_tokens: int) -> int:
    if cfg.select.token_budget > 0:
        return cfg.select.token_budget
    return int(cfg.select.token_budget_fraction * pool_tokens)


def run_pipeline(cfg: CorpusConfig) -> dict:
    """Run the whole loop into ``cfg.out_dir``. The inputs are read first: an input that cannot be opened (a
    directory, damaged compression, a wrong format) is a one-line ``UserError`` before anything is written;
    damaged records inside a readable input are read errors, counted in the report."""
    out = Path(cfg.out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir: {out} is a file, expected a folder")
    saved = out / "config.yaml"
    if saved.exists():
        # Resume reuses shards and models: only safe when everything but the runner settings is unchanged.
        before = read_yaml(saved, "saved corpus config") or {}
        if not isinstance(before, dict):
            raise UserError(f"{saved}: not a corpus config mapping; delete that folder to start over")
        now = to_dict(cfg)
        changed = sorted(k for k in set(before) | set(now) if k not in ("runner", "out_dir") and before.get(k) != now.get(k))
        if changed:
            raise UserError(f"{out} holds a run made with different settings ({', '.join(changed)}); "
                            "use a new out_dir, or delete that folder to start over")
    t0 = time.perf_counter()
    errors: list[ReadError] = []
    rows = ingest(cfg, errors)  # before the folder exists: a refused input leaves nothing behind
    out.mkdir(parents=True, exist_ok=True)
    _write_text(saved, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    rc = cfg.runner
    report: dict = {"config": to_dict(cfg), "stages": {}, "iterations": []}
    with Runner(out, backend=rc.backend, shard_size=rc.shard_size, batch_size=rc.batch_size, num_cpus=rc.num_cpus,
                progress=rc.progress) as runner:
        _write_jsonl(out / "removed" / "read_errors.jsonl", [asdict(e) for e in errors])
        report["stages"]["ingest"] = {"pages": len(rows), "read_errors": len(errors),
                                      "first_errors": [str(e) for e in errors[:5]]}

        rows = runner.map("02_extract", rows, extract_batch, main_content=cfg.extract.main_content)
        short = [r for r in rows if len(r["text"]) < cfg.extract.min_chars]
        rows = [r for r in rows if len(r["text"]) >= cfg.extract.min_chars]
        report["stages"]["extract"] = {"kept": len(rows), "too_short": len(short),
                                       "errors": sum(bool(r.get("extract_error")) for r in short)}

        rows, removed = dedup_stage(cfg, runner, rows)
        _write_jsonl(out / "removed" / "dedup.jsonl", removed)
        report["stages"]["dedup"] = {"kept": len(rows), "exact_url": sum(r["reason"] == "exact_url" for r in removed),
                                     "near_dup": sum(r["reason"] == "near_dup" for r in removed)}

        if cfg.decontam.enabled:
            from data_pipeline.decontam import decontam_batch

            dc = cfg.decontam
            rows = runner.map("04_decontam", rows, decontam_batch, index_path=dc.index_path,
                              benchmark_dir=dc.benchmark_dir, ngram=dc.ngram, min_ngram=dc.min_ngram)
            dropped = [{"id": r["id"], "url": r["url"], "label": r["label"], "benchmark_item": r["contaminated_by"],
                        "ngram": r["contaminated_ngram"]} for r in rows if r["contaminated_by"]]
            rows = [r for r in rows if not r["contaminated_by"]]
            _write_jsonl(out / "removed" / "decontam.jsonl", dropped)
            by_bench: dict[str, int] = {}
            for d in dropped:
                b = d["benchmark_item"].split(":")[0]
                by_bench[b] = by_bench.get(b, 0) + 1
            report["stages"]["decontam"] = {"kept": len(rows), "dropped": len(dropped), "by_benchmark": by_bench,
                                            "examples": dropped[:5]}
        report["stages"]["prep_seconds"] = round(time.perf_counter() - t0, 2)

        pool, heldout, seed = split(cfg, rows)
        report["stages"]["split"] = {"pool": len(pool), "heldout": len(heldout), "seed": len(seed)}
        run_iterations(cfg, runner, out, pool, heldout, seed, report)
    write_reports(out, report)
    return report


def run_iterations(cfg, runner, out, pool, heldout, seed, report) -> list[dict]:
    """The paper's iterative loop (§2.1): train fastText on the seed, score the pool, keep the top by token
    budget, discover and annotate math domains, grow the seed; stop by :func:`stop_reason`. Writes
    ``OUT/iter_K/`` each round and the final ``OUT/corpus/`` shards; returns ``report["iterations"]``."""
    rng = random.Random(cfg.classifier.seed)
    text_of = {r["id"]: r["text"] for r in pool}
    pool_ids = [r["id"] for r in pool]
    negatives_exclude: set[str] = set()
    extra_negatives: set[str] = set()
    person = domains.load_annotations(cfg.domains.annotation_file) if cfg.domains.annotation_file else None
    prev_kept: set[str] | None = None
    target = {r["id"] for r in pool if r.get("label") == "math"} - seed
    for it in range(1, cfg.iterate.max_iterations + 1):
        idir = out / f"iter_{it}"
        idir.mkdir(parents=True, exist_ok=True)
        negs = _negatives(cfg, rng, pool, pool_ids, seed, negatives_exclude, extra_negatives)
        model_path, train_s = _train_classifier(cfg, idir, [text_of[i] for i in sorted(seed)],
                                                [text_of[i] for i in negs])
        scored = runner.map(f"iter_{it}/05_score", pool + heldout, classifier.score_batch, model_path=str(model_path),
                            max_chars=cfg.classifier.max_chars)
        s_pool, s_held = scored[: len(pool)], scored[len(pool):]
        scores = np.array([r["score"] for r in s_pool])  # [P]
        tokens = np.array([r["tokens"] for r in s_pool])  # [P]
        budget = _budget(cfg, int(tokens.sum()))
        kept = set(classifier.select_by_budget(pool_ids, scores, tokens, budget))
        flagged, auto, verdicts = _review_domains(cfg, idir, s_pool, kept, person)
        added = {i for i, v in verdicts.items() if v == "math"} - seed
        negs_before = set(extra_negatives)
        extra_negatives |= {i for i, v in verdicts.items() if v == "not_math"} - seed
        negatives_exclude |= added
        overlap = len(kept & prev_kept) / len(kept) if prev_kept and kept else None
        rec = {"iteration": it, "seed_pages": len(seed), "negatives": len(negs), "train_seconds": round(train_s, 2),
               "budget_tokens": budget, "kept_pages": len(kept),
               "kept_tokens": int(sum(tokens[i] for i, x in enumerate(pool_ids) if x in kept)),
               "kept_domains": len({domains.domain_of(text_url(pool, i), cfg.domains.granularity) for i in kept}),
               "flagged_domains": [d["domain"] for d in flagged],
               "annotated_math_patterns": auto["math"] if not person else person.get("math", []) + auto["math"],
               "seed_added": len(added), "overlap_with_previous": overlap,
               **_heldout_quality(s_held, scores, pool_ids, kept), **_corpus_quality(s_pool, kept, target),
               "score_hist": np.histogram(scores, bins=20, range=(0, 1))[0].tolist()}
        report["iterations"].append(rec)
        write_reports(out, report)
        final_kept = kept
        seed = seed | added
        reason = stop_reason(cfg, it, overlap, grew=bool(added) or negs_before != extra_negatives)
        if reason:
            rec["stopped"] = reason
            write_reports(out, report)
            break
        prev_kept = kept
    _write_corpus(cfg, out, s_pool, final_kept, report)
    return report["iterations"]


def _negatives(cfg, rng: random.Random, pool, pool_ids, seed, exclude: set[str], extra: set[str]) -> list[str]:
    """Random pool pages as negatives, never from a seed host or a path already annotated as math, plus the pages
    annotated not-math (sorted; ``negatives_per_positive`` per seed page)."""
    seed_hosts = set(cfg.input.seed_domains)
    candidates = [i for i in pool_ids if i not in seed and i not in exclude
                  and domains.host_of(text_url(pool, i)) not in seed_hosts]
    n_neg = min(len(candidates), int(round(cfg.classifier.negatives_per_positive * len(seed))))
    return sorted(set(rng.sample(candidates, n_neg)) | extra)


def _train_classifier(cfg, idir: Path, positives: list[str], negatives: list[str]) -> tuple[Path, float]:
    """This iteration's fastText model (kept if already there: a rerun resumes); (path, seconds spent)."""
    cc = cfg.classifier
    t0 = time.perf_counter()
    model_path = idir / "model.bin"
    if not model_path.exists():
        classifier.train(positives, negatives, model_path, dim=cc.dim, lr=cc.lr, word_ngrams=cc.word_ngrams,
                         min_count=cc.min_count, epoch=cc.epoch, bucket=cc.bucket, threads=cc.threads, seed=cc.seed,
                         max_chars=cc.max_chars)
    return model_path, time.perf_counter() - t0


def _heldout_quality(s_held: list[dict], scores: np.ndarray, pool_ids: list[str], kept: set[str]) -> dict:
    """Held-out math vs web precision/recall (physics is borderline: its mean score apart), also at the score of
    the last page the budget kept (the effective threshold)."""
    hs = np.array([r["score"] for r in s_held if r["label"] in ("math", "web")])
    hl = np.array([r["label"] == "math" for r in s_held if r["label"] in ("math", "web")], dtype=bool)
    cut = float(min(scores[i] for i, x in enumerate(pool_ids) if x in kept)) if kept else 1.0
    phys = [r["score"] for r in s_held if r["label"] == "physics"]
    return {"heldout": classifier.precision_recall(hs, hl) if len(hs) else {}, "budget_score_cut": cut,
            "heldout_at_budget_cut": classifier.precision_recall(hs, hl, threshold=cut) if len(hs) else {},
            "heldout_physics_mean_score": float(np.mean(phys)) if phys else None}


def _corpus_quality(s_pool: list[dict], kept: set[str], target: set[str]) -> dict:
    """Recall of the non-seed math pages, precision on the labelled pages, and the kept pages by label."""
    label_of = {r["id"]: r["label"] for r in s_pool}
    return {"corpus_recall_nonseed_math": len(kept & target) / len(target) if target else None,
            "corpus_precision_labelled": (sum(label_of[i] == "math" for i in kept) /
                                          max(1, sum(label_of[i] in ("math", "web") for i in kept))),
            "kept_by_label": {lab: sum(label_of[i] == lab for i in kept) for lab in sorted(set(label_of.values()))}}


def _review_domains(cfg, idir: Path, s_pool: list[dict], kept: set[str], person) -> tuple[list, dict, dict]:
    """Domain discovery on this round's kept pages: ``domains.json``, ``review.yaml`` (the flagged domains' paths to
    review), ``annotations.yaml``; returns (flagged domains, auto annotations, URL verdict per page id)."""
    dom = domains.discover(s_pool, kept, granularity=cfg.domains.granularity,
                           min_kept_fraction=cfg.domains.min_kept_fraction, min_pages=cfg.domains.min_pages,
                           path_depth=cfg.domains.path_depth)
    (idir / "domains.json").write_text(json.dumps(dom, indent=1))
    flagged = [d for d in dom if d["flagged"]]
    (idir / "review.yaml").write_text(yaml.safe_dump(
        {"note": "Candidate URL paths of domains with > min_kept_fraction of pages kept. Copy patterns into an "
                 "annotation file (math: [...], not_math: [...]) and set domains.annotation_file to override.",
         "domains": [{"domain": d["domain"], "kept_fraction": round(d["kept_fraction"], 3),
                      "paths": [{"pattern": domains.path_glob(p["prefix"]), "pages": p["pages"],
                                 "kept_fraction": round(p["kept_fraction"], 3),
                                 "score_mean": round(p["score_mean"], 3)} for p in d["paths"]]}
                     for d in flagged]}, sort_keys=False, allow_unicode=True))
    auto = (domains.auto_annotate(dom, min_mean_score=cfg.domains.auto_min_mean_score,
                                  min_kept_fraction=cfg.domains.auto_min_kept_fraction,
                                  min_pages=cfg.domains.min_pages)
            if cfg.domains.auto_annotate else {"math": [], "not_math": []})
    rules = domains.merge_annotations(auto, person)["rules"]
    (idir / "annotations.yaml").write_text(yaml.safe_dump({"auto": auto, "person": person}, sort_keys=False))
    return flagged, auto, {r["id"]: domains.classify_url(r["url"], rules) for r in s_pool}


def _write_corpus(cfg, out: Path, s_pool: list[dict], final_kept: set[str], report: dict) -> None:
    """The last round's kept pages, best score first, as ``OUT/corpus/shard-*.parquet``; ``report["final"]``."""
    from data_pipeline.runner import write_shard

    corpus = [{"id": r["id"], "url": r["url"], "text": r["text"], "score": r["score"]} for r in s_pool
              if r["id"] in final_kept]
    corpus.sort(key=lambda r: (-r["score"], r["id"]))
    (out / "corpus").mkdir(exist_ok=True)
    for k in range(0, len(corpus), cfg.runner.shard_size):
        write_shard(out / "corpus" / f"shard-{k // cfg.runner.shard_size:05d}.parquet",
                    corpus[k : k + cfg.runner.shard_size])
    report["final"] = {"pages": len(corpus), "tokens": int(sum(len(r["text"].split()) for r in corpus))}


_URL_CACHE: dict[int, dict[str, str]] = {}


def stop_reason(cfg: CorpusConfig, iteration: int, overlap: float | None, *, grew: bool) -> str | None:
    """Why the loop stops after ``iteration`` (recorded as the iteration's ``stopped``), or None to go on.

    In order: saturation (the paper stopped when ~98% of an iteration's pages had been collected by the previous
    one: ``overlap`` = |kept ∩ previous kept| / |kept| ≥ ``iterate.stop_overlap``; None in the first iteration);
    nothing new to learn from (no page was newly annotated math or not-math, so the next classifier would differ
    only by its random negatives); ``iterate.max_iterations`` reached."""
    if overlap is not None and overlap >= cfg.iterate.stop_overlap:
        return f"saturated: overlap {overlap:.3f} >= {cfg.iterate.stop_overlap}"
    if not grew:
        return "the seed did not grow (no newly annotated pages)"
    if iteration >= cfg.iterate.max_iterations:
        return f"iterate.max_iterations={cfg.iterate.max_iterations} reached"
    return None


def text_url(pool: list[dict], pid: str) -> str:
    m = _URL_CACHE.get(id(pool))
    if m is None:
        _URL_CACHE.clear()
        m = _URL_CACHE[id(pool)] = {r["id"]: r["url"] for r in pool}
    return m[pid]


def write_reports(out: Path, report: dict) -> None:
    _write_text(out / "report.json", json.dumps(report, indent=1, default=str))
    lines = ["# Math corpus report", "", "## Stages", ""]
    for name, st in report["stages"].items():
        lines.append(f"- **{name}**: {json.dumps(st, default=str)[:400]}")
    lines += ["", "## Iterations", "",
              "| iter | seed | kept pages | kept tokens | domains | overlap | held-out P@0.5 | held-out R@0.5 | "
              "P@cut | R@cut | "
              "recall (non-seed math in pool) | kept precision | seed added |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["iterations"]:
        ov = "–" if r["overlap_with_previous"] is None else f"{r['overlap_with_previous']:.3f}"
        h, hc = r["heldout"] or {}, r.get("heldout_at_budget_cut") or {}
        lines.append(f"| {r['iteration']} | {r['seed_pages']} | {r['kept_pages']} | {r['kept_tokens']} | "
                     f"{r['kept_domains']} | {ov} | {h.get('precision', 0):.3f} | {h.get('recall', 0):.3f} | "
                     f"{hc.get('precision', 0):.3f} | {hc.get('recall', 0):.3f} | "
                     f"{r['corpus_recall_nonseed_math']:.3f} | {r['corpus_precision_labelled']:.3f} | "
                     f"{r['seed_added']} |")
    if "final" in report:
        lines += ["", f"Final corpus: {report['final']['pages']} pages, {report['final']['tokens']} tokens."]
    _write_text(out / "report.md", "\n".join(lines) + "\n")
    if report["iterations"]:
        plot(out / "report.png", report["iterations"])


def plot(path: Path, iterations: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    edges = np.linspace(0, 1, 21)
    for r in iterations:
        a1.step(edges[:-1], r["score_hist"], where="post", label=f"iter {r['iteration']}",
                linestyle=("-", "--", ":", "-.")[(r["iteration"] - 1) % 4])
    a1.set_yscale("log")
    a1.set_xlabel("P(math)")
    a1.set_ylabel("pages")
    a1.set_title("score distribution (pool)")
    a1.legend()
    its = [r["iteration"] for r in iterations]
    for lab, mark in (("math", "o-"), ("physics", "^:"), ("web", "x--")):
        a2.plot(its, [r["kept_by_label"].get(lab, 0) for r in iterations], mark, label=f"kept, label={lab}")
    a2.plot(its, [r["seed_pages"] for r in iterations], "s-", label="seed pages")
    a2.set_ylim(bottom=0)
    a2.set_xticks(its)
    a2.set_xlabel("iteration")
    a2.set_ylabel("pages")
    a2b = a2.twinx()
    a2b.plot(its, [r["corpus_recall_nonseed_math"] or 0 for r in iterations], "d-.", color="k", label="recall")
    a2b.set_ylim(0, 1.05)
    a2b.set_ylabel("recall of non-seed math pages")
    a2.set_title("corpus growth")
    a2.legend(loc="center left", fontsize=8)
    a2b.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
