"""The bootstrap's thread tuner: it keeps whichever count its loop measures faster, and that is safe only because
the count changes speed, never the numbers (checked here bit for bit on the default preset's model shape).

Each case runs in a fresh interpreter: a vLLM CPU engine replaces ``torch.set_num_threads`` with a no-op in the
process it ran in (the generator tests run engines in the pytest process), and a count that cannot be set would
make the comparison vacuous.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsmath.utils.threads import ThreadTuner, usable_cores


def _in_fresh_process(call: str, *args: object) -> None:
    """Runs ``test_threads.<call>(*args)`` in a new Python; its failure fails the calling test with its output."""
    code = f"import test_threads; test_threads.{call}(*{args!r})"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.parametrize("fast", [1, 2])
def test_the_tuner_keeps_the_count_its_steps_run_faster_at(fast: int) -> None:
    _in_fresh_process("check_tuner_keeps_the_faster_count", fast)


def check_tuner_keeps_the_faster_count(fast: int) -> None:
    import torch

    before = torch.get_num_threads()
    tuner = ThreadTuner(choices=(1, 2), every=10, trial=3)
    seen = []
    for _ in range(12):
        with tuner.step(work=1.0) as threads:
            seen.append(threads)
            assert torch.get_num_threads() == threads
            time.sleep(0.002 if threads == fast else 0.03)
    # step 0 untimed, steps 1-6 the trial (3 at each count), then the winner; step 11 starts the next trial
    assert seen[:7] == [1, 1, 1, 1, 2, 2, 2] and seen[7:11] == [fast] * 4 and seen[11] == 1
    assert tuner.current == fast and tuner.history == [(7, fast)]
    tuner.restore()
    assert torch.get_num_threads() == before


def test_the_tuner_drops_to_one_thread_when_more_start_running_slower_than_one_did() -> None:
    _in_fresh_process("check_tuner_drops_back_on_slow_steps")


def check_tuner_drops_back_on_slow_steps() -> None:
    """After a trial that 2 threads won, a core taken by another process makes each 2-thread step slower than one
    thread was in the trial: one such step is tolerated, two in a row drop to 1 thread until the next trial."""
    tuner = ThreadTuner(choices=(1, 2), every=20, trial=2, patience=2)
    # step 0 untimed, steps 1-4 the trial (1 thread 0.03 s, 2 threads 0.002 s), then 2 threads: fast, one slow
    # step, fast again, then two slow ones in a row
    sleep = {1: [0.0, 0.03, 0.03], 2: [0.002, 0.002, 0.002, 0.06, 0.002, 0.06, 0.06]}
    seen = []
    for _ in range(11):
        with tuner.step(work=1.0) as threads:
            seen.append(threads)
            time.sleep(sleep[threads].pop(0) if sleep[threads] else 0.03)
    assert seen == [1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 1], seen
    assert tuner.history == [(5, 2), (10, 1)] and tuner.current == 1
    tuner.restore()


def test_one_candidate_only_sets_it() -> None:
    tuner = ThreadTuner(choices=(1,), every=1, trial=2)
    for _ in range(4):
        with tuner.step() as threads:
            assert threads == 1
    assert tuner.choices == (1,) and tuner.history == []
    tuner.restore()


def _train(model_dir: Path, threads: int, steps: int = 8) -> dict:
    import torch

    from dsmath.config import LearnerConfig
    from learner.batch import collate_rollouts
    from dsmath.config import load_config
    from dsmath.tasks import arithmetic
    from learner.objectives.lm import build_lm
    from wiring.bootstrap import sft_examples

    boot = load_config("tiny_cpu").bootstrap
    engine, lm = build_lm(model_dir, LearnerConfig(lr=3e-3, warmup_steps=2, zero_stage=0, micro_batch_size=32,
                                                   weight_decay=0.0), rank=0, world_size=1, seed=0, total_steps=steps)
    tok = engine.tokenizer
    problems = arithmetic.generate_split("train", 200, levels=(1, 2, 3), seed=0)
    encoded = [(tok(e["prompt"])["input_ids"], tok(e["response"])["input_ids"] + [tok.eos_token_id])
               for e in sft_examples(problems, boot)]
    rng = random.Random(0)
    torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads, "torch.set_num_threads had no effect in this process"
    for _ in range(steps):
        picks = [encoded[rng.randrange(len(encoded))] for _ in range(32)]
        engine.train_step(lm, collate_rollouts([p for p, _ in picks], [c for _, c in picks], pad_id=tok.pad_token_id))
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


@pytest.mark.skipif(usable_cores() < 2, reason="needs 2 usable cores to run 2 threads")
def test_thread_count_changes_speed_not_numbers(tmp_path: Path) -> None:
    """The default preset's model shape and batch (32 sequences of arithmetic SFT): 8 steps at 1 and at 2 threads
    end in bit-identical weights."""
    _in_fresh_process("check_same_weights_at_1_and_2_threads", str(tmp_path))


def check_same_weights_at_1_and_2_threads(tmp: str) -> None:
    import torch

    from dsmath.config import load_config
    from dsmath.tasks import arithmetic
    from dsmath.tiny import build_model, train_tokenizer
    from wiring.bootstrap import sft_examples

    cfg = load_config("tiny_cpu")
    texts = [e["prompt"] + e["response"] for e in
             sft_examples(arithmetic.generate_split("train", 400, levels=(1, 2, 3), seed=0), cfg.bootstrap)]
    tmp_path = Path(tmp)
    base = tmp_path / "model"
    build_model(cfg.model, train_tokenizer(texts, cfg.model.vocab_size, base), seed=0).save_pretrained(str(base))
    before = torch.get_num_threads()
    try:
        got = {}
        for threads in (1, 2):
            shutil.copytree(base, tmp_path / f"m{threads}")
            got[threads] = _train(tmp_path / f"m{threads}", threads)
    finally:
        torch.set_num_threads(before)
    from safetensors.torch import load_file

    start = load_file(str(base / "model.safetensors"))
    assert sum(not torch.equal(start[k], got[1][k]) for k in start if k in got[1]) > len(start) // 2  # it trained
    assert got[1].keys() == got[2].keys()
    changed = [k for k in got[1] if not torch.equal(got[1][k], got[2][k])]
    assert changed == [], f"weights differ between 1 and 2 threads: {changed[:5]}"


def test_dsmath_pins_one_fp32_code_path_before_torch_loads_when_the_user_did_not() -> None:
    """Thread-count-independent numbers rest on ``dsmath.env.same_numbers_env`` (MKL's reproducible mode and the
    AVX2 kernels). A user's shell has none of it: the CLI sets it before anything loads torch, so a process started
    through it computes the bits of one started with the pins set (and a value the user set wins)."""
    import os

    from dsmath.env import SAME_NUMBERS_ENV, same_numbers_env

    if not same_numbers_env():
        pytest.skip("not an x86 machine: no code path to pin")
    bare = {k: v for k, v in os.environ.items() if k not in SAME_NUMBERS_ENV}
    via_cli = ("import os\nfrom wiring import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
               "import golden\nprint(os.environ.get('MKL_CBWR', 'unset'), golden.numerics_fingerprint())")

    def run(env: dict, code: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                             text=True, timeout=300, check=True)
        return out.stdout.split()[-2:]

    pinned = run({**bare, **SAME_NUMBERS_ENV}, "import golden\nprint('-', golden.numerics_fingerprint())")[1]
    assert run(bare, via_cli) == ["AVX2,STRICT", pinned]
    assert run({**bare, "MKL_CBWR": "COMPATIBLE"}, via_cli)[0] == "COMPATIBLE"
