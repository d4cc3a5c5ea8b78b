"""The loss gate of bench/grpo_vs_trl.py: TRL's GRPOTrainer and dsmath's learner compute one batch's loss.

Before any timing, both sides must agree on what they optimise. One hand-built batch (real prompts, real
solution texts of varying length, rewards → group advantages, old and reference log-probs perturbed away
from the policy so that the clip and the k3 KL are both active) goes through

* TRL: a real ``GRPOTrainer`` (built with the bench's settings) and its ``compute_loss`` path, and
* dsmath: ``learner.batch.collate_rollouts`` + a real ``PolicyLearner.grpo_step`` (DeepSpeed, one rank;
  the loss it reports is computed before its optimizer step),

on identical tensors. Guaranteed: both losses come from the libraries' own code paths on the same model
folder; nothing is re-implemented here but the batch. Not covered: generation, reward plumbing and the
advantage formula (the bench sets dsmath's ``algorithm.adv_eps`` to TRL's 1e-4 instead).
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

# dsmath algorithm.loss_agg -> TRL loss_type with the same aggregation over one optimizer step's batch.
LOSS_TYPE_FOR_AGG = {"seq_mean_token_mean": "grpo", "seq_mean_token_sum_norm": "dr_grpo"}


@dataclass(frozen=True)
class MatchedSettings:
    """What both sides of the bench share (dsmath config names in comments)."""

    beta: float = 0.04  # algorithm.beta (k3 KL in the loss)
    clip_eps_low: float = 0.2  # algorithm.clip_eps_low
    clip_eps_high: float = 0.2  # algorithm.clip_eps_high
    lr: float = 3e-4  # learner.lr (constant, no warm-up, AdamW, weight decay 0)
    grad_clip: float = 1.0  # learner.grad_clip
    group_size: int = 8  # rollout.group_size
    questions_per_step: int = 16  # rollout.questions_per_step
    max_new_tokens: int = 96  # rollout.max_new_tokens
    micro_batch_size: int = 32  # learner.micro_batch_size
    loss_agg: str = "seq_mean_token_mean"  # algorithm.loss_agg
    adv_eps: float = 1e-4  # algorithm.adv_eps (TRL's constant)
    temperature: float = 1.0  # rollout.temperature

    @property
    def samples_per_step(self) -> int:
        return self.questions_per_step * self.group_size

    @property
    def trl_loss_type(self) -> str:
        if self.loss_agg not in LOSS_TYPE_FOR_AGG:
            raise ValueError(f"no TRL loss_type aggregates like dsmath {self.loss_agg!r}; use one of "
                             f"{', '.join(LOSS_TYPE_FOR_AGG)}")
        return LOSS_TYPE_FOR_AGG[self.loss_agg]

    def dsmath_overrides(self) -> list[str]:
        return [f"algorithm.beta={self.beta}", f"algorithm.clip_eps_low={self.clip_eps_low}",
                f"algorithm.clip_eps_high={self.clip_eps_high}", f"algorithm.loss_agg={self.loss_agg}",
                f"algorithm.adv_eps={self.adv_eps}", "algorithm.updates_per_step=1", f"learner.lr={self.lr}",
                "learner.warmup_steps=0", "learner.weight_decay=0.0", f"learner.grad_clip={self.grad_clip}",
                f"learner.micro_batch_size={self.micro_batch_size}", f"rollout.group_size={self.group_size}",
                f"rollout.questions_per_step={self.questions_per_step}",
                f"rollout.max_new_tokens={self.max_new_tokens}", f"rollout.temperature={self.temperature}",
                "rollout.top_p=1.0"]


def trl_config(match: MatchedSettings, output_dir: str, *, max_steps: int, per_device_batch: int | None = None,
               seed: int = 0, **overrides):
    """TRL ``GRPOConfig`` equal to dsmath's settings: one optimizer step per generation batch of
    ``questions_per_step × group_size`` samples, μ = 1, constant lr, fp32 on CPU, HF ``generate``.
    ``overrides`` replace any of the keyword arguments below (tests use them to break the match)."""
    from trl import GRPOConfig

    per_device = per_device_batch or match.micro_batch_size
    if match.samples_per_step % per_device:
        raise ValueError(f"{match.samples_per_step} samples per step do not split into micro-batches of {per_device}")
    accumulation = match.samples_per_step // per_device
    kwargs = dict(
        output_dir=output_dir, max_steps=max_steps, seed=seed, use_cpu=True, bf16=False, fp16=False,
        learning_rate=match.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=match.grad_clip, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation, num_iterations=1, num_generations=match.group_size,
        max_completion_length=match.max_new_tokens, temperature=match.temperature, top_p=1.0, top_k=0,
        beta=match.beta, epsilon=match.clip_eps_low, epsilon_high=match.clip_eps_high,
        loss_type=match.trl_loss_type, scale_rewards="group", mask_truncated_completions=False,
        # TRL 1.16 multiplies the KL term by the (differentiable) ratio by default (DeepSeek-V3.2); the
        # DeepSeekMath loss dsmath implements is the plain β·k3 term, so turn that off to compare like with like.
        use_bias_correction_kl=False,
        shuffle_dataset=False, use_vllm=False, logging_steps=1, save_strategy="no", report_to=[],
        log_completions=False, dataloader_num_workers=0, disable_tqdm=True,
    )
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


@dataclass(frozen=True)
class GateBatch:
    """N = prompts × G sequences; per-completion-token lists."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    advantages: list[float]
    old_logprobs: list[list[float]]
    ref_logprobs: list[list[float]]


