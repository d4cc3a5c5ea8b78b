"""Training batches: typed row containers (one per objective), the rollout collator, sharding and micro-batching.

**The alignment convention (used everywhere in the learner).** ``input_ids`` is ``[N, T]``:
prompt then completion, right-padded. Every per-token tensor of a :class:`PolicyBatch` or :class:`LMBatch`
(``loss_mask``, ``advantages``, ``old_logprobs``, ``ref_logprobs``, ``is_weights`` and what
:meth:`PolicyLearner.logprobs` returns) is also ``[N, T]``, and **position t holds the value for token t+1** — the
log-prob of ``input_ids[:, t+1]`` given ``input_ids[:, :t+1]``. So completion token k of a sample whose prompt
has P tokens (``input_ids[P+k]``) lives at position ``P−1+k``; the last column is never a target
and its ``loss_mask`` is always 0. A :class:`ValueBatch` has the same alignment (V(s_t) at t); a
:class:`RewardModelBatch` scores the token itself (see its docstring).

Every batch type is a frozen dataclass of ``[N, T]`` tensors (optional ones may be None) built on :class:`Rows`,
which gives them the row operations :func:`micro_batches` and the learners need (select, shard, to, lengths).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence, TypeVar

import torch
from torch import Tensor

R = TypeVar("R", bound="Rows")


class Rows:
    """Row operations shared by every batch dataclass: each field is an ``[N, T]`` tensor or None.

    Guaranteed: ``select``/``shard``/``to`` return the same type with every non-None field transformed alike
    (None stays None); construction checks that every field has ``input_ids``'s shape.
    """

    input_ids: Tensor  # [N, T] long
    attention_mask: Tensor  # [N, T] long, 1 on real tokens (a prefix of each row)

    def __post_init__(self) -> None:
        n, t = self.input_ids.shape
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and tuple(v.shape) != (n, t):
                raise ValueError(f"{type(self).__name__}.{f.name} has shape {tuple(v.shape)}, expected {(n, t)}")

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def lengths(self) -> Tensor:
        return self.attention_mask.sum(dim=1)  # [N]

    def select(self: R, index: Sequence[int] | Tensor, width: int | None = None) -> R:
        """Rows ``index`` (in that order), columns trimmed to ``width`` (default: keep T)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        cols = slice(None) if width is None else slice(0, width)
        return replace(self, **{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx][:, cols])
                                for f in fields(self)})

    def shard(self: R, rank: int, world_size: int) -> R:
        """The ``rank``-th of ``world_size`` equal contiguous slices (N must divide evenly)."""
        if self.size % world_size:
            raise ValueError(f"a batch of {self.size} sequences does not split evenly over {world_size} ranks")
        per = self.size // world_size
        return self.select(range(rank * per, (rank + 1) * per))

    def to(self: R, device: torch.device | str) -> R:
        return replace(self, **{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                                for f in fields(self)})


@dataclass(frozen=True)
class LMBatch(Rows):
    """Language modelling (SFT, pre-training): token-mean NLL over ``loss_mask``."""

    input_ids: Tensor  # [N, T] long
    attention_mask: Tensor  # [N, T] long
    loss_mask: Tensor  # [N, T] float, 1 where the token at t+1 is trained on

    @classmethod
    def of(cls, batch: Rows) -> "LMBatch":
        """The LM view of any batch with ``input_ids``/``attention_mask``/``loss_mask`` (same tensors, no copy)."""
        return cls(input_ids=batch.input_ids, attention_mask=batch.attention_mask, loss_mask=batch.loss_mask)


@dataclass(frozen=True)
class PolicyBatch(Rows):
    """N sequences for a policy (GRPO-family) step. Required: ids, attention and loss masks. The RL fields are
    optional so that the rollout collator also builds SFT batches (``advantages`` is needed by ``grpo_step``).

    ``old_logprobs`` None means "on-policy": the learner uses its own detached log-probs (ratio 1).
    ``ref_logprobs`` None means the learner computes them with its reference model when β > 0.
    """

    input_ids: Tensor  # [N, T] long
    attention_mask: Tensor  # [N, T] long, 1 on real tokens (a prefix of each row)
    loss_mask: Tensor  # [N, T] float, 1 where the token at t+1 is trained on
    advantages: Tensor | None = None  # [N, T] float
    old_logprobs: Tensor | None = None  # [N, T] float
    ref_logprobs: Tensor | None = None  # [N, T] float
    is_weights: Tensor | None = None  # [N, T] float
    # The generator's log-probs of the sampled tokens (only for the logprob-gap check, never in the loss).
    behaviour_logprobs: Tensor | None = None  # [N, T] float


TrainBatch = PolicyBatch  # the rollout collator's batch: the name the driver, benches and tests use


@dataclass(frozen=True)
class ValueBatch(Rows):
    """PPO's value-model step: GAE ``returns`` (targets) and ``old_values`` (V before the update, for the clipped
    value loss) at the positions of ``loss_mask``; V(s_t) sits at position t (the log-prob alignment)."""

    input_ids: Tensor  # [N, T] long
    attention_mask: Tensor  # [N, T] long
    loss_mask: Tensor  # [N, T] float
    returns: Tensor  # [N, T] float
    old_values: Tensor  # [N, T] float


@dataclass(frozen=True)
class RewardModelBatch(Rows):
    """Reward-model training: 0/1 ``labels`` at the scored positions ``score_mask`` (1 there). Unlike the log-prob
    alignment, a score sits at the token it scores (the head has read tokens up to and including it)."""

    input_ids: Tensor  # [N, T] long
    attention_mask: Tensor  # [N, T] long
    score_mask: Tensor  # [N, T] float, 1 at labelled token positions
    labels: Tensor  # [N, T] float, 0/1 where score_mask is 1 (0 elsewhere)


