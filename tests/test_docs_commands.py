"""Docs are tests: every shell command of README.md and cluster/README.md runs here as written.

Each fenced block runs top to bottom in one bash shell (so its ``export`` lines carry), from the root of a fresh
copy of the repository's tracked files (``../shared`` beside it, as in a checkout), with ``$HOME`` a fresh folder.
The only changes are the documented shrink variables (``DSMATH_OVERRIDES`` and friends, README "Using it"), which
cut runs to a few steps of the tiny model; ``make run`` keeps the default preset and is cut to 12 steps only: it is
the golden run, and runs in ``tests/test_golden.py``. A failing command fails its block's test naming ``file:line``.
Commands tagged ``[needs …]`` are listed as skipped with the reason.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

import golden
from docs_commands import ROOT, DocCommand, all_commands, block_script, blocks, extract
from dsmath.utils.metrics import read_metrics
from tiny_loop import TINY_LOOP

COMMANDS = all_commands()
BLOCKS = blocks(COMMANDS)
SELF = {"make test"}  # the command that runs this suite: running it from inside would recurse
BLOCK_TIMEOUT_S = 1200

SHRINK = {
    # rm.*: the reward-model rounds of `dsmath rm train` / `dsmath iterate` on 16 questions, not 64
    "DSMATH_OVERRIDES": " ".join(TINY_LOOP + ["steps=2", "rm.questions=16", "rm.samples_per_question=2",
                                              "rm.completions_per_prefix=2"]),
    "DSMATH_PRETRAIN_OVERRIDES": "optim.steps=4 data.tokenizer_sample_chars=30000 eval.heldout_max_docs=10 "
                                 "eval.fewshot_problems=2",
    "DSMATH_CORPUS_OVERRIDES": "iterate.max_iterations=1 classifier.epoch=2",
}
# The block with `make run` is the golden run (tests/test_golden.py runs it and checks it): the default preset as a
# user gets it (its 1,500-step bootstrap, the default model) for 12 of its 40 steps. What its checks read is kept
# (a later block of the same repository copy would reuse runs/tiny_cpu).
MAKE_RUN = next(k for k, cmds in BLOCKS.items() if any(c.text.startswith("make run") for c in cmds))
BLOCK_ENV = {MAKE_RUN: {"DSMATH_OVERRIDES": " ".join(golden.GOLDEN)}}
KEEP = {MAKE_RUN: ("runs/tiny_cpu/summary.json", "runs/tiny_cpu/metrics.jsonl")}


def _runnable(cmds: list[DocCommand]) -> list[DocCommand]:
    return [c for c in cmds if not c.needs and c.text.split("#")[0].strip() not in SELF]


# ------------------------------------------------------------------------------------------ the extractor
def test_extractor_reads_blocks_transcripts_continuations_and_tags(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n"
        "```bash\n"
        "# a comment line\n"
        "echo one   # trailing comment\n"
        "echo two \\\n"
        "  three\n"
        "ray up c.yaml   # [needs a cloud account]\n"
        "```\n"
        "```\n"
        "$ echo transcript\n"
        "output line, not a command\n"
        "```\n"
        "```python\n"
        "print('not shell')\n"
        "```\n"
    )
    got = [(c.line, c.text, c.needs) for c in extract(doc, tmp_path)]
    assert got == [
        (4, "echo one   # trailing comment", None),
        (5, "echo two \\\n  three", None),
        (7, "ray up c.yaml   # [needs a cloud account]", "a cloud account"),
        (10, "echo transcript", None),
    ]
    doc.write_text("```bash\nmake run  # [needs patience]\n```\n")
    with pytest.raises(ValueError, match=r"x.md:2: unknown tag \[needs patience\]"):
        extract(doc, tmp_path)


def test_a_failing_doc_command_names_its_file_and_line(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("```bash\nexport A=1\ntest \"$A\" = 1\nfalse\necho never\n```\n")
    out = subprocess.run(["bash", "-c", block_script(extract(doc, tmp_path))], capture_output=True, text=True)
    assert out.returncode == 97
    assert "DOC-FAILED x.md:4 (exit 1)" in out.stderr and "DOC-RUN x.md:5" not in out.stderr


def test_the_docs_have_commands_and_every_skip_has_an_allowed_reason() -> None:
    where = {c.where for c in COMMANDS}
    # The documented cluster path is among the commands the suite runs.
    texts = [c.text for c in _runnable(COMMANDS)]
    assert any(t.startswith("cluster/jobs/local_cluster.sh start") for t in texts)
    assert any(t.startswith("cluster/jobs/submit_tiny.sh") for t in texts)
    assert any(t.startswith("ray job submit --address http://127.0.0.1:8265 --working-dir .") for t in texts)
    assert len(where) == len(COMMANDS) and len(texts) > 20


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.needs or c.text.split("#")[0].strip() in SELF],
                         ids=lambda c: c.where)
def test_doc_command_that_cannot_run_here(cmd: DocCommand) -> None:
    reason = "runs this test suite" if not cmd.needs else f"needs {cmd.needs}"
    pytest.skip(f"{cmd.where}: {reason}: {cmd.text.splitlines()[0][:80]}")


# ------------------------------------------------------------------------------------------ running them
@pytest.fixture(scope="module")
def docs_env(tmp_path_factory):
    yield from fresh_docs_env(tmp_path_factory)


def fresh_docs_env(tmp_path_factory):
    """(repository copy, environment), for a module-scoped fixture: a fresh copy of the tracked files (mtimes kept,
    so `make` sees its install stamp), ``../shared`` beside it, the project's .venv linked in, and a fresh $HOME."""
    stamp, venv = ROOT / ".venv" / ".dsmath-installed", Path(sys.executable).parent.parent
    inputs = ("pyproject.toml", "Makefile", "constraints-cpu.txt")  # what the Makefile's install stamp depends on
    if stamp.exists() and any((ROOT / f).stat().st_mtime > stamp.stat().st_mtime for f in inputs):
        pytest.fail(f"the .venv is older than {'/'.join(inputs)}: run `make setup` (or `make test`) first")
    base = tmp_path_factory.mktemp("docs")
    repo, home = base / "repo", base / "home"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    os.symlink(venv, repo / ".venv")
    if (ROOT.parent / "shared").exists():
        os.symlink(ROOT.parent / "shared", base / "shared")
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSMATH_", "RAY_ADDRESS", "PYTEST"))}
    env.update(SHRINK, HOME=str(home), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               DSMATH_LOCAL_CLUSTER_DIR=tempfile.mkdtemp(prefix="dsr", dir="/tmp"))  # short: Ray's socket paths
    yield repo, env
    shutil.rmtree(env["DSMATH_LOCAL_CLUSTER_DIR"], ignore_errors=True)


