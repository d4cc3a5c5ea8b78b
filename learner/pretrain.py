"""Continued pre-training with the DeepSpeed learner (LM mode) and the corpus comparison built on it.

:func:`run_pretrain` streams packed rows from a weighted mixture (:mod:`dsmath.pretrain`) into
:class:`learner.objectives.lm.LMObjective` on a :class:`learner.engine.LearnerEngine`: the SFT loss with the loss
mask set to the within-document label positions (token mean over the global batch). Every rank builds the same
stream and trains on its slice of each global batch (``torchrun`` sets ``RANK``/``WORLD_SIZE``);
only one rank is tested here.

Checkpoints hold the data position (mixture generator state, every source's file/record/token
offset, the packer's carried tokens) next to the model, optimizer, scheduler and RNG, so
``resume=True`` continues the token stream — and, on one rank, the loss curve — exactly.

:func:`evaluate_corpora` is the paper's corpus test (§2.2): the same initial model trained with
the same token budget on each corpus, then held-out loss and few-shot accuracy side by side.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dsmath.config import LearnerConfig
from dsmath.errors import UserError
from dsmath.pretrain.config import PretrainConfig, SourceConfig, to_dict
from dsmath.pretrain.data import build_packer, check_paths, check_run_dir, heldout_rows, sample_texts
from dsmath.pretrain.mixture import source_of_key
from dsmath.pretrain.packing import attention_mask, label_mask
from dsmath.pretrain.sources import SkipCounts


def rows_to_batch(ids: np.ndarray, keys: np.ndarray):
    """Packed rows -> a :class:`learner.batch.LMBatch` whose loss mask is the within-document labels."""
    from learner.batch import LMBatch

    return LMBatch(input_ids=torch.as_tensor(ids),  # [N, L]
                   attention_mask=torch.as_tensor(attention_mask(keys)),  # [N, L]
                   loss_mask=torch.as_tensor(label_mask(keys)))  # [N, L], position t -> token t+1


def build_initial_model(cfg: PretrainConfig, out_dir: Path, log: Callable[[str], None] = print) -> Path:
    """A tokenizer trained on the sources' first ``data.tokenizer_sample_chars`` characters each and a
    freshly initialised tiny Qwen2 (``cfg.model``), saved to ``out_dir`` (reused when already there)."""
    from dsmath.tiny import build_model, num_parameters, train_tokenizer

    if (out_dir / "config.json").exists() and (out_dir / "tokenizer.json").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok = train_tokenizer(sample_texts(cfg.data, cfg.data.tokenizer_sample_chars), cfg.model.vocab_size)
    model = build_model(cfg.model, tok, seed=cfg.seed)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    log(f"pretrain: built a {num_parameters(model) / 1e6:.2f} M-parameter model and a {len(tok)}-token BPE "
        f"in {time.time() - t0:.1f} s -> {out_dir}")
    return out_dir


def evaluate_model(model, tokenizer, cfg: PretrainConfig, *, device="cpu", log: Callable[[str], None] = print) -> dict:
    """Held-out loss on every ``eval.heldout`` set and, when asked, few-shot GSM8K / MATH accuracy."""
    from dsmath.pretrain.evaluate import fewshot_accuracy, heldout_loss

    e = cfg.eval
    out: dict = {"heldout": {}, "fewshot": {}}
    for name, src in e.heldout.items():
        skipped = SkipCounts()
        rows = heldout_rows(src, tokenizer, cfg.data.seq_len, max_docs=e.heldout_max_docs,
                            skip_bad=cfg.data.skip_bad, skipped=skipped)
        out["heldout"][name] = heldout_loss(model, rows, batch_size=cfg.optim.micro_batch_size, device=device)
        if skipped.bad or skipped.no_text:
            log(f"pretrain: held-out {name}: skipped {skipped.bad} malformed and {skipped.no_text} empty records "
                f"({'; '.join(skipped.examples[:2])})")
    if e.fewshot_problems:
        max_len = int(getattr(model.config, "max_position_embeddings", 4096))
        for bench, path in (("gsm8k", e.gsm8k_path), ("math", e.math_path)):
            if path:
                out["fewshot"][bench] = fewshot_accuracy(model, tokenizer, path, shots=e.fewshot_shots,
                                                         num_problems=e.fewshot_problems,
                                                         max_new_tokens=e.max_new_tokens, max_model_len=max_len,
                                                         device=device)
    return out


@dataclass
class _PretrainRun:
    """One pre-training run's parts, as its steps share them (rank 0 owns the files)."""

    cfg: PretrainConfig
    run_dir: Path
    model_dir: Path
    rank: int
    world: int
    learner: Any  # the LearnerEngine
    lm: Any  # the LM objective it trains with
    tokenizer: Any
    packer: Any
    label_tokens: dict[str, int]  # trained label tokens per source, since step 0
    step: int = 0
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


