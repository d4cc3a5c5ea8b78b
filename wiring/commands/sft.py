"""``dsmath sft``: instruction-tune a model on prompt/response JSONL (loss on response tokens only)."""

from __future__ import annotations

import argparse

HELP = "supervised fine-tuning on prompt/response JSONL (CoT, PoT, tool-integrated)"
DESCRIPTION = """Supervised fine-tuning (DeepSeekMath-Instruct style). Loss on response tokens only.

Each JSONL line: {"prompt": "..."} or {"question": "..."} and {"response": "..."} (or "solution").
Formats: auto (default; tool ```output``` blocks masked when present), cot, pot, tool, raw.
A malformed line stops the run naming file:line; --skip-bad skips such lines and reports them.

  dsmath sft --data sft.jsonl --model runs/base --out runs/sft --steps 500 --lr 1e-5
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="JSONL(.gz) file of prompt/response records")
    p.add_argument("--model", required=True, help="HF model folder with a tokenizer")
    p.add_argument("--out", required=True, help="output folder (model + tokenizer + metrics.jsonl)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one epoch)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=None, help="rows per forward pass (default: batch size)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    p.add_argument("--max-length", type=int, default=512, help="tokens per example (prompt + response)")
    p.add_argument("--format", default="auto", choices=["auto", "raw", "cot", "pot", "tool"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad", action="store_true", help="skip malformed lines (counted and reported)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from dsmath.errors import UserError
    from learner.sft import load_sft_jsonl, run_sft, summary_line

    for name in ("steps", "batch_size", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.lr <= 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    examples, report = load_sft_jsonl(args.data, fmt=args.format, skip_bad=args.skip_bad)
    print(f"dsmath sft: {report.summary()}", flush=True)
    if not examples:
        raise UserError(f"{args.data}: no usable examples")
    from dsmath.model_folder import model_folder

    model_folder(args.model, f"--model {args.model}")  # after the data: its damage is named first, in a second
    from dsmath.logs import log_to

    log_to(f"{args.out}/logs/driver.log")  # while quiet (the default): the libraries' lines
    info = run_sft(
        args.model, examples, args.out, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
        fmt=args.format, max_length=args.max_length, warmup_steps=args.warmup_steps,
        micro_batch_size=args.micro_batch_size, metrics_dir=args.out, progress=not args.no_progress,
    )
    info["skipped_bad_lines"] = len(report.skipped)
    print(f"dsmath sft: saved {args.out}; loss {info['first_loss']:.4f} -> {info['final_loss']:.4f} "
          f"in {info['steps']} steps, {info['tokens_per_second']:.0f} tokens/s", flush=True)
    print(summary_line(info), flush=True)
    return 0
