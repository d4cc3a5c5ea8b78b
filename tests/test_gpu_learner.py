"""The learner on a CUDA GPU, one rank: ZeRO 0-3, bf16 vs fp32, exact resume, checkpoints.

(The cuda_ipc weight-sync receive between two processes on one GPU, without Ray, is
``tests/test_weight_sync.py::test_cuda_ipc_receive_between_two_processes_streams_on_the_device``; bench/gpu_check.sh
runs both files.)

Every test is ``@pytest.mark.gpu`` (tests/conftest.py skips them, with the reason, where torch sees no CUDA).
They need torch, transformers and DeepSpeed only — no Ray, no vLLM (tests/test_bench_gpu_learner.py imports this
module with both blocked) — and DeepSpeed's CUDA accelerator: run them as ``bench/gpu_check.sh`` does,
``DS_ACCELERATOR=cuda python -m pytest -m gpu tests/test_gpu_learner.py`` (the CPU stack's default is ``cpu``).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

# cuBLAS needs this for deterministic GEMMs (exact resume); set before the first CUDA call of the process.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from dsmath.config import AlgorithmConfig, LearnerConfig  # noqa: E402
from learner.batch import TrainBatch, collate_rollouts  # noqa: E402

pytestmark = pytest.mark.gpu

VOCAB = 512
BF16_LOSS_TOL = (2e-2, 2e-2)  # bf16 loss within atol + rtol·|fp32 loss| of the fp32 learner's, step by step


@pytest.fixture(scope="module", autouse=True)
def cuda_accelerator():
    if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        pytest.fail(f"DS_ACCELERATOR={os.environ['DS_ACCELERATOR']}: the GPU tests need DeepSpeed's CUDA accelerator; "
                    "run them with DS_ACCELERATOR=cuda (bench/gpu_check.sh does)")
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("gpu-tiny") / "model"
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(str(out))
    return out


def make_learner(model_dir, **kw):
    from learner.policy import PolicyLearner

    base = dict(lr=1e-3, zero_stage=1, micro_batch_size=4, grad_clip=1.0, warmup_steps=0)
    base.update(kw)
    return PolicyLearner(model_dir, LearnerConfig(**base), AlgorithmConfig(beta=0.04, clip_eps_low=0.2,
                                                                     clip_eps_high=0.28), seed=0)


def rl_batch(seed: int, n: int = 8, group: int = 4) -> TrainBatch:
    """Ragged prompts and completions, group-normalised advantages, off-policy old log-probs (−ln V)."""
    from dsmath.grpo import group_advantages

    g = torch.Generator().manual_seed(seed)
    lens = [(int(torch.randint(4, 17, (1,), generator=g)), int(torch.randint(8, 33, (1,), generator=g)))
            for _ in range(n)]
    prompts = [torch.randint(2, VOCAB, (p,), generator=g).tolist() for p, _ in lens]
    comps = [torch.randint(2, VOCAB, (c,), generator=g).tolist() for _, c in lens]
    adv = group_advantages(torch.randint(0, 2, (n,), generator=g).double(), group).tolist()
    old = [[-math.log(VOCAB)] * c for _, c in lens]
    return collate_rollouts(prompts, comps, pad_id=0, advantages=adv, old_logprobs=old)


def train(learner, steps: int, seed0: int = 100) -> list[float]:
    return [learner.grpo_step(rl_batch(seed0 + i))["loss"] for i in range(steps)]


def weights(learner) -> dict[str, torch.Tensor]:
    return {k: v.float().clone() for k, v in learner.named_weights()}


# ------------------------------------------------------------------------------------------- learner


@pytest.fixture(scope="module")
def zero0_run(model_dir):
    learner = make_learner(model_dir, zero_stage=0)
    losses = train(learner, 2)
    return losses, weights(learner)


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_learner_on_cuda_at_every_zero_stage_takes_the_same_steps(model_dir, zero0_run, zero_stage):
    """One rank: every ZeRO stage computes the ZeRO-0 update (to float32 summation order)."""
    learner = make_learner(model_dir, zero_stage=zero_stage)
    assert learner.device.type == "cuda"
    assert next(learner.engine.module.parameters()).device.type == "cuda"
    before = weights(learner)
    losses = train(learner, 2)
    assert all(math.isfinite(x) for x in losses)
    after = weights(learner)
    ref_losses, ref_weights = zero0_run
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    assert set(after) == set(ref_weights)
    for name, t in after.items():
        assert (t - before[name]).abs().max() > 0, f"{name} did not move"
        assert torch.allclose(t, ref_weights[name], rtol=0, atol=5e-5), (name, (t - ref_weights[name]).abs().max())


def test_bf16_learner_tracks_fp32_losses(model_dir):
    """learner.precision=bf16: bf16 weights on the device, float32 log-probs; each step's loss within
    BF16_LOSS_TOL of the fp32 learner's on the same batches."""
    fp32 = make_learner(model_dir, precision="fp32")
    bf16 = make_learner(model_dir, precision="bf16")
    assert next(bf16.engine.module.parameters()).dtype == torch.bfloat16
    assert bf16.logprobs(rl_batch(7)).dtype == torch.float32
    atol, rtol = BF16_LOSS_TOL
    for a, b in zip(train(fp32, 4), train(bf16, 4)):
        assert abs(a - b) <= atol + rtol * abs(a), (a, b)


@pytest.mark.parametrize("precision,zero_stage", [("fp32", 1), ("bf16", 2), ("fp32", 3)])
def test_exact_resume_on_cuda(model_dir, tmp_path, precision, zero_stage):
    """Train 4 steps saving after 2; a fresh learner loading that checkpoint reproduces steps 3-4 bit for bit."""
    a = make_learner(model_dir, precision=precision, zero_stage=zero_stage)
    first = train(a, 2, seed0=200)
    a.save_checkpoint(tmp_path / "step_2", {"data_position": 2})
    rest_a = train(a, 2, seed0=202)
    final_a = weights(a)
    b = make_learner(model_dir, precision=precision, zero_stage=zero_stage)
    assert b.load_checkpoint(tmp_path) == {"data_position": 2} and b.steps == 2
    rest_b = train(b, 2, seed0=202)
    assert all(math.isfinite(x) for x in first)
    assert rest_b == rest_a
    final_b = weights(b)
    assert all(torch.equal(t, final_a[k]) for k, t in final_b.items())


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_checkpoint_round_trip_on_cuda(model_dir, tmp_path, zero_stage):
    """The checkpoint loads in transformers with the learner's weights, and back into a fresh learner."""
    from transformers import AutoModelForCausalLM

    learner = make_learner(model_dir, zero_stage=zero_stage)
    train(learner, 1)
    path = learner.save_checkpoint(tmp_path / "step_1", {"step": 1})
    live = weights(learner)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).state_dict()
    assert set(hf) == set(live)
    assert all(torch.equal(hf[k].float(), v) for k, v in live.items())
    fresh = make_learner(model_dir, zero_stage=zero_stage)
    assert fresh.load_checkpoint(tmp_path) == {"step": 1}
    assert all(torch.equal(t, live[k]) for k, t in weights(fresh).items())