def run_pretrain(cfg: PretrainConfig, *, resume: bool = False, stop_after: int | None = None, progress: bool = True,
                 config_changes: list[dict] | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Train ``cfg.optim.steps`` steps on the mixture; returns (and writes) ``RUN_DIR/summary.json``.

    ``stop_after`` N stops (with a checkpoint) after step N of the same ``optim.steps`` schedule —
    a planned interruption; ``resume=True`` later continues it as if it had never stopped.

    Writes ``RUN_DIR/{config.yaml, metrics.jsonl, checkpoints/step-N, summary.json}``; with an empty
    ``model.path`` also ``RUN_DIR/init`` (the tokenizer and initial weights). Only the newest
    ``keep_checkpoints`` checkpoints are kept. A run folder that already has checkpoints needs
    ``resume=True`` (a fresh run never silently overwrites one).
    ``config_changes`` (from :func:`dsmath.run_dir.resume_changes`) are recorded with the step they take effect.
    """
    start = time.time()
    run_dir, model_dir, rank, world = _prepare(cfg, resume, log)
    run = _start(cfg, run_dir, model_dir, rank, world)
    if resume:
        _restore(run, config_changes, log)
    elif rank == 0 and run.metrics_path.exists():
        run.metrics_path.unlink()  # a fresh run does not append to an old run's curve
    _train(run, stop_after=stop_after, progress=progress, log=log)
    final_eval = evaluate_model(run.learner.module, run.tokenizer, cfg, device=run.learner.device, log=log)
    return _write_summary(run, final_eval, wall_seconds=time.time() - start)


def _prepare(cfg: PretrainConfig, resume: bool, log: Callable[[str], None]) -> tuple[Path, Path, int, int]:
    """Refuse a bad set-up (one line each), then the run folder, the initial model and (rank 0) ``config.yaml``
    and ``runs/latest``: (run folder, model folder, rank, world size)."""
    import yaml

    run_dir = Path(cfg.run_dir)
    check_run_dir(cfg, resume)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.optim.batch_size % world:
        raise UserError(f"optim.batch_size={cfg.optim.batch_size} does not split over {world} ranks")
    check_paths(cfg)
    if world > 1 and not cfg.model.path:
        raise UserError("more than one rank needs model.path (build the tiny model with one rank first, or "
                        "start from a base model): ranks must not each build their own")
    run_dir.mkdir(parents=True, exist_ok=True)
    model_dir = Path(cfg.model.path) if cfg.model.path else build_initial_model(cfg, run_dir / "init", log)
    if rank == 0:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        from dsmath.run_dir import link_latest

        link_latest(run_dir)  # runs/latest: the most recent run directory
    return run_dir, model_dir, rank, world


def _start(cfg: PretrainConfig, run_dir: Path, model_dir: Path, rank: int, world: int) -> _PretrainRun:
    """The learner engine with the LM objective (no reference), its tokenizer and the mixture's packer, at step 0."""
    from learner.objectives.lm import build_lm

    o = cfg.optim
    lcfg = LearnerConfig(lr=o.lr, weight_decay=o.weight_decay, warmup_steps=o.warmup_steps, grad_clip=o.grad_clip,
                         zero_stage=o.zero_stage, num_ranks=world, micro_batch_size=o.micro_batch_size,
                         backend=o.backend)
    engine, lm = build_lm(model_dir, lcfg, rank=rank, world_size=world, seed=cfg.seed, total_steps=o.steps)
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise UserError(f"{model_dir}: no tokenizer in the model folder; pre-training needs one")
    packer = build_packer(cfg.data, tokenizer, seed=cfg.seed)
    return _PretrainRun(cfg=cfg, run_dir=run_dir, model_dir=model_dir, rank=rank, world=world, learner=engine, lm=lm,
                        tokenizer=tokenizer, packer=packer, label_tokens={n: 0 for n in packer.source.names})


def _restore(run: _PretrainRun, config_changes: list[dict] | None, log: Callable[[str], None]) -> None:
    """Weights, optimizer, data position and token counts from the newest checkpoint; metrics rows after it are
    dropped and the resume's config changes recorded (rank 0)."""
    extra = run.learner.load_checkpoint(run.ckpt_dir)
    run.packer.load_state(extra["data"])
    run.step = int(extra["step"])
    run.label_tokens = {n: int(extra["label_tokens"].get(n, 0)) for n in run.packer.source.names}
    if run.rank == 0:
        from dsmath.run_dir import record_changes
        from dsmath.utils.metrics import truncate_metrics

        truncate_metrics(run.metrics_path, run.step)

        record_changes(run.run_dir, config_changes or [], from_step=run.step + 1)  # RUN_DIR/config_changes.jsonl
    log(f"pretrain: resumed at step {run.step} from {run.ckpt_dir} (data position restored)")


def _checkpoint(run: _PretrainRun) -> None:
    """``checkpoints/step-N`` (all ranks write), then rank 0 keeps only the newest ``keep_checkpoints``."""
    from learner.checkpoint import prune

    path = run.learner.save_checkpoint(run.ckpt_dir / f"step-{run.step:06d}",
                                       extra={"step": run.step, "data": run.packer.state(),
                                              "label_tokens": run.label_tokens})
    if run.rank == 0:
        prune(run.ckpt_dir, run.cfg.keep_checkpoints, Path(path))


def _train(run: _PretrainRun, *, stop_after: int | None, progress: bool, log: Callable[[str], None]) -> None:
    """Optimizer steps up to ``optim.steps`` (or ``stop_after``): a metrics row each, evaluation every
    ``eval.eval_every``, a checkpoint every ``checkpoint_every`` and at the last step."""
    from tqdm import tqdm

    from dsmath.utils.metrics import MetricsWriter

    cfg, o, names = run.cfg, run.cfg.optim, run.packer.source.names
    writer = MetricsWriter(run.run_dir, tensorboard=False) if run.rank == 0 else None
    last = o.steps if stop_after is None else min(o.steps, stop_after)
    bar = tqdm(total=o.steps, initial=run.step, desc="pretrain", unit="step", disable=not progress or run.rank != 0,
               dynamic_ncols=True)
    t_last = time.time()
    try:
        while run.step < last:
            ids, keys = run.packer.next_rows(o.batch_size)  # [B, L] the global batch, same on every rank
            batch = rows_to_batch(ids, keys).shard(run.rank, run.world)
            mask = label_mask(keys)
            src = source_of_key(keys)
            for i, n in enumerate(names):
                run.label_tokens[n] += int((mask * (src == i)).sum())
            m = run.learner.train_step(run.lm, batch)
            run.step += 1
            run.losses.append(m["loss"])
            now = time.time()
            total = sum(run.label_tokens.values())
            row = {"pretrain/loss": m["loss"], "pretrain/lr": m["lr"], "pretrain/grad_norm": m.get("grad_norm"),
                   "pretrain/tokens": m["tokens"], "pretrain/tokens_per_s": m["tokens"] / max(now - t_last, 1e-9),
                   "pretrain/step_s": now - t_last}
            row.update({f"mixture/{n}": run.label_tokens[n] / total for n in names})  # realised share since step 0
            t_last = now
            if cfg.eval.eval_every and run.step % cfg.eval.eval_every == 0 and run.step < last:
                ev = evaluate_model(run.learner.module, run.tokenizer, cfg, device=run.learner.device, log=log)
                run.evals.append({"step": run.step, **ev})
                row.update({f"eval/{k}_loss": v["loss"] for k, v in ev["heldout"].items()})
            if writer is not None:
                writer.write(run.step, row)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.1e}")
            if (cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0) or run.step == last:
                _checkpoint(run)
    finally:
        bar.close()
        if writer is not None:
            writer.close()


