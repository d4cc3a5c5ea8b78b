"""The reward model, as a part of the ``combined`` reward (:mod:`dsmath.rewards.combined`): an outcome reward model
(one score per completion) or a process reward model (a score at the end of every reasoning step). It is no kind of
its own: a score is not a verdict, and ``RewardResult.correct`` (and every accuracy metric) stays the rule's.

The model is a transformers token-classification model with one label (``AutoModelForTokenClassification``,
``num_labels=1``): the policy's transformer plus a linear head on every position. Why that and not a head bolted
onto the causal LM: one forward pass scores every token, so the ORM (score at the last token) and the PRM
(scores at the step ends) are the same model and the same code; it saves and loads as a plain HF folder; and it
can be initialised from any policy checkpoint (the body's weights load, the head starts fresh). A score is
``sigmoid(logit)``, the model's probability that the solution so far leads to the gold answer.

The reward model must share the policy's tokenizer (``dsmath rm train`` initialises it from the policy): it reads
the rollout's own ``prompt_ids + completion_ids``, so step-end indices are the policy's completion-token indices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from dsmath.errors import UserError
from dsmath.model_folder import model_folder
from dsmath.records import Rollout
from dsmath.reward_models import completion_step_ends, gather_scores


def load_reward_model(model_dir: str | Path):
    """(model, tokenizer) from an RM folder, in eval mode, float32, on CPU (the actor asks Ray for no GPU; a tiny
    or mid-size RM scores a chunk in well under the generation time, and the GPUs stay with vLLM and the learner)."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    path = model_folder(model_dir, f"reward.model_path={model_dir}", "; train one with dsmath rm train")
    model = AutoModelForTokenClassification.from_pretrained(str(path), dtype=torch.float32)
    if model.config.num_labels != 1:
        raise UserError(f"{model_dir}: a reward model needs one output label, this one has {model.config.num_labels}")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model.eval().requires_grad_(False), tokenizer


class RewardModelScorer:
    """Batched scoring of rollouts with one reward model.

    Guaranteed: one entry per rollout, in order; scores are in (0, 1). Step ends come from
    ``dsmath.reward_models.completion_step_ends`` with the model's tokenizer (the same function the RM learner
    labels with).
    """

    def __init__(self, model_dir: str | Path, *, batch_size: int = 32):
        self.model, self.tokenizer = load_reward_model(model_dir)
        self.batch_size = batch_size
        self.vocab = int(self.model.config.vocab_size)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _score_positions(self, sequences: list[list[int]], positions: list[list[int]]) -> list[list[float]]:
        """sigmoid(RM logit) at ``positions[i]`` (sequence positions) of ``sequences[i]``, in batches."""
        out: list[list[float]] = [[] for _ in sequences]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for lo in range(0, len(sequences), self.batch_size):
            part = sequences[lo:lo + self.batch_size]
            width = max(len(s) for s in part)
            ids = torch.full((len(part), width), pad, dtype=torch.long)  # [n, w] right-padded
            mask = torch.zeros((len(part), width), dtype=torch.long)  # [n, w]
            for i, s in enumerate(part):
                if s and max(s) >= self.vocab:
                    raise UserError(f"token id {max(s)} is outside the reward model's vocabulary ({self.vocab}): "
                                    "the RM must share the policy's tokenizer")
                ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
                mask[i, :len(s)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask).logits[..., 0].float()  # [n, w]
            rows = [i for i in range(len(part)) for _ in positions[lo + i]]
            cols = [p for i in range(len(part)) for p in positions[lo + i]]
            flat = torch.sigmoid(gather_scores(logits, rows, cols)).tolist()  # [J]
            j = 0
            for i in range(len(part)):
                n = len(positions[lo + i])
                out[lo + i] = flat[j:j + n]
                j += n
        return out

    def outcome_scores(self, rollouts: Sequence[Rollout]) -> list[float]:
        """The score at each completion's last token (the last prompt token for an empty completion)."""
        seqs = [list(r.prompt_ids) + list(r.completion_ids) for r in rollouts]
        return [s[0] for s in self._score_positions(seqs, [[len(q) - 1] for q in seqs])]

    def step_scores(self, rollouts: Sequence[Rollout], delimiter: str) -> list[tuple[list[float], list[int]]]:
        """(scores, completion-token indices) at every step end of each completion; empty for an empty one."""
        ends = [completion_step_ends(self._decode, r.completion_ids, delimiter) for r in rollouts]
        seqs = [list(r.prompt_ids) + list(r.completion_ids) for r in rollouts]
        positions = [[len(r.prompt_ids) + k for k in e] for r, e in zip(rollouts, ends)]
        return list(zip(self._score_positions(seqs, positions), ends))