def _stop_local_cluster(repo: Path, env: dict) -> None:
    subprocess.run(["bash", "cluster/jobs/local_cluster.sh", "stop"], cwd=repo, env=env, capture_output=True,
                   timeout=120)


_RAN: dict[tuple[str, int, Path], tuple[int, str]] = {}  # (block, repo copy) -> (exit code, its output)


def run_block(key: tuple[str, int], docs_env: tuple[Path, dict]) -> tuple[int, str]:
    """Run one block as written, once per repository copy (``docs_env``, one per test module); later callers get
    the first run's exit code and output."""
    repo, env = docs_env
    if (*key, repo) in _RAN:
        return _RAN[(*key, repo)]
    env = {**env, **BLOCK_ENV.get(key, {})}
    script = block_script(_runnable(BLOCKS[key]))
    log = repo.parent / f"{key[0].replace('/', '_')}-{key[1]}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-c", script], cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        proc.wait(timeout=BLOCK_TIMEOUT_S)
    finally:
        if "local_cluster.sh start" in script:
            _stop_local_cluster(repo, env)
        try:  # whatever the block left running (a server started with `&` before a failing command)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    for rel in KEEP.get(key, ()):
        if (repo / rel).exists():
            (kept_dir(key, repo) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / rel, kept_dir(key, repo) / rel)
    _RAN[(*key, repo)] = (proc.returncode, log.read_text(errors="replace"))
    return _RAN[(*key, repo)]


def kept_dir(key: tuple[str, int], repo: Path) -> Path:
    """Where ``run_block`` keeps the ``KEEP`` outputs of block ``key`` (paths relative to the repository)."""
    return repo.parent / "kept" / f"{key[0].replace('/', '_')}-{key[1]}"


@pytest.mark.slow
@pytest.mark.parametrize("key", [k for k, cmds in BLOCKS.items() if _runnable(cmds) and k != MAKE_RUN],
                         ids=lambda k: f"{k[0]}:{k[1]}")
def test_doc_block_runs_as_written(key: tuple[str, int], docs_env: tuple[Path, dict]) -> None:
    """Every block but `make run`'s, which tests/test_golden.py runs (the golden run: minutes of bootstrap, kept
    in a file of its own so that the two longest files run side by side on two workers)."""
    check_block_ran(key, docs_env)


