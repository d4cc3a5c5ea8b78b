"""Docs are tests: every shell command of README.md and cluster/README.md runs here as written.

Each fenced block runs top to bottom in one bash shell (so its ``export`` lines carry), from the root of a fresh
copy of the repository's tracked files (``../shared`` beside it, as in a checkout), with ``$HOME`` a fresh folder.
The only changes are the documented shrink variables (``DSMATH_OVERRIDES`` and friends, README "Using it"), which
cut runs to a few steps of the tiny model. A failing command fails its block's test naming ``file:line``.
Commands tagged ``[needs …]`` are listed as skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from docs_commands import ROOT, DocCommand, all_commands, block_script, blocks, extract
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
    """A fresh copy of the tracked files (mtimes kept, so `make` sees its install stamp), ``../shared`` beside
    it, the project's .venv linked in, and a fresh $HOME."""
    stamp, venv = ROOT / ".venv" / ".dsmath-installed", Path(sys.executable).parent.parent
    if stamp.exists() and any((ROOT / f).stat().st_mtime > stamp.stat().st_mtime for f in ("pyproject.toml", "Makefile")):
        pytest.fail("the .venv is older than pyproject.toml/Makefile: run `make setup` (or `make test`) first")
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


@pytest.mark.slow
@pytest.mark.parametrize("key", [k for k, cmds in BLOCKS.items() if _runnable(cmds)], ids=lambda k: f"{k[0]}:{k[1]}")
def test_doc_block_runs_as_written(key: tuple[str, int], docs_env: tuple[Path, dict]) -> None:
    repo, env = docs_env
    cmds = _runnable(BLOCKS[key])
    script = block_script(cmds)
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
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        failed = [line for line in text.splitlines() if line.startswith("DOC-FAILED")]
        where = failed[-1].split()[1] if failed else f"{key[0]}:{key[1]} (block)"
        cmd = next((c.text for c in cmds if c.where == where), "")
        pytest.fail(f"{where}: documented command failed: {cmd}\n--- last output ---\n{text[-4000:]}",
                    pytrace=False)
    ran = [line.split()[1] for line in text.splitlines() if line.startswith("DOC-RUN")]
    assert ran == [c.where for c in cmds], text[-2000:]