def _write_summary(run: _PretrainRun, final_eval: dict, *, wall_seconds: float) -> dict:
    """The run's summary (rank 0 also writes ``summary.json``): loss curve ends, realised mixture, evaluation."""
    cfg, names, label_tokens = run.cfg, run.packer.source.names, run.label_tokens
    total = sum(label_tokens.values())
    curve = ([json.loads(x)["pretrain/loss"] for x in run.metrics_path.read_text().splitlines()] if run.rank == 0
             else run.losses)
    streams = run.packer.source.streams
    summary = {
        "run_dir": str(run.run_dir),
        "steps": run.step,
        "rows_per_step": cfg.optim.batch_size,
        "seq_len": cfg.data.seq_len,
        "label_tokens": total,
        "first_loss": curve[0] if curve else None,
        "final_loss": float(np.mean(curve[-10:])) if curve else None,
        "mixture_weights": run.packer.source.weights,
        "mixture_realised": {n: (label_tokens[n] / total if total else 0.0) for n in names},
        "skipped_records": {n: {"malformed": s.skipped.bad, "no_text": s.skipped.no_text} for n, s in streams.items()},
        "source_epochs": {n: s.epoch for n, s in streams.items()},
        "eval": final_eval,
        "evals_during": run.evals,
        "wall_seconds": wall_seconds,
        "model_dir": str(run.model_dir),
        "checkpoint": str(run.ckpt_dir / f"step-{run.step:06d}"),
    }
    if run.rank == 0:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------------------------------------------- corpus test


