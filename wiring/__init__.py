"""The wiring layer: what puts the base library (``dsmath``), the Ray actors (``actors``) and the DeepSpeed learner
(``learner``) together into runs — the training driver and its rollout producers, the tiny-model bootstrap,
iterative GRPO, reward-model rounds, job submission and the ``dsmath`` command line.

Nothing in ``dsmath``, ``actors`` or ``learner`` imports this package (``tests/test_layering.py`` checks it).
Importing it is cheap: every module imports Ray, vLLM and DeepSpeed only inside the functions that need them.
"""
