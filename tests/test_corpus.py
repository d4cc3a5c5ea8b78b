"""Unit tests of the corpus pipeline stages (pure functions; real fastText, real resiliparse, real WARCs)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason=f"real data folder {SHARED} is absent (clone next to shared/)")

# ---------------------------------------------------------------- HTML → text (SYNTHETIC hand-written fixtures)

SYNTHETIC_MATHJAX2 = """<html><body><nav><a href="/">Home</a> | <a href="/login">Log in</a></nav>
<article><h1>Quadratic formula</h1><p>The roots of <script type="math/tex">ax^2+bx+c=0</script> are
<span class="MathJax_Preview">x = …</span><span class="MathJax">RENDERED-GLYPHS</span>
<script type="math/tex; mode=display">x=\\frac{-b\\pm\\sqrt{b^2-4ac}}{2a}</script> whenever a is not zero, which
every student of algebra learns early and uses for the rest of their mathematical life.</p></article>
<footer>Copyright 2024 Example Math Site. All rights reserved.</footer></body></html>"""

SYNTHETIC_KATEX = """<html><body><main><p>Euler's identity
<span class="katex"><span class="katex-mathml"><math><semantics><mrow><msup><mi>e</mi><mrow><mi>i</mi><mi>π</mi></mrow></msup></mrow>
<annotation encoding="application/x-tex">e^{i\\pi}+1=0</annotation></semantics></math></span>
<span class="katex-html" aria-hidden="true">eiπ+1=0</span></span> links five constants; it is often called the most
beautiful equation in mathematics, and it follows from the power series of the exponential.</p></main></body></html>"""

SYNTHETIC_MATHML = """<html><body><div><p>The harmonic series diverges although its terms
<math><mfrac><mn>1</mn><mi>n</mi></mfrac></math> tend to zero, while the series of
<math display="block"><msup><mi>n</mi><mn>-2</mn></msup></math> converges to a sum that Euler found to be
π squared over six; both facts are classical results taught in a first course on analysis.</p></div></body></html>"""

SYNTHETIC_MJX3_AND_IMG = """<html><body><div><p>A sum <mjx-container class="MathJax" jax="CHTML"><mjx-math>GLYPHS</mjx-math>
<mjx-assistive-mml><math><msqrt><mn>2</mn></msqrt></math></mjx-assistive-mml></mjx-container> is irrational,
and WordPress writes <img class="latex" src="x.png" alt="\\int_0^1 x\\,dx"> as an image with its source in the alt
text; the proof that the square root of two is irrational goes back to the ancient Greeks.</p></div></body></html>"""


def test_html_to_text_keeps_mathjax_script_math_and_drops_rendered_copies():
    from data_pipeline.html_math import html_to_text

    text = html_to_text(SYNTHETIC_MATHJAX2)
    assert "$ax^2+bx+c=0$" in text
    assert "$$x=\\frac{-b\\pm\\sqrt{b^2-4ac}}{2a}$$" in text
    assert "RENDERED-GLYPHS" not in text and "x = …" not in text
    assert "Copyright" not in text and "Log in" not in text  # boilerplate removed by the main-content extractor


def test_html_to_text_katex_uses_tex_annotation_not_glyphs():
    from data_pipeline.html_math import html_to_text

    text = html_to_text(SYNTHETIC_KATEX)
    assert "$e^{i\\pi}+1=0$" in text
    assert "eiπ+1=0" not in text


def test_html_to_text_mathml_without_annotation_and_mathjax3_and_img_alt():
    from data_pipeline.html_math import html_to_text

    text = html_to_text(SYNTHETIC_MATHML)
    assert "$\\frac{1}{n}$" in text
    assert "$${n}^{-2}$$" in text
    text = html_to_text(SYNTHETIC_MJX3_AND_IMG)
    assert "$\\sqrt{2}$" in text and "GLYPHS" not in text
    assert "$\\int_0^1 x\\,dx$" in text


# ---------------------------------------------------------------- readers


@needs_shared
def test_read_real_warcs_counts_and_wget_bracket_uris():
    from data_pipeline.readers import read_any

    errors: list = []
    cc = list(read_any(SHARED / "warc" / "cc-main-2020-34_resiliparse_warcfile.warc.gz", errors))
    assert len(cc) == 16 and all(r["html"] for r in cc)
    dolma = list(read_any(SHARED / "warc" / "dolma_wget_sample-0000.warc.gz", errors))
    assert len(dolma) == 22
    assert all(r["url"].startswith("http") and not r["url"].startswith("<") for r in dolma)
    wet = list(read_any(SHARED / "warc" / "cc-main-2024-22_whirlwind.warc.wet.gz", errors))
    assert len(wet) == 1 and wet[0]["url"] == "https://an.wikipedia.org/wiki/Escopete" and len(wet[0]["text"]) > 4000
    assert errors == []
    # A GBK page without a declared charset is decoded by sniffing, not as mojibake.
    assert "广东" in next(r for r in cc if "003338.cn" in r["url"])["html"]


@needs_shared
def test_truncated_warc_is_reported_with_offset_and_does_not_stop(tmp_path):
    from data_pipeline.readers import read_any

    raw = gzip.decompress((SHARED / "warc" / "dolma_wget_sample-0000.warc.gz").read_bytes())
    bad = tmp_path / "truncated.warc"
    bad.write_bytes(raw[: len(raw) // 2] + b"WARC/1.0\r\nWARC-Type: response\r\nContent-Length: 999999\r\n\r\nshort")
    errors: list = []
    rows = list(read_any(bad, errors))
    assert len(rows) == 14  # 15 records start in the first half; the one cut in two is reported, not yielded
    assert len(errors) == 1 and errors[0].offset == 368781 and "truncated record" in errors[0].reason
    garbled = tmp_path / "garbled.warc"
    garbled.write_bytes(raw[: len(raw) // 3] + b"GARBAGE" * 50 + raw[len(raw) // 3 :])
    errors = []
    rows = list(read_any(garbled, errors))
    assert len(rows) == 9 and len(errors) == 1 and errors[0].offset > 0 and "rest of the file" in errors[0].reason
    errors = []
    good = tmp_path / "pages.jsonl"
    good.write_text('{"url": "http://a.org/1", "text": "hello"}\nnot json\n{"url": "http://a.org/2"}\n'
                    '{"url": "http://a.org/3", "html": "<p>x</p>"}\n')
    rows = list(read_any(good, errors))
    assert [r["url"] for r in rows] == ["http://a.org/1", "http://a.org/3"]
    assert [(Path(e.path).name, e.offset) for e in errors if e.path.endswith(".jsonl")] == [("pages.jsonl", 2),
                                                                                          ("pages.jsonl", 3)]


# ---------------------------------------------------------------- dedup


def test_minhash_vectorised_agrees_with_plain_loop_reference():
    from data_pipeline.dedup import minhash_signature, minhash_signature_loop, permutations

    a, b = permutations(64, seed=3)
    for text in ["", "one two", "the cat sat on the mat " * 7 + " ".join(map(str, range(200)))]:
        np.testing.assert_array_equal(minhash_signature(text, a, b, 5), minhash_signature_loop(text, a, b, 5))


def test_near_duplicates_removed_distinct_kept_and_exact_url_dedup():
    from data_pipeline.dedup import exact_url_dedup, minhash_signature, near_duplicates, permutations

    rng = np.random.RandomState(0)
    vocab = [f"w{i}" for i in range(5000)]
    base = " ".join(rng.choice(vocab, 400))
    edited = base.replace(base.split()[10], "CHANGED", 1) + " plus a footer"
    other = " ".join(rng.choice(vocab, 400))
    a, b = permutations(128, 1)
    sigs = np.stack([minhash_signature(t, a, b, 5) for t in (base, edited, other)])
    removed = near_duplicates(["base", "edited", "other"], sigs, bands=16, threshold=0.8)
    assert set(removed) == {"edited"} and removed["edited"][0] == "base" and removed["edited"][1] > 0.9
    rows = [{"id": str(i), "url": u} for i, u in enumerate(
        ["https://www.x.org/a/", "http://x.org/a", "https://x.org/a#frag", "https://x.org/b"])]
    kept, rem = exact_url_dedup(rows)
    assert [r["id"] for r in kept] == ["0", "3"] and {r["duplicate_of"] for r in rem} == {"0"}


# ---------------------------------------------------------------- decontamination


def _bench(name: str) -> list[dict]:
    return [json.loads(line) for line in (SHARED / "decontam_benchmarks" / name).open()]


def test_rolling_ngram_hash_agrees_with_reference():
    from data_pipeline.decontam import ngram_hashes, ngram_hashes_loop, normalise_tokens

    toks = normalise_tokens("Let $f(x)=\\dfrac{x^2}{3}$ for all x in R; 求 函数 的 最大值 and more words here " * 3)
    for n in (1, 3, 10):
        assert ngram_hashes(toks, n).tolist() == ngram_hashes_loop(toks, n)


@needs_shared
def test_shipped_index_matches_a_fresh_build_from_the_benchmarks():
    from data_pipeline.decontam import DecontamIndex, SHIPPED_INDEX, build_index, load_benchmarks

    shipped = DecontamIndex.load(SHIPPED_INDEX)
    fresh = build_index(load_benchmarks(SHARED / "decontam_benchmarks"))
    assert SHIPPED_INDEX.stat().st_size < 5_000_000
    assert shipped.benchmarks == fresh.benchmarks == ["agieval_gaokao_mathcloze", "agieval_gaokao_mathqa", "cmath",
                                                      "gsm8k", "math", "mmlu_stem"]
    np.testing.assert_array_equal(shipped.hashes, fresh.hashes)
    np.testing.assert_array_equal(shipped.items, fresh.items)


def _reformat(q: str) -> str:
    """Light reformatting a scraper or a forum would do: case, spacing, punctuation, LaTeX spacing."""
    q = q.upper().replace(" ", "   ").replace(",", " ,").replace("?", " ??").replace(".", " . ")
    return q.replace("+", " \\, + \\; ").replace("=", "\\quad=~").replace("\\frac", "\\dfrac")


@needs_shared
def test_planted_benchmark_questions_verbatim_and_reformatted_are_all_removed_clean_pages_kept():
    from data_pipeline.decontam import decontam_batch

    gsm, math_, cmath, mmlu = (_bench("gsm8k_test.jsonl"), _bench("math_test.jsonl"), _bench("cmath_test.jsonl"),
                               _bench("mmlu_stem_test.jsonl"))
    planted = {  # expected item → question text
        "gsm8k:0": gsm[0]["question"], "gsm8k:700": gsm[700]["question"],
        "math:1": math_[1]["problem"], "math:4321": math_[4321]["problem"],
        "mmlu_stem:12": mmlu[12]["question"], "cmath:7": cmath[7]["question"], "math:3": math_[3]["problem"],
    }
    wrap = "Welcome to my homework blog! Today a reader sent me this one: {} Let me know in the comments below."
    rows = []
    for item, q in planted.items():
        rows.append({"id": f"verbatim:{item}", "url": "u", "text": wrap.format(q)})
        rows.append({"id": f"reformatted:{item}", "url": "u", "text": wrap.format(_reformat(q))})
    clean_se = [json.loads(line) for line in (SHARED / "math_text" / "se_math_overflow_40votes.jsonl").open()][:40]
    rows += [{"id": f"clean:{i}", "url": "u", "text": r["input"] + "\n" + r["output"]} for i, r in enumerate(clean_se)]
    gt = json.loads((SHARED / "nonmath_text" / "article_extraction_benchmark_ground_truth.json").read_text())
    rows += [{"id": f"news:{k}", "url": "u", "text": v["articleBody"]} for k, v in list(gt.items())[:40]]
    out = {r["id"]: r for r in decontam_batch(rows)}
    for item in planted:
        assert out[f"verbatim:{item}"]["contaminated_by"] == item, item
        assert out[f"reformatted:{item}"]["contaminated_by"] == item, (item, out[f"reformatted:{item}"])
    dirty_clean = [i for i, r in out.items() if i.startswith(("clean:", "news:")) and r["contaminated_by"]]
    assert dirty_clean == []


@needs_shared
def test_chinese_uses_character_ngrams():
    from data_pipeline.decontam import find_contamination, get_index

    q = _bench("cmath_test.jsonl")[100]["question"]
    middle = q[3:-3]  # a piece of the question, cut mid-word: no spaces anywhere
    assert " " not in middle and len(middle) >= 14
    hit = find_contamination("今天的作业：" + middle + "。", get_index())
    assert hit is not None and hit["item"] == "cmath:100" and len(hit["ngram"].split()) == 10


# ---------------------------------------------------------------- classifier and selection


def test_select_by_budget_ranks_and_spends_the_budget():
    from data_pipeline.classifier import precision_recall, select_by_budget

    ids = ["a", "b", "c", "d", "e"]
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.7])
    tokens = np.array([100, 50, 50, 30, 40])
    assert select_by_budget(ids, scores, tokens, 80) == ["b", "d"]  # tie at 0.9 broken by id
    assert select_by_budget(ids, scores, tokens, 81) == ["b", "d", "e"]  # the page crossing the budget is kept
    assert select_by_budget(ids, scores, tokens, 10**9) == ["b", "d", "e", "c", "a"]
    pr = precision_recall(np.array([0.9, 0.8, 0.2, 0.6]), np.array([True, False, True, True]))
    assert (pr["tp"], pr["fp"], pr["fn"]) == (2, 1, 1) and pr["precision"] == pytest.approx(2 / 3)


@needs_shared
def test_fasttext_trained_on_real_math_vs_news_separates_held_out_pages(tmp_path):
    from data_pipeline.classifier import load_model, math_probability, train

    se = [json.loads(line) for line in (SHARED / "math_text" / "se_math_33votes.jsonl").open()]
    math_texts = [r["input"] + "\n" + r["output"] for r in se[:240]]
    gt = json.loads((SHARED / "nonmath_text" / "article_extraction_benchmark_ground_truth.json").read_text())
    news = [v["articleBody"] for v in gt.values()]
    path = train(math_texts[:120], news[:120], tmp_path / "m.bin", dim=32, epoch=10, lr=0.5, max_chars=4000)
    assert path.stat().st_size < 60_000_000  # bucket=200000 keeps the model small
    p_math = math_probability(load_model(path), math_texts[120:])
    p_news = math_probability(load_model(path), news[120:])
    assert np.mean(p_math >= 0.5) > 0.9 and np.mean(p_news < 0.5) > 0.9


# ---------------------------------------------------------------- domains and annotation


def _scored(url: str, score: float, i: int) -> dict:
    return {"id": f"{url}#{i}", "url": url, "score": score}


def test_domain_discovery_flags_and_auto_annotator_with_person_override(tmp_path):
    from data_pipeline import domains

    assert domains.domain_of("https://a.b.example.co.uk/x", "registered") == "example.co.uk"
    assert domains.domain_of("https://www.Math.StackExchange.com/q", "host") == "math.stackexchange.com"
    assert domains.domain_of("https://sub.blog.org/x", "registered") == "blog.org"
    rows = ([_scored(f"https://mathy.org/questions/{i}", 0.9, i) for i in range(10)]
            + [_scored(f"https://mathy.org/users/{i}", 0.6, i) for i in range(4)]
            + [_scored(f"https://news.com/story/{i}", 0.1, i) for i in range(40)]
            + [_scored("https://news.com/math-page", 0.95, 0)]
            + [_scored("https://tiny.org/", 0.9, 0)] + [_scored(f"https://tiny.org/blog/{i}", 0.1, i) for i in range(4)])
    kept = {r["id"] for r in rows if r["score"] >= 0.8}
    found = {d["domain"]: d for d in domains.discover(rows, kept, min_kept_fraction=0.10, min_pages=5)}
    assert found["mathy.org"]["flagged"] and not found["news.com"]["flagged"]  # news.com: 1/41 kept
    auto = domains.auto_annotate(list(found.values()), min_mean_score=0.5, min_kept_fraction=0.5)
    assert found["tiny.org"]["flagged"]  # 1 of 5 pages kept: > 10 %
    # The one kept page is the home page: one page is no evidence, and "tiny.org/" never means the whole site.
    assert auto == {"math": ["mathy.org/questions*"], "not_math": ["mathy.org/users*", "tiny.org/", "tiny.org/blog*"]}
    rules = domains.merge_annotations(auto, None)["rules"]
    assert domains.classify_url("https://mathy.org/questions/77", rules) == "math"
    assert domains.classify_url("https://news.com/x", rules) is None
    assert domains.classify_url("https://tiny.org/", rules) == "not_math"
    assert domains.classify_url("https://tiny.org/other/1", rules) is None
    ann = tmp_path / "ann.yaml"
    ann.write_text("math: []\nnot_math: ['mathy.org/questions/7*']\n")
    rules = domains.merge_annotations(auto, domains.load_annotations(ann))["rules"]
    assert domains.classify_url("https://mathy.org/questions/77", rules) == "not_math"  # the person wins
    assert domains.classify_url("https://mathy.org/questions/5", rules) == "math"
    ann.write_text("maths: [x]\n")
    from dsmath.errors import UserError

    with pytest.raises(UserError, match="expected a mapping"):
        domains.load_annotations(ann)


# ---------------------------------------------------------------- config


def test_corpus_config_unknown_key_and_bad_values_are_one_line_errors(tmp_path):
    from data_pipeline.config import ConfigError, load_corpus_config

    cfg = load_corpus_config("corpus_demo", ["dedup.bands=32", "select.token_budget=1000"])
    assert cfg.dedup.bands == 32 and cfg.select.token_budget == 1000 and cfg.classifier.bucket == 200000
    with pytest.raises(ConfigError, match=r"unknown key 'dedup.band'.*did you mean 'bands'"):
        load_corpus_config("corpus_demo", ["dedup.band=3"])
    with pytest.raises(ConfigError, match="does not divide"):
        load_corpus_config("corpus_demo", ["dedup.bands=7"])
    with pytest.raises(ConfigError, match="runner.backend"):
        load_corpus_config("corpus_demo", ["runner.backend=spark"])


def test_pipeline_modules_import_nothing_distributed():
    import subprocess
    import sys

    code = ("import sys; import data_pipeline.pipeline, data_pipeline.decontam, data_pipeline.html_math; "
            "import wiring.commands.corpus; "
            "bad = [m for m in ('ray', 'vllm', 'deepspeed', 'torch', 'fasttext', 'matplotlib') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


@needs_shared
def test_cli_decontam_subcommand_drops_planted_page(tmp_path, capsys):
    from wiring.cli import main

    q = _bench("gsm8k_test.jsonl")[42]["question"]
    pages = tmp_path / "pages.jsonl"
    pages.write_text(json.dumps({"url": "http://blog.example/1", "text": "Homework: " + q.lower()}) + "\n"
                     + json.dumps({"url": "http://blog.example/2", "text": "A clean page about gardening."}) + "\n")
    assert main(["corpus", "decontam", str(pages), "--out", str(tmp_path / "clean.jsonl")]) == 0
    assert "kept 1, dropped 1" in capsys.readouterr().out
    dropped = [json.loads(line) for line in (tmp_path / "clean.dropped.jsonl").open()]
    assert [d["benchmark_item"] for d in dropped] == ["gsm8k:42"]


def test_parquet_reader_reports_bad_rows_by_index(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipeline.readers import read_any

    pq.write_table(pa.Table.from_pylist([{"url": "http://a.org/1", "text": "x", "html": None},
                                         {"url": None, "text": "no url", "html": None},
                                         {"url": "http://a.org/3", "text": None, "html": "<p>h</p>"}]),
                   tmp_path / "p.parquet")
    errors: list = []
    rows = list(read_any(tmp_path / "p.parquet", errors))
    assert [(r["url"], r["text"], r["html"]) for r in rows] == [("http://a.org/1", "x", ""),
                                                                 ("http://a.org/3", "", "<p>h</p>")]
    assert [(e.offset, "missing 'url'" in e.reason) for e in errors] == [(1, True)]
