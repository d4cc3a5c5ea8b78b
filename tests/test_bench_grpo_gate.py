"""bench/grpo_vs_trl.py's loss gate: TRL's GRPOTrainer.compute_loss and dsmath's learner agree on one batch.

Real components on both sides (a GRPOTrainer built from the bench's settings; a one-rank DeepSpeed PolicyLearner),
a tiny model built here. The bench itself is not a timed test; its --help and argument errors are checked.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


@pytest.fixture(scope="module")
def gate_module():
    pytest.importorskip("trl")
    sys.path.insert(0, str(BENCH))
    try:
        import grpo_loss_gate
    finally:
        sys.path.remove(str(BENCH))
    return grpo_loss_gate


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from dsmath.config import ModelConfig
    from dsmath.prompts import format_prompt
    from dsmath.tasks.arithmetic import generate_split, stepwise_solution
    from dsmath.tiny import build_model, train_tokenizer

    out = tmp_path_factory.mktemp("gate") / "model"
    texts = [format_prompt(p.question, "tiny") + " " + stepwise_solution(p) for p in generate_split("train", 300)]
    tok = train_tokenizer(texts, vocab_size=300, out_dir=out)
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                      max_position_embeddings=256, vocab_size=300)
    build_model(cfg, tok, seed=0).save_pretrained(str(out))
    return out


def test_trl_and_dsmath_losses_agree_and_a_mismatch_is_caught(gate_module, model_dir):
    match = gate_module.MatchedSettings(group_size=4, micro_batch_size=8)  # 16 sequences in 2 dsmath micro-batches
    batch = gate_module.build_gate_batch(model_dir, match, num_prompts=4, seed=0)
    assert len(batch.prompt_ids) == 16
    assert len({len(c) for c in batch.completion_ids}) > 2  # different lengths: the aggregation matters
    assert any(a > 0 for a in batch.advantages) and any(a < 0 for a in batch.advantages)

    trl_loss = gate_module.trl_batch_loss(model_dir, batch, match)
    dsmath_loss = gate_module.dsmath_batch_loss(model_dir, batch, match)
    assert abs(trl_loss) > 1e-4  # not a vacuous 0 == 0
    assert abs(trl_loss - dsmath_loss) <= 1e-6, (trl_loss, dsmath_loss)

    # The gate catches a subtle mismatch: TRL's default ratio-weighted KL (use_bias_correction_kl=True, which the
    # bench turns off) differs only where old != current log-probs, as in this batch.
    biased = gate_module.trl_batch_loss(model_dir, batch, match, use_bias_correction_kl=True)
    assert abs(biased - dsmath_loss) > 1e-6
    other_beta = gate_module.trl_batch_loss(model_dir, batch, replace(match, beta=0.0))
    assert abs(other_beta - dsmath_loss) > 1e-4


def test_token_mean_has_no_trl_counterpart(gate_module):
    with pytest.raises(ValueError, match="no TRL loss_type"):
        gate_module.MatchedSettings(loss_agg="token_mean").trl_loss_type


def test_bench_help_and_bad_arm():
    ok = subprocess.run([sys.executable, str(BENCH / "grpo_vs_trl.py"), "--help"], capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0
    for option in ("--arms", "--model", "--rounds", "--steps", "--quick", "--trl-threads", "--eval-size"):
        assert option in ok.stdout
    bad = subprocess.run([sys.executable, str(BENCH / "grpo_vs_trl.py"), "--arms", "trl,fast"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2
    assert "unknown arm(s) fast" in bad.stderr and "Traceback" not in bad.stderr
