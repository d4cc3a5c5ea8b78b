"""The tiny model and step size every end-to-end loop test starts from (dotted overrides for ``tiny_cpu``).

A 2-layer, 64-wide Qwen2 with a 320-token vocabulary, a 30-step SFT bootstrap on 400 problems, 4 questions × 4
samples of at most 24 tokens per step: seconds per step on 2 cores. Tests append their own overrides (later ones
win).
"""

TINY_LOOP = [
    "bootstrap.num_train_problems=800",
    "bootstrap.num_sft_problems=400",
    "bootstrap.num_heldout_problems=24",
    "bootstrap.sft_steps=30",
    "bootstrap.sft_batch_size=16",
    "model.hidden_size=64",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.num_layers=2",
    "model.intermediate_size=128",
    "model.vocab_size=320",
    "eval_size=24",
    "rollout.questions_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=24",
    "learner.lr=1e-3",
    "learner.micro_batch_size=8",
]
