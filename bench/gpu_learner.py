"""GPU learner card: the dsmath learner in each precision vs a plain PyTorch bf16 loop, same batch, same run.

Arms, each in a fresh Python process (so no arm's allocations or compiled kernels leak into another's peak memory
or timing), in this order:

* ``dsmath fp32``            ``learner.policy.PolicyLearner``, ``learner.precision=fp32``, ZeRO-1, one rank;
* ``dsmath bf16``            the same with ``learner.precision=bf16`` (DeepSpeed bf16: bf16 weights, fp32 master);
* ``dsmath bf16 lean``       bf16 + ``gradient_checkpointing`` + ``logprob_chunk_tokens=1024``;
* ``plain PyTorch bf16``     the peer: forty lines of PyTorch — fp32 weights under bf16 autocast, a bf16
                             reference copy, ``torch.optim.AdamW``, the same GRPO loss (``dsmath.grpo.grpo_loss``:
                             clipped ratio, k3 KL with β, seq-mean-token-mean) on the same micro-batches.

One GRPO step = one policy forward + backward over the whole batch (the old log-probs travel with the batch, as
the generator's do) plus one reference forward, then one optimizer step. Each arm runs ``--warmup`` untimed steps, then ``--steps``
timed ones (CUDA synchronised around each); the card reports the median s/step, tokens/s (all tokens of the batch,
prompt included), MFU = (6·P + 2·P)·tokens / (s/step) / peak — 6·P·tokens for the policy's forward+backward,
2·P·tokens for the reference forward; recomputation under checkpointing is not counted as useful work — against
the device's data-sheet dense bf16 peak (H100/H200: 989 TFLOP/s), and peak memory
(``torch.cuda.max_memory_allocated`` over the whole arm, model loading included). The first step's loss of every
arm is printed next to it: on the same batch and starting weights they must agree (to bf16 precision).

Default: a Qwen2.5-0.5B-shaped model with random weights (494 M parameters, vocabulary 151,936), 64 sequences ×
1,024 tokens (256 prompt + 768 completion), micro-batch 8, β = 0.04 — the batch of issue 15's table. ``--tiny``
runs a tiny shape on CPU (gloo, DeepSpeed's CPU accelerator) so the whole script is exercised in CI; its timings
mean nothing. Needs torch, transformers and DeepSpeed; never imports Ray or vLLM. Last line: JSON.

    python bench/gpu_learner.py [--tiny] [--steps 3] [--warmup 1] [--arms fp32,bf16,bf16_lean,plain_bf16]
                                [--out card.md] [--json card.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Data-sheet dense (no sparsity) bf16 tensor-core peaks, FLOP/s, matched against torch.cuda.get_device_name().
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}

ARMS = {  # name -> (label, settings)
    "fp32": ("dsmath learner fp32 (ZeRO-1)", {"precision": "fp32"}),
    "bf16": ("dsmath learner bf16 (ZeRO-1)", {"precision": "bf16"}),
    "bf16_lean": ("dsmath learner bf16 + checkpointing + 1024-token log-prob chunks",
                  {"precision": "bf16", "gradient_checkpointing": True, "logprob_chunk_tokens": 1024}),
    "plain_bf16": ("plain PyTorch loop, bf16 autocast over fp32 weights, bf16 reference", {}),
}


@dataclass(frozen=True)
class Workload:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seqs: int
    prompt_tokens: int
    completion_tokens: int
    micro_batch: int
    group: int = 8
    beta: float = 0.04


FULL = Workload(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, seqs=64,
                prompt_tokens=256, completion_tokens=768, micro_batch=8)
TINY = Workload(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256, seqs=8,
                prompt_tokens=8, completion_tokens=24, micro_batch=4, group=4)


def make_model(w: Workload, out_dir: Path) -> int:
    """A Qwen2 model of ``w``'s shape with random weights (seed 0), saved to ``out_dir``; returns its parameters."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=w.vocab, hidden_size=w.hidden, intermediate_size=w.intermediate,
                      num_hidden_layers=w.layers, num_attention_heads=w.heads, num_key_value_heads=w.kv_heads,
                      max_position_embeddings=max(2048, w.prompt_tokens + w.completion_tokens),
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(str(out_dir))
    return sum(p.numel() for p in model.parameters())


