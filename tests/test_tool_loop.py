"""`dsmath train rollout.mode=tool` end to end, its tool calls run by the gRPC sandbox service.

A tiny model is overfit on one tool-use script after every question's prompt (it writes ``print(6*7)``; the
trained ```output block says 41, so an output block saying 42 came from the sandbox, not the model).
`dsmath sandbox serve` runs on 127.0.0.1 with a token; `dsmath train` (its own process and local Ray cluster)
points its generators at it with ``reward.sandbox_address``. Checked: the steps complete, the service ran the
programs (its own counter), the sandbox's output is in the trained completions, rewards are recorded, and the
learner's batch trained exactly the model-written tokens (tool output masked).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DSMATH = str(Path(sys.executable).with_name("dsmath"))
PAIRS = [(6, 7), (3, 4), (5, 8), (9, 2)]


SCRIPT = " Let me compute.\n```python\nprint(6*7)\n```\n```output\n41\n```\nThe answer is \\boxed{42}."


def _question(a: int, b: int) -> str:
    return f"What is {a} times {b}?"


def _overfit_tool_model(path: Path) -> None:
    """A tiny Qwen2 that writes SCRIPT after the tool prompt of each question of PAIRS."""
    import torch

    from dsmath.config import ModelConfig
    from dsmath.prompts import format_prompt
    from dsmath.tiny import build_model, train_tokenizer

    prompts = [format_prompt(_question(a, b), "tool") for a, b in PAIRS]
    texts = [p + SCRIPT for p in prompts]
    tok = train_tokenizer(texts * 20, 384, path)
    model = build_model(ModelConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
                                    vocab_size=384), tok, seed=0)
    batch = []
    for p, t in zip(prompts, texts):
        ids = torch.tensor([tok(t + tok.eos_token, add_special_tokens=False)["input_ids"]])  # [1, L]
        labels = ids.clone()  # [1, L]
        labels[0, :len(tok(p, add_special_tokens=False)["input_ids"])] = -100  # the script only, not the question
        batch.append((ids, labels))
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)  # (1e-2 oscillates on this long prompt)
    for _ in range(120):
        loss = sum(model(ids, labels=labels).loss for ids, labels in batch) / len(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02
    model.save_pretrained(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tool_mode_training_runs_its_programs_on_the_sandbox_service(tmp_path):
    from dsmath.sandbox.service import SandboxClient
    from dsmath.utils.metrics import read_metrics
    from wiring.lineage import read_step

    _overfit_tool_model(tmp_path / "model")
    with open(tmp_path / "q.jsonl", "w") as fh:
        for a, b in PAIRS:
            fh.write(json.dumps({"question": _question(a, b), "answer": str(a * b)}) + "\n")
    port, token = _free_port(), "tool-loop-" + "k" * 22
    env = {**os.environ, "DSMATH_SANDBOX_TOKEN": token}
    env.pop("RAY_ADDRESS", None)  # the driver starts its own local cluster: its actors inherit this env (token)
    server = subprocess.Popen([DSMATH, "sandbox", "serve", "--port", str(port), "--workers", "2"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = SandboxClient(f"127.0.0.1:{port}", token)
    try:
        client.wait_ready(60)
        assert client.health().runs == 0
        run = tmp_path / "run"
        started = time.monotonic()
        out = subprocess.run(
            [DSMATH, "train", "--no-progress", f"run_dir={run}", f"model.path={tmp_path / 'model'}",
             f"data.train={tmp_path / 'q.jsonl'}", f"data.heldout={tmp_path / 'q.jsonl'}", "rollout.mode=tool",
             f"reward.sandbox_address=127.0.0.1:{port}", "steps=2", "eval_size=2", "rollout.questions_per_step=2",
             "rollout.group_size=4", "rollout.max_new_tokens=48", "learner.micro_batch_size=8", "checkpoint_every=0"],
            env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        runs = client.health().runs
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=60)
    print(f"tool loop: 2 steps in {time.monotonic() - started:.0f} s, {runs} programs run by the service")

    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and [r["weight_version"] for r in rows] == [1, 2]
    calls = sum(r["rollout/tool_calls"] for r in rows)
    assert calls > 0 and runs >= calls  # every tool call of the trained samples ran on the service (+ held-out evals)
    for r in rows:
        samples, _full = read_step(run, r["step"])
        assert len(samples) == r["samples"] == 8
        assert sum(s["reward"] for s in samples) / 8 == pytest.approx(r["reward/mean"])
        ran = [s for s in samples if "```output\n" in s["completion"]]
        # The output blocks are the sandbox's (42), never the model's trained 41.
        assert ran and all(s["completion"].split("```output\n", 1)[1].startswith("42\n```") for s in ran)
        # The learner trained on every completion token the model wrote and on none the sandbox wrote.
        completion_tokens = sum(s["completion_tokens"] for s in samples)
        assert r["rollout/tool_output_tokens"] > 0
        assert r["train/tokens"] == completion_tokens - r["rollout/tool_output_tokens"]
        assert r["rollout/logprob_abs_diff_max"] < 1e-3  # masked tool tokens (log-prob 0.0) are not compared
