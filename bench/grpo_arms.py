"""The arms of bench/grpo_vs_trl.py; each runs in a fresh Python process started by the bench.

    python bench/grpo_arms.py ARM SPEC.json OUT.json        ARM: trl | sync | async | gate

An arm reads the shared spec (model folder, matched settings, the exact training questions in order, the
held-out questions), trains for ``steps`` optimizer steps and writes per-step wall times, the time split,
completion-token counts and its held-out greedy accuracy. Step wall times are the gaps between consecutive
step-end timestamps, so the first step (warm-up, first-call allocation) is never timed.

Held-out accuracy: dsmath arms report the driver's own evaluation (greedy vLLM, dsmath.grading strict, the
first ``eval_size`` held-out questions); the TRL arm saves its final model and runs the same evaluation
(the in-process Generator, same greedy settings, same grader) on it, and on the starting model as a
cross-check that both evaluators give the same "before" number.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dsmath.env import apply_cpu_env_defaults  # noqa: E402 - before torch/ray/vllm are imported

apply_cpu_env_defaults()

from grpo_loss_gate import MatchedSettings, loss_gate, trl_config  # noqa: E402

# Driver stages that make up "train" in the card's split (the rest: rollout = generate, weight_sync = sync).
TRAIN_STAGES = ("time/advantages", "time/old_logprobs", "time/ref_logprobs", "time/update")


def mark_trained(spec: dict) -> None:
    """Tell the bench's memory sampler that training is over (evaluation's extra engine is not counted)."""
    if spec.get("trained_marker"):
        Path(spec["trained_marker"]).write_text(str(time.time()))


def _match(spec: dict) -> MatchedSettings:
    return MatchedSettings(**spec["match"])


def _step_rows(stamps: list[float], splits: list[dict], tokens: list[int]) -> list[dict]:
    """Rows for steps 2..N: wall = gap between step-end stamps."""
    rows = []
    for i in range(1, len(stamps)):
        rows.append({"step": i + 1, "wall_s": stamps[i] - stamps[i - 1], "completion_tokens": tokens[i], **splits[i]})
    return rows


# ------------------------------------------------------------------------------------------------ dsmath


def driver_has_async() -> bool:
    """Whether the installed driver reads ``async`` settings at all (the arm is skipped otherwise)."""
    import inspect

    import wiring.driver as driver

    return "async_" in inspect.getsource(driver)


def run_dsmath(spec: dict, *, asynchronous: bool) -> dict:
    from dsmath.config import load_config
    from wiring.driver import train
    from dsmath.utils.metrics import read_metrics

    if asynchronous and not driver_has_async():
        return {"skipped": "the installed dsmath driver has no async mode (wiring/driver.py never reads async.*)"}
    match = _match(spec)
    run_dir = Path(spec["work_dir"]) / ("async" if asynchronous else "sync")
    overrides = list(spec["config_overrides"]) + match.dsmath_overrides() + [
        f"run_dir={run_dir}", f"steps={spec['steps']}", f"seed={spec['seed']}", f"eval_size={spec['eval_size']}",
        "eval_every=0", "checkpoint_every=0", "status.port=0"]
    if asynchronous:
        overrides += ["async.enabled=true", "async.max_staleness=1"]
    cfg = load_config("tiny_cpu", overrides)
    start = time.perf_counter()
    summary = train(cfg, progress=False)  # evaluations before and after included: they use the run's own engine
    wall = time.perf_counter() - start
    mark_trained(spec)
    import ray

    ray.shutdown()
    metrics = read_metrics(run_dir)
    stamps = [m["time"] for m in metrics]
    splits, tokens = [], []
    for m in metrics:
        train_s = sum(m.get(k, 0.0) for k in TRAIN_STAGES)
        split = {"reward_s": m.get("time/reward", 0.0), "train_s": train_s, "sync_s": m.get("time/weight_sync", 0.0)}
        if "time/rollout_wait" in m:  # async: generation overlaps training; the step only waits for what is left
            split.update(generate_s=m["time/rollout_wait"], generate_overlapped_s=m.get("time/rollout", 0.0))
        else:
            split["generate_s"] = m.get("time/rollout", 0.0)
        splits.append(split)
        tokens.append(round(m["response_length/mean"] * match.samples_per_step))
    staleness_keys = sorted({k for m in metrics for k in m if "stale" in k})
    max_staleness = max((m[k] for m in metrics for k in staleness_keys if m.get(k) is not None), default=0)
    out = {
        "steps": len(metrics), "samples": summary["samples_trained"], "rows": _step_rows(stamps, splits, tokens),
        "heldout_before": summary["heldout_accuracy_before"], "heldout_after": summary["heldout_accuracy_after"],
        "heldout_size": summary["heldout_size"], "arm_wall_s": wall, "setup_s": summary.get("setup_seconds"),
        "reward_mean_last": metrics[-1]["reward/mean"] if metrics else None,
        "staleness_metrics": staleness_keys, "max_staleness": max_staleness,
    }
    if asynchronous and not max_staleness:
        out["not_async"] = ("no step trained on samples from an older weight version (staleness metrics "
                            f"{staleness_keys or 'absent'}): async.enabled did not make the run asynchronous")
    return out


# --------------------------------------------------------------------------------------------------- TRL


def heldout_accuracy(model_dir: str, problems: list[dict], max_new_tokens: int, strict: bool = True) -> float:
    """Greedy pass@1 with the in-process Generator (vLLM, the driver's evaluation settings), dsmath.grading."""
    from actors.generator import Generator
    from dsmath.config import RolloutConfig
    from dsmath.grading import GradingPool
    from dsmath.prompts import format_prompt
    from dsmath.records import GenerationRequest, Problem, SamplingParams

    sampling = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
    requests = [GenerationRequest(f"h{i}", Problem(f"h{i}", p["question"], p["answer"]),
                                  format_prompt(p["question"], "tiny"), sampling) for i, p in enumerate(problems)]
    gen = Generator(model_dir, RolloutConfig(max_new_tokens=max_new_tokens), generator_id="eval", seed=0)
    rollouts = gen.generate(requests)
    with GradingPool(1, mode="strict" if strict else "lenient") as pool:
        verdicts = pool.grade_many([(r.completion, r.problem.answer) for r in rollouts])
    del gen
    return sum(v.correct for v in verdicts) / max(1, len(verdicts))


def _trl_reward_fn(reward_cfg, grader):
    """The reward function handed to TRL, graded by ``grader`` (a dsmath GradingPool)."""
    def reward_fn(completions, answer, **_kwargs) -> list[float]:
        """dsmath's reward worker rule: correct / incorrect reward, minus the format penalty when nothing is
        extracted (the grading itself is dsmath.grading, as on the dsmath side)."""
        out = []
        for v in grader.grade_many(list(zip(completions, answer))):
            r = reward_cfg.correct_reward if v.correct else reward_cfg.incorrect_reward
            if v.extracted is None and not v.correct:
                r -= reward_cfg.format_penalty
            out.append(float(r))
        return out

    return reward_fn


def _timed_trainer_class(GRPOTrainer: type, split: dict):
    """``GRPOTrainer`` with its generation and reward calls timed into ``split`` (generate_s, reward_s, tokens)."""
    class TimedGRPOTrainer(GRPOTrainer):
        """Times generation and reward calls (TRL's own methods, unchanged) for the card's split."""

        def _generate_single_turn(self, *args, **kwargs):
            start = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(*args, **kwargs)
            split["generate_s"] += time.perf_counter() - start
            split["tokens"] += sum(len(c) for c in completion_ids)
            return completion_ids, logprobs

        def _calculate_rewards(self, *args, **kwargs):
            start = time.perf_counter()
            out = super()._calculate_rewards(*args, **kwargs)
            split["reward_s"] += time.perf_counter() - start
            return out

    return TimedGRPOTrainer


def _step_clock(split: dict, stamps: list, splits: list, tokens: list, trl_logs: list):
    """A TrainerCallback that, at each step's end, stamps the time and moves ``split`` into ``splits`` / ``tokens``
    (then zeroes it), and keeps every TRL log entry in ``trl_logs``."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.time())
            splits.append({"generate_s": split["generate_s"], "reward_s": split["reward_s"]})
            tokens.append(split["tokens"])
            split.update(generate_s=0.0, reward_s=0.0, tokens=0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                trl_logs.append(dict(logs))

    return StepClock()


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from dsmath.config import RewardConfig
    from dsmath.grading import GradingPool
    from dsmath.prompts import format_prompt

    torch.set_num_threads(spec["trl_threads"])
    match = _match(spec)
    reward_cfg = RewardConfig(**spec.get("reward", {}))
    model_dir = spec["model_dir"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [{"prompt": format_prompt(p["question"], "tiny"), "answer": p["answer"]} for p in spec["train_problems"]]
    grader = GradingPool(1, timeout_s=reward_cfg.timeout_s, mode="strict" if reward_cfg.strict else "lenient")
    split = {"generate_s": 0.0, "reward_s": 0.0, "tokens": 0}
    stamps, splits, tokens, trl_logs = [], [], [], []

    work = Path(spec["work_dir"]) / "trl"
    args = trl_config(match, str(work / "out"), max_steps=spec["steps"], seed=spec["seed"])
    trainer = _timed_trainer_class(GRPOTrainer, split)(
        model=model, reward_funcs=_trl_reward_fn(reward_cfg, grader), args=args,
        train_dataset=Dataset.from_list(rows), processing_class=tok,
        callbacks=[_step_clock(split, stamps, splits, tokens, trl_logs)])
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    mark_trained(spec)
    grader.close()
    final_dir = str(work / "final")
    trainer.save_model(final_dir)
    tok.save_pretrained(final_dir)
    step_walls = [b - a for a, b in zip(stamps, stamps[1:])]
    for i, s in enumerate(splits):  # the rest of a step is TRL's training work (ref logprobs, fwd/bwd, optimizer)
        if i:
            s["train_s"] = max(0.0, step_walls[i - 1] - s["generate_s"] - s["reward_s"])
            s["sync_s"] = 0.0  # HF generate samples from the training model itself
    heldout = spec["heldout_problems"]
    after = heldout_accuracy(final_dir, heldout, match.max_new_tokens, reward_cfg.strict)
    before = heldout_accuracy(model_dir, heldout, match.max_new_tokens, reward_cfg.strict)
    rewards = [entry["reward"] for entry in trl_logs if "reward" in entry]
    return {"steps": len(stamps), "samples": len(stamps) * match.samples_per_step,
            "rows": _step_rows(stamps, splits, tokens), "heldout_before": before, "heldout_after": after,
            "heldout_size": len(heldout), "arm_wall_s": wall, "reward_mean_last": rewards[-1] if rewards else None,
            "torch_threads": torch.get_num_threads()}


def run_gate(spec: dict) -> dict:
    return loss_gate(spec["model_dir"], _match(spec), num_prompts=4, seed=spec["seed"])


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("trl", "sync", "async", "gate"):
        print("usage: grpo_arms.py trl|sync|async|gate SPEC.json OUT.json", file=sys.stderr)
        return 2
    arm, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    if arm == "trl":
        result = run_trl(spec)
    elif arm == "gate":
        result = run_gate(spec)
    else:
        result = run_dsmath(spec, asynchronous=arm == "async")
    tmp = Path(out_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
