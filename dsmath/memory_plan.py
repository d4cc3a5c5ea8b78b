"""Memory plan: what one learner GPU and one generator GPU will hold, estimated before anything starts.

Pure arithmetic on the model's shape (from ``model.path``'s ``config.json``, else ``model.shape``'s entry in
:data:`KNOWN_SHAPES`, else the ``model.*`` fields of the built-in tiny model) and the config. No Ray, vLLM,
DeepSpeed or torch import. ``dsmath train --dry-run`` prints it; ``dsmath train`` on GPU configs refuses, in
one line, a config whose estimate exceeds the device memory.

Per learner GPU (P parameters, N = learner.num_ranks, s = learner.zero_stage; ZeRO stage 1 shards the optimizer
state over the N ranks, 2 also the gradients, 3 also the weights):

* weights: 4·P bytes in fp32, 2·P in bf16 (DeepSpeed's bf16 module); /N at s = 3.
* gradients: in the compute dtype (4·P or 2·P), /N at s >= 2; in bf16 mode plus the float32 gradient of this
  rank's optimizer partition the optimizer steps on (4·P, /N at s >= 1).
* optimizer: Adam's float32 m and v (8·P), plus the float32 master weights in bf16 mode (4·P); /N at s >= 1.
* reference: none unless algorithm.beta > 0 or the algorithm is DPO; then 4·P (fp32) or 2·P (bf16), /N at s = 3,
  and 0 on the device with learner.reference=host (it lives in host memory: shown, not counted).
* activations, for one micro-batch of b = micro_batch_size sequences of s = max_prompt_tokens + max_new_tokens
  tokens (capped by max_tokens_per_micro_batch): Korthikanti et al. 2022 ("Reducing Activation Recomputation in
  Large Transformer Models", eq. 1) give s·b·h·(34 + 5·a·s/h) bytes per layer with 16-bit activations for a GPT
  layer (4h MLP, dropout). Adapted to a Llama/Qwen layer — no dropout masks, RMSNorm inputs, a fused attention
  kernel (SDPA/flash: the a·s² scores are never stored) and a gated MLP storing its input, gate, up, activation
  and product (2h + 8·I bytes per token) — this is s·b·(16·h + 8·I) bytes per layer at 16 bits, twice that in
  fp32. With checkpointing only each layer's input is kept (2·h bytes per token per layer at 16 bits) plus one
  layer's full activations while it is recomputed in backward.
* logits: the full float32 ``[b, s, V]`` logits, their log-softmax and its gradient (3 × 4·b·s·V bytes), or
  the same for one chunk of learner.logprob_chunk_tokens tokens when it is set.
* reserve: a flat :data:`RUNTIME_RESERVE_GB` for the CUDA context, NCCL and DeepSpeed's communication buckets
  and allocator fragmentation — an allowance, not a term-by-term model.

Per generator GPU (vLLM; T = rollout.tensor_parallel_size): the weights in ``model.dtype`` (/T); the budget
``rollout.gpu_memory_utilization × device memory``; :data:`VLLM_RESERVE_GB` for vLLM's activations and CUDA
graphs; the rest is KV cache at 2 × layers × kv_heads × head_dim × dtype bytes per token (/T). A generator is
refused when the weights do not fit the budget or the KV cache cannot hold one full-length sequence.

Guaranteed: the figures are the arithmetic above, deterministic, in bytes. Not guaranteed: that they match a
measured peak (framework buffers, fragmentation and kernel workspaces vary by version) — an estimate, not a
measurement. Learners and generators are assumed to sit on separate GPUs (no colocation).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from dsmath.config import ConfigError, TrainConfig, with_overrides

GB = 1e9  # decimal gigabytes: an "80 GB" H100 has 85.0e9 bytes, so learner.gpu_memory_gb=80 leaves headroom
RUNTIME_RESERVE_GB = 3.0
VLLM_RESERVE_GB = 2.0
LOGIT_COPIES = 3  # logits, log-softmax, and the gradient of the latter in backward


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's dimensions (Llama / Qwen2 layout)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    head_dim: int = 0  # 0 = hidden_size // num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def num_parameters(self) -> int:
        """Exact parameter count of the Llama/Qwen2 layout (embedding, layers, final norm, untied LM head)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_size
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.attention_bias else 0)
        layer = attn + 3 * h * i + 2 * h  # q,k,v,o + gate,up,down + two RMSNorms
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * layer + h + head


