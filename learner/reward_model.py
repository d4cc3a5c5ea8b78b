"""The reward-model learner: the policy learner's DeepSpeed engine, optimizer and checkpoints around a
token-classification model (one label) trained with binary cross-entropy at labelled token positions.

Examples are dicts (they are also the JSONL history that iterative GRPO replays)::

    {"prompt_ids": [...], "completion_ids": [...], "positions": [k, ...], "labels": [0 or 1, ...]}

``positions`` are completion-token indices: the outcome RM has one, the completion's last token; the process RM
has one per step end (``dsmath.reward_models.completion_step_ends``). The score for completion token k sits at
sequence position ``len(prompt_ids) + k`` (the head reads tokens up to and including k), which is where
``dsmath.rewards.model.RewardModelScorer`` reads it.

Batches reuse ``learner.batch.TrainBatch`` so micro-batching, sharding and the DeepSpeed step are the policy's:
for the RM, ``loss_mask`` marks the scored positions (at the token itself, not shifted by one as for logprobs)
and ``advantages`` carries their 0/1 labels.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from learner.batch import TrainBatch
from learner.policy import PolicyLearner


def collate_rm_examples(examples: Sequence[dict], pad_id: int) -> TrainBatch:
    """Right-padded ``[N, T]`` batch with scored positions in ``loss_mask`` and labels in ``advantages``."""
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
    return TrainBatch(input_ids=ids, attention_mask=attention, loss_mask=scored, advantages=labels)


class RewardModelLearner(PolicyLearner):
    """A reward model on the policy learner's DeepSpeed engine (same ZeRO set-up, same checkpoint layout).

    ``model_dir`` is a policy folder (the head starts fresh: ``score`` is initialised by transformers) or an
    earlier reward-model folder/checkpoint (training continues from its weights; the optimizer starts fresh).
    No reference model.
    """

    def __init__(self, model_dir: str | Path, learner_cfg, **kwargs) -> None:
        kwargs.setdefault("with_reference", False)
        super().__init__(model_dir, learner_cfg, None, **kwargs)

    def _load_model(self):
        from transformers import AutoConfig, AutoModelForTokenClassification

        config = AutoConfig.from_pretrained(str(self.model_dir), num_labels=1)
        config.classifier_dropout = 0.0  # no dropout before the head: scores must not depend on train/eval mode
        return AutoModelForTokenClassification.from_pretrained(str(self.model_dir), config=config, dtype=torch.float32)

    def _scores(self, model, mb: TrainBatch) -> torch.Tensor:
        mb = mb.to(self.device)
        return model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[..., 0].float()  # [n, w]

    def rm_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step of BCE-with-logits, averaged over all scored positions of the global batch."""
        (normalizer,) = self._all_reduce([float(batch.loss_mask.sum())])
        stats = {"correct": 0.0}

        def loss_fn(mb: TrainBatch):
            logits = self._scores(self.engine, mb)  # [n, w]
            mb = mb.to(self.device)
            per_token = F.binary_cross_entropy_with_logits(logits, mb.advantages, reduction="none")  # [n, w]
            loss = (per_token * mb.loss_mask).sum() / max(normalizer, 1.0)
            with torch.no_grad():
                hit = ((logits > 0).float() == mb.advantages).float() * mb.loss_mask  # [n, w]
                stats["correct"] += float(hit.sum())
            return loss, {}

        loss, _ = self._run_step(batch, loss_fn)
        (correct,) = self._all_reduce([stats["correct"]])
        return {"loss": loss, "accuracy": correct / max(normalizer, 1.0), "labels": normalizer,
                **self._common_metrics()}

    @torch.no_grad()
    def evaluate(self, batch: TrainBatch) -> dict[str, float]:
        """Mean BCE and accuracy (score > 0.5) on this rank's batch, no update."""
        self.engine.eval()
        logits = self._scores(self.engine, batch)  # [N, T]
        b = batch.to(self.device)
        n = float(b.loss_mask.sum())
        bce = F.binary_cross_entropy_with_logits(logits, b.advantages, reduction="none")  # [N, T]
        hit = ((logits > 0).float() == b.advantages).float()  # [N, T]
        return {"loss": float((bce * b.loss_mask).sum()) / max(n, 1.0),
                "accuracy": float((hit * b.loss_mask).sum()) / max(n, 1.0), "labels": n}


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
