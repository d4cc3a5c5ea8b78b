"""PPO's value model: the policy learner's DeepSpeed engine, optimizer and micro-batching around a scalar head.

The model is the policy's transformer with a one-label token-classification head (``AutoModelForTokenClassification``,
the head freshly initialised, the body from ``model_dir`` — usually the SFT model, as the paper's PPO baseline).
The value at sequence position t is V(s_t), the state after tokens 0..t — the same alignment as
:mod:`learner.batch` logprobs (position t scores token t+1), so a value lines up with the log-prob of the
token sampled from that state.

Batches reuse :class:`learner.batch.TrainBatch`: for :meth:`ValueLearner.value_step`, ``advantages`` carries the
GAE returns and ``old_logprobs`` the values before the update (for the clipped value loss).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsmath import algorithms
from learner.batch import TrainBatch, micro_batches
from learner.policy import PolicyLearner


class ValueLearner(PolicyLearner):
    """V_ψ on DeepSpeed (same ZeRO set-up as the policy). No reference model.

    ``value_clip`` is PPO's value clipping range around the old values (≤ 0: off).
    """

    def __init__(self, model_dir: str | Path, learner_cfg, *, value_clip: float = 0.2, **kwargs) -> None:
        kwargs.setdefault("with_reference", False)
        self.value_clip = value_clip
        super().__init__(model_dir, learner_cfg, None, **kwargs)
        if not hasattr(self.engine.module, "score") and not hasattr(self.engine.module, "classifier"):
            raise RuntimeError("ValueLearner needs PolicyLearner._load_model (a scalar head); got a plain causal LM")

    def _load_model(self):
        from transformers import AutoConfig, AutoModelForTokenClassification

        config = AutoConfig.from_pretrained(str(self.model_dir), num_labels=1)
        config.classifier_dropout = 0.0  # dropout before the head would make V(s) noisy; PPO needs it deterministic
        return AutoModelForTokenClassification.from_pretrained(str(self.model_dir), config=config, dtype=torch.float32)

    def _values(self, model, mb: TrainBatch) -> torch.Tensor:
        mb = mb.to(self.device)
        return model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[..., 0].float()  # [n, w]

    @torch.no_grad()
    def values(self, batch: TrainBatch) -> torch.Tensor:
        """V(s_t) ``[N, T]`` for every position (padding positions hold junk — mask them)."""
        self.engine.eval()
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)  # [N, T]
        for rows, mb in micro_batches(batch, self.cfg.micro_batch_size, self.max_tokens_per_micro_batch):
            v = self._values(self.engine, mb)  # [n, w]
            out[rows, : v.shape[1]] = v.cpu()
        return out

    def value_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step of the clipped value loss, token mean over the global batch's ``loss_mask``.

        ``batch.advantages`` = returns, ``batch.old_logprobs`` = values before the update (both ``[N, T]``)."""
        if batch.advantages is None or batch.old_logprobs is None:
            raise ValueError("value_step needs returns in batch.advantages and old values in batch.old_logprobs")
        (normalizer,) = self._all_reduce([float(batch.loss_mask.sum())])
        stats = {"abs_err": 0.0}

        def loss_fn(mb: TrainBatch):
            v = self._values(self.engine, mb)  # [n, w]
            mb = mb.to(self.device)
            loss, m = algorithms.value_loss(v, mb.old_logprobs, mb.advantages, mb.loss_mask, clip=self.value_clip,
                                            normalizer=normalizer)
            stats["abs_err"] += m["value/abs_err"] * float(mb.loss_mask.sum())
            return loss, {}

        loss, _ = self._run_step(batch, loss_fn)
        (abs_err,) = self._all_reduce([stats["abs_err"]])
        common = self._common_metrics()
        return {"value/loss": loss, "value/abs_err": abs_err / max(normalizer, 1.0),
                "value/grad_norm": common.get("grad_norm", 0.0), "value/lr": common["lr"]}