def check_block_ran(key: tuple[str, int], docs_env: tuple[Path, dict]) -> None:
    """Block ``key`` ran (or runs now) and every runnable command of it ran and exited 0, else the test fails
    naming the command's ``file:line``."""
    cmds = _runnable(BLOCKS[key])
    returncode, text = run_block(key, docs_env)
    if returncode != 0:
        failed = [line for line in text.splitlines() if line.startswith("DOC-FAILED")]
        where = failed[-1].split()[1] if failed else f"{key[0]}:{key[1]} (block)"
        cmd = next((c.text for c in cmds if c.where == where), "")
        pytest.fail(f"{where}: documented command failed: {cmd}\n--- last output ---\n{text[-4000:]}",
                    pytrace=False)
    ran = [line.split()[1] for line in text.splitlines() if line.startswith("DOC-RUN")]
    assert ran == [c.where for c in cmds], text[-2000:]
    # Quiet by default: no command's terminal shows a library's log lines (they go to the run's log folder).
    chatter = LIBRARY_LINE.findall(text)
    assert not chatter, f"{key[0]}:{key[1]}: library log lines on the terminal, e.g. {chatter[:3]}"


# A vLLM log line ("INFO 12-05 19:29:58 [core.py:402] ..."), also as Ray or multiprocessing forward it from a
# worker ("(Generator pid=123) WARNING ..."); or a Python warning from a library's or the standard library's file
# (".../multiprocessing/resource_tracker.py:254: UserWarning: ..."). What `dsmath --verbose` would show.
LIBRARY_LINE = re.compile(r"^(?:\(\S+ pid=\d+\) )?(?:DEBUG|INFO|WARNING) \d\d-\d\d \d\d:\d\d:\d\d \[.*$"
                          r"|^\S*(?:site-packages|/lib/python3\.\d+)/\S+\.py:\d+: \w*Warning: .*$", re.M)


# ---------------------------------------------------------------------------------- what the documented runs show
# The runs the blocks above start are the feature tests of `dsmath compare` and `dsmath iterate`: a second run of
# the same path in another test file would cost minutes and prove less (it would not be the user's command).
def documented_run(command: str, docs_env: tuple[Path, dict]) -> tuple[Path, str]:
    """(the repository copy the block ran in, its output) for the one block that runs ``command``; the block runs
    here if its own test has not run it yet."""
    keys = [k for k, cmds in BLOCKS.items() if any(c.text.startswith(command) for c in _runnable(cmds))]
    assert len(keys) == 1, f"{command!r}: in {len(keys)} runnable blocks, expected 1"
    returncode, text = run_block(keys[0], docs_env)
    if returncode != 0:
        pytest.fail(f"{keys[0][0]}:{keys[0][1]}: the block failed (its test_doc_block_runs_as_written says where)",
                    pytrace=False)
    return docs_env[0], text


COMPARED = (("grpo", "online"), ("online_rft", "online"), ("rft", "offline"), ("ppo", "online"), ("dpo", "offline"))
SAMPLES_PER_STEP = 4 * 4  # TINY_LOOP: rollout.questions_per_step × rollout.group_size


@pytest.mark.slow
def test_documented_compare_gives_every_method_one_budget_and_offline_step_one_equals_online(docs_env) -> None:
    repo, text = documented_run("dsmath compare", docs_env)
    out = repo / "runs" / "compare"
    samples = 2 * SAMPLES_PER_STEP  # the shrink's steps=2 wins over --samples (DSMATH_OVERRIDES come last)
    for i, (name, sampling) in enumerate(COMPARED, 1):
        assert f"[compare] {i}/{len(COMPARED)} {name}: {name}, {sampling} sampling, 2 steps" in text, text[-3000:]
    table = (out / "compare.md").read_text()
    for name, sampling in COMPARED:
        assert f"| {name} | {name} | {sampling} | 2 | {samples} |" in table, table
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    rows = {r["name"]: r for r in json.loads((out / "compare.json").read_text())}
    for name, _ in COMPARED:
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["samples_trained"] == samples and summary["steps"] == 2
        assert [p[1] for p in rows[name]["curve"]] == [0, samples]  # before and after (--eval-every 8 > 2 steps)
    on, off = read_metrics(out / "online_rft"), read_metrics(out / "rft")
    # Offline step s uses the questions and sampling seed of online step s, drawn from the starting policy:
    # at step 1 both are the starting policy, so the samples (hence rewards, lengths) are identical.
    for key in ("reward/mean", "response_length/mean"):
        assert on[0][key] == off[0][key], key
    # The generators still receive every update (evaluation needs the current weights); the pool does not.
    assert [r["weight_version"] for r in off] == [1, 2]
    # The coefficient is I(o): every advantage over trained tokens lies in [0, 1], never negative. (The tiny model
    # rarely answers right when sampling, so this is mostly 0 here; tests/test_algorithms.py checks the values.)
    for r in on + off:
        assert 0.0 <= r["train/adv_min"] and r["train/adv_max"] <= 1.0
    _check_ppo(read_metrics(out / "ppo"))


