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
    assert cfg.grpo.beta == 0.04
    assert cfg.rollout.group_size == 64
    assert cfg.rollout.max_new_tokens == 1024
    assert cfg.rollout.questions_per_step * cfg.rollout.group_size == 1024
    assert cfg.grpo.updates_per_step == 1


def test_dotted_overrides_are_typed():
    cfg = load_config("tiny_cpu", ["grpo.beta=0.1", "rollout.group_size=4", "rollout.stop=[a, b]", "async.enabled=true"])
    assert cfg.grpo.beta == 0.1 and isinstance(cfg.grpo.beta, float)
    assert cfg.rollout.group_size == 4
    assert cfg.rollout.stop == ("a", "b")
    assert cfg.async_.enabled is True
    assert to_dict(cfg)["async"]["enabled"] is True


@pytest.mark.parametrize(
    "override, words",
    [
        (["grpo.betta=0.1"], ["grpo.betta", "did you mean 'beta'"]),
        (["rollout.group_size=abc"], ["rollout.group_size", "integer"]),
        (["grpo.loss_agg=sum"], ["grpo.loss_agg", "seq_mean_token_mean"]),
        (["learner.num_ranks=3"], ["learner.num_ranks", "divide"]),
        (["weight_sync.transport=nccl"], ["weight_sync.transport", "GPU"]),
        (["rollout.group_size=1"], ["rollout.group_size", "GRPO"]),
        (["nosuchsection.x=1"], ["unknown key 'nosuchsection'"]),
        (["grpo"], ["section.key=value"]),
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
    bad.write_text("grpo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.grpo.beta = 1.0  # type: ignore[misc]
    assert with_overrides(cfg, ["steps=3"]).steps == 3
    assert load_config().steps == cfg.steps


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
