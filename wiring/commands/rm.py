"""``dsmath rm train``: train an outcome or process reward model from the current policy's samples."""

from __future__ import annotations

import argparse

HELP = "reward models: train an outcome (ORM) or process (PRM, Math-Shepherd labels) reward model"
DESCRIPTION = """Reward-model training (DeepSeekMath §4.1; Math-Shepherd step labels).

dsmath rm train samples questions from the training split with the policy (vLLM), grades the completions with
dsmath.grading (or the sandbox for PoT) and trains a reward model on the same DeepSpeed learner as the policy:
  --kind outcome   one label per completion (correct or not), scored at its last token
  --kind process   one label per reasoning step (steps split at algorithm.step_delimiter): the policy completes
                   rm.completions_per_prefix times from every step prefix; a step is good if any
                   (rm.label=any) or most (rm.label=most) of those completions reach the gold answer
The model is the policy's transformer with a one-output token-classification head (initialised from --init,
default the policy). Sizes and the optimizer come from the rm.* config keys.

examples:
  dsmath rm train --kind process --out runs/prm
  dsmath rm train --kind outcome --out runs/orm rm.questions=128 rm.epochs=3
  dsmath rm train --kind process --out runs/prm2 --init runs/prm/checkpoint --history runs/prm/rm_data.jsonl
  dsmath train algorithm.advantage=process reward.model_kind=process reward.model_path=runs/prm/checkpoint

writes OUT/{rm_data.jsonl, metrics.jsonl, checkpoint/, rm_summary.json}
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="rm_command", metavar="ACTION")
    t = sub.add_parser("train", help="sample, label and train a reward model", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. rm.epochs=3")
    t.add_argument("--config", default="tiny_cpu", help="preset name or YAML path (the task, policy and rm.* keys)")
    t.add_argument("--kind", choices=("outcome", "process"), required=True, help="outcome (ORM) or process (PRM)")
    t.add_argument("--out", required=True, help="output folder (checkpoint/, rm_data.jsonl, metrics.jsonl, summary)")
    t.add_argument("--policy", help="policy folder or checkpoint to sample with (default: model.path, else the "
                                    "config's bootstrap model)")
    t.add_argument("--init", help="folder the reward model starts from (default: the policy; give an earlier RM "
                                  "checkpoint to continue training it)")
    t.add_argument("--history", nargs="*", default=[], metavar="JSONL",
                   help="earlier rounds' rm_data.jsonl: rm.replay_fraction of the training set is replayed from them")
    t.add_argument("--data", nargs="*", metavar="JSONL",
                   help="train on these labelled examples instead of sampling new ones from the policy")
    t.add_argument("--seed", type=int, help="sampling and shuffling seed (default: rm.seed)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from dsmath.config import load_config
    from dsmath.errors import UserError

    if args.rm_command != "train":
        raise UserError("say what to do: dsmath rm train --kind outcome|process --out DIR (see dsmath rm train --help)")
    cfg = load_config(args.config, list(args.overrides))
    from wiring.rm_pipeline import read_examples, rm_round, sample_problems

    # Read the user's files first: a bad line is reported before any model is built or loaded.
    history = read_examples(args.history)
    fresh = read_examples(args.data) if args.data else None
    from dsmath.logs import log_to

    log_to(f"{args.out}/logs/driver.log")  # while quiet (the default): the libraries' lines
    from wiring.task import load_task

    task = load_task(cfg)
    from dsmath.model_folder import model_folder

    policy = model_folder(args.policy, f"--policy {args.policy}") if args.policy else task.model_dir
    init = model_folder(args.init, f"--init {args.init}") if args.init else policy
    seed = cfg.rm.seed if args.seed is None else args.seed
    problems = sample_problems(task.train, cfg.rm.questions, seed)
    s = rm_round(cfg, policy_dir=policy, init_dir=init, out_dir=args.out, problems=problems,
                 prompt_mode=task.prompt_mode, kind=args.kind, history=history, fresh=fresh, seed=seed,
                 progress=not args.no_progress)
    print(f"{args.kind} reward model: {s['fresh_examples']} fresh + {s['replayed_examples']} replayed examples, "
          f"{s['optimizer_steps']} steps, loss {s['loss_first']:.3f} -> {s['loss_last']:.3f}, accuracy on fresh "
          f"labels {s['fresh_before']['accuracy']:.1%} -> {s['fresh_after']['accuracy']:.1%}; "
          f"checkpoint: {s['checkpoint']}")
    return 0
