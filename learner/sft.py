"""Supervised fine-tuning (instruction tuning, paper §3): loss on response tokens only.

Data: JSONL with a prompt (``prompt`` used verbatim, or ``question`` formatted with the chosen
template) and a response (``response`` | ``solution`` | ``output``). Formats:

* ``cot`` / ``pot``: the whole response is trained on (question → COT/POT template).
* ``tool`` (tool-integrated): every ```` ```output ... ``` ```` block — fences included, because
  the tool executor, not the model, writes them — is masked out of the loss.
* ``auto`` (default): ``prompt`` verbatim, ``question`` with the COT template, and output blocks
  masked whenever present. ``raw``: ``prompt`` verbatim, nothing masked.

A malformed line is a :class:`dsmath.datasets.DataError` naming file and line; ``skip_bad`` skips
and counts such lines instead (the report says how many and which).
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from dsmath.datasets import DataError, ReadReport, iter_jsonl
from dsmath.errors import UserError
from dsmath.model_folder import model_folder
from dsmath.prompts import format_prompt

FORMATS = ("auto", "raw", "cot", "pot", "tool")
PROMPT_KEYS = ("prompt", "question")
RESPONSE_KEYS = ("response", "solution", "output")
OUTPUT_BLOCK = re.compile(r"```output\b.*?(?:```|\Z)", re.S)


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str


def example_from_record(obj: dict, fmt: str = "auto") -> SFTExample:
    """Build an example from one JSON object; raises ``ValueError`` saying what is wrong."""
    if fmt not in FORMATS:
        raise UserError(f"unknown SFT format {fmt!r}; one of {', '.join(FORMATS)}")
    response = next((obj[k] for k in RESPONSE_KEYS if k in obj), None)
    if not isinstance(response, str) or not response:
        raise ValueError(f"'{'|'.join(RESPONSE_KEYS)}' must be a non-empty string")
    if isinstance(obj.get("prompt"), str):
        return SFTExample(obj["prompt"], response)
    question = obj.get("question")
    if not isinstance(question, str) or not question:
        raise ValueError("needs a string 'prompt' or 'question'")
    mode = {"auto": "cot", "raw": "cot"}.get(fmt, fmt)
    return SFTExample(format_prompt(question, mode), response)


def load_sft_jsonl(path: str | Path, *, fmt: str = "auto", skip_bad: bool = False) -> tuple[list[SFTExample], ReadReport]:
    """Read SFT examples; bad lines raise (naming file:line) or, with ``skip_bad``, are counted."""
    report = ReadReport(str(path))
    out: list[SFTExample] = []
    required = ("|".join(PROMPT_KEYS), "|".join(RESPONSE_KEYS))
    for obj in iter_jsonl(path, required=required, skip_bad=skip_bad, report=report):
        try:
            out.append(example_from_record(obj, fmt))
        except ValueError as exc:
            lineno = report.lines_read  # iter_jsonl has counted the line it just yielded
            if not skip_bad:
                raise DataError(f"{path}:{lineno}: {exc}") from None
            report.records -= 1
            report.skipped.append((lineno, str(exc)))
    return out, report


def masked_char_spans(response: str, fmt: str) -> list[tuple[int, int]]:
    """Character spans of ``response`` that must not be trained on (tool output blocks)."""
    if fmt in ("raw", "cot", "pot"):
        return []
    return [m.span() for m in OUTPUT_BLOCK.finditer(response)]


def tokenize_example(tokenizer, ex: SFTExample, fmt: str = "auto") -> tuple[list[int], list[int], list[int]]:
    """``(prompt_ids, response_ids + [eos], response loss mask)``; prompt and response are
    tokenized separately, as at generation time (the generator continues the prompt's tokens)."""
    prompt_ids = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
    enc = tokenizer(ex.response, add_special_tokens=False, return_offsets_mapping=True)
    spans = masked_char_spans(ex.response, fmt)
    mask = [0 if any(s < end and e > start for start, end in spans) else 1 for s, e in enc["offset_mapping"]]
    eos = tokenizer.eos_token_id
    if not prompt_ids:  # plain LM data: predict the first token from an EOS "document start"
        prompt_ids = [eos]
    return list(prompt_ids), list(enc["input_ids"]) + [eos], mask + [1]


def build_batch(tokenized: Sequence[tuple[list[int], list[int], list[int]]], pad_id: int, max_length: int | None = None):
    from learner.batch import collate_rollouts

    return collate_rollouts([t[0] for t in tokenized], [t[1] for t in tokenized], pad_id=pad_id,
                            loss_masks=[t[2] for t in tokenized], max_length=max_length)


def run_sft(
    model_dir: str | Path,
    examples: Iterable[SFTExample | dict],
    out_dir: str | Path,
    *,
    steps: int | None = None,
    lr: float = 1e-5,
    batch_size: int = 16,
    seed: int = 0,
    fmt: str = "auto",
    max_length: int = 512,
    warmup_steps: int | None = None,
    micro_batch_size: int | None = None,
    metrics_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Fine-tune the model in ``model_dir`` and save model + tokenizer to ``out_dir``.

    Each step draws ``batch_size`` examples from a seeded shuffle (reshuffled every epoch);
    ``steps`` None means one epoch. The lr warms up linearly (default 5 % of the steps), then
    follows a cosine to 10 %. Single process (world size 1). Returns a summary dict (loss curve,
    throughput, counts) that is also what :mod:`wiring.commands.sft` prints.
    """
    from dsmath.config import LearnerConfig
    from learner.objectives.lm import build_lm

    start = time.time()
    tokenizer, usable, too_long = _tokenized_examples(model_dir, examples, fmt, max_length, log)
    model_dir = model_folder(model_dir, str(model_dir))
    steps = steps if steps is not None else math.ceil(len(usable) / batch_size)
    warmup = warmup_steps if warmup_steps is not None else max(0, steps // 20)
    cfg = LearnerConfig(lr=lr, warmup_steps=warmup, grad_clip=1.0, zero_stage=0,
                        micro_batch_size=micro_batch_size or batch_size)
    engine, lm = build_lm(model_dir, cfg, seed=seed, total_steps=steps)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses, tokens_trained = _train(engine, lm, usable, steps=steps, batch_size=batch_size, seed=seed, pad_id=pad_id,
                                    max_length=max_length, metrics_dir=metrics_dir, progress=progress)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    engine.module.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    wall = time.time() - start
    every = max(1, steps // 50)
    return {
        "steps": steps,
        "examples": len(usable),
        "skipped_too_long": too_long,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "loss_curve": [round(x, 5) for x in losses[::every]],
        "tokens_trained": tokens_trained,
        "wall_seconds": wall,
        "tokens_per_second": tokens_trained / wall if wall > 0 else 0.0,
    }


def _tokenized_examples(model_dir, examples, fmt: str, max_length: int, log) -> tuple[Any, list, int]:
    """(tokenizer, the tokenized examples whose prompt fits ``max_length``, how many did not); one-line
    ``UserError`` for no examples, no tokenizer, or nothing that fits."""
    exs = [e if isinstance(e, SFTExample) else example_from_record(e, fmt) for e in examples]
    if not exs:
        raise UserError("no SFT examples to train on")
    from transformers import AutoTokenizer

    model_dir = model_folder(model_dir, str(model_dir))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:
        raise UserError(f"{model_dir}: cannot load a tokenizer ({type(exc).__name__}); SFT needs one in the model folder") from None
    tokenized = [tokenize_example(tokenizer, e, fmt) for e in exs]
    usable = [t for t in tokenized if len(t[0]) < max_length]
    too_long = len(tokenized) - len(usable)
    if not usable:
        raise UserError(f"every prompt is at least max_length={max_length} tokens long")
    if too_long:
        log(f"sft: skipping {too_long} examples whose prompt alone reaches max_length={max_length}")
    return tokenizer, usable, too_long


def _train(engine, lm, usable: list, *, steps: int, batch_size: int, seed: int, pad_id: int, max_length: int,
           metrics_dir, progress: bool) -> tuple[list[float], int]:
    """``steps`` optimizer steps of ``batch_size`` examples from a seeded shuffle, reshuffled every epoch;
    returns (loss per step, tokens trained)."""
    from tqdm import tqdm

    from dsmath.utils.metrics import MetricsWriter

    rng = random.Random(seed)
    order: list[int] = []
    writer = MetricsWriter(metrics_dir, tensorboard=False) if metrics_dir else None
    losses, tokens_trained = [], 0
    bar = tqdm(range(steps), desc="sft", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for step in bar:
            rows = []
            while len(rows) < batch_size:
                if not order:
                    order = list(range(len(usable)))
                    rng.shuffle(order)
                rows.append(usable[order.pop()])
            m = engine.train_step(lm, build_batch(rows, pad_id, max_length))
            losses.append(m["loss"])
            tokens_trained += int(m["tokens"])
            bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
            if writer is not None:
                writer.write(step + 1, {"sft/loss": m["loss"], "sft/lr": m["lr"], "sft/grad_norm": m.get("grad_norm"),
                                        "sft/tokens": m["tokens"]})
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return losses, tokens_trained


def summary_line(info: dict) -> str:
    return json.dumps({k: v for k, v in info.items() if k != "loss_curve"})
