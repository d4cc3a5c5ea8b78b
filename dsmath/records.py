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
    schema: int = SCHEMA_VERSION


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


def check_schema(record: object) -> None:
    """Raise if ``record`` was made by an incompatible dsmath version."""
    version = getattr(record, "schema", None)
    if version != SCHEMA_VERSION:
        raise TypeError(
            f"{type(record).__name__} has schema {version}, this dsmath speaks {SCHEMA_VERSION}: "
            "driver and actors run different dsmath versions"
        )
