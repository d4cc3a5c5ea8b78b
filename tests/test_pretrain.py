"""Continued pre-training: packing, mixtures, exact resume (pure), and a real DeepSpeed `dsmath pretrain` run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from dsmath.config import ConfigError
from dsmath.datasets import DataError
from dsmath.errors import UserError
from dsmath.pretrain.config import load_pretrain_config
from dsmath.pretrain.data import tokenize_fn
from dsmath.pretrain.mixture import MixtureSampler, source_of_key
from dsmath.pretrain.packing import PAD_KEY, Packer, label_mask, label_mask_loop, pack_documents
from dsmath.pretrain.sources import TokenStream, expand_paths

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MATH = SHARED / "math_text" / "se_math_33votes.jsonl"
MATH_HELDOUT = SHARED / "math_text" / "se_math_overflow_40votes.jsonl"
NEWS = SHARED / "nonmath_text" / "article_extraction_benchmark_ground_truth.json"
PAPER_WEIGHTS = {"deepseekmath_corpus": 0.56, "algebraic_stack": 0.04, "arxiv": 0.10, "github_code": 0.20,
                 "natural_language": 0.10}
WORDS = "the of a prime number sum integral matrix proof let be group ring field city market river".split()


@pytest.fixture(scope="module")
def tokenizer():
    from dsmath.tiny import train_tokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(40)) + f" {i} $x^{i}$" for i in range(300)]
    return train_tokenizer(texts, 300)


def _doc(rng: random.Random, tag: str, n_words: int) -> str:
    return f"[{tag}] " + " ".join(rng.choice(WORDS) for _ in range(n_words))


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def stream(name: str, files, tokenizer, **kw) -> TokenStream:
    return TokenStream(name, [Path(f) for f in files], tokenize_fn(tokenizer), tokenizer.eos_token_id, **kw)


def test_pretrain_library_imports_nothing_distributed():
    mods = ["dsmath.pretrain.config", "dsmath.pretrain.data", "dsmath.pretrain.evaluate", "dsmath.pretrain.packing",
            "dsmath.pretrain.mixture", "dsmath.pretrain.sources", "wiring.commands.pretrain"]
    code = (f"import importlib, sys\nfor m in {mods!r}: importlib.import_module(m)\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('ray', 'vllm', 'deepspeed', 'actors', 'learner', 'data_pipeline'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == ""


# ---------------------------------------------------------------------------------------------------- packing


def test_label_mask_vectorised_matches_loop():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 4, size=(50, 33))  # [50, 33] runs of equal keys, random boundaries
    keys = np.sort(keys, axis=1)
    keys[::3, -7:] = PAD_KEY  # padded tails
    assert label_mask(keys).tolist() == label_mask_loop(keys.tolist())


def test_pack_documents_labels_stay_inside_documents_long_doc_and_tail():
    eos, pad, L = 0, 1, 8
    docs = [[10, 11, 12], list(range(100, 125)), [20], [30, 31, 32, 33, 34]]  # doc 1 spans 4+ rows
    rows = list(pack_documents(docs, L, pad, eos))
    ids = np.stack([r[0] for r in rows])  # [R, L]
    keys = np.stack([r[1] for r in rows])
    mask = label_mask(keys)
    # Every trained (input, label) pair is consecutive inside one document (+EOS) ...
    full = [d + [eos] for d in docs]
    pairs = [(int(keys[r, t]), int(ids[r, t]), int(ids[r, t + 1])) for r in range(len(rows)) for t in range(L - 1) if mask[r, t]]
    expected = [(k, d[i], d[i + 1]) for k, d in enumerate(full) for i in range(len(d) - 1)]
    # ... and each within-document pair is trained exactly once (row overlap loses none at row edges).
    assert sorted(pairs) == sorted(expected)
    # The tail row is padded; padding is never attended as a label source or target.
    assert keys[-1, -1] == PAD_KEY and ids[-1, -1] == pad
    assert mask[keys == PAD_KEY].sum() == 0
    # No label crosses into the next document: the position holding a document's EOS is never trained.
    for r in range(len(rows)):
        for t in range(L - 1):
            if keys[r, t] != keys[r, t + 1]:
                assert mask[r, t] == 0


def test_packer_over_mixture_reconstructs_every_document(tmp_path, tokenizer):
    rng = random.Random(1)
    a_texts = [_doc(rng, f"a{i}", rng.choice([3, 8, 60])) for i in range(9)]  # one doc far longer than a row
    b_texts = [_doc(rng, f"b{i}", rng.choice([2, 5])) for i in range(7)]
    a = write_jsonl(tmp_path / "a.jsonl", a_texts)
    b = write_jsonl(tmp_path / "b.jsonl", b_texts)
    sampler = MixtureSampler({"a": stream("a", [a], tokenizer), "b": stream("b", [b], tokenizer)},
                             {"a": 0.7, "b": 0.3}, seed=3, chunk_tokens=7)
    L = 16
    ids, keys = Packer(sampler, L, tokenizer.pad_token_id).next_rows(120)
    mask = label_mask(keys)
    # The token stream, undoing the one-token overlap of consecutive rows.
    flat_ids = np.concatenate([ids[0], *[r[1:] for r in ids[1:]]])
    flat_keys = np.concatenate([keys[0], *[r[1:] for r in keys[1:]]])
    by_key: dict[int, list[int]] = defaultdict(list)
    for tok, key in zip(flat_ids.tolist(), flat_keys.tolist()):
        by_key[key].append(tok)
    tok = tokenize_fn(tokenizer)
    texts = {0: a_texts, 1: b_texts}
    last_key = {s: max(k for k in by_key if source_of_key(np.array([k]))[0] == s) for s in (0, 1)}
    for key, got in by_key.items():
        s, doc_number = int(source_of_key(np.array([key]))[0]), key & ((1 << 40) - 1)
        want = tok(texts[s][doc_number % len(texts[s])]) + [tokenizer.eos_token_id]
        if key == last_key[s]:
            assert got == want[: len(got)]  # the document in progress when the rows stopped
        else:
            assert got == want, f"source {s} document {doc_number} was split or mixed with another"
    # Labels: exactly the successor pairs inside each contiguous run of one document, each once (a document
    # that another source's chunk interrupts loses the one pair across the interruption, nothing else).
    runs = 1 + int((flat_keys[1:] != flat_keys[:-1]).sum())
    assert int(mask.sum()) == len(flat_keys) - runs
    assert runs > len(by_key)  # the test does exercise interrupted documents
    assert all(keys[r, t] == keys[r, t + 1] for r, t in zip(*np.nonzero(mask)))


# ---------------------------------------------------------------------------------------------------- mixture


def test_mixture_realised_token_shares_within_2pct_of_the_paper_weights(tmp_path, tokenizer):
    rng = random.Random(2)
    streams = {}
    # Very different document lengths per source: document-level sampling would miss token shares badly.
    for j, name in enumerate(PAPER_WEIGHTS):
        n_words = [3, 200, 40, 12, 90][j]
        f = write_jsonl(tmp_path / f"{name}.jsonl", [_doc(rng, f"{name}{i}", n_words) for i in range(30)])
        streams[name] = stream(name, [f], tokenizer)
    sampler = MixtureSampler(streams, PAPER_WEIGHTS, seed=0, chunk_tokens=16)
    _, keys = Packer(sampler, 128, tokenizer.pad_token_id).next_rows(3000)  # 381k label tokens
    mask = label_mask(keys)
    src = source_of_key(keys)
    total = mask.sum()
    shares = {n: float((mask * (src == i)).sum() / total) for i, n in enumerate(sampler.names)}
    for name, w in PAPER_WEIGHTS.items():
        assert abs(shares[name] - w) < 0.02, (name, shares[name], w)
    # The sampler's own draw counts agree with what reached the rows.
    drawn = sum(sampler.tokens_drawn.values())
    assert abs(sampler.tokens_drawn["github_code"] / drawn - shares["github_code"]) < 0.005


# ---------------------------------------------------------------------------------------------------- resume


def _mixed_packer(tmp_path: Path, tokenizer, seed: int = 7) -> Packer:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(5)
    d = tmp_path / "src"
    if not d.exists():
        d.mkdir()
        write_jsonl(d / "m1.jsonl", [_doc(rng, f"m1-{i}", rng.randint(2, 50)) for i in range(6)])
        (d / "m2.jsonl").write_text(json.dumps({"text": _doc(rng, "m2-0", 9)}) + "\n\n"
                                    + json.dumps({"meta": "no text here"}) + "\n"
                                    + json.dumps({"text": _doc(rng, "m2-1", 70)}) + "\n")
        table = pa.table({"text": [_doc(rng, f"p{i}", rng.randint(1, 30)) for i in range(11)]})
        pq.write_table(table, d / "p.parquet", row_group_size=4)
        (d / "qa.json").write_text(json.dumps({f"id{i}": {"input": _doc(rng, f"q{i}", 5), "output": _doc(rng, f"r{i}", 8)}
                                               for i in range(4)}))
    streams = {"math": stream("math", expand_paths([str(d / "m*.jsonl")]), tokenizer),
               "parquet": stream("parquet", [d / "p.parquet"], tokenizer, max_docs=7),
               "qa": stream("qa", [d / "qa.json"], tokenizer)}
    sampler = MixtureSampler(streams, {"math": 0.5, "parquet": 0.3, "qa": 0.2}, seed=seed, chunk_tokens=11)
    return Packer(sampler, 24, tokenizer.pad_token_id)


@pytest.mark.parametrize("cut", [1, 23, 97])
def test_resume_continues_the_stream_token_for_token(tmp_path, tokenizer, cut):
    total = 160  # several epochs of every small source: resume points fall mid-document, mid-file, mid-epoch
    ids_all, keys_all = _mixed_packer(tmp_path, tokenizer).next_rows(total)
    first = _mixed_packer(tmp_path, tokenizer)
    first.next_rows(cut)
    state = json.loads(json.dumps(first.state()))  # through JSON, as in a checkpoint
    resumed = _mixed_packer(tmp_path, tokenizer, seed=999)  # the seed comes back from the state
    resumed.load_state(state)
    ids, keys = resumed.next_rows(total - cut)
    assert np.array_equal(ids, ids_all[cut:]) and np.array_equal(keys, keys_all[cut:])
    assert resumed.source.streams["math"].skipped.no_text >= 1  # the record without text was counted
    assert resumed.source.streams["parquet"].epoch >= 2


def test_reads_the_corpus_pipelines_parquet_output_folder(tmp_path, tokenizer):
    import pyarrow.parquet as pq

    from data_pipeline.runner import write_shard  # the writer `dsmath corpus run` uses for OUT/corpus/

    out = tmp_path / "corpus"
    out.mkdir()
    pages = [{"id": f"p{i}", "url": f"https://math.example/{i}", "text": f"page {i} $x^{i}$", "score": 0.9}
             for i in range(5)]
    write_shard(out / "shard-00000.parquet", pages[:3])
    write_shard(out / "shard-00001.parquet", pages[3:])
    write_shard(out / "shard-00002.parquet", [])  # an empty shard (no columns) is fine
    assert pq.read_table(out / "shard-00000.parquet").column_names == ["id", "url", "text", "score"]
    s = stream("mined", expand_paths([str(out)]), tokenizer)
    tok = tokenize_fn(tokenizer)
    want = [t for p in pages for t in tok(p["text"]) + [tokenizer.eos_token_id]]
    ids, docs = s.take(len(want) + 1)  # one token into the second epoch
    assert ids[: len(want)] == want and docs[len(want) - 1] == 4 and s.epoch == 1


def test_malformed_record_names_file_and_line_or_is_counted(tmp_path, tokenizer):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": "fine words"}) + "\n{not json\n" + json.dumps({"text": "more"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        stream("s", [f], tokenizer).take(200)
    s = stream("s", [f], tokenizer, skip_bad=True)
    s.take(200)
    assert s.skipped.bad >= 1 and "bad.jsonl:2" in s.skipped.examples[0]


def test_config_mistakes_are_one_line_errors():
    with pytest.raises(ConfigError, match="did you mean 'weight'"):
        load_pretrain_config("pretrain_tiny_cpu", ["data.sources.math.wieght=1"])
    with pytest.raises(ConfigError, match="data.sources.math.weight: must be >= 0"):
        load_pretrain_config("pretrain_tiny_cpu", ["data.sources.math.weight=-1"])
    with pytest.raises(ConfigError, match="keep_checkpoints: must be >= 1"):
        load_pretrain_config("pretrain_tiny_cpu", ["keep_checkpoints=0"])
    cfg = load_pretrain_config("pretrain_deepseekmath_base")
    assert {n: s.weight for n, s in cfg.data.sources.items()} == PAPER_WEIGHTS


# ---------------------------------------------------------------------------------------------------- real runs


def _dsmath(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # An in-process learner (another test) leaves its rendezvous in os.environ; a child must pick its own.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "wiring.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


TINY = ["model.hidden_size=64", "model.num_heads=2", "model.num_kv_heads=1", "model.num_layers=2",
        "model.intermediate_size=128", "model.vocab_size=512", "data.seq_len=64", "data.chunk_tokens=32",
        "data.tokenizer_sample_chars=40000", "optim.batch_size=8", "optim.micro_batch_size=8", "optim.warmup_steps=2",
        "eval.heldout_max_docs=5", f"eval.heldout.math_overflow.paths=[{MATH_HELDOUT}]",
        f"data.sources.math.paths=[{MATH}]", f"data.sources.physics.paths=[{SHARED}/math_text/se_physics_35votes.jsonl]",
        f"data.sources.news.paths=[{NEWS}]", f"data.sources.web.paths=[{SHARED}/nonmath_text/dolma*.jsonl]"]


@pytest.mark.skipif(not MATH.exists(), reason="needs ../shared/data")
def test_dsmath_pretrain_loss_goes_down_and_resume_is_exact(tmp_path):
    full = tmp_path / "full"
    r = _dsmath("pretrain", "--run-dir", str(full), "--steps", "16", "--no-progress", "checkpoint_every=4", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    # checkpoints at 4, 8, 12, 16; keep_checkpoints (default 2) keeps the newest two
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["latest", "step-000012", "step-000016"]
    s = json.loads((full / "summary.json").read_text())
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    losses = [x["pretrain/loss"] for x in rows]
    assert len(losses) == 16 and np.mean(losses[-4:]) < losses[0] - 0.5, losses
    assert s["eval"]["heldout"]["math_overflow"]["tokens"] > 1000
    assert abs(sum(s["mixture_realised"].values()) - 1) < 1e-9 and "mixture/news" in rows[-1]
    # Same start (the built initial model) and schedule, stopped after 8, resumed (in this process, to save a
    # second interpreter start): the same losses step for step.
    from learner.pretrain import run_pretrain

    part = tmp_path / "part"
    cfg = load_pretrain_config("pretrain_tiny_cpu", [f"run_dir={part}", "optim.steps=16",
                                                     f"model.path={full / 'init'}", *TINY])
    run_pretrain(cfg, stop_after=8, progress=False, log=lambda m: None)
    assert len((part / "metrics.jsonl").read_text().splitlines()) == 8
    with pytest.raises(UserError, match="already holds checkpoints"):
        run_pretrain(cfg, progress=False)
    run_pretrain(cfg, resume=True, progress=False, log=lambda m: None)
    resumed = [json.loads(x)["pretrain/loss"] for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert len(resumed) == 16
    np.testing.assert_allclose(resumed, losses, rtol=0, atol=1e-5)
    summary = json.loads((part / "summary.json").read_text())
    assert summary["mixture_realised"] == pytest.approx(s["mixture_realised"], abs=1e-12)


def test_dsmath_pretrain_user_mistakes_are_one_line(tmp_path):
    r = _dsmath("pretrain", "--run-dir", str(tmp_path / "x"), "data.sources.math.paths=[/no/such/file.jsonl]")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "dsmath pretrain: error: data.sources.math.paths: /no/such/file.jsonl" in r.stderr
    r = _dsmath("pretrain", "--run-dir", str(tmp_path / "y"), "--resume")
    assert r.returncode == 2 and "no checkpoint to resume from" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(not MATH.exists(), reason="needs ../shared/data")
def test_corpus_evaluate_math_beats_news_on_heldout_math(tmp_path):
    out = tmp_path / "cmp"
    r = _dsmath("corpus", "evaluate", "--corpus", f"math={MATH}", "--corpus", f"news={NEWS}",
                "--heldout", f"math_overflow={MATH_HELDOUT}", "--out-dir", str(out), "--steps", "40",
                "--no-progress", "eval.heldout_max_docs=20", "data.tokenizer_sample_chars=60000", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    res = rep["results"]
    # The same budget: equal rows of equal length; trained labels differ only by the document starts.
    assert rep["steps"] == 40
    assert abs(res["math"]["label_tokens"] - res["news"]["label_tokens"]) < 0.01 * res["math"]["label_tokens"]
    math_loss = res["math"]["heldout"]["math_overflow"]["loss"]
    news_loss = res["news"]["heldout"]["math_overflow"]["loss"]
    print(f"held-out math loss: math corpus {math_loss:.3f}, news corpus {news_loss:.3f}")
    assert math_loss < news_loss - 0.1, (math_loss, news_loss)
    assert "| math |" in r.stdout and "| news |" in r.stdout


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DSMATH_TORCHRUN_TEST"), reason="opt-in: set DSMATH_TORCHRUN_TEST=1 (~80 s)")
def test_two_torchrun_ranks_train_like_one_rank(tmp_path):
    from dsmath.utils.net import free_port

    init = tmp_path / "one" / "init"
    common = ["--steps", "6", "--no-progress", "optim.batch_size=8", "optim.micro_batch_size=2", "optim.zero_stage=2",
              "eval.heldout_max_docs=5", *TINY]
    r = _dsmath("pretrain", "--run-dir", str(tmp_path / "one"), *common)  # builds the initial model, 1 rank
    assert r.returncode == 0, r.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "wiring.cli", "pretrain", "--run-dir", str(tmp_path / "two"),
           *common, f"model.path={init}"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = ([json.loads(x)["pretrain/loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                for d in ("one", "two"))
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)