def make_batch(w: Workload, seed: int = 0):
    """The same batch in every arm: random prompt/completion tokens, group-normalised ±1 rewards, and old
    log-probs of a uniform sampler (−ln V), so the first step's loss depends on the model (with old = the step's
    own log-probs the ratio is exactly 1 and the loss is −mean(A) = 0 whatever the weights)."""
    import math

    import torch

    from dsmath.grpo import group_advantages
    from learner.batch import collate_rollouts

    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, w.vocab, (w.seqs, w.prompt_tokens), generator=g).tolist()
    comps = torch.randint(3, w.vocab, (w.seqs, w.completion_tokens), generator=g).tolist()
    rewards = torch.randint(0, 2, (w.seqs,), generator=g).double()  # [N]
    adv = group_advantages(rewards, w.group).tolist()
    old = [[-math.log(w.vocab)] * w.completion_tokens for _ in range(w.seqs)]
    return collate_rollouts(prompts, comps, pad_id=0, advantages=adv, old_logprobs=old)


def mfu(params: int, tokens: int, s_per_step: float, device_name: str) -> float | None:
    """Model FLOPs utilisation: (6·P policy forward+backward + 2·P reference forward)·tokens per step, over the
    device's data-sheet dense bf16 peak; None where the device is not in :data:`PEAK_BF16` (e.g. a CPU)."""
    peak = next((v for k, v in PEAK_BF16.items() if k in device_name), None)
    return (6 + 2) * params * tokens / s_per_step / peak if peak else None


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device) -> tuple[float, str]:
    """Peak bytes: the CUDA allocator's on a GPU, the process's peak RSS on CPU (a different quantity)."""
    import torch

    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS (CPU)"


def dsmath_arm(model_dir: Path, w: Workload, settings: dict):
    """(step function, device) for the dsmath learner with ``settings`` on ``learner.LearnerConfig``."""
    from dsmath.config import AlgorithmConfig, LearnerConfig
    from learner.policy import PolicyLearner

    cfg = LearnerConfig(lr=1e-6, zero_stage=1, num_ranks=1, micro_batch_size=w.micro_batch, grad_clip=1.0,
                        **settings)
    learner = PolicyLearner(model_dir, cfg, AlgorithmConfig(beta=w.beta), seed=0)
    return (lambda batch: learner.grpo_step(batch)["loss"]), learner.device


