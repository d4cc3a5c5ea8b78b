"""The tiny-model bootstrap: problems → tokenizer → Qwen2 model → short SFT warm-up.

Everything is cached under ``bootstrap.data_dir/<key>`` where the key hashes every setting that
changes the result, so a later run with the same settings reuses it and a changed setting rebuilds.
``bootstrap.data_dir/latest`` links to the entry the last run built or reused (``dsmath eval --model
~/.cache/dsmath/latest/model``, whatever other bootstraps the cache holds).
The folder is written atomically (build in a temp dir, then rename): an interrupted bootstrap never
leaves a half-built cache behind.

Layout of a cache entry::

    model/             HF folder (model + tokenizer), loadable by transformers and vLLM
    train.jsonl        {"question", "answer", "level"} — the RL training split
    heldout.jsonl      the held-out split (disjoint question texts)
    sft.jsonl          {"prompt", "response"} — the warm-up data
    bootstrap.json     settings, parameter count, SFT loss curve, wall time
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dsmath.config import BootstrapConfig, ModelConfig
from dsmath.datasets import load_problems, write_jsonl
from dsmath.prompts import format_prompt
from dsmath.records import Problem
from dsmath.run_dir import link_latest
from dsmath.tasks import arithmetic

# Bump when the task generator or the SFT recipe changes, so old caches are not reused.
BOOTSTRAP_VERSION = 3
PROMPT_MODE = "tiny"


@dataclass(frozen=True)
class BootstrapArtifacts:
    root: Path
    model_dir: Path
    train_path: Path
    heldout_path: Path
    sft_path: Path
    info: dict

    def train_problems(self) -> list[Problem]:
        return load_problems(self.train_path)[0]

    def heldout_problems(self, limit: int | None = None) -> list[Problem]:
        return load_problems(self.heldout_path, limit=limit)[0]


def cache_key(boot: BootstrapConfig, model: ModelConfig) -> str:
    payload = json.dumps(
        {"v": BOOTSTRAP_VERSION, "boot": {k: v for k, v in asdict(boot).items() if k != "data_dir"}, "model": asdict(model)},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def sft_examples(problems: list[arithmetic.ArithmeticProblem], boot: BootstrapConfig) -> list[dict]:
    """Warm-up data mixing two formats: ``stepwise_fraction`` step-by-step, the rest direct answers."""
    rng = random.Random(boot.seed)
    out = []
    for p in problems:
        stepwise = rng.random() < boot.stepwise_fraction
        solution = arithmetic.stepwise_solution(p) if stepwise else arithmetic.direct_solution(p)
        out.append({"prompt": format_prompt(p.question, PROMPT_MODE), "response": " " + solution,
                    "format": "stepwise" if stepwise else "direct"})
    return out


def ensure_bootstrap(boot: BootstrapConfig, model_cfg: ModelConfig, *, log=print) -> BootstrapArtifacts:
    """Return the cached bootstrap for these settings, building it first if needed."""
    root = Path(boot.data_dir).expanduser() / f"bootstrap-{cache_key(boot, model_cfg)}"
    if (root / "bootstrap.json").exists():
        info = json.loads((root / "bootstrap.json").read_text())
        log(f"bootstrap: reusing {root}")
        link_latest(root)
        return _artifacts(root, info)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
    try:
        info = _build(tmp, boot, model_cfg, log=log)
        if root.exists():  # another process finished first; keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    link_latest(root)
    return _artifacts(root, json.loads((root / "bootstrap.json").read_text()))


def _artifacts(root: Path, info: dict) -> BootstrapArtifacts:
    return BootstrapArtifacts(
        root=root,
        model_dir=root / "model",
        train_path=root / "train.jsonl",
        heldout_path=root / "heldout.jsonl",
        sft_path=root / "sft.jsonl",
        info=info,
    )


def _build(out: Path, boot: BootstrapConfig, model_cfg: ModelConfig, *, log=print) -> dict:
    from dsmath.tiny import build_model, num_parameters, train_tokenizer

    start = time.time()
    log(f"bootstrap: generating {boot.num_train_problems} train + {boot.num_heldout_problems} held-out problems")
    train = arithmetic.generate_split("train", boot.num_train_problems, levels=tuple(boot.levels), seed=boot.seed)
    heldout = arithmetic.generate_split(
        "heldout", boot.num_heldout_problems, levels=tuple(boot.levels), seed=boot.seed,
        exclude_questions={p.question for p in train},
    )
    write_jsonl(out / "train.jsonl", ({"question": p.question, "answer": str(p.answer), "level": p.level} for p in train))
    write_jsonl(out / "heldout.jsonl", ({"question": p.question, "answer": str(p.answer), "level": p.level} for p in heldout))
    # SFT uses the first part of the train split; RL draws its questions from the rest.
    sft_problems = train[: boot.num_sft_problems]
    examples = sft_examples(sft_problems, boot)
    write_jsonl(out / "sft.jsonl", examples)

    log(f"bootstrap: training a {model_cfg.vocab_size}-token BPE tokenizer")
    tokenizer = train_tokenizer(
        (e["prompt"] + e["response"] for e in examples[:5000]), model_cfg.vocab_size, out / "model"
    )
    model = build_model(model_cfg, tokenizer, seed=boot.seed)
    model.save_pretrained(str(out / "model"))
    n_params = num_parameters(model)
    log(f"bootstrap: Qwen2 model with {n_params / 1e6:.2f} M parameters; SFT warm-up for {boot.sft_steps} steps")
    sft_info = warm_up(out / "model", examples, boot, log=log)
    info = {
        "version": BOOTSTRAP_VERSION,
        "bootstrap": asdict(boot),
        "model": asdict(model_cfg),
        "parameters": n_params,
        "sft": sft_info,
        "wall_seconds": time.time() - start,
    }
    (out / "bootstrap.json").write_text(json.dumps(info, indent=2))
    return info


def warm_up(model_dir: Path, examples: list[dict], boot: BootstrapConfig, *, log=print) -> dict:
    """The short SFT: the DeepSpeed learner (one rank, in this process) on prompt/response pairs.

    Loss on response tokens only.
    """
    from tqdm import tqdm

    from dsmath.config import LearnerConfig
    from dsmath.utils.threads import ThreadTuner
    from learner.batch import collate_rollouts
    from learner.objectives.lm import build_lm

    tuner = ThreadTuner()  # 1 thread or all cores, whichever the loop measures faster: the same numbers either way
    try:
        engine, lm = build_lm(
            model_dir,
            LearnerConfig(lr=boot.sft_lr, warmup_steps=20, zero_stage=0, micro_batch_size=boot.sft_batch_size,
                          weight_decay=0.0),
            rank=0, world_size=1, seed=boot.seed, total_steps=boot.sft_steps,
        )
        tok = engine.tokenizer
        eos = tok.eos_token_id
        encoded = [(tok(e["prompt"])["input_ids"], tok(e["response"])["input_ids"] + [eos]) for e in examples]
        rng = random.Random(boot.seed)
        curve = []
        for step in tqdm(range(boot.sft_steps), desc="bootstrap sft", unit="step", mininterval=2.0):
            picks = [encoded[rng.randrange(len(encoded))] for _ in range(boot.sft_batch_size)]
            batch = collate_rollouts([p for p, _ in picks], [c for _, c in picks], pad_id=tok.pad_token_id)
            with tuner.step(work=batch.input_ids.numel()):
                metrics = engine.train_step(lm, batch)
            if step % 50 == 0 or step == boot.sft_steps - 1:
                curve.append((step, round(metrics["loss"], 4)))
        engine.module.save_pretrained(str(model_dir), safe_serialization=True)
        log(f"bootstrap: SFT loss {curve[0][1]} -> {curve[-1][1]} ({tuner.current} torch thread(s) at the end)")
        return {"loss_curve": curve, "steps": boot.sft_steps, "lr": boot.sft_lr, "batch_size": boot.sft_batch_size}
    finally:
        # The one-rank process group stays: a later learner in this process (another bootstrap, a compare run)
        # reuses it. Destroying it leaves DeepSpeed's cached world group dangling ("Group ... is not registered").
        tuner.restore()
