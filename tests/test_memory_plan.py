"""The memory plan (dsmath.memory_plan) against hand arithmetic, and `dsmath train --dry-run` / the one-line refusal
through the real CLI."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dsmath import memory_plan as mp
from dsmath.config import ConfigError, load_config, with_overrides

ROOT = Path(__file__).resolve().parents[1]

# DeepSeekMath 7B by hand: per layer q,k,v,o (4·h²) + gate,up,down (3·h·I) + two RMSNorms (2·h);
# embedding and untied LM head (2·V·h); final norm (h).
H, I, L, V = 4096, 11008, 30, 102400
P7B = L * (4 * H * H + 3 * H * I + 2 * H) + 2 * V * H + H
assert P7B == 6_910_365_696
# Qwen2.5-0.5B: 14 heads of 64, 2 kv heads (k,v: 896×128 each) with q/k/v biases, tied embeddings.
P05B = 24 * (896 * 896 + 896 + 2 * (896 * 128 + 128) + 896 * 896 + 3 * 896 * 4864 + 2 * 896) + 151936 * 896 + 896
assert P05B == 494_032_768


def cfg7b(*overrides: str):
    return with_overrides(load_config("deepseekmath_7b"), list(overrides))


def terms(cfg) -> dict[str, float]:
    """The learner GPU's terms keyed by their first word."""
    dev = mp.plan(cfg).devices[0]
    return {name.split(" ")[0]: size for name, size in dev.terms.items()}


def test_parameter_counts_of_the_known_shapes():
    assert mp.KNOWN_SHAPES["deepseek-math-7b"].num_parameters() == P7B
    assert mp.KNOWN_SHAPES["qwen2.5-0.5b"].num_parameters() == P05B


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_shape_from_config_json_counts_what_transformers_builds(tmp_path, kind):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    model.save_pretrained(str(tmp_path))
    cfg = load_config("tiny_cpu", [f"model.path={tmp_path}"])
    shape, source = mp.model_shape(cfg)
    assert source.endswith("config.json")
    assert shape.num_parameters() == sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert shape.tie_word_embeddings == (kind == "qwen2") and shape.attention_bias == (kind == "qwen2")


def test_fp32_zero0_one_rank_is_16_bytes_per_parameter_plus_an_fp32_reference():
    t = terms(cfg7b("learner.precision=fp32", "learner.zero_stage=0", "learner.num_ranks=1"))
    assert t["weights"] == 4 * P7B and t["gradients"] == 4 * P7B
    assert t["optimizer"] == 8 * P7B and t["reference"] == 4 * P7B


def test_zero2_over_8_ranks_shards_adam_and_gradients_not_weights():
    t = terms(cfg7b("learner.precision=fp32", "learner.zero_stage=2", "learner.num_ranks=8"))
    assert t["optimizer"] == 8 * P7B / 8  # Adam m + v in fp32, one eighth each
    assert t["gradients"] == 4 * P7B / 8
    assert t["weights"] == 4 * P7B and t["reference"] == 4 * P7B
    t1 = terms(cfg7b("learner.precision=fp32", "learner.zero_stage=1", "learner.num_ranks=8"))
    assert t1["optimizer"] == P7B and t1["gradients"] == 4 * P7B


def test_bf16_zero3_shards_everything_and_keeps_fp32_master_and_gradient_partition():
    t = terms(cfg7b("learner.precision=bf16", "learner.zero_stage=3", "learner.num_ranks=8"))
    assert t["weights"] == 2 * P7B / 8 and t["reference"] == 2 * P7B / 8
    assert t["gradients"] == 2 * P7B / 8 + 4 * P7B / 8
    assert t["optimizer"] == (8 + 4) * P7B / 8  # Adam m + v + fp32 master weights


def test_reference_costs_nothing_on_the_device_with_beta_0_or_on_the_host():
    assert terms(cfg7b("algorithm.beta=0"))["reference"] == 0
    host = mp.plan(cfg7b("learner.reference=host")).devices[0]
    assert terms(cfg7b("learner.reference=host"))["reference"] == 0
    assert any("13.82 GB in host memory" in n for n in host.notes)
    assert terms(cfg7b("algorithm.beta=0", "algorithm.name=dpo"))["reference"] == 2 * P7B  # DPO needs it


