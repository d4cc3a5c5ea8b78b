"""PPO's value objective: the clipped value loss (:func:`dsmath.algorithms.value_loss`) of a scalar-head model on
a :class:`learner.batch.ValueBatch`, token mean over the global batch's ``loss_mask``."""

from __future__ import annotations

import torch

from dsmath import algorithms
from learner.batch import Rows, ValueBatch


def scalar_scores(model, mb: Rows, device: torch.device) -> torch.Tensor:
    """The one-label head's output at every position of ``mb``: ``[n, w]`` float32 (V(s_t), or an RM score)."""
    mb = mb.to(device)
    return model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[..., 0].float()  # [n, w]


class ValueObjective:
    """``value_clip`` is PPO's value clipping range around ``old_values`` (≤ 0: off). Metrics: ``value/loss``,
    ``value/abs_err`` (token mean |V − return| over all ranks), ``value/grad_norm``, ``value/lr``."""

    def __init__(self, device: torch.device, value_clip: float = 0.2) -> None:
        self.device, self.value_clip = device, value_clip
        self._normalizer = 0.0

    def prepare(self, engine, batch: ValueBatch) -> ValueBatch:
        if not isinstance(batch, ValueBatch):
            raise TypeError(f"value_step needs a ValueBatch (returns, old_values); got {type(batch).__name__}")
        (self._normalizer,) = engine.all_reduce([float(batch.loss_mask.sum())])
        return batch

    def loss(self, model, mb: ValueBatch) -> tuple[torch.Tensor, dict]:
        v = scalar_scores(model, mb, self.device)  # [n, w]
        mb = mb.to(self.device)
        loss, m = algorithms.value_loss(v, mb.old_values, mb.returns, mb.loss_mask, clip=self.value_clip,
                                        normalizer=self._normalizer)
        return loss, {"abs_err_sum": m["value/abs_err"] * float(mb.loss_mask.sum())}

    def summarize(self, engine, batch: ValueBatch, loss: float, parts: list[dict]) -> dict[str, float]:
        (abs_err,) = engine.all_reduce([sum(m["abs_err_sum"] for m in parts)])
        common = engine.common_metrics()
        return {"value/loss": loss, "value/abs_err": abs_err / max(self._normalizer, 1.0),
                "value/grad_norm": common.get("grad_norm", 0.0), "value/lr": common["lr"]}
