"""bench/gpu_learner.py and tests/test_gpu_learner.py on CPU: the bench's --tiny run end to end and its card's
arithmetic, and that everything the GPU check imports works where Ray and vLLM are not installed."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKER = ROOT / "tests" / "blocked_imports"


def blocked_env() -> dict:
    """This environment, with Ray and vLLM made absent (tests/blocked_imports/sitecustomize.py) in every child."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(BLOCKER), str(ROOT)])}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_learner", ROOT / "bench" / "gpu_learner.py")
    module = sys.modules["bench_gpu_learner"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IMPORTS = """
import importlib.util, sys
try:
    import ray
    raise SystemExit("the blocker did not block ray")
except ModuleNotFoundError:
    pass
assert importlib.util.find_spec("vllm") is None  # as on a machine without it
import deepspeed, transformers, torch
import learner.policy, learner.weight_sync, learner.batch, learner.checkpoint, dsmath.memory_plan
for name, path in [("bench_gpu_learner", "bench/gpu_learner.py"), ("test_gpu_learner", "tests/test_gpu_learner.py"),
                   ("test_weight_sync", "tests/test_weight_sync.py")]:
    spec = importlib.util.spec_from_file_location(name, path)
    sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[name])
assert sys.modules.get("ray") is None and sys.modules.get("vllm") is None
print("imported without ray and vllm")
"""


def test_gpu_check_modules_import_without_ray_or_vllm():
    out = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, cwd=ROOT,
                         env=blocked_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("imported without ray and vllm")


def test_mfu_and_card_arithmetic():
    bench = load_bench()
    # 494 M parameters, 65,536 tokens in 1.29 s on an H200: 8·P·tokens / s / 989e12
    assert bench.mfu(494_032_768, 65_536, 1.29, "NVIDIA H200") == pytest.approx(
        8 * 494_032_768 * 65_536 / 1.29 / 989e12)
    assert bench.mfu(10, 10, 1.0, "cpu") is None
    rows = [{"arm": "bf16", "label": "dsmath bf16", "device": "NVIDIA H200", "s_per_step": 1.0, "tokens": 65536,
             "tokens_per_s": 65536.0, "mfu": 0.25, "peak_bytes": 24.4e9, "peak_kind": "cuda max_memory_allocated",
             "first_loss": 0.5},
            {"arm": "plain_bf16", "label": "plain", "device": "NVIDIA H200", "s_per_step": 2.0, "tokens": 65536,
             "tokens_per_s": 32768.0, "mfu": 0.125, "peak_bytes": 32e9, "peak_kind": "cuda max_memory_allocated",
             "first_loss": 0.5},
            {"arm": "fp32", "label": "dsmath fp32", "error": "exit 1: CUDA out of memory"}]
    card = bench.format_card(rows, bench.FULL, 494_032_768, {"torch": "x"})
    assert "| dsmath bf16 | 1.000 | 65.5 k | 2.00× | 25.0 % | 24.40 GB | 0.500000 |" in card
    assert "| plain | 2.000 | 32.8 k | 1.00× | 12.5 % | 32.00 GB | 0.500000 |" in card
    assert "| dsmath fp32 | failed: exit 1: CUDA out of memory |" in card
    assert "64 sequences × 1024 tokens (256 prompt + 768 completion), micro-batch 8, beta 0.04" in card


def _check_tiny_card(rows: list[dict], card: str, last_line: str) -> None:
    """--tiny on CPU, Ray and vLLM absent in the bench and in every arm's process: four rows, same batch, losses
    that agree (bf16 to bf16 precision)."""
    assert [r["arm"] for r in rows] == ["fp32", "bf16", "bf16_lean", "plain_bf16"]
    for r in rows:
        assert "error" not in r, r
        assert r["tokens"] == 8 * 32 and r["s_per_step"] > 0 and r["mfu"] is None  # no data-sheet peak for a CPU
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["s_per_step"])
        assert len(r["losses"]) == 2 and r["peak_kind"] == "process peak RSS (CPU)"
    fp32_loss = rows[0]["first_loss"]
    assert fp32_loss != 0.0  # off-policy old log-probs: the loss depends on the weights
    for r in rows[1:]:
        assert abs(r["first_loss"] - fp32_loss) <= 2e-3 + 2e-2 * abs(fp32_loss), (r["arm"], r["first_loss"], fp32_loss)
    table = [line for line in card.splitlines() if line.startswith("| ") and "arm" not in line]
    assert len(table) == 4 and table[-1].startswith("| plain PyTorch loop") and "| 1.00× |" in table[-1]
    assert all(re.search(r"\| [\d.]+ \| [\d.]+ k \| [\d.]+× \| n/a \| [\d.]+ GB \| -?[\d.]+ \|$", row) for row in table)
    from dsmath.memory_plan import ModelShape

    tiny = ModelShape("tiny", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128,
                      vocab_size=256, tie_word_embeddings=True, attention_bias=True)
    last = json.loads(last_line)  # the card's JSON line
    assert last["params"] == tiny.num_parameters() and [r["arm"] for r in last["rows"]] == [r["arm"] for r in rows]


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu_in_tiny_mode(tmp_path):
    """bench/gpu_check.sh end to end where there is no GPU: the gpu tests are skipped, the bench runs --tiny (every
    arm, checked by :func:`_check_tiny_card`), and every output file the GPU session fetches is written."""
    out_dir = tmp_path / "out"
    env = {**blocked_env(), "OUT": str(out_dir), "DS_ACCELERATOR": "cpu", "PYTHON": sys.executable,
           "GPU_CHECK_BENCH_ARGS": "--tiny --steps 1 --warmup 1"}
    out = subprocess.run(["bash", "bench/gpu_check.sh"], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:]
    assert sorted(p.name for p in out_dir.iterdir()) == ["gpu_check.log", "gpu_learner.json", "gpu_learner.log",
                                                          "gpu_learner_card.md", "gpu_tests.log", "gpu_tests.xml"]
    log = (out_dir / "gpu_check.log").read_text()
    assert "gpu_check: tests exit 0, bench exit 0" in log and "ray present: False | vllm present: False" in log
    assert "skipped" in (out_dir / "gpu_tests.log").read_text()
    bench_lines = [x for x in (out_dir / "gpu_learner.log").read_text().splitlines() if x.startswith("{")]
    _check_tiny_card(json.loads((out_dir / "gpu_learner.json").read_text()),
                     (out_dir / "gpu_learner_card.md").read_text(), bench_lines[-1])