def plain_arm(model_dir: Path, w: Workload):
    """(step function, device) for the plain PyTorch peer: same loss, same micro-batches, AdamW, bf16 autocast."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from dsmath import grpo
    from learner.batch import micro_batches

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device)
    model.config.use_cache = False
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).to(device).eval()
    ref.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)

    def logprobs(m, mb):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = m(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits  # [n, w, V]
        return F.pad(grpo.token_logprobs(logits[:, :-1].float(), mb.input_ids[:, 1:]), (0, 1))  # [n, w]

    def step(batch) -> float:
        model.train()
        norm = grpo.loss_normalizer(batch.loss_mask, "seq_mean_token_mean")
        total = 0.0
        for _rows, mb in micro_batches(batch, w.micro_batch):
            mb = mb.to(device)
            lp = logprobs(model, mb)  # [n, w]
            with torch.no_grad():
                ref_lp = logprobs(ref, mb)  # [n, w]
            loss, _ = grpo.grpo_loss(lp, mb.old_logprobs, ref_lp, mb.advantages, mb.loss_mask, beta=w.beta,
                                     loss_agg="seq_mean_token_mean", normalizer=norm)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    return step, device


def run_arm(arm: str, model_dir: Path, w: Workload, params: int, steps: int, warmup: int) -> dict:
    """One arm in this process: build, ``warmup`` untimed steps, ``steps`` timed ones; the card row's figures."""
    import torch

    t0 = time.perf_counter()
    label, settings = ARMS[arm]
    step, device = plain_arm(model_dir, w) if arm == "plain_bf16" else dsmath_arm(model_dir, w, settings)
    build_s = time.perf_counter() - t0
    batch = make_batch(w)
    tokens = int(batch.attention_mask.sum())
    losses, times = [], []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        losses.append(step(batch))
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    s_step = statistics.median(times)
    peak, peak_kind = _peak_memory(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"arm": arm, "label": label, "device": name, "s_per_step": s_step, "tokens": tokens,
            "tokens_per_s": tokens / s_step, "mfu": mfu(params, tokens, s_step, name),
            "peak_bytes": peak, "peak_kind": peak_kind, "first_loss": losses[0], "losses": losses,
            "build_s": build_s, "step_times": times}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "deepspeed"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def spawn_arm(arm: str, model_dir: Path, w_name: str, params: int, steps: int, warmup: int, timeout_s: float) -> dict:
    """Run one arm in a fresh interpreter; its result row, or a row with the error's last line."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--model-dir", str(model_dir),
               "--workload", w_name, "--params", str(params), "--steps", str(steps), "--warmup", str(warmup),
               "--result", str(result)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"arm": arm, "label": ARMS[arm][0], "error": f"timed out after {timeout_s:.0f} s"}
        if proc.returncode != 0 or not result.exists():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            sys.stderr.write(proc.stderr[-4000:])
            return {"arm": arm, "label": ARMS[arm][0], "error": f"exit {proc.returncode}: {tail}"}
        return json.loads(result.read_text())


def format_card(rows: list[dict], w: Workload, params: int, versions: dict) -> str:
    """The markdown card: one row per arm, the plain loop's tokens/s as the 1.0× reference."""
    plain = next((r for r in rows if r["arm"] == "plain_bf16" and "error" not in r), None)
    device = next((r["device"] for r in rows if "device" in r), "?")
    kind = next((r["peak_kind"] for r in rows if "peak_kind" in r), "")
    lines = [f"GPU learner card — {device}; " + ", ".join(f"{k} {v}" for k, v in versions.items()),
             f"model: Qwen2-shaped, random weights, {params / 1e6:.1f} M parameters, vocabulary {w.vocab}; batch: "
             f"{w.seqs} sequences × {w.prompt_tokens + w.completion_tokens} tokens ({w.prompt_tokens} prompt + "
             f"{w.completion_tokens} completion), micro-batch {w.micro_batch}, beta {w.beta}; each arm a fresh process",
             f"MFU = 8·P·tokens per step (policy fwd+bwd 6·P, reference fwd 2·P) / s / data-sheet dense bf16 peak; "
             f"peak memory = {kind}",
             "",
             "| arm | s/step | tokens/s | × plain | MFU | peak memory | loss, step 1 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}×" if plain else "n/a"
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['label']} | {r['s_per_step']:.3f} | {r['tokens_per_s'] / 1e3:.1f} k | {ratio} | {mfu} | "
                     f"{r['peak_bytes'] / 1e9:.2f} GB | {r['first_loss']:.6f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny shape on CPU: exercises the script, times nothing")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per arm (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per arm first")
    ap.add_argument("--arm-timeout", type=float, default=240.0, help="seconds per arm before it is reported failed")
    ap.add_argument("--out", help="write the card (markdown) here too")
    ap.add_argument("--json", help="write the rows (JSON) here too")
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--workload", default="full", help=argparse.SUPPRESS)
    ap.add_argument("--params", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    w_name = "tiny" if args.tiny else args.workload
    w = TINY if w_name == "tiny" else FULL
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if w_name == "tiny":
        from dsmath.env import apply_cpu_env_defaults

        apply_cpu_env_defaults()  # DeepSpeed's CPU accelerator, one OpenMP thread
    if args.arm:  # a child: one arm, result to a file
        row = run_arm(args.arm, Path(args.model_dir), w, args.params, args.steps, args.warmup)
        Path(args.result).write_text(json.dumps(row))
        return 0
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        params = make_model(w, model_dir)
        rows = [spawn_arm(a, model_dir, w_name, params, args.steps, args.warmup, args.arm_timeout) for a in arms]
    card = format_card(rows, w, params, _versions())
    print(card)
    for path, text in ((args.out, card + "\n"), (args.json, json.dumps(rows, indent=1))):
        if path:
            Path(path).write_text(text)
    print(json.dumps({"rows": [{k: v for k, v in r.items() if k not in ("losses", "step_times")} for r in rows],
                      "params": params, "workload": asdict(w)}))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
