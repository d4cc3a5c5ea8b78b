"""The paper's DPO loss (A.1.4) against the frozen reference, on chosen/rejected row pairs of a
:class:`learner.batch.PolicyBatch`, trained through its gradient coefficients."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dsmath import algorithms, grpo
from learner.batch import PolicyBatch, Rows


@dataclass(frozen=True)
class _WeightedRows(Rows):
    """The rows of a DPO step with each loss token's fixed coefficient (+GC on chosen rows, −GC on rejected)."""

    input_ids: Tensor  # [N, T] long
    attention_mask: Tensor  # [N, T] long
    loss_mask: Tensor  # [N, T] float
    coef: Tensor  # [N, T] float


class DPOObjective:
    """Rows 2k and 2k+1 of this rank's batch are pair k's chosen (right) and rejected (wrong) completion;
    ``loss_mask`` marks their tokens. The gradient is the DPO loss's, computed through its coefficients: a no-grad
    pass gives ρ = mean token log π_θ/π_ref per completion and GC = β·σ(β·(ρ⁻ − ρ⁺)) per pair
    (:func:`dsmath.algorithms.dpo_coefficients`); the step then descends −Σ_pairs GC·(ρ⁺ − ρ⁻)/P with GC held
    fixed, whose gradient at the current weights equals that of mean −log σ(β·(ρ⁺ − ρ⁻)). So micro-batches may
    split pairs. ``dpo/loss``, ``dpo/margin`` and ``dpo/pair_accuracy`` are measured before the step, over all
    ranks' pairs.
    """

    def __init__(self, logprobs, beta: float) -> None:
        self.logprobs, self.beta = logprobs, beta
        self._pairs, self._before = 1.0, {}

    def prepare(self, engine, batch: PolicyBatch) -> _WeightedRows:
        if batch.size % 2:
            raise ValueError(f"dpo_step needs chosen/rejected row pairs; got {batch.size} rows")
        if engine.reference is None:
            raise RuntimeError("dpo_step needs the frozen reference model (with_reference=True)")
        logp = self.logprobs.batched(engine.ds, batch)  # [N, T]
        ref = self.logprobs.batched(engine.reference, batch)  # [N, T]
        rho = algorithms.sequence_log_ratio(logp, ref, batch.loss_mask)  # [N]
        chosen, rejected = rho[0::2], rho[1::2]  # [P] each
        _, local = algorithms.dpo_loss(chosen, rejected, self.beta)
        coef = algorithms.dpo_coefficients(chosen, rejected, self.beta)  # [P]
        signed = torch.stack([coef, -coef], dim=1).reshape(-1)  # [N] +GC on chosen rows, −GC on rejected
        pairs_here = float(batch.size // 2)
        (pairs, loss_sum, margin_sum, acc_sum) = engine.all_reduce(
            [pairs_here, local["dpo/loss"] * pairs_here, local["dpo/margin"] * pairs_here,
             local["dpo/pair_accuracy"] * pairs_here])
        self._pairs = pairs
        n = max(pairs, 1.0)
        self._before = {"loss": loss_sum / n, "dpo/loss": loss_sum / n, "dpo/margin": margin_sum / n,
                        "dpo/pair_accuracy": acc_sum / n, "dpo/coef_mean": float(coef.mean()) if coef.numel() else 0.0}
        return _WeightedRows(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             loss_mask=batch.loss_mask, coef=signed[:, None] * batch.loss_mask)  # coef [N, T]

    def loss(self, model, mb: _WeightedRows) -> tuple[torch.Tensor, dict]:
        lp, _ = self.logprobs(model, mb)  # [n, w]
        mb = mb.to(self.logprobs.device)
        # Σ_rows ±GC·ρ_θ(row) / P: per-sequence token mean of GC·logp, summed over rows, over the pairs.
        return grpo.aggregate(-mb.coef * lp, mb.loss_mask, "seq_mean_token_mean", normalizer=self._pairs), {}

    def summarize(self, engine, batch: _WeightedRows, loss: float, parts: list[dict]) -> dict[str, float]:
        return {**self._before, **engine.common_metrics()}