# Shapes for presets whose model.path is not on this machine (dsmath train --dry-run on a login node).
KNOWN_SHAPES: dict[str, ModelShape] = {
    "deepseek-math-7b": ModelShape("deepseek-math-7b", num_layers=30, hidden_size=4096, num_heads=32,
                                   num_kv_heads=32, intermediate_size=11008, vocab_size=102400),
    "qwen2.5-0.5b": ModelShape("qwen2.5-0.5b", num_layers=24, hidden_size=896, num_heads=14, num_kv_heads=2,
                               intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                               attention_bias=True),
}


def shape_from_hf_config(config: dict, name: str) -> ModelShape:
    """A :class:`ModelShape` from a transformers ``config.json`` mapping (Llama/Qwen2/Mistral keys)."""
    try:
        heads = int(config["num_attention_heads"])
        return ModelShape(
            name=name, num_layers=int(config["num_hidden_layers"]), hidden_size=int(config["hidden_size"]),
            num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads),
            intermediate_size=int(config["intermediate_size"]), vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
            head_dim=int(config.get("head_dim") or 0),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"model.path: {name} has no usable transformer shape ({exc!s} missing or invalid)") from None


def model_shape(cfg: TrainConfig) -> tuple[ModelShape, str]:
    """The policy's shape and where it came from (config.json, model.shape, or the model.* fields)."""
    m = cfg.model
    if m.path:
        path = Path(m.path).expanduser()
        for candidate in (path / "config.json", path / "latest"):
            if candidate.name == "latest" and candidate.exists():  # a dsmath checkpoint folder
                candidate = path / candidate.read_text().strip() / "config.json"
            if candidate.exists():
                try:
                    data = json.loads(candidate.read_text())
                except (OSError, json.JSONDecodeError) as exc:
                    raise ConfigError(f"model.path: {candidate} is not readable JSON ({exc})") from None
                return shape_from_hf_config(data, str(candidate.parent)), f"{candidate}"
    key = m.shape
    if key:
        if key not in KNOWN_SHAPES:
            raise ConfigError(f"model.shape: {key!r} is not a known shape; one of {', '.join(sorted(KNOWN_SHAPES))}")
        return KNOWN_SHAPES[key], f"model.shape={key}"
    if m.path:
        raise ConfigError(f"model.path={m.path} has no config.json on this machine: set model.shape to one of "
                          f"{', '.join(sorted(KNOWN_SHAPES))} for the memory plan")
    shape = ModelShape("tiny (model.* fields)", num_layers=m.num_layers, hidden_size=m.hidden_size,
                       num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, intermediate_size=m.intermediate_size,
                       vocab_size=m.vocab_size, tie_word_embeddings=True, attention_bias=True)
    return shape, "model.* fields (the built-in tiny model)"


@dataclass
class DevicePlan:
    """One GPU's estimate: ``terms`` are counted in ``total``; ``alternatives`` are shown, not counted."""

    role: str
    description: str
    capacity: float  # bytes; 0 = not checked (CPU)
    terms: dict[str, float] = field(default_factory=dict)
    alternatives: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problem: str = ""  # a reason to refuse other than the total (e.g. no room for one sequence's KV cache)

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def fits(self) -> bool:
        return not self.problem and (self.capacity <= 0 or self.total <= self.capacity)

    def biggest(self) -> tuple[str, float]:
        return max(self.terms.items(), key=lambda kv: kv[1])


