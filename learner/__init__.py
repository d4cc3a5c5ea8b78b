"""DeepSpeed learner: one engine, objectives that plug into it, and the learners composed of the two
(import-light: submodules import torch/DeepSpeed/Ray only when used).

    learner.batch       typed batches (PolicyBatch alias TrainBatch, LMBatch, ValueBatch, RewardModelBatch),
                        collate_rollouts, collate_from_rollouts, micro_batches
    learner.engine      LearnerEngine (one rank: DeepSpeed, micro-batching, collectives, checkpoints), init_distributed
    learner.objectives  the losses: grpo (PolicyObjective), dpo, lm, value, reward_model
    learner.logprobs    TokenLogprobs (full or chunked LM-head log-probs)
    learner.policy      PolicyLearner = engine + GRPO/DPO/LM objectives + reference
    learner.value       ValueLearner = engine (scalar head) + value objective (PPO)
    learner.reward_model RewardModelLearner = engine (scalar head) + reward-model objective
    learner.ray_group   LearnerGroup (K ranks as Ray actors)
    learner.checkpoint  atomic checkpoint directories, `latest` pointer, RNG state
    learner.sft         SFT data formats and run_sft
"""
