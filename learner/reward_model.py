"""The reward-model learner: a :class:`learner.engine.LearnerEngine` on a token-classification model (one label)
composed with :class:`learner.objectives.reward_model.RewardModelObjective` (binary cross-entropy at labelled token
positions).

Examples are dicts (they are also the JSONL history that iterative GRPO replays)::

    {"prompt_ids": [...], "completion_ids": [...], "positions": [k, ...], "labels": [0 or 1, ...]}

``positions`` are completion-token indices: the outcome RM has one, the completion's last token; the process RM
has one per step end (``dsmath.reward_models.completion_step_ends``). The score for completion token k sits at
sequence position ``len(prompt_ids) + k`` (the head reads tokens up to and including k), which is where
``actors.reward_model.RewardModelScorer`` reads it. :func:`collate_rm_examples` builds the
:class:`learner.batch.RewardModelBatch` (``score_mask`` at those positions, ``labels`` there).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator, Sequence

import torch

from learner.batch import RewardModelBatch
from learner.engine import LearnerEngine, load_scalar_head
from learner.objectives.reward_model import RewardModelObjective


def collate_rm_examples(examples: Sequence[dict], pad_id: int) -> RewardModelBatch:
    """Right-padded ``[N, T]`` batch with the scored positions in ``score_mask`` and their labels in ``labels``."""
    seqs = [list(e["prompt_ids"]) + list(e["completion_ids"]) for e in examples]
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)  # [N, T]
    attention = torch.zeros(len(seqs), t, dtype=torch.long)  # [N, T]
    scored = torch.zeros(len(seqs), t)  # [N, T] 1 at labelled token positions
    labels = torch.zeros(len(seqs), t)  # [N, T]
    for i, (e, s) in enumerate(zip(examples, seqs)):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, :len(s)] = 1
        p = len(e["prompt_ids"])
        if len(e["positions"]) != len(e["labels"]):
            raise ValueError(f"example {i}: {len(e['positions'])} positions but {len(e['labels'])} labels")
        for k, y in zip(e["positions"], e["labels"]):
            if not 0 <= p + k < len(s):
                raise ValueError(f"example {i}: position {k} outside its {len(s) - p} completion tokens")
            scored[i, p + k] = 1.0
            labels[i, p + k] = float(y)
    return RewardModelBatch(input_ids=ids, attention_mask=attention, score_mask=scored, labels=labels)


class RewardModelLearner:
    """A reward model on DeepSpeed (same ZeRO set-up and checkpoint layout as the policy).

    ``model_dir`` is a policy folder (the head starts fresh: ``score`` is initialised by transformers) or an
    earlier reward-model folder/checkpoint (training continues from its weights; the optimizer starts fresh).
    No reference model. Engine keyword arguments (``rank``, ``world_size``, ``seed``, ...) pass through.
    """

    def __init__(self, model_dir: str | Path, learner_cfg, **kwargs) -> None:
        if kwargs.pop("with_reference", False):
            raise ValueError("a reward model has no reference")
        self.engine = LearnerEngine(model_dir, learner_cfg, load_model=load_scalar_head, **kwargs)
        self.objective = RewardModelObjective(self.engine.device)

    rank = property(lambda self: self.engine.rank)
    device = property(lambda self: self.engine.device)
    tokenizer = property(lambda self: self.engine.tokenizer)
    model = property(lambda self: self.engine.module)

    def rm_step(self, batch: RewardModelBatch) -> dict[str, float]:
        """One optimizer step of BCE-with-logits, averaged over all scored positions of the global batch."""
        return self.engine.train_step(self.objective, batch)

    def evaluate(self, batch: RewardModelBatch) -> dict[str, float]:
        """Mean BCE and accuracy (score > 0.5) on this rank's batch, no update."""
        self.engine.ds.eval()
        return self.objective.evaluate(self.engine.ds, batch)

    def named_weights(self, on_device: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        return self.engine.named_weights(on_device=on_device)

    def save_checkpoint(self, path: str | Path, extra: dict | None = None, tokenizer=None) -> Path:
        return self.engine.save_checkpoint(path, extra, tokenizer)

    def load_checkpoint(self, path: str | Path) -> dict:
        return self.engine.load_checkpoint(path)


def train_reward_model(learner: RewardModelLearner, examples: Sequence[dict], *, epochs: int, batch_size: int,
                       seed: int, pad_id: int, progress: bool = False, on_step=None) -> list[dict]:
    """``epochs`` shuffled passes over ``examples`` in batches of ``batch_size``; returns per-step metrics.

    ``on_step(step, metrics)`` is called after every optimizer step (for a metrics file).
    """
    from tqdm import tqdm

    order = list(range(len(examples)))
    rng = random.Random(seed)
    steps_per_epoch = max(1, -(-len(order) // batch_size))
    rows = []
    bar = tqdm(total=epochs * steps_per_epoch, desc="rm train", unit="step", disable=not progress, dynamic_ncols=True)
    for epoch in range(epochs):
        rng.shuffle(order)
        for lo in range(0, len(order), batch_size):
            batch = collate_rm_examples([examples[i] for i in order[lo:lo + batch_size]], pad_id)
            m = learner.rm_step(batch)
            m["epoch"] = float(epoch)
            rows.append(m)
            if on_step is not None:
                on_step(len(rows), m)
            bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.2f}")
            bar.update(1)
    bar.close()
    return rows
