"""``dsmath iterate``: iterative GRPO (paper Algorithm 1) — GRPO and reward-model training in turns."""

from __future__ import annotations

import argparse

HELP = "iterative GRPO: reset the reference, M GRPO steps, continue training the reward model; repeat"
DESCRIPTION = """Iterative GRPO (DeepSeekMath §4.1.4, Algorithm 1).

First a reward model is trained on samples of the starting policy (skipped when reward.model_path is set).
Then, for each of --iterations: the reference model is reset to the current policy, `steps` GRPO steps run
with rewards from the current reward model (combined with the rule reward as reward.combine says), and the
reward model continues training on fresh samples of the new policy mixed with rm.replay_fraction (10 %) of
all earlier rounds' examples. Every iteration's models and metrics are kept.

examples:
  dsmath iterate --iterations 2 steps=10
  dsmath iterate --iterations 3 --kind outcome steps=20 rm.questions=128

RUN_DIR defaults to runs/iterate_<preset run dir name> (runs/iterate_tiny_cpu), apart from `dsmath train`'s.
A RUN_DIR that already holds iterations is refused unless --overwrite.

writes RUN_DIR/{iter-0/rm/, iter-K/ (a dsmath train run), iter-K/rm/, iterations.json, summary.json}; points
runs/latest (the run dir's parent's `latest` link) at RUN_DIR and RUN_DIR/latest at the iteration in progress
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides; steps = M per iteration")
    p.add_argument("--config", default="tiny_cpu", help="preset name or YAML path")
    p.add_argument("--iterations", type=int, default=2, help="number of iterations I (default 2)")
    p.add_argument("--kind", choices=("process", "outcome"), default="process",
                   help="reward model: process (PRM, process-supervision GRPO; default) or outcome (ORM)")
    p.add_argument("--run-dir", help="where every iteration goes (default: runs/iterate_<the config's run_dir name>)")
    p.add_argument("--overwrite", action="store_true", help="start again in a run dir that holds iterations")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines instead)")


def own_run_dir(train_run_dir: str) -> str:
    """``dsmath iterate``'s default run directory beside the preset's (train's) one: runs/x -> runs/iterate_x."""
    from pathlib import Path

    return str(Path(train_run_dir).with_name(f"iterate_{Path(train_run_dir).name}"))


def run(args: argparse.Namespace) -> int:
    from dsmath.config import load_config, parse_overrides, with_overrides
    from dsmath.errors import UserError

    if args.iterations < 1:
        raise UserError(f"--iterations: must be >= 1, got {args.iterations}")
    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    cfg = load_config(args.config, overrides)
    if not any(key == "run_dir" for key, _ in parse_overrides(overrides)):  # not train's directory
        cfg = with_overrides(cfg, [f"run_dir={own_run_dir(cfg.run_dir)}"])
    from wiring.iterative import iterate

    s = iterate(cfg, iterations=args.iterations, kind=args.kind, progress=not args.no_progress,
                overwrite=args.overwrite)
    print(f"iterative GRPO, {s['iterations']} iterations x {s['steps_per_iteration']} steps ({s['kind']} RM): "
          f"held-out greedy accuracy on {s['heldout_size']} problems {s['heldout_accuracy_before']:.1%} -> "
          f"{s['heldout_accuracy_after']:.1%}; {s['samples_trained']} GRPO samples, {s['rm_samples']} RM-labelling "
          f"samples; {s['wall_seconds']:.0f} s; {cfg.run_dir}/summary.json")
    return 0