def test_activations_and_logits_follow_the_stated_formula():
    tokens = 4 * 2048  # micro_batch_size × (max_prompt_tokens + max_new_tokens)
    full_layer = tokens * (16 * H + 8 * I)  # bytes at 16 bits
    plan = mp.plan(cfg7b()).devices[0]
    t = terms(cfg7b())
    assert t["activations"] == L * tokens * 2 * H + full_layer == 3_271_557_120  # checkpointed: inputs + one layer
    assert plan.alternatives["activations without checkpointing"] == L * full_layer == 37_748_736_000
    assert t["logits"] == 3 * 4 * 1024 * V  # one 1024-token chunk
    assert plan.alternatives["logits full [mb, T, V] fp32"] == 3 * 4 * tokens * V
    fp32 = terms(cfg7b("learner.precision=fp32", "learner.gradient_checkpointing=false"))
    assert fp32["activations"] == 2 * L * full_layer  # float32 activations: twice the bytes
    capped = terms(cfg7b("learner.max_tokens_per_micro_batch=4096", "learner.gradient_checkpointing=false"))
    assert capped["activations"] == L * 2 * 2048 * (16 * H + 8 * I)  # two sequences fit the token budget


def test_generator_weights_and_kv_cache():
    gen = mp.plan(cfg7b()).devices[1]
    kv_per_token = 2 * L * 32 * 128 * 2  # K and V, layers, kv heads, head dim, bf16
    assert kv_per_token == 491_520
    assert gen.terms["weights (bfloat16, /TP 1)"] == 2 * P7B
    budget = 0.85 * 80e9
    assert gen.terms[f"KV cache ({kv_per_token / 1e6:.3f} MB/token)"] == budget - 2 * P7B - mp.VLLM_RESERVE_GB * 1e9
    held = int((budget - 2 * P7B - 2e9) // (kv_per_token * 2048))
    assert held == 51 and f"holds {held} of this generator's 128 sequences" in gen.notes[0]
    qwen = mp.KNOWN_SHAPES["qwen2.5-0.5b"]
    assert 2 * qwen.num_layers * qwen.num_kv_heads * qwen.head_size * 2 == 12_288
    tp2 = mp.plan(cfg7b("rollout.tensor_parallel_size=2")).devices[1]
    assert tp2.terms["weights (bfloat16, /TP 2)"] == P7B


def test_the_7b_preset_fits_80gb_and_its_header_states_the_estimate():
    memory = mp.check(load_config("deepseekmath_7b"))
    learner = memory.devices[0]
    assert learner.fits and learner.total < 80e9 and memory.fits
    header = (ROOT / "dsmath/configs/deepseekmath_7b.yaml").read_text()
    stated = float(re.search(r"per learner GPU ([\d.]+) GB of 80", header).group(1))
    assert stated == round(learner.total / 1e9, 1)
    assert "Estimate from dsmath.memory_plan" in header and "not measured" in header
    cfg = load_config("deepseekmath_7b")
    assert not cfg.model.path.startswith("deepseek-ai/")  # a local folder: hub ids are refused by the loader


def test_the_refusal_names_the_biggest_term_and_a_fix_that_fits():
    cfg = cfg7b("learner.gradient_checkpointing=false")
    with pytest.raises(ConfigError) as err:
        mp.check(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "85.2 GB of 80 GB" in msg
    assert "biggest term is activations (no checkpointing) at 37.7 GB" in msg
    assert "set learner.gradient_checkpointing=true" in msg
    # a fix is only suggested when the plan with it fits
    for overrides in (["learner.zero_stage=0", "learner.num_ranks=1"], ["learner.gpu_memory_gb=40"]):
        bad = cfg7b(*overrides)
        fix = mp.suggest_fix(bad, "learner")
        assert fix and not mp.plan(bad).devices[0].fits and mp.plan(with_overrides(bad, fix)).devices[0].fits


def test_generator_refused_when_its_kv_cache_cannot_hold_one_sequence():
    with pytest.raises(ConfigError, match="cannot hold one 2048-token sequence"):
        mp.check(cfg7b("rollout.gpu_memory_gb=19"))
    mp.check(cfg7b("rollout.gpu_memory_gb=20"))  # 1 sequence fits


def test_shape_sources_and_their_errors(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json on this machine: set model.shape"):
        mp.plan(load_config("tiny_cpu", [f"model.path={tmp_path}/nowhere"]))
    with pytest.raises(ConfigError, match="model.shape: 'gpt-9' is not a known shape"):
        mp.plan(load_config("tiny_cpu", ["model.shape=gpt-9"]))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ConfigError, match="no usable transformer shape"):
        mp.plan(load_config("tiny_cpu", [f"model.path={tmp_path}"]))
    tiny = mp.plan(load_config("tiny_cpu"))
    assert tiny.shape_source.startswith("model.* fields") and tiny.devices[0].capacity == 0 and tiny.fits


def test_presets_still_load():
    from dsmath.pretrain.config import load_pretrain_config

    for name in ("tiny_cpu", "deepseekmath_7b"):
        load_config(name)
    for name in ("pretrain_tiny_cpu", "pretrain_deepseekmath_base"):
        load_pretrain_config(name)


# ----------------------------------------------------------------------------- the real CLI

def dsmath(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "wiring.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def test_dry_run_on_tiny_cpu_prints_the_plan_and_exits_0():
    out = dsmath("train", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "learner CPU (host memory, not checked)" in out.stdout and "0.37 M parameters" in out.stdout
    assert "activations (no checkpointing)" in out.stdout and out.stderr == ""


def test_dry_run_on_the_7b_preset_passes():
    out = dsmath("train", "--config", "deepseekmath_7b", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert re.search(r"total\s+50\.72\s+of 80 GB: fits", out.stdout)
    assert "generator 80 GB GPU" in out.stdout and "DOES NOT FIT" not in out.stdout


def test_dry_run_refuses_in_one_line_with_exit_2():
    out = dsmath("train", "--config", "deepseekmath_7b", "--dry-run", "learner.gradient_checkpointing=false")
    assert out.returncode == 2
    assert "DOES NOT FIT" in out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert lines[0].startswith("dsmath train: error: learner GPU needs 85.2 GB of 80 GB")
    assert lines[0].endswith("set learner.gradient_checkpointing=true (estimate then 50.7 GB)")


def test_train_on_a_gpu_config_checks_the_plan_before_starting_anything():
    code = ("import sys; from wiring.cli import main; rc = main(sys.argv[1:]); "
            "print(sorted(m for m in ('ray', 'vllm', 'deepspeed', 'torch', 'wiring.driver') if m in sys.modules)); "
            "sys.exit(rc)")
    out = dsmath("train", "--config", "deepseekmath_7b", "learner.gradient_checkpointing=false", code=code)
    assert out.returncode == 2
    assert out.stdout.strip() == "[]"  # refused before Ray, vLLM, DeepSpeed, torch or the driver were imported
    assert len(out.stderr.strip().splitlines()) == 1 and "gradient_checkpointing=true" in out.stderr


def test_reference_rule_and_bf16_stage0_match_the_learner():
    from dsmath.methods import needs_reference

    for overrides in ([], ["algorithm.beta=0"], ["algorithm.beta=0", "algorithm.name=dpo"], ["algorithm.name=ppo"]):
        cfg = cfg7b(*overrides)
        assert mp.needs_reference(cfg) == needs_reference(cfg.algorithm), overrides
    with pytest.raises(ConfigError, match="bf16 needs learner.zero_stage >= 1"):
        mp.check(cfg7b("learner.zero_stage=0"))
    fix = mp.suggest_fix(cfg7b("learner.zero_stage=0", "learner.num_ranks=1", "learner.precision=fp32"), "learner")
    assert "learner.precision=bf16" not in fix or "learner.zero_stage=1" in fix or "learner.zero_stage=2" in fix \
        or "learner.zero_stage=3" in fix
