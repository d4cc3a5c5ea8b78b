"""``dsmath eval``: greedy pass@1 and maj@k of a model on GSM8K/MATH-style JSONL (CoT, PoT, tool-integrated).

Also the Python entry point :func:`evaluate_model` (used by ``dsmath corpus evaluate`` for few-shot accuracy).
This is the wiring layer: it builds a vLLM ``actors.generator.Generator`` in-process and hands its ``generate``
to the pure harness in ``dsmath.evaluation``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

HELP = "evaluate a model: greedy pass@1 and maj@k (CoT, PoT, tool-integrated) on GSM8K/MATH-style JSONL"
DESCRIPTION = """Evaluate a model the DeepSeekMath way: one greedy completion per problem (pass@1) and, with --k,
k samples at --temperature whose answers vote (maj@k; equivalent answers grouped by dsmath.grading's math_equal).
Grading is lenient by default (--grading-mode): the answer a human grader reads, so a model that does not box its
answer is not scored as wrong for its format; --grading-mode strict is the training reward's rule.

Data: JSONL with a question ("question"/"problem") and a gold answer: GSM8K ("answer" ending in '#### N'), MATH
("solution" with \\boxed{}; its "level" and "type" give per-level and per-subject breakdowns) or plain
{"question", "answer"}. Prompts are the DeepSeekMath-Instruct templates (dsmath.prompts): cot asks for a
\\boxed{} answer; pot for a Python program whose last printed line is the answer (run in dsmath's sandbox); tool
interleaves reasoning and programs (the generator runs each ```python block and appends its ```output).

  dsmath eval --model runs/tiny_cpu/checkpoints/step-000040 --data gsm8k_test.jsonl math_test.jsonl --limit 100
  dsmath eval --model DIR --data math_test.jsonl --mode tool --k 16 --temperature 0.7
  dsmath eval --model BASE_DIR --data gsm8k_test.jsonl --fewshot 8          # base model, 8 shots from the file

Writes OUT/summary.json (all numbers, per dataset / level / subject) and OUT/samples.jsonl (every completion with
its verdict); prints a table. Few-shot examples come from --fewshot-file, or else from the first N records of each
data file, which are then not evaluated (said in the output)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="HF model folder with its tokenizer (a dsmath checkpoint is one; a run's checkpoints/ "
                        "folder means its latest checkpoint)")
    p.add_argument("--data", required=True, nargs="+", help="one or more question/answer JSONL(.gz) files")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many problems per file")
    p.add_argument("--shuffle", action="store_true",
                   help="with --limit: a random (--seed) subset instead of the first problems")
    p.add_argument("--mode", choices=("cot", "pot", "tool", "tiny"), default="cot",
                   help="chain-of-thought, program-of-thought or tool-integrated prompting (default cot); tiny: "
                        "the built-in arithmetic task's short 'Q: ... A:' template (dsmath's own tiny models)")
    p.add_argument("--k", type=int, default=4, help="samples per problem for maj@k and pass@k; 0: greedy only (default 4)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the k samples (default 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling for the k samples (default 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="generated tokens per completion, capped by the context left after the prompt (default 512)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed and --shuffle seed (default 0)")
    p.add_argument("--fewshot", type=int, default=0, metavar="N", help="worked examples before each question (default 0)")
    p.add_argument("--fewshot-file", default=None,
                   help="JSONL of worked examples (default: the first N records of each --data file, not evaluated)")
    p.add_argument("--max-tool-rounds", type=int, default=3, help="tool mode: program runs per completion (default 3)")
    p.add_argument("--timeout-s", type=float, default=5.0, help="limit per symbolic check and per program run (default 5)")
    p.add_argument("--grading-workers", type=int, default=1, help="sympy worker processes (default 1)")
    p.add_argument("--grading-mode", choices=("lenient", "strict"), default="lenient",
                   help="answer extraction (default lenient: a model not trained on dsmath's prompts is graded on the "
                        "answer a human would read — box, stated answer, else its last math span or number; strict: "
                        "only a stated answer counts, the training rewards' rule)")
    p.add_argument("--chunk-size", type=int, default=16, help="problems per generation call (default 16)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed JSONL lines (counted and reported)")
    p.add_argument("--out", default=None,
                   help="output folder for summary.json and samples.jsonl (default: MODEL/eval/MODE, or "
                        "runs/eval/NAME-MODE when the model folder is not writable)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (HOST:PORT, or 'auto' for the one RAY_ADDRESS / `ray start` names): run "
                        "the vLLM engine there as a Ray actor, on a GPU when the cluster has one (default: in this "
                        "process, no Ray). The model folder must be readable on that node and here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _default_out(model: Path, mode: str) -> Path:
    if os.access(model, os.W_OK):
        return model / "eval" / mode
    return Path("runs") / "eval" / f"{model.resolve().name}-{mode}"


def _check_settings(*, k: int, temperature: float, top_p: float, limit: int | None, fewshot: int,
                    max_new_tokens: int, max_tool_rounds: int, timeout_s: float, grading_workers: int,
                    chunk_size: int) -> None:
    from dsmath.errors import UserError

    checks = [
        (k >= 0, f"--k must be >= 0, got {k}"),
        (k == 0 or temperature > 0, f"--temperature must be > 0 for the --k samples, got {temperature}"),
        (0 < top_p <= 1, f"--top-p must be in (0, 1], got {top_p}"),
        (limit is None or limit >= 1, f"--limit must be >= 1, got {limit}"),
        (fewshot >= 0, f"--fewshot must be >= 0, got {fewshot}"),
        (max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {max_new_tokens}"),
        (max_tool_rounds >= 0, f"--max-tool-rounds must be >= 0, got {max_tool_rounds}"),
        (timeout_s > 0, f"--timeout-s must be > 0, got {timeout_s}"),
        (grading_workers >= 1, f"--grading-workers must be >= 1, got {grading_workers}"),
        (chunk_size >= 1, f"--chunk-size must be >= 1, got {chunk_size}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def load_eval_problems(paths: Sequence[str], *, limit: int | None, shuffle: bool, seed: int, mode: str,
                       fewshot: int, fewshot_file: str | None, skip_bad: bool = False):
    """(problems with meta["dataset"], few-shot prefix per dataset, notes to print) for ``paths``.

    Shots drawn from a data file (no ``fewshot_file``) are its first ``fewshot`` records and are not evaluated.
    """
    from dsmath.datasets import load_problems
    from dsmath.errors import UserError
    from dsmath.evaluation.fewshot import fewshot_prefix, load_shots

    problems, prefixes, notes = [], {}, []
    shared_prefix = fewshot_prefix(load_shots(fewshot_file, fewshot, mode), mode) if fewshot_file and fewshot else None
    names = [Path(p).name.split(".")[0] for p in paths]
    for path, name in zip(paths, names):
        if names.count(name) > 1:
            name = str(path)
        loaded, report = load_problems(path, skip_bad=skip_bad)
        notes.append(report.summary())
        if shared_prefix is not None:
            prefixes[name] = shared_prefix
        elif fewshot:
            prefixes[name] = fewshot_prefix(load_shots(path, fewshot, mode), mode)
            loaded = loaded[fewshot:]
            notes.append(f"{path}: records 1-{fewshot} are the few-shot examples and are not evaluated")
        else:
            prefixes[name] = ""
        if limit is not None and limit < len(loaded):
            loaded = random.Random(seed).sample(loaded, limit) if shuffle else loaded[:limit]
        if not loaded:
            raise UserError(f"{path}: no problems left to evaluate")
        problems += [replace(p, meta={**p.meta, "dataset": name}) for p in loaded]
    return problems, prefixes, notes


def evaluate_model(model: str, data: Sequence[str], *, mode: str = "cot", k: int = 4, temperature: float = 0.7,
                   top_p: float = 1.0, max_new_tokens: int = 512, seed: int = 0, limit: int | None = None,
                   shuffle: bool = False, fewshot: int = 0, fewshot_file: str | None = None,
                   max_tool_rounds: int = 3, timeout_s: float = 5.0, grading_workers: int = 1, chunk_size: int = 16,
                   grading_mode: str = "lenient", skip_bad: bool = False, out: str | None = None, progress: bool = True,
                   address: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Evaluate the HF model folder ``model`` on ``data`` files; returns the summary dict (see ``run_eval``).

    The summary's ``datasets[NAME]`` holds each file's ``pass@1``, ``maj@k``, ``pass@k``, ``by_level``,
    ``by_subject``; the top level the same over all files. With ``out`` set, writes ``summary.json`` and
    ``samples.jsonl`` there. For few-shot accuracy of a base model: ``evaluate_model(dir, [file], fewshot=4,
    k=0)["pass@1"]``. Raises ``UserError`` for bad paths and settings. Loads one vLLM engine (GPU if present):
    in this process, or with ``address`` as a Ray actor on that cluster (joining an already initialised Ray as is).
    """

    _check_settings(k=k, temperature=temperature, top_p=top_p, limit=limit, fewshot=fewshot,
                    max_new_tokens=max_new_tokens, max_tool_rounds=max_tool_rounds, timeout_s=timeout_s,
                    grading_workers=grading_workers, chunk_size=chunk_size)
    from dsmath.model_folder import model_folder

    # the data first: a damaged file fails in a second with its own line, before any model or cluster is touched
    problems, prefixes, notes = load_eval_problems(data, limit=limit, shuffle=shuffle, seed=seed, mode=mode,
                                                   fewshot=fewshot, fewshot_file=fewshot_file, skip_bad=skip_bad)
    for note in notes:
        log(f"dsmath eval: {note}")
    model_dir = model_folder(model, f"--model {model}")  # a run's checkpoints/ folder: its newest checkpoint
    if address:
        _check_reachable(address)

    from dsmath.config import RolloutConfig
    from dsmath.datasets import write_jsonl
    from dsmath.evaluation.harness import format_table

    t0 = time.perf_counter()
    rollout = RolloutConfig(mode="tool" if mode == "tool" else "cot", max_tool_rounds=max_tool_rounds)
    engine_class = _RemoteEngine if address else _LocalEngine
    engine = engine_class(address, str(model_dir), rollout, seed, timeout_s)
    try:
        load_s = time.perf_counter() - t0
        summary, outputs = _evaluate(engine, problems, prefixes, mode=mode, k=k, temperature=temperature,
                                     top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, fewshot=fewshot,
                                     chunk_size=chunk_size, timeout_s=timeout_s, grading_workers=grading_workers,
                                     grading_mode=grading_mode, progress=progress)
    finally:
        engine.close()
    summary["prompt_too_long"] = sum(o.summary["prompt_too_long"] for o in outputs)
    summary["truncated"] = sum(o.summary["truncated"] for o in outputs)
    summary["datasets"] = {name: part for o in outputs for name, part in o.summary["datasets"].items()}
    summary["settings"] = {**outputs[0].summary["settings"], "fewshot": fewshot, "fewshot_file": fewshot_file,
                           "limit": limit, "shuffle": shuffle, "max_tool_rounds": max_tool_rounds,
                           "engine": engine.where}
    summary["model"] = str(model_dir)
    summary["data"] = [str(d) for d in data]
    summary["seconds"] = {"load": round(load_s, 3),
                          "generate": round(sum(o.summary["seconds"]["generate"] for o in outputs), 3),
                          "grade": round(sum(o.summary["seconds"]["grade"] for o in outputs), 3),
                          "total": round(time.perf_counter() - t0, 3)}
    if out is not None:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(out_dir / "summary.json")
        write_jsonl(out_dir / "samples.jsonl", (row for o in outputs for row in o.rows))
        summary["out"] = str(out_dir)
    summary["table"] = format_table(summary)
    return summary


class _LocalEngine:
    """The vLLM Generator in this process."""

    where = "local"

    def __init__(self, address: None, model_dir: str, rollout, seed: int, timeout_s: float) -> None:
        from actors.generator import Generator

        self.generator = Generator(model_dir, rollout, generator_id="eval", seed=seed, sandbox_timeout_s=timeout_s)
        self.max_model_len = self.generator.max_model_len
        self.tokenizer = self.generator.tokenizer

    def generate(self, requests, mode):
        return self.generator.generate(requests, mode=mode)

    def close(self) -> None:
        self.generator = None


def _check_reachable(address: str) -> None:
    """Fail fast (UserError) when a HOST:PORT address does not accept connections: Ray itself retries for minutes."""
    import socket

    from dsmath.errors import UserError

    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # 'auto', 'local' or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=5.0).close()
    except OSError as exc:
        raise UserError(f"--address {address}: nothing answers there ({exc})") from None


class _RemoteEngine:
    """The vLLM Generator as a Ray actor on the cluster at ``address`` (a GPU one when the cluster has GPUs)."""

    def __init__(self, address: str, model_dir: str, rollout, seed: int, timeout_s: float) -> None:
        import ray
        from transformers import AutoTokenizer

        from actors.generator import generator_actor_class

        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                from dsmath.errors import UserError

                raise UserError(f"--address {address}: no Ray cluster there ({type(exc).__name__}: {exc})") from None
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        self.where = f"ray actor ({'1 GPU' if gpus else 'CPU'})"
        self.actor = generator_actor_class(num_cpus=1.0, num_gpus=gpus).remote(
            model_dir, rollout, generator_id="eval", seed=seed, sandbox_timeout_s=timeout_s)
        self.max_model_len = ray.get(self.actor.__ray_call__.remote(lambda gen: gen.max_model_len))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)  # prompt lengths, counted here

    def generate(self, requests, mode):
        import ray

        return ray.get(self.actor.generate.remote(list(requests), None, mode))

    def close(self) -> None:
        import ray

        ray.kill(self.actor)
        if self._started_ray:
            ray.shutdown()


def _evaluate(engine, problems, prefixes, *, mode, k, temperature, top_p, max_new_tokens, seed, fewshot, chunk_size,
              timeout_s, grading_workers, progress, grading_mode="lenient"):
    """(summary over all files, per-file EvalOutputs): one run_eval per file (each has its own few-shot prefix)."""
    from tqdm import tqdm

    from dsmath.evaluation.aggregate import summarize
    from dsmath.evaluation.fewshot import fewshot_stop
    from dsmath.evaluation.harness import EvalSettings, run_eval
    from dsmath.grading import GradingPool, math_equal

    def count_tokens(text: str) -> int:
        return len(engine.tokenizer(text)["input_ids"])  # with special tokens: what the engine will see, or more

    outputs = []
    with GradingPool(grading_workers, timeout_s=timeout_s) as pool, \
            tqdm(total=len(problems), desc=f"eval {mode}", unit="problem", file=sys.stderr,
                 disable=None if progress else True) as bar:
        for name in dict.fromkeys(p.meta["dataset"] for p in problems):
            part = [p for p in problems if p.meta["dataset"] == name]
            settings = EvalSettings(mode=mode, k=k, temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens, seed=seed, prefix=prefixes[name],
                                    stop=fewshot_stop(fewshot), chunk_size=chunk_size, timeout_s=timeout_s,
                                    grading_mode=grading_mode)
            outputs.append(run_eval(part, engine.generate, settings, grading_pool=pool, count_tokens=count_tokens,
                                    max_model_len=engine.max_model_len, progress=bar.update))
        # one summary over every file (the prefixes differ per file; the counting does not)
        summary = summarize([p for o in outputs for p in o.problems], [c for o in outputs for c in o.completions],
                            [v for o in outputs for v in o.verdicts],
                            equal=lambda a, b: math_equal(a, b, pool=pool, timeout_s=timeout_s))
    return summary, outputs


def run(args: argparse.Namespace) -> int:
    from dsmath.logs import log_to

    out = args.out or str(_default_out(Path(args.model), args.mode))
    log_to(Path(out) / "logs" / "driver.log")  # created at its first line: a refused eval (bad data) writes nothing
    summary = evaluate_model(
        args.model, args.data, mode=args.mode, k=args.k, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, seed=args.seed, limit=args.limit, shuffle=args.shuffle,
        fewshot=args.fewshot, fewshot_file=args.fewshot_file, max_tool_rounds=args.max_tool_rounds,
        timeout_s=args.timeout_s, grading_workers=args.grading_workers, chunk_size=args.chunk_size,
        grading_mode=args.grading_mode,
        skip_bad=args.skip_bad, out=out, progress=not args.no_progress, address=args.address,
        log=lambda line: print(line, flush=True),
    )
    table = summary.pop("table")
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        print(table)
        print(f"dsmath eval: {summary['problems']} problems, mode {args.mode}, k={summary['k']}; "
              f"pass@1 {100 * summary['pass@1']:.1f}%"
              + (f", maj@{summary['k']} {100 * summary['maj@k']:.1f}%" if summary["maj@k"] is not None else "")
              + f"; {summary['seconds']['total']:.1f}s; wrote {summary['out']}/summary.json and samples.jsonl")
    return 0