def build_gate_batch(model_dir: str | Path, match: MatchedSettings, *, num_prompts: int = 4, seed: int = 0
                     ) -> GateBatch:
    """Real questions and solution texts (right and wrong answers, two formats, different lengths); the policy's
    own log-probs perturbed by seeded noise become old (σ 0.15: some ratios leave [1−ε, 1+ε]) and ref (σ 0.3)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsmath.grpo import group_advantages
    from dsmath.prompts import format_prompt
    from dsmath.tasks.arithmetic import direct_solution, generate_split, stepwise_solution

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rng = random.Random(seed)
    problems = generate_split("train", num_prompts, seed=seed)
    prompt_ids, completion_ids, rewards = [], [], []
    for p in problems:
        ids = tok(format_prompt(p.question, "tiny"))["input_ids"]
        for _ in range(match.group_size):
            correct = rng.random() < 0.5
            text = " " + (stepwise_solution(p) if rng.random() < 0.4 else direct_solution(p))
            if not correct:
                text = text.replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{int(p.answer) + rng.randint(1, 9)}}}")
            completion = tok(text)["input_ids"][: match.max_new_tokens - 1] + [tok.eos_token_id]
            prompt_ids.append(ids)
            completion_ids.append(completion)
            rewards.append(1.0 if correct else 0.0)
    advantages = group_advantages(torch.tensor(rewards), match.group_size, eps=match.adv_eps).tolist()

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    old, ref = [], []
    with torch.no_grad():
        for p_ids, c_ids in zip(prompt_ids, completion_ids):
            ids = torch.tensor([p_ids + c_ids])  # [1, P+C]
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)  # [P+C-1, V]
            own = logp.gather(1, ids[0, 1:, None]).squeeze(1)[len(p_ids) - 1:].float()  # [C]
            old.append((own + 0.15 * torch.randn(own.shape, generator=gen)).tolist())
            ref.append((own + 0.3 * torch.randn(own.shape, generator=gen)).tolist())
    return GateBatch(prompt_ids, completion_ids, advantages, old, ref)


def trl_batch_loss(model_dir: str | Path, batch: GateBatch, match: MatchedSettings, **config_overrides) -> float:
    """The loss of ``batch`` through a real ``GRPOTrainer.compute_loss`` (train mode, one micro-batch);
    ``config_overrides`` go to :func:`trl_config`."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    n = len(batch.prompt_ids)
    gate_match = replace(match, questions_per_step=n // match.group_size)
    with tempfile.TemporaryDirectory(prefix="trl_gate_") as out:
        args = trl_config(gate_match, out, max_steps=1, per_device_batch=n, **config_overrides)
        data = Dataset.from_list([{"prompt": "Q: 1 + 1\nA:", "answer": "2"}] * n)
        trainer = GRPOTrainer(model=model, reward_funcs=_zero_reward, args=args, train_dataset=data,
                              processing_class=tok)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; one micro-batch here
        pad = tok.pad_token_id
        p_width = max(len(p) for p in batch.prompt_ids)
        c_width = max(len(c) for c in batch.completion_ids)

        def left(rows: list[list], fill) -> torch.Tensor:
            return torch.tensor([[fill] * (p_width - len(r)) + list(r) for r in rows])  # [N, P]

        def right(rows: list[list], fill, dtype=None) -> torch.Tensor:
            return torch.tensor([list(r) + [fill] * (c_width - len(r)) for r in rows], dtype=dtype)  # [N, C]

        inputs = {
            "prompt_ids": left(batch.prompt_ids, pad),
            "prompt_mask": left([[1] * len(p) for p in batch.prompt_ids], 0),
            "completion_ids": right(batch.completion_ids, pad),
            "completion_mask": right([[1] * len(c) for c in batch.completion_ids], 0),
            "advantages": torch.tensor(batch.advantages, dtype=torch.float32),  # [N]
            "old_per_token_logps": right(batch.old_logprobs, 0.0, torch.float32),
            "ref_per_token_logps": right(batch.ref_logprobs, 0.0, torch.float32),
        }
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, inputs)
    return float(loss.detach())


