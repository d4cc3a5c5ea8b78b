"""Judging a pre-trained model: held-out LM loss on a text set, few-shot GSM8K/MATH accuracy.

Both take a plain HF causal LM (no DeepSpeed, no Ray). The loss is the token mean of −log p over
exactly the label positions :mod:`dsmath.pretrain.packing` trains on (within-document next tokens),
so losses of models sharing a tokenizer are comparable; across tokenizers they are not.

Few-shot accuracy runs the ``dsmath eval`` harness (:mod:`dsmath.evaluation`: its CoT template,
few-shot prefix and grading) with greedy decoding by the HF model itself, so a small CPU model
needs no vLLM engine; the worked examples are the first records of the benchmark file and are
not scored.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

from dsmath.pretrain.packing import attention_mask, label_mask


@torch.no_grad()
def heldout_loss(model, rows: Iterable[tuple[np.ndarray, np.ndarray]], *, batch_size: int = 16,
                 device: str | torch.device = "cpu") -> dict[str, float]:
    """``{"loss": token-mean NLL, "tokens": labels scored, "ppl": exp(loss)}`` over packed ``rows``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    batch: list[tuple[np.ndarray, np.ndarray]] = []

    def flush() -> None:
        nonlocal total, count
        ids = torch.as_tensor(np.stack([r[0] for r in batch]), device=device)  # [n, L]
        keys = np.stack([r[1] for r in batch])  # [n, L]
        attn = torch.as_tensor(attention_mask(keys), device=device)  # [n, L]
        mask = torch.as_tensor(label_mask(keys), device=device)[:, :-1]  # [n, L-1] position t -> token t+1
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()  # [n, L-1, V]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [n, L-1]
        total += float((nll * mask).sum())
        count += int(mask.sum())
        batch.clear()

    for row in rows:
        batch.append(row)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    model.train(was_training)
    loss = total / count if count else float("nan")
    return {"loss": loss, "tokens": float(count), "ppl": math.exp(loss) if count else float("nan")}


class HFGreedyGenerator:
    """A ``dsmath.evaluation`` ``GenerateFn`` over a plain HF causal LM: greedy only, one prompt at a time.

    For small CPU models (no vLLM engine to start). Only temperature-0, n=1 requests are served (anything
    else is a ``ValueError``); the completion is cut at the first stop string, as vLLM would."""

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu") -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device

    @torch.no_grad()
    def __call__(self, requests, mode: str):
        from dsmath.records import Rollout

        out = []
        for req in requests:
            sp = req.sampling
            if sp.n != 1 or sp.temperature != 0:
                raise ValueError("HFGreedyGenerator serves greedy requests only (n=1, temperature=0)")
            ids = self.tokenizer(req.prompt, add_special_tokens=False, verbose=False)["input_ids"]
            inp = torch.tensor([ids], device=self.device)  # [1, P]
            gen = self.model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=sp.max_new_tokens,
                                      do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self.tokenizer.eos_token_id)[0, len(ids):]  # [new]
            text = self.tokenizer.decode(gen, skip_special_tokens=True)
            finish = "stop" if len(gen) < sp.max_new_tokens else "length"
            for stop in sp.stop:
                if stop in text:
                    text, finish = text.split(stop, 1)[0], "stop"
            out.append(Rollout(req.request_id, 0, req.problem, req.prompt, tuple(ids), text,
                               tuple(int(t) for t in gen), (), finish, 0, "hf-greedy"))
        return out


@torch.no_grad()
def fewshot_accuracy(model, tokenizer, path: str, *, shots: int, num_problems: int, max_new_tokens: int,
                     max_model_len: int, device: str | torch.device = "cpu") -> dict:
    """Greedy few-shot pass@1 through the ``dsmath eval`` harness (its CoT template, shots and grading).

    The first ``shots`` records of ``path`` are the worked examples and are not scored; the next
    ``num_problems`` are. A prompt that does not fit ``max_model_len`` is counted as ``prompt_too_long``
    (and scored wrong), never dropped. Returns ``{"accuracy", "correct", "n", "prompt_too_long", "examples"}``.
    """
    from dsmath.datasets import load_problems
    from dsmath.evaluation.fewshot import fewshot_prefix, fewshot_stop, load_shots
    from dsmath.evaluation.harness import EvalSettings, run_eval
    from dsmath.grading import GradingPool

    problems, _ = load_problems(path, limit=shots + num_problems)
    todo = problems[shots:]
    prefix = fewshot_prefix(load_shots(path, shots, "cot"), "cot")
    settings = EvalSettings(mode="cot", k=0, max_new_tokens=max_new_tokens, prefix=prefix, stop=fewshot_stop(shots))
    was_training = model.training
    model.eval()
    try:
        with GradingPool(1) as pool:
            res = run_eval(todo, HFGreedyGenerator(model, tokenizer, device), settings, grading_pool=pool,
                           count_tokens=lambda text: len(tokenizer(text, add_special_tokens=False,
                                                                   verbose=False)["input_ids"]),
                           max_model_len=max_model_len)
    finally:
        model.train(was_training)
    n = len(todo)
    correct = int(res.summary["correct@1"] or 0)
    examples = [{"question": p.question[:160], "completion": c[0][:160], "gold": p.answer}
                for p, c in list(zip(res.problems, res.completions))[:3]]
    return {"accuracy": correct / n if n else float("nan"), "correct": correct, "n": n,
            "prompt_too_long": int(res.summary["prompt_too_long"]), "examples": examples}