def _check_ppo(rows: list[dict]) -> None:
    """PPO learned a value model beside the policy (its own engine: timed passes, a finite loss that moved)."""
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["time/values"] > 0 and r["time/value_update"] > 0
        assert math.isfinite(r["value/loss"]) and r["value/loss"] >= 0
        assert r["weight_version"] == r["step"]
    # Step 1: old policy == reference, so the per-token KL penalty is 0; whitened advantages have mean 0.
    assert abs(rows[0]["ppo/kl_penalty_mean"]) < 1e-5
    assert abs(rows[0]["train/adv_mean"]) < 1e-4
    # The value model was trained: its error on step 2's returns differs from step 1's (it moved).
    assert rows[0]["value/abs_err"] != rows[1]["value/abs_err"]


REFERENCE_VS = """
import json, sys
from safetensors.torch import load_file
from dsmath.config import AlgorithmConfig, LearnerConfig
from learner.policy import PolicyLearner
start, others = sys.argv[1], sys.argv[2:]
learner = PolicyLearner(start, LearnerConfig(lr=1e-3, zero_stage=0), AlgorithmConfig(), with_reference=True)
ref = {k: v.detach() for k, v in learner.reference.state_dict().items()}
saved = [load_file(f"{o}/model.safetensors") for o in others]
print(json.dumps([max(float((ref[k] - w[k]).abs().max()) for k in w) for w in saved]))
"""


@pytest.mark.slow
def test_documented_iterate_resets_the_reference_and_replays_ten_percent(docs_env) -> None:
    """Paper Algorithm 1 as the README runs it (2 iterations, a process reward model): iteration 2 starts from
    iteration 1's final policy and its reference holds exactly those weights (not the initial model's); the first
    step of every iteration measures KL = 0; the reward model's replay is 10 % of each later round's set."""
    from safetensors.torch import load_file

    from dsmath.model_folder import resolve
    from dsmath.reward_models import replay_count

    repo, _ = documented_run("dsmath iterate", docs_env)
    run = repo / "runs" / "iterate_tiny_cpu"
    records = json.loads((run / "iterations.json").read_text())
    assert [r["iteration"] for r in records] == [0, 1, 2]
    initial, end1 = records[1]["policy_start"], resolve(run / "iter-1" / "checkpoints")
    assert repo / records[1]["policy_end"] == end1 and repo / records[2]["policy_start"] == end1

    cfg2 = yaml.safe_load((run / "iter-2" / "config.yaml").read_text())
    assert repo / cfg2["model"]["path"] == end1
    assert cfg2["algorithm"]["advantage"] == "process"
    assert cfg2["reward"]["model_path"] == records[1]["rm"]["checkpoint"]
    # Iteration 1 changed the policy, so "reference = end of iteration 1" differs from "reference = initial".
    w0, w1 = load_file(f"{initial}/model.safetensors"), load_file(f"{end1}/model.safetensors")
    assert max(float((w0[k] - w1[k]).abs().max()) for k in w0) > 1e-4
    # The reference a learner builds from iteration 2's start holds iteration 1's final weights (a fresh process:
    # DeepSpeed keeps process-wide state).
    got = subprocess.run([sys.executable, "-c", REFERENCE_VS, str(end1), str(end1), initial], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    to_end1, to_initial = json.loads(got.stdout.strip().splitlines()[-1])
    assert to_end1 == 0.0 and to_initial > 1e-4, (to_end1, to_initial)

    # The first step of every iteration sees policy == reference (KL exactly 0); by the second it has moved.
    for k in (1, 2):
        rows = read_metrics(run / f"iter-{k}")
        assert [r["step"] for r in rows] == [1, 2]
        assert rows[0]["train/kl"] == 0.0 and rows[1]["train/kl"] > 0.0, (k, rows)
    # Reward model: round k trains on its fresh examples + 10 % replay of all earlier rounds.
    fresh = [r["rm"]["fresh_examples"] for r in records]
    for k in (1, 2):
        rm = records[k]["rm"]
        assert rm["history_examples"] == sum(fresh[:k])
        assert rm["replayed_examples"] == min(replay_count(rm["fresh_examples"], 0.1), rm["history_examples"])
        assert rm["replayed_examples"] > 0 and rm["train_examples"] == rm["fresh_examples"] + rm["replayed_examples"]
        assert (run / f"iter-{k}" / "rm" / "checkpoint" / "config.json").exists()
        assert (run / f"iter-{k}" / "summary.json").exists()
    assert records[0]["rm"]["replayed_examples"] == 0
    summary = json.loads((run / "iter-2" / "summary.json").read_text())
    assert summary["samples_trained"] == 2 * SAMPLES_PER_STEP