def evaluate_corpora(cfg: PretrainConfig, corpora: dict[str, SourceConfig], out_dir: str | Path, *,
                     progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train the same initial model with the same budget (``optim.steps`` × ``batch_size`` rows of
    ``seq_len``) on each corpus alone, then evaluate each on ``cfg.eval``. Writes
    ``OUT/report.{json,md}`` and one run folder per corpus; returns the report.

    The tokenizer is trained on an equal character sample of every corpus, so no corpus gets a
    tokenizer made for it and the held-out losses are comparable (same tokenizer, same labels).
    """
    if len(corpora) < 1:
        raise UserError("name at least one corpus")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    init_cfg = replace(cfg, data=replace(cfg.data, sources=corpora))
    model_dir = Path(cfg.model.path) if cfg.model.path else build_initial_model(init_cfg, out / "init", log)
    results = {}
    import shutil

    import yaml

    for name, src in corpora.items():
        run_dir = out / name
        one = replace(cfg, run_dir=str(run_dir), model=replace(cfg.model, path=str(model_dir)),
                      data=replace(cfg.data, sources={name: replace(src, weight=1.0)}))
        saved = run_dir / "config.yaml"
        if (run_dir / "summary.json").exists() and saved.exists() and yaml.safe_load(saved.read_text()) == to_dict(one):
            log(f"corpus evaluate: {name}: reusing {run_dir}/summary.json (same settings)")
            results[name] = json.loads((run_dir / "summary.json").read_text())
            continue
        if run_dir.exists():
            shutil.rmtree(run_dir)  # unfinished, or made with other settings: train this corpus again
        log(f"corpus evaluate: training on {name} ({', '.join(src.paths)})")
        results[name] = run_pretrain(one, progress=progress, log=log)
    report = {"model_dir": str(model_dir), "steps": cfg.optim.steps, "rows_per_step": cfg.optim.batch_size,
              "seq_len": cfg.data.seq_len, "corpora": {n: {"paths": list(s.paths)} for n, s in corpora.items()},
              "results": {n: {"label_tokens": r["label_tokens"], "final_train_loss": r["final_loss"],
                              "heldout": r["eval"]["heldout"],
                              "fewshot": {b: {k: v[k] for k in ("accuracy", "correct", "n", "prompt_too_long")}
                                          for b, v in r["eval"]["fewshot"].items()},
                              "source_epochs": r["source_epochs"], "wall_seconds": r["wall_seconds"]}
                          for n, r in results.items()}}
    report["table"] = format_table(report)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(report["table"] + "\n")
    return report


def format_table(report: dict) -> str:
    """The side-by-side Markdown table: one row per corpus, held-out losses then few-shot accuracies."""
    res = report["results"]
    heldout = sorted({h for r in res.values() for h in r["heldout"]})
    benches = sorted({b for r in res.values() for b in r["fewshot"]})
    head = (["corpus", "trained tokens"] + [f"held-out loss: {h}" for h in heldout]
            + [f"{b} few-shot acc" for b in benches])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in res.items():
        cells = [name, f"{r['label_tokens']:,}"]
        cells += [f"{r['heldout'][h]['loss']:.3f}" if h in r["heldout"] else "-" for h in heldout]
        cells += [(f"{r['fewshot'][b]['accuracy']:.1%} ({r['fewshot'][b]['correct']}/{r['fewshot'][b]['n']})"
                   if b in r["fewshot"] and not math.isnan(r["fewshot"][b]["accuracy"]) else "-") for b in benches]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
