"""DeepSpeed learner: GRPO and SFT steps, reference model, checkpoints (import-light: submodules
import torch/DeepSpeed/Ray only when used).

    learner.batch      TrainBatch, collate_rollouts, collate_from_rollouts, micro_batches
    learner.policy     PolicyLearner (one rank), init_distributed
    learner.ray_group  LearnerGroup (K ranks as Ray actors)
    learner.checkpoint atomic checkpoint directories, `latest` pointer, RNG state
    learner.sft        SFT data formats and run_sft
"""
