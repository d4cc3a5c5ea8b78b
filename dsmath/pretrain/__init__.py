"""Continued pre-training (DeepSeekMath §2.2–2.3): streaming document sources, weighted mixtures, packing.

Pure, Ray-free and DeepSpeed-free: the training loop that uses these lives in :mod:`learner.pretrain`.

* :mod:`dsmath.pretrain.sources` — documents from JSONL / Parquet / JSON shards, streamed, resumable.
* :mod:`dsmath.pretrain.mixture` — named sources sampled by weight with a seed; the position is serialisable.
* :mod:`dsmath.pretrain.packing` — fixed-length rows with EOS-marked documents and labels masked at boundaries.
* :mod:`dsmath.pretrain.evaluate` — held-out LM loss and few-shot GSM8K/MATH accuracy of an HF model.
* :mod:`dsmath.pretrain.config` — the frozen ``pretrain`` config tree and its presets.
"""
