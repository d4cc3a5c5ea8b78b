"""Typed, versioned records that cross actor boundaries.

Every record is a frozen dataclass with a ``schema`` version so that a driver and an actor of
different dsmath versions fail loudly instead of mis-reading each other. Records hold plain
Python data (lists, not tensors) so they pickle cheaply through Ray's object store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Problem:
    """One question with its gold answer."""

    uid: str
    question: str
    answer: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = True


@dataclass(frozen=True)
class GenerationRequest:
    """Sample ``sampling.n`` completions of ``prompt`` (already formatted with a template)."""

    request_id: str
    problem: Problem
    prompt: str
    sampling: SamplingParams
    schema: int = SCHEMA_VERSION


@dataclass(frozen=True)
class Rollout:
    """One completion. ``logprobs[i]`` is the generator's log-prob of ``completion_ids[i]``.

    ``loss_mask[i]`` is 0 for tokens that must not be trained on (tool output in tool-integrated
    rollouts); it is all ones otherwise.
    """

    request_id: str
    sample_index: int
    problem: Problem
    prompt: str
    prompt_ids: tuple[int, ...]
    completion: str
    completion_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str
    weight_version: int
    generator_id: str
    loss_mask: tuple[int, ...] = ()
    # Generated again after the generator first asked died (``actors.pool`` reissues the same request and seed).
    reissued: bool = False
    schema: int = SCHEMA_VERSION

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass(frozen=True)
class RewardResult:
    request_id: str
    sample_index: int
    reward: float
    correct: bool
    reason: str
    extracted: str | None = None
    timed_out: bool = False
    step_rewards: tuple[float, ...] = ()
    step_end_token_index: tuple[int, ...] = ()
    # The grader (or sandbox) failed on this sample, even after retries on fresh workers: ``reward`` and
    # ``correct`` judge nothing. The driver drops the sample's group (counted), never trains on it as wrong.
    grader_failed: bool = False
    # Wall seconds the grader (or sandbox) spent on this sample, re-gradings included.
    grader_seconds: float = 0.0
    # Graded again after the reward worker first asked died (``actors.pool`` reissues the same rollouts).
    reissued: bool = False
    # Verifier audit (``reward.audit_fraction``): this sample was also judged by a second check
    # (``reward.audit_check``); ``audit_disagrees`` when its verdict differs, ``audit_reason`` is what it said.
    audited: bool = False
    audit_disagrees: bool = False
    audit_reason: str = ""
    schema: int = SCHEMA_VERSION

    @property
    def no_answer(self) -> bool:
        """No final answer could be extracted (a parse failure, not a grader failure or a timeout)."""
        return self.extracted is None and not self.grader_failed and not self.timed_out and not self.correct


@dataclass(frozen=True)
class WeightBucket:
    """A slice of the state dict, sent in one RPC. ``version`` is the policy version it belongs to."""

    version: int
    bucket_index: int
    num_buckets: int
    names: tuple[str, ...]
    schema: int = SCHEMA_VERSION


@dataclass(frozen=True)
class GeneratorHealth:
    generator_id: str
    weight_version: int
    alive: bool
    requests_served: int
    tokens_generated: int
    last_error: str = ""
    schema: int = SCHEMA_VERSION


@dataclass(frozen=True)
class ModelFiles:
    """A folder's files as bytes, sent through the object store to a node without a copy (no shared filesystem):
    a model folder without its weights for a generator (its weights then come from the learner), a whole model
    folder for a learner rank or a reward worker, a whole checkpoint (names relative, with sub-folders) for the
    driver. ``source`` is the folder they were read from, for messages only: the receiver never opens it."""

    files: tuple[tuple[str, bytes], ...]
    source: str
    schema: int = SCHEMA_VERSION


def check_schema(record: object) -> None:
    """Raise if ``record`` was made by an incompatible dsmath version."""
    version = getattr(record, "schema", None)
    if version != SCHEMA_VERSION:
        raise TypeError(
            f"{type(record).__name__} has schema {version}, this dsmath speaks {SCHEMA_VERSION}: "
            "driver and actors run different dsmath versions"
        )
