"""The demo corpus built from ``shared/data`` (see its README).

* web (label ``web``): WARC responses (HTML), the 181 news/blog HTML pages, the 20 CCNet documents (text);
* math (label ``math``): math.stackexchange and mathoverflow Q&A, each **wrapped as a synthetic HTML page** at
  ``https://math.stackexchange.com/questions/<post_id>`` / ``https://mathoverflow.net/questions/<post_id>``
  with the LaTeX inside ``$…$`` as on the real sites (MathJax source) plus a navigation bar and footer;
* borderline (label ``physics``): physics.stackexchange Q&A, wrapped the same way.

Labels are used only for the held-out evaluation and the recall report, never for training.
"""

from __future__ import annotations

import gzip
import html as htmllib
import json
from pathlib import Path

from data_pipeline.readers import ReadError, page, read_jsonl, read_warc

SE_SOURCES = (
    ("math_text/se_math_33votes.jsonl", "https://math.stackexchange.com/questions/{}", "math"),
    ("math_text/se_math_overflow_40votes.jsonl", "https://mathoverflow.net/questions/{}", "math"),
    ("math_text/se_physics_35votes.jsonl", "https://physics.stackexchange.com/questions/{}", "physics"),
)


def wrap_se_page(title: str, question: str, answer: str, site: str) -> str:
    """A synthetic Stack-Exchange-like page (navigation, question, answer, footer); text is HTML-escaped."""
    def paras(t: str) -> str:
        return "".join(f"<p>{htmllib.escape(p)}</p>" for p in t.split("\n\n") if p.strip())

    return (f"<!DOCTYPE html><html><head><title>{htmllib.escape(title)} - {site}</title></head><body>"
            f"<header><nav><a href='/'>{site}</a> <a href='/questions'>Questions</a> <a href='/tags'>Tags</a> "
            f"<a href='/users'>Users</a></nav></header><main><div id='question-header'><h1>{htmllib.escape(title)}</h1>"
            f"</div><div class='question'><div class='s-prose'>{paras(question)}</div></div>"
            f"<div class='answer'><h2>Answer</h2><div class='s-prose'>{paras(answer)}</div></div></main>"
            f"<footer><p>site design / logo © Stack Exchange Inc; user contributions licensed under CC BY-SA</p>"
            f"</footer></body></html>")


def demo_pages(data_dir: str | Path, errors: list[ReadError], max_per_source: int = 0) -> list[dict]:
    d = Path(data_dir)
    rows: list[dict] = []

    def take(it) -> list[dict]:
        out = []
        for r in it:
            out.append(r)
            if max_per_source and len(out) >= max_per_source:
                break
        return out

    for p in sorted((d / "warc").glob("*.warc.gz")):
        rows += take(read_warc(p, errors, source=f"warc/{p.name}", label="web"))
    gt = json.loads((d / "nonmath_text" / "article_extraction_benchmark_ground_truth.json").read_text())
    news = []
    for key in sorted(gt):
        hp = d / "nonmath_text" / "article_extraction_benchmark_html" / f"{key}.html.gz"
        if hp.exists():
            news.append(page(gt[key]["url"], html=gzip.open(hp, "rt", encoding="utf-8", errors="replace").read(),
                             source="news_html", label="web", id=f"news:{key[:16]}"))
    rows += take(news)
    for p in sorted((d / "nonmath_text").glob("dolma_ccnet_*.jsonl")):
        rows += take(read_jsonl(p, errors, source=f"ccnet/{p.name}", label="web"))
    for rel, url_fmt, label in SE_SOURCES:
        p = d / rel
        site = url_fmt.split("/")[2]
        se = []
        with p.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                try:
                    obj = json.loads(line)
                    meta = obj["meta"]
                    se.append(page(url_fmt.format(meta["post_id"]), source=f"se/{site}", label=label,
                                   html=wrap_se_page(meta.get("post_title", ""), obj["input"], obj["output"], site)))
                except Exception as exc:
                    errors.append(ReadError(str(p), lineno, f"{type(exc).__name__}: {exc}"))
                if max_per_source and len(se) >= max_per_source:
                    break
        rows += se
    return rows
