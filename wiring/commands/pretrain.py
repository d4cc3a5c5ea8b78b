"""``dsmath pretrain``: continued pre-training (LM loss) on a weighted mixture of document shards."""

from __future__ import annotations

import argparse

HELP = "continued pre-training on a weighted mixture of JSONL/Parquet document shards (DeepSpeed, LM loss)"
DESCRIPTION = """Continued pre-training (DeepSeekMath §2.3) with the DeepSpeed learner in LM mode.

Sources are named shard lists (JSONL(.gz), Parquet or JSON records with a text field; the corpus
pipeline's OUT/corpus/*.parquet among them) with weights. The mixture picks a source per chunk of
data.chunk_tokens tokens, by weight, from a seeded generator; documents end with EOS and are packed
into data.seq_len rows. Labels never cross a document boundary (the loss mask drops them); attention
is plain causal, so a document may attend to earlier documents in its row. Shards are streamed:
memory does not grow with the corpus. The data position is part of every checkpoint, so --resume
continues the token stream exactly. The realised token share per source is logged (mixture/NAME).

presets: pretrain_tiny_cpu (default; tiny model, ../shared/data, CPU), pretrain_deepseekmath_base
         (the paper's 56/4/10/20/10 mixture on a GPU cluster; see its header)

examples:
  dsmath pretrain
  dsmath pretrain data.sources.news.weight=0 optim.steps=50 --run-dir runs/pt_math
  dsmath pretrain --config my_mix.yaml data.sources.mined.paths=[runs/corpus/corpus]
  dsmath pretrain --stop-after 100 --run-dir runs/pt   # later: dsmath pretrain --resume --run-dir runs/pt

writes RUN_DIR/{config.yaml, metrics.jsonl, checkpoints/step-N (HF folder + DeepSpeed state + data position;
the newest keep_checkpoints, default 2, are kept), summary.json} and, when model.path is empty, RUN_DIR/init (tokenizer + initial weights)
"""


# What `dsmath pretrain --resume` may change (recorded in RUN_DIR/config_changes.jsonl); the rest is refused.
MUTABLE_ON_RESUME = ("run_dir", "optim.steps", "checkpoint_every", "keep_checkpoints", "eval.eval_every")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. data.sources.math.weight=0.5 optim.steps=100")
    p.add_argument("--config", default="pretrain_tiny_cpu",
                   help="preset name (pretrain_tiny_cpu, pretrain_deepseekmath_base) or a YAML path")
    p.add_argument("--run-dir", help="where metrics, checkpoints and summary.json go (same as run_dir=...)")
    p.add_argument("--steps", type=int, help="optimizer steps in total (same as optim.steps=N)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run dir's newest intact checkpoint (weights, optimizer, data position) "
                        "with its saved config.yaml; only optim.steps, checkpoint_every, keep_checkpoints, "
                        "eval.eval_every may change")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after step N of the optim.steps schedule (checkpointed; --resume continues it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from dsmath.pretrain.config import load_pretrain_config

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.steps is not None:
        overrides.append(f"optim.steps={args.steps}")
    cfg = load_pretrain_config(args.config, overrides)
    from dsmath.errors import UserError
    from dsmath.pretrain.data import check_paths, check_run_dir

    check_run_dir(cfg, args.resume)  # before the slow imports: a user mistake fails in a second
    changes: list[dict] = []
    if args.resume:  # the run as it was started: its saved config, changed only where a resume may change it
        from dsmath.config import to_dict
        from dsmath.run_dir import resume_changes, saved_config_path

        cfg = load_pretrain_config(str(saved_config_path(cfg.run_dir)), overrides)
        changes = resume_changes(cfg.run_dir, to_dict(cfg), mutable=MUTABLE_ON_RESUME)

    if args.stop_after is not None and args.stop_after < 1:
        raise UserError(f"--stop-after: {args.stop_after} must be >= 1")
    check_paths(cfg)
    _probe_shards(cfg)
    from dsmath.logs import log_to

    log_to(f"{cfg.run_dir}/logs/driver.log")  # while quiet (the default): the libraries' lines
    from learner.pretrain import run_pretrain

    s = run_pretrain(cfg, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress,
                     config_changes=changes)
    shares = ", ".join(f"{n} {s['mixture_realised'][n]:.1%} (weight {w:.1%})" for n, w in s["mixture_weights"].items())
    print(f"pretrain: {s['steps']} steps, {s['label_tokens']:,} trained tokens, loss {s['first_loss']:.3f} -> "
          f"{s['final_loss']:.3f} (mean of the last 10); {s['wall_seconds']:.0f} s")
    print(f"mixture realised: {shares}")
    for name, ev in s["eval"]["heldout"].items():
        print(f"held-out {name}: loss {ev['loss']:.3f} (ppl {ev['ppl']:.1f}) over {int(ev['tokens']):,} tokens")
    for bench, ev in s["eval"]["fewshot"].items():
        print(f"{bench} few-shot: {ev['accuracy']:.1%} ({ev['correct']}/{ev['n']})")
    skipped = {n: v for n, v in s["skipped_records"].items() if v["malformed"] or v["no_text"]}
    if skipped:
        print(f"skipped records (counted each pass): {skipped}")
    print(f"summary: {cfg.run_dir}/summary.json  checkpoint: {s['checkpoint']}")
    return 0


def _probe_shards(cfg) -> None:  # type: ignore[no-untyped-def]
    """Open every shard and read its first record, before the model loads: a shard that cannot be opened (wrong
    compression, UTF-16, not Parquet, a broken JSON file) is a one-line error in a second, not after set-up.
    Damage further into a shard is found while training (an error, or counted with data.skip_bad)."""
    from dsmath.pretrain.sources import expand_paths, iter_records

    for sources in (cfg.data.sources, cfg.eval.heldout):
        for src in sources.values():
            for f in expand_paths(src.paths):
                next(iter(iter_records(f)), None)
