"""Rollout throughput: the Generator Ray actor vs calling vLLM directly vs HF ``generate``, same prompts.

    python bench/rollout.py [--model DIR] [--prompts 32] [--n 4] [--max-new-tokens 64] [--repeats 3]

Without ``--model`` it builds the tiny Qwen2 of the default run (random weights, so lengths are near max).
Prints a card, then one line of JSON. The aim: actor overhead < 5 % over direct vLLM (same engine settings:
the actor adds request/rollout records, log-prob extraction and Ray serialisation; the in-process Generator line
separates the wrapper from Ray). On a shared, loaded machine run-to-run noise exceeds 5 %: compare medians of
several runs, or run it on a quiet box. On a GPU it also prints
an estimate of memory-bandwidth utilisation during decoding (weights read once per decode step / time /
the device's peak bandwidth from a table of exact device names; a device not in it is reported as unknown,
never matched to a similar name). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

for _key, _value in {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "VLLM_CPU_KVCACHE_SPACE": "1",
                     "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1",
                     "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_key, _value)

# Peak DRAM bandwidth in bytes/s from the vendors' data sheets, keyed by the exact name torch.cuda reports.
# Exact names only: "H100" alone would also match the H100 PCIe (2.0 TB/s, not 3.35) and "L4" the L40S, so
# anything not listed here is reported as unknown rather than guessed from a substring.
PEAK_BANDWIDTH = {
    "NVIDIA H200": 4.8e12,
    "NVIDIA H200 NVL": 4.8e12,
    "NVIDIA H100 80GB HBM3": 3.35e12,  # SXM5
    "NVIDIA H100 NVL": 3.9e12,
    "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA A100-SXM4-80GB": 2.039e12,
    "NVIDIA A100-SXM4-40GB": 1.555e12,
    "NVIDIA A100 80GB PCIe": 1.935e12,
    "NVIDIA A100-PCIE-40GB": 1.555e12,
    "NVIDIA L40S": 0.864e12,
    "NVIDIA L4": 0.3e12,
    "NVIDIA A10G": 0.6e12,
    "NVIDIA A10": 0.6e12,
    "Tesla T4": 0.32e12,
    "Tesla V100-SXM2-16GB": 0.9e12,
    "Tesla V100-SXM2-32GB": 0.9e12,
}


def peak_bandwidth(device_name: str) -> float | None:
    """The data-sheet peak for exactly this device name, or None (unknown) — never a near match."""
    return PEAK_BANDWIDTH.get(device_name.strip())


def build_tiny(path: str) -> None:
    from dsmath.config import ModelConfig
    from dsmath.tasks.arithmetic import direct_solution, generate_split
    from dsmath.tiny import build_model, train_tokenizer

    problems = generate_split("train", 2000, seed=0)
    texts = [f"Q: {p.question}\nA: {direct_solution(p)}" for p in problems]
    tok = train_tokenizer(texts, ModelConfig().vocab_size, path)
    build_model(ModelConfig(), tok).save_pretrained(path)


def make_requests(num_prompts: int, n: int, max_new_tokens: int):
    from dsmath.prompts import format_prompt
    from dsmath.records import GenerationRequest, Problem, SamplingParams

    out = []
    for i in range(num_prompts):
        question = f"Tom has {i + 3} apples and buys {2 * i + 1} more. How many apples does he have?"
        prompt = format_prompt(question, "tiny")
        out.append(GenerationRequest(f"r{i}", Problem(f"r{i}", question, str(3 * i + 4)), prompt,
                                     SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new_tokens)))
    return out


def timed(fn, repeats: int) -> tuple[float, int]:
    fn()  # warm-up
    times, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), tokens


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="HF model folder (default: a freshly built tiny Qwen2 with random "
                                                     "weights, so completions run to near max length)")
    parser.add_argument("--prompts", type=int, default=32, help="number of prompts per generate call")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="max completion length")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per path (median reported)")
    parser.add_argument("--skip-hf", action="store_true", help="leave out the HF generate line")
    return parser.parse_args()


def time_direct_and_in_process(model_dir: str, rollout_cfg, requests, repeats: int) -> tuple[dict[str, dict], int]:
    """1. vLLM directly, with the generator's engine settings, and the in-process Generator on the same engine,
    interleaved. Returns ({"vllm_direct": ..., "generator_in_process": ...}, decode steps of the last direct
    batch = its longest completion). Both entries carry the token count of the last timed call. The engine is
    released before returning."""
    from actors.generator import Generator

    direct = Generator(model_dir, rollout_cfg, generator_id="direct", seed=0)
    params = [direct._vllm_params(r.sampling, n=r.sampling.n, max_tokens=r.sampling.max_new_tokens) for r in requests]

    longest = [0]  # decode steps of a batch = its longest completion

    def run_direct() -> int:
        outs = direct.llm.generate([r.prompt for r in requests], params, use_tqdm=False)
        longest[0] = max(len(c.token_ids) for o in outs for c in o.outputs)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    def run_wrapped() -> int:
        return sum(len(r.completion_ids) for r in direct.generate(requests))

    # Interleaved, so that load from other processes hits both alike.
    run_direct(), run_wrapped()
    t_direct, t_wrapped = [], []
    for _ in range(repeats):
        for fn, times in ((run_direct, t_direct), (run_wrapped, t_wrapped)):
            start = time.perf_counter()
            tokens = fn()
            times.append(time.perf_counter() - start)
    results = {"vllm_direct": {"seconds": statistics.median(t_direct), "tokens": tokens},
               "generator_in_process": {"seconds": statistics.median(t_wrapped), "tokens": tokens}}
    del direct
    import gc

    gc.collect()
    return results, longest[0]


def time_generator_actor(model_dir: str, rollout_cfg, requests, repeats: int, on_gpu: bool) -> dict:
    """2. The same through the Generator Ray actor (records, log-probs, Ray serialisation), in a Ray instance
    started and shut down here."""
    import ray

    ray.init(num_cpus=2, num_gpus=1 if on_gpu else 0, include_dashboard=False, log_to_driver=False)
    from actors.generator import generator_actor_class

    actor = generator_actor_class(num_cpus=1, num_gpus=1 if on_gpu else 0).remote(
        model_dir, rollout_cfg, generator_id="actor", seed=0)

    def run_actor() -> int:
        rollouts = ray.get(actor.generate.remote(requests, None))
        return sum(len(r.completion_ids) for r in rollouts)

    seconds, tokens = timed(run_actor, repeats)
    ray.kill(actor)
    ray.shutdown()
    return {"seconds": seconds, "tokens": tokens}


def time_hf_generate(model_dir: str, requests, args: argparse.Namespace, on_gpu: bool) -> tuple[int, dict | None]:
    """3. HF generate (padded batch, sampling, same lengths). Returns (the model's parameter bytes, the timing or
    None with ``--skip-hf``); the model is loaded either way, for the parameter bytes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    param_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    if args.skip_hf:
        return param_bytes, None
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    device = "cuda" if on_gpu else "cpu"
    hf.to(device)
    batch = tok([r.prompt for r in requests], return_tensors="pt", padding=True).to(device)

    def run_hf() -> int:
        with torch.no_grad():
            out = hf.generate(**batch, do_sample=True, temperature=1.0, max_new_tokens=args.max_new_tokens,
                              num_return_sequences=args.n, pad_token_id=tok.pad_token_id)
        completion = out[:, batch["input_ids"].shape[1]:]
        return int((completion != tok.pad_token_id).sum())

    seconds, tokens = timed(run_hf, max(1, args.repeats // 2))
    return param_bytes, {"seconds": seconds, "tokens": tokens}


def decode_bandwidth(device_name: str, param_bytes: int, decode_steps: int, seconds: float) -> dict:
    """Every decode step of the batch reads all weights once; KV-cache and activation traffic and the prefill
    are not modelled, so this is a lower bound on the bytes moved (and on the utilisation)."""
    peak = peak_bandwidth(device_name)
    achieved = param_bytes * decode_steps / seconds
    return {"achieved_gb_s": achieved / 1e9, "peak_gb_s": None if peak is None else peak / 1e9,
            "utilisation": None if peak is None else achieved / peak, "decode_steps": decode_steps,
            "device_in_table": peak is not None}


def print_card(args: argparse.Namespace, device_name: str, param_bytes: int, results: dict[str, dict],
               overhead: float, wrapper_overhead: float, bandwidth: dict | None) -> None:
    print("=" * 68)
    print(f"rollout bench  device={device_name}  prompts={args.prompts} n={args.n} "
          f"max_new_tokens={args.max_new_tokens} params={param_bytes / 4 / 1e6:.2f}M")
    print("-" * 68)
    print(f"{'path':<22}{'seconds':>10}{'tokens':>10}{'tokens/s':>12}{'vs direct':>12}")
    base = results["vllm_direct"]["tokens_per_s"]
    for name, r in results.items():
        print(f"{name:<22}{r['seconds']:>10.3f}{r['tokens']:>10d}{r['tokens_per_s']:>12.1f}"
              f"{r['tokens_per_s'] / base:>11.2f}x")
    print("-" * 68)
    print(f"generator actor overhead vs direct vLLM: {overhead * 100:+.1f}% (aim < 5%); "
          f"of which the Generator wrapper in-process: {wrapper_overhead * 100:+.1f}%")
    if bandwidth is not None:
        util = (f"unknown ({device_name!r} is not in the bandwidth table)" if bandwidth["utilisation"] is None
                else f"{bandwidth['utilisation'] * 100:.1f}% of {bandwidth['peak_gb_s']:.0f} GB/s")
        print(f"decode memory bandwidth (weights only, a lower bound): {bandwidth['achieved_gb_s']:.1f} GB/s over "
              f"{bandwidth['decode_steps']} decode steps, utilisation {util}")
    print("=" * 68)


def main() -> int:
    args = parse_args()

    import torch

    on_gpu = torch.cuda.is_available()
    model_dir = args.model
    if not model_dir:
        model_dir = tempfile.mkdtemp(prefix="bench_rollout_")
        build_tiny(model_dir)
    requests = make_requests(args.prompts, args.n, args.max_new_tokens)
    from dsmath.config import RolloutConfig

    rollout_cfg = RolloutConfig(kv_cache_space_gib=1)
    results, decode_steps = time_direct_and_in_process(model_dir, rollout_cfg, requests, args.repeats)
    results["generator_actor"] = time_generator_actor(model_dir, rollout_cfg, requests, args.repeats, on_gpu)
    param_bytes, hf = time_hf_generate(model_dir, requests, args, on_gpu)
    if hf is not None:
        results["hf_generate"] = hf

    for r in results.values():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
    # Compare per generated token: sampled lengths differ a little between runs.
    overhead = results["vllm_direct"]["tokens_per_s"] / results["generator_actor"]["tokens_per_s"] - 1.0
    wrapper_overhead = results["vllm_direct"]["tokens_per_s"] / results["generator_in_process"]["tokens_per_s"] - 1.0
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    bandwidth = None
    if on_gpu:
        bandwidth = decode_bandwidth(device_name, param_bytes, decode_steps, results["vllm_direct"]["seconds"])

    print_card(args, device_name, param_bytes, results, overhead, wrapper_overhead, bandwidth)
    print(json.dumps({"bench": "rollout", "device": device_name, "prompts": args.prompts, "n": args.n,
                      "max_new_tokens": args.max_new_tokens, "results": results,
                      "actor_overhead": overhead, "wrapper_overhead": wrapper_overhead, "bandwidth": bandwidth}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
