"""``dsmath train``: online GRPO on Ray (also the ``ray job submit`` entrypoint)."""

from __future__ import annotations

import argparse

HELP = "online GRPO: vLLM generators + reward workers + DeepSpeed learner on Ray"
DESCRIPTION = """Online GRPO (DeepSeekMath §4) on a Ray cluster.

With no arguments it runs the tiny_cpu preset end to end on a laptop-class CPU: the tiny-model
bootstrap (cached), held-out accuracy before, GRPO steps, held-out accuracy after. It joins an
existing cluster when RAY_ADDRESS or --address is given, and starts a local one otherwise.

examples:
  dsmath train
  dsmath train --config deepseekmath_7b model.path=/models/deepseek-math-7b-instruct data.train=q.jsonl
  dsmath train algorithm.beta=0.0 rollout.group_size=16 steps=100
  dsmath train --config deepseekmath_7b --dry-run        # the memory plan per GPU; starts nothing
  dsmath train --resume --run-dir runs/tiny_cpu          # the run as it was started (RUN_DIR/config.yaml)
  dsmath train --resume --run-dir runs/tiny_cpu steps=40 # a resume may change steps, cadences, ports only
  dsmath train --overwrite --run-dir runs/tiny_cpu       # start again in a directory that holds a run
  ray job submit --address http://HEAD:8265 --working-dir . -- dsmath train --config deepseekmath_7b

On GPU configs (learner.gpus_per_rank > 0 or rollout.gpus_per_generator > 0) the memory plan
(dsmath.memory_plan: weights, gradients, optimizer state, reference, activations, logits, vLLM KV cache per
GPU) is checked before anything starts; a config whose estimate exceeds learner.gpu_memory_gb /
rollout.gpu_memory_gb is refused in one line naming the biggest term and the setting that would fix it.

With storage=URI (file:///abs/path, s3://bucket/prefix) checkpoints and run files are also copied there, and
--resume storage=URI fetches them when RUN_DIR holds no intact checkpoint (no shared filesystem needed).

--resume runs the config saved in RUN_DIR/config.yaml (the --config preset is not read); an override that
changes it is refused naming the key, except the keys a resume may change (steps, eval_every,
checkpoint_every, keep_checkpoints, status settings, ray_address, ...: dsmath.run_dir.MUTABLE_ON_RESUME),
which are recorded in RUN_DIR/config_changes.jsonl with the step they take effect. It starts from the newest
checkpoint that matches its manifest (a damaged newer one is said and skipped); a finished run is said and
left alone. A fresh run into a directory holding a run is refused unless --overwrite.

writes RUN_DIR/{config.yaml, metrics.jsonl, tensorboard/, checkpoints/, summary.json, status.json, logs/} and
points the run dir's parent's `latest` link (runs/latest) at RUN_DIR. logs/ holds the libraries' log lines (vLLM,
Ray, DeepSpeed: driver.log, worker-PID.log per Ray worker); --verbose prints them on the terminal instead. A local
Ray cluster started here ends with the command, also when it is killed.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. algorithm.beta=0.04")
    p.add_argument("--config", default="tiny_cpu", help="preset name (tiny_cpu, deepseekmath_7b) or a YAML path")
    p.add_argument("--run-dir", help="where metrics, checkpoints and summary.json go (default: the config's run_dir)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else start a local cluster)")
    p.add_argument("--steps", type=int, help="number of GRPO steps (same as steps=N)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its newest intact checkpoint, with its saved config")
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh in a run dir that holds a run (its files are removed first)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory plan per learner and generator GPU and exit (0 if it fits, 2 if not); "
                        "starts nothing")


def run(args: argparse.Namespace) -> int:
    from dsmath.config import load_config
    from dsmath.errors import UserError

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.address:
        overrides.append(f"ray_address={args.address}")
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite: choose one (continue the run, or replace it)")
    cfg = resumed_config(args, overrides) if args.resume else load_config(args.config, overrides)
    if args.dry_run:
        return dry_run(cfg)
    if cfg.learner.gpus_per_rank > 0 or cfg.rollout.gpus_per_generator > 0:
        from dsmath.memory_plan import check

        check(cfg)  # a one-line ConfigError before Ray, vLLM or DeepSpeed start
    from wiring.driver import train

    summary = train(cfg, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    before, after = summary["heldout_accuracy_before"], summary["heldout_accuracy_after"]
    print(
        f"held-out greedy accuracy on {summary['heldout_size']} problems: "
        f"{before:.1%} before RL -> {after:.1%} after {summary['steps']} GRPO steps "
        f"({after - before:+.1%}); {summary['wall_seconds']:.0f} s; summary: {summary['summary_path']}"
    )
    return 0


def resumed_config(args: argparse.Namespace, overrides: list[str]):
    """The run's saved ``RUN_DIR/config.yaml`` with ``overrides`` applied (the driver refuses those that change
    what may not change). RUN_DIR is --run-dir / ``run_dir=``, else the preset's; nothing is created."""
    from dsmath.config import load_config, parse_overrides
    from dsmath.run_dir import saved_config_path

    given = dict(parse_overrides(overrides))  # the last of a repeated key wins
    run_dir = str(given["run_dir"]) if "run_dir" in given else load_config(args.config, overrides).run_dir
    if given.get("storage"):  # a run kept in storage: its files and newest checkpoint, unless already here
        from wiring.console import log
        from wiring.run_storage import restore

        restore(run_dir, str(given["storage"]), log)
    return load_config(str(saved_config_path(run_dir)), overrides)


def dry_run(cfg) -> int:
    """Print the memory plan; refuse (ConfigError, exit 2) after the table when a GPU's estimate does not fit."""
    from dsmath.memory_plan import check, format_plan, plan

    memory = plan(cfg)
    print(format_plan(memory), flush=True)
    check(cfg, memory)
    return 0