def _zero_reward(completions, **_kwargs) -> list[float]:
    return [0.0] * len(completions)


def dsmath_batch_loss(model_dir: str | Path, batch: GateBatch, match: MatchedSettings) -> float:
    """The loss of ``batch`` through dsmath's collator and a real one-rank ``PolicyLearner.grpo_step``."""
    from dsmath.config import AlgorithmConfig, LearnerConfig
    from learner.batch import collate_rollouts
    from learner.policy import PolicyLearner

    algo_cfg = AlgorithmConfig(beta=match.beta, clip_eps_low=match.clip_eps_low, clip_eps_high=match.clip_eps_high,
                          loss_agg=match.loss_agg, adv_eps=match.adv_eps)
    learner_cfg = LearnerConfig(lr=match.lr, zero_stage=0, micro_batch_size=match.micro_batch_size,
                                grad_clip=match.grad_clip)
    learner = PolicyLearner(model_dir, learner_cfg, algo_cfg, with_reference=False,
                            max_tokens=match.max_new_tokens)
    train_batch = collate_rollouts(batch.prompt_ids, batch.completion_ids, pad_id=learner.tokenizer.pad_token_id,
                                   advantages=batch.advantages, old_logprobs=batch.old_logprobs,
                                   ref_logprobs=batch.ref_logprobs)
    metrics = learner.grpo_step(train_batch)
    return float(metrics["loss"])


def loss_gate(model_dir: str | Path, match: MatchedSettings, *, num_prompts: int = 4, seed: int = 0) -> dict:
    """Both losses on one batch; ``passed`` when they agree within 1e-6 (absolute)."""
    batch = build_gate_batch(model_dir, match, num_prompts=num_prompts, seed=seed)
    trl_value = trl_batch_loss(model_dir, batch, match)
    dsmath_value = dsmath_batch_loss(model_dir, batch, match)
    diff = abs(trl_value - dsmath_value)
    return {"trl_loss": trl_value, "dsmath_loss": dsmath_value, "abs_diff": diff, "passed": diff <= 1e-6,
            "sequences": len(batch.prompt_ids), "completion_tokens": sum(len(c) for c in batch.completion_ids)}