def _per_token(values, lengths: list[int], name: str) -> list[list[float]]:
    """Broadcast a per-sequence scalar to its completion tokens, or check a per-token list."""
    out = []
    for i, (v, n) in enumerate(zip(values, lengths)):
        if isinstance(v, (int, float)):
            out.append([float(v)] * n)
        else:
            v = [float(x) for x in v]
            if len(v) != n:
                raise ValueError(f"{name}[{i}] has {len(v)} values for {n} completion tokens")
            out.append(v)
    return out


def collate_rollouts(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    advantages: Sequence[float | Sequence[float]] | None = None,
    old_logprobs: Sequence[Sequence[float]] | None = None,
    loss_masks: Sequence[Sequence[int]] | None = None,
    ref_logprobs: Sequence[Sequence[float]] | None = None,
    is_weights: Sequence[Sequence[float]] | None = None,
    max_length: int | None = None,
) -> PolicyBatch:
    """Right-pad prompt+completion and place per-completion-token values at their logprob
    positions (see the module docstring).

    ``advantages[i]`` is a float (broadcast over the completion: outcome supervision) or one value
    per completion token (process supervision). ``loss_masks[i]`` (per completion token; 0 for tool
    output) defaults to all ones. ``max_length`` truncates the completion's tail when
    prompt+completion is longer (the truncated tokens are simply not trained on).
    """
    n = len(prompt_ids)
    if len(completion_ids) != n:
        raise ValueError(f"{n} prompts but {len(completion_ids)} completions")
    seqs, plens, clens = [], [], []
    for p, c in zip(prompt_ids, completion_ids):
        if len(p) == 0:
            raise ValueError("a prompt must have at least one token (the first completion token is predicted from it)")
        seq = list(p) + list(c)
        if max_length is not None:
            seq = seq[:max_length]
        seqs.append(seq)
        plens.append(len(p))
        clens.append(max(0, len(seq) - len(p)))
    t = max(len(s) for s in seqs) if seqs else 1
    input_ids = torch.full((n, t), pad_id, dtype=torch.long)
    attention = torch.zeros(n, t, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, : len(s)] = 1

    full_lens = [len(c) for c in completion_ids]

    def place(values, name: str, default: float | None) -> Tensor | None:
        if values is None and default is None:
            return None
        out = torch.zeros(n, t, dtype=torch.float32)
        rows = [[default] * k for k in full_lens] if values is None else _per_token(values, full_lens, name)
        for i, row in enumerate(rows):
            k = clens[i]
            if k:
                out[i, plens[i] - 1 : plens[i] - 1 + k] = torch.tensor(row[:k], dtype=torch.float32)
        return out

    loss_mask = place(loss_masks, "loss_masks", 1.0)
    return PolicyBatch(
        input_ids=input_ids,
        attention_mask=attention,
        loss_mask=loss_mask,
        advantages=place(advantages, "advantages", None),
        old_logprobs=place(old_logprobs, "old_logprobs", None),
        ref_logprobs=place(ref_logprobs, "ref_logprobs", None),
        is_weights=place(is_weights, "is_weights", None),
    )


def collate_from_rollouts(
    rollouts: Sequence,
    advantages: Sequence[float | Sequence[float]],
    *,
    pad_id: int,
    generator_logprobs_as_old: bool = False,
    max_length: int | None = None,
) -> PolicyBatch:
    """:func:`collate_rollouts` over :class:`dsmath.records.Rollout` records.

    Uses each rollout's ``loss_mask`` (tool output masked) when present. With
    ``generator_logprobs_as_old`` the generator's sampling log-probs become ``old_logprobs`` (the
    async off-policy case); otherwise ``old_logprobs`` stays None and the learner uses its own.
    """
    return collate_rollouts(
        [r.prompt_ids for r in rollouts],
        [r.completion_ids for r in rollouts],
        pad_id=pad_id,
        advantages=advantages,
        old_logprobs=[r.logprobs for r in rollouts] if generator_logprobs_as_old else None,
        loss_masks=[r.loss_mask if r.loss_mask else [1] * len(r.completion_ids) for r in rollouts],
        max_length=max_length,
    )


def micro_batches(batch: R, max_seqs: int, max_tokens: int | None = None) -> list[tuple[list[int], R]]:
    """Split into micro-batches, each padded only to its own longest sequence.

    Sequences are sorted by length (longest first) and packed greedily: at most ``max_seqs`` rows
    and, when ``max_tokens`` is set, at most ``max_tokens`` padded tokens (rows × width) per
    micro-batch — a single longer sequence still gets a micro-batch of its own. Returns
    ``(original row indices, micro-batch)`` pairs, of ``batch``'s type. Deterministic (stable sort).
    """
    lengths = batch.lengths().tolist()
    order = sorted(range(batch.size), key=lambda i: -lengths[i])
    out: list[tuple[list[int], R]] = []
    current: list[int] = []
    for i in order:
        width = max(lengths[current[0]], 1) if current else max(lengths[i], 1)
        fits = len(current) < max_seqs and (max_tokens is None or (len(current) + 1) * width <= max_tokens)
        if current and not fits:
            out.append((current, batch.select(current, width=max(lengths[current[0]], 1))))
            current = []
        current.append(i)
    if current:
        out.append((current, batch.select(current, width=max(lengths[current[0]], 1))))
    return out
