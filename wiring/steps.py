"""From scored samples to the learner's batch, and the step's metric row: built here, in one place."""

from __future__ import annotations

from dsmath.records import Rollout, RewardResult


def build_train_batch(rollouts: list[Rollout], advantages, pad_id: int, max_length: int, *,
                      mask_truncated: bool = False):
    """The learner's batch; ``mask_truncated`` (``rollout.overlong=mask``) drops completions that hit the length
    limit from the loss (their group statistics still count them)."""
    from learner.batch import collate_rollouts

    def loss_mask(r: Rollout) -> list[int]:
        if mask_truncated and r.truncated:
            return [0] * len(r.completion_ids)
        return list(r.loss_mask) if r.loss_mask else [1] * len(r.completion_ids)

    return collate_rollouts(
        [r.prompt_ids for r in rollouts],
        [r.completion_ids for r in rollouts],
        pad_id=pad_id,
        advantages=[a if isinstance(a, list) else float(a) for a in advantages],
        loss_masks=[loss_mask(r) for r in rollouts],
        max_length=max_length,
    )


def generator_logprobs(rollouts: list[Rollout], batch):
    """``[N, T]``: each sampled token's log-prob under the generator that sampled it, at the batch's positions."""
    import torch

    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)  # [N, T]
    for i, r in enumerate(rollouts):
        p = len(r.prompt_ids)
        k = min(len(r.logprobs), batch.input_ids.shape[1] - p)
        if k > 0:
            out[i, p - 1:p - 1 + k] = torch.tensor(r.logprobs[:k], dtype=torch.float32)
    return out


def logprob_gap(rollouts: list[Rollout], batch, learner_logprobs) -> float:
    """Max |generator logprob − learner logprob| over the trained tokens: a weight-sync bug shows up here."""
    sel = batch.loss_mask.bool()  # [N, T]
    gap = (generator_logprobs(rollouts, batch) - learner_logprobs.float()).abs()[sel]
    return float(gap.max()) if gap.numel() else 0.0


def rollout_metrics(rollouts: list[Rollout], results: list[RewardResult], group_size: int) -> dict:
    import torch

    rewards = torch.tensor([r.reward for r in results], dtype=torch.float32)  # [B*G]
    groups = rewards.view(-1, group_size)  # [B, G]
    lengths = torch.tensor([len(r.completion_ids) for r in rollouts], dtype=torch.float32)
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "accuracy": float(sum(r.correct for r in results) / len(results)),
        "zero_std_groups": float((groups.std(dim=1) == 0).float().mean()),
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "truncation_rate": float(sum(r.truncated for r in rollouts) / len(rollouts)),
        "grading_timeouts": float(sum(r.timed_out for r in results)),
    }


def tool_metrics(rollouts: list[Rollout]) -> dict:
    """Tool-integrated rollouts (``rollout.mode=tool``): the step's tool calls (``output`` blocks the sandbox
    wrote into completions: runs of ``loss_mask`` 0) and their tokens, which the learner never trains on. Both 0.0
    in the other modes."""
    calls = tokens = 0
    for r in rollouts:
        mask = r.loss_mask or ()
        tokens += sum(1 for m in mask if not m)
        calls += sum(1 for i, m in enumerate(mask) if not m and (i == 0 or mask[i - 1]))
    return {"rollout/tool_calls": float(calls), "rollout/tool_output_tokens": float(tokens)}


def verifier_metrics(results: list[RewardResult]) -> dict:
    """The verifier audit of the step's trained samples: no-answer parses and grader timeouts (rates over all),
    and the second check's disagreement (``reward.audit_fraction``; the rate is over the audited samples, 0.0
    when none was audited this step)."""
    n = max(1, len(results))
    audited = sum(r.audited for r in results)
    disagreed = sum(r.audited and r.audit_disagrees for r in results)
    return {
        "verifier/no_answer_rate": sum(r.no_answer for r in results) / n,
        "verifier/timeout_rate": sum(r.timed_out for r in results) / n,
        "verifier/audited": float(audited),
        "verifier/disagreements": float(disagreed),
        "verifier/disagreement_rate": disagreed / audited if audited else 0.0,
        "verifier/grader_seconds_max": max((r.grader_seconds for r in results), default=0.0),
    }


def generator_health(gen_pool) -> list[dict]:
    import ray

    out = []
    for i, actor in enumerate(gen_pool.actors):
        try:
            h = ray.get(actor.health.remote(), timeout=10)
            out.append({"id": i, "alive": h.alive, "weight_version": h.weight_version,
                        "requests": h.requests_served, "tokens": h.tokens_generated})
        except Exception:  # noqa: BLE001 - a dead or hung generator is shown as such, not raised
            out.append({"id": i, "alive": False})
    return out


def step_row(samples, train_metrics: dict, timings: dict, *, group_size: int, state, staleness: list[int],
             logprob_gap: float, sync, gen_pool, reward_pool) -> dict:
    """The step's metric row (``metrics.jsonl``, the status view, Prometheus): every key is set here.

    ``timings`` are the driver's stage times of this step (``time/<stage>``); ``samples.timings`` the producer's
    rollout/reward times (in async mode: of the rollout that overlapped the previous update)."""
    rollouts, results = samples.rollouts, samples.results
    row = rollout_metrics(rollouts, results, group_size)
    row.update(verifier_metrics(results))
    row.update(tool_metrics(rollouts))
    row.update({k if "/" in k else f"train/{k}": v for k, v in train_metrics.items()})
    row.update(samples.timings)
    row.update(timings)
    completion_tokens = sum(len(r.completion_ids) for r in rollouts)
    if row.get("time/rollout", 0.0) > 0:  # (offline sampling generates nothing during the step)
        row["tokens_per_s"] = completion_tokens / row["time/rollout"]
    row["samples"] = len(rollouts)
    row["rollout/logprob_abs_diff_max"] = logprob_gap
    row["weight_version"] = state.weight_version
    row["samples_trained"] = state.samples_trained
    row["staleness/mean"] = sum(staleness) / len(staleness)
    row["staleness/max"] = max(staleness)
    row["dynamic_sampling/dropped_groups"] = samples.dropped_groups
    row["dynamic_sampling/rounds"] = samples.rounds
    row["reward/grader_failed_groups"] = samples.grader_failed_groups
    row["weight_sync/bytes"] = float(sync.bytes) if sync else 0.0
    row["weight_sync/pause_s"] = float(sync.pause_s) if sync else 0.0
    row["weight_sync/transfer_s"] = float(sync.transfer_s) if sync else 0.0
    row["faults/generator_restarts"] = gen_pool.restarts
    row["faults/reward_worker_restarts"] = reward_pool.restarts
    row["faults/reissued_samples"] = gen_pool.reissued
    return row
