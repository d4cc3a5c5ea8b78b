"""The reward-model objective: binary cross-entropy with logits of a scalar-head model at the labelled positions of
a :class:`learner.batch.RewardModelBatch`, averaged over all scored positions of the global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from learner.batch import RewardModelBatch
from learner.objectives.value import scalar_scores


class RewardModelObjective:
    """Metrics: ``loss`` (global mean BCE), ``accuracy`` (score > 0 ⇔ label 1, over all ranks' labels), ``labels``
    (their count), ``lr``, ``step``, ``grad_norm``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._normalizer = 0.0

    def prepare(self, engine, batch: RewardModelBatch) -> RewardModelBatch:
        if not isinstance(batch, RewardModelBatch):
            raise TypeError(f"rm_step needs a RewardModelBatch (score_mask, labels); got {type(batch).__name__}")
        (self._normalizer,) = engine.all_reduce([float(batch.score_mask.sum())])
        return batch

    def loss(self, model, mb: RewardModelBatch) -> tuple[torch.Tensor, dict]:
        logits = scalar_scores(model, mb, self.device)  # [n, w]
        mb = mb.to(self.device)
        per_token = F.binary_cross_entropy_with_logits(logits, mb.labels, reduction="none")  # [n, w]
        loss = (per_token * mb.score_mask).sum() / max(self._normalizer, 1.0)
        with torch.no_grad():
            hit = ((logits > 0).float() == mb.labels).float() * mb.score_mask  # [n, w]
        return loss, {"correct": float(hit.sum())}

    def summarize(self, engine, batch: RewardModelBatch, loss: float, parts: list[dict]) -> dict[str, float]:
        (correct,) = engine.all_reduce([sum(m["correct"] for m in parts)])
        return {"loss": loss, "accuracy": correct / max(self._normalizer, 1.0), "labels": self._normalizer,
                **engine.common_metrics()}

    @torch.no_grad()
    def evaluate(self, model, batch: RewardModelBatch) -> dict[str, float]:
        """Mean BCE and accuracy (score > 0.5) of ``model`` on this rank's ``batch`` in one
        forward (not micro-batched), no update, no collectives."""
        logits = scalar_scores(model, batch, self.device)  # [N, T]
        b = batch.to(self.device)
        n = float(b.score_mask.sum())
        bce = F.binary_cross_entropy_with_logits(logits, b.labels, reduction="none")  # [N, T]
        hit = ((logits > 0).float() == b.labels).float()  # [N, T]
        return {"loss": float((bce * b.score_mask).sum()) / max(n, 1.0),
                "accuracy": float((hit * b.score_mask).sum()) / max(n, 1.0), "labels": n}
