"""Language modelling (SFT, the bootstrap warm-up, continued pre-training): token-mean NLL over ``loss_mask`` of an
:class:`learner.batch.LMBatch`, the mean taken over the global batch (all ranks)."""

from __future__ import annotations

import torch

from dsmath import grpo
from learner.batch import LMBatch, Rows


class LMObjective:
    """Metrics: ``loss`` (the global token-mean NLL), ``tokens`` (trained tokens over all ranks), ``lr``, ``step``,
    ``grad_norm``. Accepts any batch with ``loss_mask`` (a rollout batch too): only the LM fields are read."""

    def __init__(self, logprobs) -> None:
        self.logprobs = logprobs
        self._normalizer = 0.0

    def prepare(self, engine, batch: Rows) -> LMBatch:
        batch = LMBatch.of(batch)
        (self._normalizer,) = engine.all_reduce([float(batch.loss_mask.sum())])
        return batch

    def loss(self, model, mb: LMBatch) -> tuple[torch.Tensor, dict]:
        logp, _ = self.logprobs(model, mb)  # [n, w]
        mb = mb.to(self.logprobs.device)
        return grpo.sft_loss(logp, mb.loss_mask, normalizer=self._normalizer), {}

    def summarize(self, engine, batch: LMBatch, loss: float, parts: list[dict]) -> dict[str, float]:
        return {"loss": loss, "tokens": self._normalizer, **engine.common_metrics()}


def build_lm(model_dir, learner_cfg, **engine_kwargs):
    """``(engine, objective)``: a causal-LM :class:`learner.engine.LearnerEngine` (no reference) and an
    :class:`LMObjective` on it — what SFT, the bootstrap warm-up and pre-training train with
    ``engine.train_step(objective, batch)``. ``engine_kwargs``: rank, world_size, seed, total_steps, ..."""
    from learner.engine import LearnerEngine, load_causal_lm
    from learner.logprobs import TokenLogprobs

    engine = LearnerEngine(model_dir, learner_cfg, load_model=load_causal_lm, with_reference=False, **engine_kwargs)
    return engine, LMObjective(TokenLogprobs(engine))
