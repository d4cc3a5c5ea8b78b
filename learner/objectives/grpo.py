"""The policy objective of the GRPO family (GRPO, Dr. GRPO, DAPO-style clipping, online RFT, PPO's clipped policy
step): :func:`dsmath.grpo.grpo_loss` on a :class:`learner.batch.PolicyBatch`, with the KL term against the frozen
reference when ``methods.loss_beta`` > 0."""

from __future__ import annotations

import dataclasses
import math

import torch

from dsmath import grpo, methods
from dsmath.config import AlgorithmConfig
from dsmath.errors import UserError
from learner.batch import PolicyBatch

# Mean-type GRPO metrics, combined over micro-batches and ranks weighted by their token counts.
_TOKEN_MEAN_KEYS = ("clip_frac", "ratio_mean", "pg_loss", "kl", "kl_loss", "entropy", "is_weight_mean")


class PolicyObjective:
    """The clipped policy-gradient loss (plus β·KL) over ``loss_mask``, aggregated per ``algo_cfg.loss_agg`` with
    the divisor taken over the global batch (all ranks).

    Needs ``batch.advantages``. ``old_logprobs`` None: the learner's own detached log-probs (ratio 1).
    ``ref_logprobs`` None with β > 0: computed with the engine's reference (a host-memory reference before the
    micro-batches, a device copy per micro-batch). Metrics: ``loss``, ``tokens``, token-weighted means of the
    loss's own metrics, ratio and advantage extremes/moments, ``logprob_gap`` when ``behaviour_logprobs`` is given.
    """

    def __init__(self, logprobs, algo_cfg: AlgorithmConfig, *, max_tokens: int | None = None) -> None:
        """``logprobs``: the engine's :class:`learner.logprobs.TokenLogprobs`. ``max_tokens`` is Dr. GRPO's
        constant for ``loss_agg='seq_mean_token_sum_norm'`` (e.g. ``rollout.max_new_tokens``)."""
        self.check(algo_cfg, max_tokens)
        self.logprobs, self.cfg, self.max_tokens = logprobs, algo_cfg, max_tokens
        self.beta = methods.loss_beta(algo_cfg)  # PPO pays the KL as a per-token reward, not as a loss term
        self._normalizer = 0.0
        self._reference = None

    @staticmethod
    def check(algo_cfg: AlgorithmConfig, max_tokens: int | None) -> None:
        """A one-line UserError for settings this objective cannot train with (checked before any model loads)."""
        if algo_cfg.loss_agg == "seq_mean_token_sum_norm" and not max_tokens:
            raise UserError("algorithm.loss_agg=seq_mean_token_sum_norm (Dr. GRPO) needs the learner's max_tokens "
                            "(pass rollout.max_new_tokens)")

    def prepare(self, engine, batch: PolicyBatch) -> PolicyBatch:
        from learner.reference import HostReference

        if batch.advantages is None:
            raise ValueError("grpo_step needs batch.advantages")
        need_ref = self.beta > 0
        if need_ref and batch.ref_logprobs is None and engine.reference is None:
            raise ValueError("beta > 0 needs batch.ref_logprobs or a learner with a reference model")
        if need_ref and batch.ref_logprobs is None and isinstance(engine.reference, HostReference):
            # Swapping weights inside the step would invalidate the autograd graph: do the reference pass first.
            batch = dataclasses.replace(batch, ref_logprobs=self.logprobs.batched(engine.reference, batch))
        self._reference = engine.reference
        (self._normalizer,) = engine.all_reduce([grpo.loss_normalizer(batch.loss_mask, self.cfg.loss_agg,
                                                                      self.max_tokens)])
        return batch

    def loss(self, model, mb: PolicyBatch) -> tuple[torch.Tensor, dict]:
        g, need_ref = self.cfg, self.beta > 0
        logp, ent = self.logprobs(model, mb, with_entropy=True)  # [n, w] each
        mb = mb.to(self.logprobs.device)
        old = mb.old_logprobs if mb.old_logprobs is not None else logp.detach()  # [n, w]
        ref = mb.ref_logprobs  # [n, w] or None
        if need_ref and ref is None:
            with torch.no_grad():
                ref, _ = self.logprobs(self._reference, mb)  # [n, w]
        loss, metrics = grpo.grpo_loss(
            logp, old, ref if need_ref else None, mb.advantages, mb.loss_mask,
            clip_eps_low=g.clip_eps_low, clip_eps_high=g.clip_eps_high, beta=self.beta, loss_agg=g.loss_agg,
            max_tokens=self.max_tokens, is_weights=mb.is_weights, entropy=ent, normalizer=self._normalizer,
        )
        if mb.behaviour_logprobs is not None:  # sampler vs learner on the sampled tokens: a sync-bug detector
            sel = mb.loss_mask.bool()  # [n, w]
            gap = (logp.detach() - mb.behaviour_logprobs).abs()[sel]  # [k]
            metrics["logprob_gap"] = float(gap.max()) if gap.numel() else 0.0
        return loss, metrics

    def summarize(self, engine, batch: PolicyBatch, loss: float, parts: list[dict]) -> dict[str, float]:
        """Token-weighted means and global extremes over micro-batches and ranks (four collectives, fixed order)."""
        sums = [sum(m.get("tokens", 0.0) for m in parts)]
        for key in _TOKEN_MEAN_KEYS:
            sums.append(sum(m[key] * m["tokens"] for m in parts if key in m))
        sel = batch.loss_mask.bool()  # [N, T]
        adv = batch.advantages[sel].double()  # [k]
        sums += [float(adv.sum()), float((adv * adv).sum())]
        sums = engine.all_reduce(sums)
        big = -1e30
        extremes = engine.all_reduce(
            [max([m.get("ratio_max", big) for m in parts] or [big]), -min([m.get("ratio_min", -big) for m in parts] or [-big]),
             float(adv.max()) if adv.numel() else big, -float(adv.min()) if adv.numel() else big],
            op="max",
        )
        tokens = sums[0]
        metrics = {"loss": loss, "tokens": tokens, **engine.common_metrics()}
        if batch.behaviour_logprobs is not None:
            (metrics["logprob_gap"],) = engine.all_reduce([max([m.get("logprob_gap", 0.0) for m in parts] or [0.0])],
                                                          op="max")
        if tokens:
            present = {k for m in parts for k in m}
            for key, total in zip(_TOKEN_MEAN_KEYS, sums[1:]):
                if key in present:
                    metrics[key] = total / tokens
            mean = sums[-2] / tokens
            metrics.update(
                ratio_max=extremes[0], ratio_min=-extremes[1], adv_mean=mean,
                adv_std=math.sqrt(max(0.0, sums[-1] / tokens - mean * mean)), adv_max=extremes[2], adv_min=-extremes[3],
            )
        return metrics
