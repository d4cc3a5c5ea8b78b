"""Objectives: the losses that plug into :class:`learner.engine.LearnerEngine` (which owns DeepSpeed, micro-batching,
gradient accumulation, all-reductions and checkpoints).

An objective is an object with three methods, called by :meth:`LearnerEngine.train_step` once per optimizer step,
in this order, on every rank together:

* ``prepare(engine, batch) -> batch`` — collectives the loss needs before any micro-batch (the global loss divisor,
  a reference pass) and checks; returns the batch to train on (the same type). May keep per-step state on the
  objective (one step at a time per objective instance).
* ``loss(model, micro_batch) -> (loss, metrics)`` — the micro-batch's share of the global loss (a scalar tensor
  with a graph; the engine scales it by ``world_size`` and backpropagates) and plain-float metrics for this
  micro-batch. ``model`` is the DeepSpeed engine (call it like the HF model).
* ``summarize(engine, batch, loss, parts) -> metrics`` — the step's metrics, reduced over ranks (``loss`` is
  already the global sum; ``parts`` are this rank's per-micro-batch metrics in order).

Each objective has its own typed batch (:mod:`learner.batch`): ``PolicyBatch`` (grpo), ``PolicyBatch`` row pairs
(dpo), ``LMBatch`` (lm), ``ValueBatch`` (value), ``RewardModelBatch`` (reward_model). A new objective is one new
module here (a class with the three methods); the learner that trains it composes ``LearnerEngine`` with it.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Objective(Protocol):
    def prepare(self, engine: Any, batch: Any) -> Any: ...

    def loss(self, model: Any, micro_batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...

    def summarize(self, engine: Any, batch: Any, loss: float, parts: list[dict]) -> dict[str, float]: ...