def _micro_batch_tokens(cfg: TrainConfig) -> tuple[int, int]:
    """(sequences, tokens) in the largest micro-batch: micro_batch_size full-length sequences, token-capped."""
    seq = cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens
    seqs = cfg.learner.micro_batch_size
    cap = cfg.learner.max_tokens_per_micro_batch
    if cap:
        seqs = max(1, min(seqs, cap // seq))
    return seqs, seqs * seq


def activation_bytes(shape: ModelShape, tokens: int, act_bytes: int, checkpointing: bool) -> float:
    """Activations kept for backward for ``tokens`` tokens (formula in the module docstring)."""
    h, i = shape.hidden_size, shape.intermediate_size
    per_layer_16bit = tokens * (16 * h + 8 * i)  # one layer's full activations at 16 bits
    scale = act_bytes / 2
    if not checkpointing:
        return shape.num_layers * per_layer_16bit * scale
    inputs = shape.num_layers * tokens * 2 * h  # each layer's input, 16 bits
    return (inputs + per_layer_16bit) * scale


def logits_bytes(shape: ModelShape, tokens: int, chunk_tokens: int) -> float:
    """Float32 logits, log-softmax and its gradient for ``tokens`` (or one chunk of ``chunk_tokens``)."""
    n = min(tokens, chunk_tokens) if chunk_tokens else tokens
    return LOGIT_COPIES * 4 * n * shape.vocab_size


def needs_reference(cfg: TrainConfig) -> bool:
    """GRPO/PPO with a KL term (β > 0) and DPO use the frozen reference; β = 0 needs none (the learner's rule,
    ``dsmath.methods.needs_reference``)."""
    from dsmath.methods import needs_reference as method_needs_reference

    return method_needs_reference(cfg.algorithm)


def learner_plan(cfg: TrainConfig, shape: ModelShape) -> DevicePlan:
    """One learner GPU's (or CPU rank's) estimate."""
    lr = cfg.learner
    p, n, s = shape.num_parameters(), lr.num_ranks, lr.zero_stage
    bf16 = lr.precision == "bf16"
    w = 2 if bf16 else 4
    shard = lambda from_stage: n if s >= from_stage else 1  # noqa: E731 - ranks a term is divided over
    gpu = lr.gpus_per_rank > 0
    capacity = lr.gpu_memory_gb * GB if gpu else 0.0
    seqs, tokens = _micro_batch_tokens(cfg)
    ckpt = lr.gradient_checkpointing
    terms = {
        f"weights ({lr.precision})": w * p / shard(3),
        "gradients": w * p / shard(2) + (4 * p / shard(1) if bf16 else 0.0),
        "optimizer (Adam m+v" + (" + fp32 master)" if bf16 else ")"): (12 if bf16 else 8) * p / shard(1),
    }
    notes = []
    if needs_reference(cfg):
        ref = w * p / shard(3)
        if lr.reference == "host":
            notes.append(f"reference: {ref / GB:.2f} GB in host memory (learner.reference=host), not on the device")
            ref = 0.0
        terms[f"reference ({lr.precision})"] = ref
    else:
        terms["reference (none: beta=0)"] = 0.0
    on = activation_bytes(shape, tokens, w, True)
    off = activation_bytes(shape, tokens, w, False)
    terms["activations (" + ("checkpointed" if ckpt else "no checkpointing") + ")"] = on if ckpt else off
    chunk = lr.logprob_chunk_tokens
    full, chunked = logits_bytes(shape, tokens, 0), logits_bytes(shape, tokens, chunk or 1024)
    terms[f"logits ({'chunk of ' + str(chunk) + ' tokens' if chunk else 'full [mb, T, V] fp32'})"] = (
        chunked if chunk else full)
    if gpu:
        terms["reserve (CUDA context, NCCL, buckets)"] = RUNTIME_RESERVE_GB * GB
    alternatives = {
        "activations " + ("without checkpointing" if ckpt else "with checkpointing"): off if ckpt else on,
        "logits " + ("full [mb, T, V] fp32" if chunk else "in chunks of 1024 tokens"): full if chunk else chunked,
    }
    where = f"{lr.gpu_memory_gb:g} GB GPU" if gpu else "CPU (host memory, not checked)"
    desc = (f"learner {where}, 1 of {n} rank(s): ZeRO-{s}, {lr.precision}, checkpointing "
            f"{'on' if ckpt else 'off'}, micro-batch {seqs} × {tokens // max(seqs, 1)} tokens")
    plan = DevicePlan("learner", desc, capacity, terms, alternatives, notes)
    if bf16 and s == 0:
        plan.problem = "learner.precision=bf16 needs learner.zero_stage >= 1 (the learner refuses bf16 at ZeRO-0)"
    return plan


def generator_plan(cfg: TrainConfig, shape: ModelShape) -> DevicePlan | None:
    """One generator GPU's estimate; None when the generators run on CPU."""
    r = cfg.rollout
    if r.gpus_per_generator <= 0:
        return None
    tp = max(1, r.tensor_parallel_size)
    dtype_bytes = 4 if cfg.model.dtype == "float32" else 2
    capacity = r.gpu_memory_gb * GB
    budget = r.gpu_memory_utilization * capacity
    weights = shape.num_parameters() * dtype_bytes / tp
    kv_per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_size * dtype_bytes / tp
    seq = r.max_prompt_tokens + r.max_new_tokens
    per_gen = math.ceil(r.questions_per_step * r.group_size / r.num_generators)
    kv = max(0.0, budget - weights - VLLM_RESERVE_GB * GB)
    held = int(kv // (kv_per_token * seq))
    terms = {f"weights ({cfg.model.dtype}, /TP {tp})": weights, "vLLM reserve (activations, CUDA graphs)":
             VLLM_RESERVE_GB * GB, f"KV cache ({kv_per_token / 1e6:.3f} MB/token)": kv}
    desc = (f"generator {r.gpu_memory_gb:g} GB GPU: vLLM at gpu_memory_utilization {r.gpu_memory_utilization:g} "
            f"({budget / GB:.1f} GB), tensor parallel {tp}")
    notes = [f"KV cache holds {held} of this generator's {per_gen} sequences of {seq} tokens at once "
             f"(vLLM queues the rest)"]
    plan = DevicePlan("generator", desc, capacity, terms, {"KV for all sequences at once":
                                                           per_gen * seq * kv_per_token}, notes)
    if weights + VLLM_RESERVE_GB * GB > budget:
        plan.problem = (f"generator weights ({weights / GB:.1f} GB) + vLLM reserve exceed "
                        f"rollout.gpu_memory_utilization × {r.gpu_memory_gb:g} GB = {budget / GB:.1f} GB")
    elif held < 1:
        plan.problem = (f"the generator's KV cache ({kv / GB:.2f} GB) cannot hold one {seq}-token sequence "
                        f"({kv_per_token * seq / GB:.2f} GB)")
    return plan


@dataclass
class MemoryPlan:
    shape: ModelShape
    shape_source: str
    devices: list[DevicePlan]

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices)


def plan(cfg: TrainConfig) -> MemoryPlan:
    """The estimate for ``cfg`` (see the module docstring for every formula)."""
    shape, source = model_shape(cfg)
    devices = [learner_plan(cfg, shape)]
    gen = generator_plan(cfg, shape)
    if gen is not None:
        devices.append(gen)
    return MemoryPlan(shape, source, devices)


# ------------------------------------------------------------------------------------ fixes and refusal

def _candidates(cfg: TrainConfig, role: str, term: str) -> list[list[str]]:
    """Overrides that shrink ``term`` on a ``role`` GPU, most natural first."""
    lr, r = cfg.learner, cfg.rollout
    smaller_mb = [[f"learner.micro_batch_size={m}"] for m in (lr.micro_batch_size // 2, lr.micro_batch_size // 4, 1)
                  if 1 <= m < lr.micro_batch_size]
    stages = [[f"learner.zero_stage={z}"] for z in (1, 2, 3) if z > lr.zero_stage]
    # the learner refuses bf16 at ZeRO-0 (DeepSpeed's stage-0 bf16 optimizer accumulates bf16 gradients)
    bf16 = ["learner.precision=bf16"] + (["learner.zero_stage=1"] if lr.zero_stage == 0 else [])
    ranks = [[f"learner.num_ranks={lr.num_ranks * k}"] + ([] if lr.zero_stage else ["learner.zero_stage=1"])
             for k in (2, 4, 8)]
    if role == "generator":
        return [[f"rollout.tensor_parallel_size={t}", f"rollout.gpus_per_generator={t}"] for t in (2, 4, 8)
                if t > r.tensor_parallel_size] + [["model.dtype=bfloat16"]]
    by_term = {
        "weights": [bf16, ["learner.zero_stage=3"]],
        "gradients": (stages[1:] if lr.zero_stage < 2 else stages) + [bf16],
        "optimizer": stages + ranks,
        "reference": [["learner.reference=host"], bf16, ["learner.zero_stage=3"]],
        "activations": [["learner.gradient_checkpointing=true"]] + smaller_mb,
        "logits": [["learner.logprob_chunk_tokens=1024"]] + smaller_mb,
    }
    first = term.split(" ")[0]
    ordered = by_term.get(first, [])
    rest = [c for k, v in by_term.items() if k != first for c in v]
    return ordered + rest


def _device(cfg: TrainConfig, role: str) -> DevicePlan:
    return next(d for d in plan(cfg).devices if d.role == role)


def suggest_fix(cfg: TrainConfig, role: str, max_changes: int = 4) -> list[str]:
    """Greedy: overrides that make ``role``'s GPU fit (empty when no combination of the candidates does).

    Each round tries the candidates for the current biggest term first and keeps the first that fits, else the
    one that lowers the total most; candidates the config validation refuses are skipped.
    """
    chosen: list[str] = []
    current = cfg
    for _ in range(max_changes):
        dev = _device(current, role)
        if dev.fits:
            return chosen
        best, best_total = None, dev.total if not dev.problem else math.inf
        for cand in _candidates(current, role, dev.biggest()[0]):
            try:
                trial = with_overrides(current, cand)
            except ConfigError:
                continue
            t = _device(trial, role)
            if t.fits:
                return chosen + cand
            total = t.total if not t.problem else math.inf
            if total < best_total - 1:
                best, best_total = (cand, trial), total
        if best is None:
            return []
        chosen += best[0]
        current = best[1]
    return chosen if _device(current, role).fits else []


def refusal(cfg: TrainConfig, memory: MemoryPlan) -> str:
    """The one-line reason ``cfg`` does not fit (empty when it fits)."""
    for dev in memory.devices:
        if dev.fits:
            continue
        name, size = dev.biggest()
        fix = suggest_fix(cfg, dev.role)
        after = (f" (estimate then {_device(with_overrides(cfg, fix), dev.role).total / GB:.1f} GB)"
                 if fix and dev.role == "learner" else "")
        how = f"set {' '.join(fix)}{after}" if fix else "none of the settings dsmath tries fixes it: use bigger GPUs"
        what = dev.problem or (f"{dev.role} GPU needs {dev.total / GB:.1f} GB of {dev.capacity / GB:g} GB "
                               f"(estimate, dsmath.memory_plan)")
        return f"{what}; the biggest term is {name} at {size / GB:.1f} GB; {how}"
    return ""


def check(cfg: TrainConfig, memory: MemoryPlan | None = None) -> MemoryPlan:
    """The plan; a one-line :class:`ConfigError` when a GPU's estimate exceeds its memory."""
    memory = memory or plan(cfg)
    reason = refusal(cfg, memory)
    if reason:
        raise ConfigError(reason)
    return memory


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def format_plan(memory: MemoryPlan) -> str:
    """The plan as a text table (GB = 1e9 bytes)."""
    s = memory.shape
    lines = ["memory plan (estimate from dsmath.memory_plan, not measured; GB = 1e9 bytes)",
             f"model: {s.name} from {memory.shape_source}: {_count(s.num_parameters())} parameters, "
             f"{s.num_layers} layers, hidden {s.hidden_size}, {s.num_heads} heads / {s.num_kv_heads} kv heads, "
             f"intermediate {s.intermediate_size}, vocab {s.vocab_size}"]
    for dev in memory.devices:
        lines += ["", dev.description, f"  {'term':<48} {'GB':>9}"]
        lines += [f"  {name:<48} {size / GB:>9.2f}" for name, size in dev.terms.items()]
        verdict = ("not checked" if dev.capacity <= 0 else
                   f"of {dev.capacity / GB:g} GB: " + ("fits" if dev.fits else "DOES NOT FIT"))
        lines.append(f"  {'total':<48} {dev.total / GB:>9.2f}  {verdict}")
        lines += [f"  (not counted) {name:<34} {size / GB:>9.2f}" for name, size in dev.alternatives.items()]
        lines += [f"  note: {n}" for n in dev.notes]
        if dev.problem:
            lines.append(f"  problem: {dev.problem}")
    return "\n".join(lines)
