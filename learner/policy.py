"""The policy learner: a :class:`learner.engine.LearnerEngine` on a causal LM composed with the objectives that
train a policy — GRPO family (:mod:`learner.objectives.grpo`), DPO (:mod:`learner.objectives.dpo`) and SFT
(:mod:`learner.objectives.lm`) — plus the log-prob passes the driver's old/ref stages call.

One :class:`PolicyLearner` per rank, launched under ``torchrun`` or inside a Ray actor (:mod:`learner.ray_group`).
Per-token tensors follow the alignment of :mod:`learner.batch` (position t = token t+1).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch

from dsmath import methods
from dsmath.config import AlgorithmConfig, LearnerConfig
from learner.batch import LMBatch, PolicyBatch
from learner.engine import LearnerEngine, load_causal_lm
from learner.logprobs import TokenLogprobs
from learner.objectives.dpo import DPOObjective
from learner.objectives.grpo import PolicyObjective
from learner.objectives.lm import LMObjective


class PolicyLearner:
    """A policy (DeepSpeed engine) plus a frozen reference copy, on one rank.

    Guaranteed: ``grpo_step``/``dpo_step``/``sft_step`` do exactly one optimizer step over the whole local batch
    (:meth:`LearnerEngine.train_step`); every rank must call them together with equally sized shards.
    """

    def __init__(
        self,
        model_dir: str | Path,
        learner_cfg: LearnerConfig,
        algo_cfg: AlgorithmConfig | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        with_reference: bool | None = None,
        total_steps: int | None = None,
        max_tokens: int | None = None,
        max_tokens_per_micro_batch: int | None = None,
    ) -> None:
        """``total_steps`` turns on cosine decay (to 10 % of ``lr``) after warm-up; None keeps the
        lr constant after warm-up. ``max_tokens`` is Dr. GRPO's constant for
        ``loss_agg='seq_mean_token_sum_norm'`` (e.g. ``rollout.max_new_tokens``). ``with_reference`` None builds
        the frozen reference only where ``algo_cfg`` reads it (:func:`dsmath.methods.needs_reference`)."""
        self.algo_cfg = algo_cfg or AlgorithmConfig()
        self.max_tokens = max_tokens
        PolicyObjective.check(self.algo_cfg, max_tokens)  # before any model loads
        if with_reference is None:
            with_reference = methods.needs_reference(self.algo_cfg)
        self.engine = LearnerEngine(model_dir, learner_cfg, load_model=load_causal_lm, rank=rank,
                                    world_size=world_size, seed=seed, with_reference=with_reference,
                                    total_steps=total_steps, max_tokens_per_micro_batch=max_tokens_per_micro_batch)
        self.token_logprobs = TokenLogprobs(self.engine)
        self.policy = PolicyObjective(self.token_logprobs, self.algo_cfg, max_tokens=max_tokens)
        self.lm = LMObjective(self.token_logprobs)

    @classmethod
    def from_env(cls, model_dir: str | Path, learner_cfg: LearnerConfig, algo_cfg: AlgorithmConfig | None = None,
                 **kwargs) -> "PolicyLearner":
        """Under ``torchrun``: rank and world size from ``RANK``/``WORLD_SIZE``."""
        return cls(model_dir, learner_cfg, algo_cfg, rank=int(os.environ.get("RANK", "0")),
                   world_size=int(os.environ.get("WORLD_SIZE", "1")), **kwargs)

    # ------------------------------------------------------------------ the engine's parts, by their old names

    cfg = property(lambda self: self.engine.cfg)
    rank = property(lambda self: self.engine.rank)
    world_size = property(lambda self: self.engine.world_size)
    device = property(lambda self: self.engine.device)
    dtype = property(lambda self: self.engine.dtype)
    model_dir = property(lambda self: self.engine.model_dir)
    tokenizer = property(lambda self: self.engine.tokenizer)
    reference = property(lambda self: self.engine.reference)
    optimizer = property(lambda self: self.engine.optimizer)
    steps = property(lambda self: self.engine.steps)

    @property
    def model(self) -> torch.nn.Module:
        """The HF model being trained (inside the DeepSpeed engine)."""
        return self.engine.module

    @property
    def max_tokens_per_micro_batch(self) -> int | None:
        return self.engine.max_tokens_per_micro_batch

    @max_tokens_per_micro_batch.setter
    def max_tokens_per_micro_batch(self, value: int | None) -> None:
        self.engine.max_tokens_per_micro_batch = value

    def _logprobs(self, model, mb, *, with_entropy: bool = False):
        """Token log-probs ``[n, w]`` (and detached entropy) of one micro-batch (:class:`TokenLogprobs`)."""
        return self.token_logprobs(model, mb, with_entropy=with_entropy)

    # ------------------------------------------------------------------ steps

    def grpo_step(self, batch: PolicyBatch) -> dict[str, float]:
        """One GRPO-family optimizer step on this rank's shard. Returns metrics reduced over all ranks."""
        return self.engine.train_step(self.policy, batch)

    def dpo_step(self, batch: PolicyBatch, beta: float) -> dict[str, float]:
        """One optimizer step of the DPO loss on row pairs (2k chosen, 2k+1 rejected): :class:`DPOObjective`."""
        return self.engine.train_step(DPOObjective(self.token_logprobs, beta), batch)

    def sft_step(self, batch: PolicyBatch | LMBatch) -> dict[str, float]:
        """One optimizer step of token-mean NLL over ``loss_mask`` (global over ranks)."""
        return self.engine.train_step(self.lm, batch)

    # ------------------------------------------------------------------ log-prob passes

    def logprobs(self, batch: PolicyBatch) -> torch.Tensor:
        """Policy log-probs ``[N, T]`` (position t = token t+1; padding positions hold junk — mask them)."""
        return self.token_logprobs.batched(self.engine.ds, batch)

    def ref_logprobs(self, batch: PolicyBatch) -> torch.Tensor:
        """Reference-model log-probs ``[N, T]``, same convention as :meth:`logprobs`."""
        if self.engine.reference is None:
            raise RuntimeError("this learner was built with_reference=False")
        return self.token_logprobs.batched(self.engine.reference, batch)

    # ------------------------------------------------------------------ weights and checkpoints

    def named_weights(self, on_device: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """:meth:`LearnerEngine.named_weights` (ZeRO-3: a collective, all ranks iterate together)."""
        return self.engine.named_weights(on_device=on_device)

    def weight_shapes(self) -> list[tuple[str, torch.Tensor]]:
        """:meth:`LearnerEngine.weight_shapes`: names, shapes and dtypes as ``meta`` tensors, no gather."""
        return self.engine.weight_shapes()

    def reset_reference(self) -> None:
        """Copy the current policy into the reference model (iterative GRPO, paper §4.1.4)."""
        self.engine.reset_reference()

    def save_checkpoint(self, path: str | Path, extra: dict | None = None, tokenizer=None) -> Path:
        """:meth:`LearnerEngine.save_checkpoint` (atomic; all ranks call it)."""
        return self.engine.save_checkpoint(path, extra, tokenizer)

    def load_checkpoint(self, path: str | Path) -> dict:
        """:meth:`LearnerEngine.load_checkpoint`; returns the saved ``extra``."""
        return self.engine.load_checkpoint(path)
