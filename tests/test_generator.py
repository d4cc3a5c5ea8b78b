"""The vLLM generator without Ray: sampling records, raw log-probs vs HF, version refusal, in-place weight
load, and the tool-integrated loop (a tiny model overfit on one tool-use script, a real sandbox run)."""

import tempfile

import torch
import pytest

from dsmath.config import ModelConfig, RolloutConfig
from dsmath.model_folder import temp_files_in
from dsmath.records import GenerationRequest, Problem, SamplingParams
from dsmath.weight_wire import StaleWeightVersion

TOOL_PROMPT = "Q: what is 6 times 7?\nA:"
TOOL_SCRIPT = " ```python\nprint(6*7)\n```\n```output\n42\n```\nThe answer is \\boxed{42}."
TOOL_STOP_TEXT = " ```python\nprint(6*7)\n```\n```output"


def tiny_model_dir(path, seed=0):
    """A tiny Qwen2 + BPE folder vLLM and HF both load."""
    from dsmath.tiny import build_model, train_tokenizer

    texts = [f"Q: what is {a} plus {b}?\nA: The answer is \\boxed{{{a + b}}}." for a in range(40) for b in range(20)]
    texts += [TOOL_PROMPT + TOOL_SCRIPT] * 20
    tok = train_tokenizer(texts, 384, path)
    model = build_model(ModelConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=256, vocab_size=384), tok, seed=seed)  # head_dim 32: vLLM CPU has no 16
    model.save_pretrained(path)
    return tok, model


def hf_logprobs(model, prompt_ids, completion_ids):
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion_ids)[:, None])[:, 0]


def request(uid, prompt, n=1, **sampling):
    return GenerationRequest(uid, Problem(uid, prompt, "42"), prompt, SamplingParams(n=n, **sampling))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from actors.generator import Generator

    path = tmp_path_factory.mktemp("tiny")
    tok, model = tiny_model_dir(path)
    # The engine is built with this module's own temp dir, so what it leaves there is its own: the shared /tmp also
    # gets the scratch folders of the other xdist worker's generators while this one builds (a CI run failed so).
    own_tmp = tmp_path_factory.mktemp("tmpdir")
    rendezvous = not torch.distributed.is_initialized()  # else vLLM joins the process group this process has
    with temp_files_in(own_tmp):
        gen = Generator(str(path), RolloutConfig(kv_cache_space_gib=1, max_tool_rounds=2), generator_id="g0", seed=0)
        made = (set(own_tmp.iterdir()), rendezvous, tempfile.gettempdir() == str(own_tmp))
    return gen, tok, model, made


def test_the_engines_temporary_file_is_in_the_generators_scratch_folder(setup):
    """vLLM's engine makes a rendezvous file (``vllm_dist_*``) in the temp dir and never removes it; a generator's
    goes in its scratch folder, which remove_files() (called before ray.kill) removes and a sweep finds after a
    crash. Building the engine leaves nothing else in the temp dir. (Where an earlier test of this pytest process
    already made a torch.distributed group, the engine joins it and makes no file: only the last part is checked;
    tests/test_two_nodes.py checks the actors' temp dir on every run.)"""
    _, _, _, (made, rendezvous, temp_dir_back) = setup
    assert [p.name.startswith("dsmath-scratch-") for p in made] == [True], made
    scratch = made.pop()
    assert [p.name[:10] for p in scratch.iterdir()] == (["vllm_dist_"] if rendezvous else [])
    assert temp_dir_back  # the temp dir before the engine was built is back


def test_samples_group_with_ids_logprobs_and_version(setup):
    gen, tok, model, _ = setup
    reqs = [request("a", "Q: what is 3 plus 4?\nA:", n=4, temperature=1.0, max_new_tokens=12),
            request("b", "Q: what is 10 plus 2?\nA:", n=3, temperature=0.7, max_new_tokens=9)]
    rollouts = gen.generate(reqs, expected_version=0)
    assert [(r.request_id, r.sample_index) for r in rollouts] == [("a", i) for i in range(4)] + [("b", i) for i in range(3)]
    assert len({r.completion_ids for r in rollouts if r.request_id == "a"}) > 1  # G different samples
    worst = 0.0
    for r in rollouts:
        assert r.weight_version == 0 and r.generator_id == "g0"
        assert 1 <= len(r.completion_ids) == len(r.logprobs) == len(r.loss_mask)
        assert set(r.loss_mask) == {1}
        assert r.finish_reason in ("stop", "length")
        assert r.finish_reason == "length" or r.completion_ids[-1] == tok.eos_token_id
        assert list(r.prompt_ids) == tok(r.prompt, add_special_tokens=False)["input_ids"]
        # Raw (temperature-1) log-probs: what the learner recomputes, also for the 0.7-temperature request.
        diff = (hf_logprobs(model, r.prompt_ids, r.completion_ids) - torch.tensor(r.logprobs)).abs().max().item()
        worst = max(worst, diff)
    print(f"max |vLLM - HF| logprob difference: {worst:.3g}")
    assert worst < 1e-4
    health = gen.health()
    assert (health.requests_served, health.tokens_generated) == (2, sum(len(r.completion_ids) for r in rollouts))


def test_stale_version_is_refused_and_stop_strings_apply(setup):
    gen, _, _, _ = setup
    with pytest.raises(StaleWeightVersion, match="holds version 0"):
        gen.generate([request("a", "Q: x\nA:")], expected_version=1)
    (r,) = gen.generate([request("s", "Q: what is 1 plus 1?\nA:", temperature=1.0, max_new_tokens=40,
                                 stop=(" ",))])
    # Stop strings are kept in the text so text and ids describe the same tokens.
    assert r.finish_reason == "length" or r.completion.endswith(" ")
    assert " " not in r.completion[:-1]


def test_load_weights_then_tool_loop_runs_code_and_masks_output(setup):
    gen, tok, model, _ = setup
    # Overfit the model on one tool-use script, push it in place as version 1.
    ids = torch.tensor([tok(TOOL_PROMPT + TOOL_SCRIPT + tok.eos_token, add_special_tokens=False)["input_ids"]])
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):  # (the DeepSeekMath tool template is long: 150 steps no longer memorise the script)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    gen.load_weights(list(model.state_dict().items()), version=1)
    with pytest.raises(StaleWeightVersion):
        gen.load_weights(list(model.state_dict().items()), version=1)
    (plain,) = gen.generate([request("p", TOOL_PROMPT, temperature=0.0, max_new_tokens=60)], expected_version=1)
    assert plain.completion == TOOL_SCRIPT and plain.weight_version == 1

    (r,) = gen.generate([request("t", TOOL_PROMPT, temperature=0.0, max_new_tokens=60)], mode="tool")
    assert r.completion.startswith(TOOL_STOP_TEXT + "\n42\n```\n")  # the sandbox's output, not the model's
    assert r.completion.endswith("\\boxed{42}.") and r.finish_reason == "stop"
    stop_len = len(tok(TOOL_PROMPT + TOOL_STOP_TEXT, add_special_tokens=False)["input_ids"]) - len(r.prompt_ids)
    block_len = len(tok("\n42\n```\n", add_special_tokens=False)["input_ids"])
    mask = list(r.loss_mask)
    assert len(mask) == len(r.completion_ids) == len(r.logprobs)
    assert mask[:stop_len] == [1] * stop_len
    assert mask[stop_len : stop_len + block_len] == [0] * block_len
    assert set(mask[stop_len + block_len :]) == {1}
    assert tok.decode(list(r.completion_ids)[stop_len : stop_len + block_len]) == "\n42\n```\n"
