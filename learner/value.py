"""PPO's value model: a :class:`learner.engine.LearnerEngine` on a scalar-head model composed with
:class:`learner.objectives.value.ValueObjective`.

The model is the policy's transformer with a one-label token-classification head (``AutoModelForTokenClassification``,
the head freshly initialised, the body from ``model_dir`` — usually the SFT model, as the paper's PPO baseline).
The value at sequence position t is V(s_t), the state after tokens 0..t — the same alignment as
:mod:`learner.batch` logprobs (position t scores token t+1), so a value lines up with the log-prob of the
token sampled from that state. Updates take a :class:`learner.batch.ValueBatch` (GAE ``returns``, ``old_values``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from learner.batch import Rows, ValueBatch
from learner.engine import LearnerEngine, load_scalar_head
from learner.objectives.value import ValueObjective, scalar_scores


class ValueLearner:
    """V_ψ on DeepSpeed (same ZeRO set-up and checkpoint layout as the policy). No reference model.

    ``value_clip`` is PPO's value clipping range around the old values (≤ 0: off). Engine keyword arguments
    (``rank``, ``world_size``, ``seed``, ``total_steps``, ``max_tokens_per_micro_batch``) pass through.
    """

    def __init__(self, model_dir: str | Path, learner_cfg, *, value_clip: float = 0.2, **kwargs) -> None:
        if kwargs.pop("with_reference", False):
            raise ValueError("a value model has no reference")
        self.engine = LearnerEngine(model_dir, learner_cfg, load_model=load_scalar_head, **kwargs)
        if not hasattr(self.engine.module, "score") and not hasattr(self.engine.module, "classifier"):
            raise RuntimeError("ValueLearner needs a scalar head (load_scalar_head); got a plain causal LM")
        self.objective = ValueObjective(self.engine.device, value_clip)

    rank = property(lambda self: self.engine.rank)
    device = property(lambda self: self.engine.device)
    tokenizer = property(lambda self: self.engine.tokenizer)
    model = property(lambda self: self.engine.module)

    def values(self, batch: Rows) -> torch.Tensor:
        """V(s_t) ``[N, T]`` for every position of any batch's rows (padding positions hold junk — mask them)."""
        self.engine.ds.eval()
        return self.engine.per_position(self.engine.ds, batch, lambda m, mb: scalar_scores(m, mb, self.engine.device))

    def value_step(self, batch: ValueBatch) -> dict[str, float]:
        """One optimizer step of the clipped value loss (:class:`ValueObjective`), metrics reduced over ranks."""
        return self.engine.train_step(self.objective, batch)

    def named_weights(self, on_device: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        return self.engine.named_weights(on_device=on_device)

    def save_checkpoint(self, path: str | Path, extra: dict | None = None, tokenizer=None) -> Path:
        return self.engine.save_checkpoint(path, extra, tokenizer)

    def load_checkpoint(self, path: str | Path) -> dict:
        return self.engine.load_checkpoint(path)
