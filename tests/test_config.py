import os

import pytest

from dsmath.config import ConfigError, load_config, to_dict, with_overrides


def test_default_preset_is_tiny_cpu():
    cfg = load_config()
    assert cfg.rollout.group_size >= 2
    assert cfg.learner.num_ranks == 1
    assert cfg.weight_sync.transport in ("object_store", "gloo")


def test_deepseekmath_7b_matches_the_paper():
    cfg = load_config("deepseekmath_7b")
    assert cfg.learner.lr == 1e-6
    assert cfg.algorithm.beta == 0.04
    assert cfg.rollout.group_size == 64
    assert cfg.rollout.max_new_tokens == 1024
    assert cfg.rollout.questions_per_step * cfg.rollout.group_size == 1024
    assert cfg.algorithm.updates_per_step == 1


def test_dotted_overrides_are_typed():
    cfg = load_config("tiny_cpu", ["algorithm.beta=0.1", "rollout.group_size=4", "rollout.stop=[a, b]",
                                   "async.enabled=true"])
    assert cfg.algorithm.beta == 0.1 and isinstance(cfg.algorithm.beta, float)
    assert cfg.rollout.group_size == 4
    assert cfg.rollout.stop == ("a", "b")
    assert cfg.async_.enabled is True
    assert to_dict(cfg)["async"]["enabled"] is True


@pytest.mark.parametrize(
    "override, words",
    [
        (["algorithm.betta=0.1"], ["algorithm.betta", "did you mean 'beta'"]),
        (["rollout.group_size=abc"], ["rollout.group_size", "integer"]),
        (["algorithm.loss_agg=sum"], ["algorithm.loss_agg", "seq_mean_token_mean"]),
        (["learner.num_ranks=3"], ["learner.num_ranks", "divide"]),
        (["weight_sync.transport=nccl"], ["weight_sync.transport", "GPU"]),
        (["rollout.group_size=1"], ["rollout.group_size", "GRPO"]),
        (["nosuchsection.x=1"], ["unknown key 'nosuchsection'"]),
        (["algorithm"], ["section.key=value"]),
    ],
)
def test_bad_input_is_one_line_naming_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", override)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_unknown_preset_lists_presets(tmp_path):
    with pytest.raises(ConfigError, match="tiny_cpu"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.algorithm.beta = 1.0  # type: ignore[misc]
    assert with_overrides(cfg, ["steps=3"]).steps == 3
    assert load_config().steps == cfg.steps


def test_old_grpo_override_is_refused_naming_its_new_key():
    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", ["rollout.group_size=4", "grpo.beta=0.0"])
    assert str(info.value) == "'grpo.beta' is now 'algorithm.beta' (e.g. algorithm.beta=0.0)"
    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", ["grpo.algorithm=ppo"])
    assert str(info.value) == "'grpo.algorithm' is now 'algorithm.name' (e.g. algorithm.name=ppo)"
    with pytest.raises(ConfigError, match=r"^'grpo.sampling' is now 'algorithm.sampling'"):
        with_overrides(load_config(), ["grpo.sampling=online"])


def test_old_grpo_yaml_section_is_refused_mapping_its_keys(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("steps: 3\ngrpo:\n  algorithm: rft\n  beta: 0.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(old))
    assert str(info.value) == (f"{old}: the section 'grpo:' is now 'algorithm:' (grpo.algorithm -> algorithm.name, "
                               "grpo.beta -> algorithm.beta); rename it in that file")
    # A saved run's whole section: the keys whose own name changes, then one example of the rest.
    saved = tmp_path / "config.yaml"
    saved.write_text("grpo:\n  algorithm: grpo\n  beta: 0.04\n  clip_eps_low: 0.2\n  clip_eps_high: 0.2\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(saved))
    assert str(info.value) == (f"{saved}: the section 'grpo:' is now 'algorithm:' (grpo.algorithm -> algorithm.name; "
                               "its other 3 keys keep their names, e.g. grpo.beta -> algorithm.beta); rename it in "
                               "that file")


def test_algorithm_section_loads_from_overrides_and_yaml(tmp_path):
    cfg = load_config("tiny_cpu", ["algorithm.name=ppo", "algorithm.beta=0.02", "algorithm.gae_lambda=0.9"])
    assert (cfg.algorithm.name, cfg.algorithm.beta, cfg.algorithm.gae_lambda) == ("ppo", 0.02, 0.9)
    assert load_config().algorithm.name == "grpo"
    new = tmp_path / "new.yaml"
    new.write_text("algorithm:\n  name: rft\n  beta: 0.0\n")
    cfg = load_config(str(new))
    assert (cfg.algorithm.name, cfg.algorithm.beta) == ("rft", 0.0)
    assert to_dict(cfg)["algorithm"]["name"] == "rft" and "grpo" not in to_dict(cfg)
    with pytest.raises(ConfigError, match=r"^algorithm.name: 'nope' is not one of dpo, grpo, online_rft, ppo, rft$"):
        load_config("tiny_cpu", ["algorithm.name=nope"])


def test_cli_refuses_old_keys_in_one_line_with_exit_2(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    old = tmp_path / "old.yaml"
    old.write_text("grpo: {beta: 0.0}\n")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "DSMATH_OVERRIDES"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
    for argv, want in ((["grpo.beta=0.0"], "'grpo.beta' is now 'algorithm.beta' (e.g. algorithm.beta=0.0)"),
                       (["--config", str(old)], f"{old}: the section 'grpo:' is now 'algorithm:' "
                                                "(grpo.beta -> algorithm.beta)")):
        p = subprocess.run([sys.executable, "-m", "wiring.cli", "train", f"run_dir={tmp_path / 'run'}", *argv],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dsmath train: error: ") and want in lines[0], p.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was created


def test_transport_validation_reads_the_registry():
    """weight_sync.transport is checked against dsmath.transports: a name registered at run time is accepted, or
    refused on CPU when registered as needing a GPU, and an unknown name is refused naming every registered one."""
    from dsmath import transports

    with pytest.raises(ConfigError, match="'pigeon' is not allowed; expected one of 'object_store', 'gloo', 'nccl', "
                                          "'cuda_ipc'$"):
        load_config("tiny_cpu", ["weight_sync.transport=pigeon"])
    transports.register("pigeon", "nowhere:Pigeon")  # never imported: validation needs only the entry
    transports.register("gpu_pigeon", "nowhere:Pigeon", needs_gpu=True)
    try:
        assert load_config("tiny_cpu", ["weight_sync.transport=pigeon"]).weight_sync.transport == "pigeon"
        with pytest.raises(ConfigError, match="'gpu_pigeon' needs GPUs"):
            load_config("tiny_cpu", ["weight_sync.transport=gpu_pigeon"])
        cfg = load_config("tiny_cpu", ["weight_sync.transport=gpu_pigeon", "rollout.gpus_per_generator=1"])
        assert cfg.weight_sync.transport == "gpu_pigeon"
    finally:
        transports.unregister("pigeon")
        transports.unregister("gpu_pigeon")
    with pytest.raises(ConfigError, match="'pigeon' is not allowed"):
        load_config("tiny_cpu", ["weight_sync.transport=pigeon"])
