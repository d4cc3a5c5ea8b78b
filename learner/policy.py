"""The DeepSpeed policy learner: GRPO and SFT steps, a frozen reference model, weights, checkpoints.

One :class:`PolicyLearner` per rank. It is a plain class — launch it under ``torchrun`` or inside a
Ray actor (:mod:`learner.ray_group`); it only needs ``rank``/``world_size`` and, for more than one
rank, ``MASTER_ADDR``/``MASTER_PORT`` in the environment.

Loss normalisation across micro-batches and ranks: every step first all-reduces the batch's loss
divisor (tokens or sequences, :func:`dsmath.grpo.loss_normalizer`) so each micro-batch's loss is
its share of the *global* loss; DeepSpeed then averages gradients over ranks, which we undo by
scaling by ``world_size``. Hence K ranks on a global batch compute the same update as one rank on
it (up to float summation order), whatever the micro-batch split.

Per-token tensors follow the alignment of :mod:`learner.batch` (position t = token t+1).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from dsmath import algorithms, grpo, methods
from dsmath.config import AlgorithmConfig, LearnerConfig
from dsmath.errors import UserError
from dsmath.model_folder import model_folder
from dsmath.utils.net import free_port
from learner import checkpoint as ckpt
from learner.batch import TrainBatch, micro_batches

# Mean-type GRPO metrics, combined over micro-batches and ranks weighted by their token counts.
_TOKEN_MEAN_KEYS = ("clip_frac", "ratio_mean", "pg_loss", "kl", "kl_loss", "entropy", "is_weight_mean")


def _skip_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory comm op (35–65 s) on its first init; gloo does not need it."""
    import deepspeed.comm.torch  # noqa: F401  (make sure the module is loaded before patching it)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_distributed(rank: int, world_size: int, backend: str = "auto") -> str:
    """Join (or create) the default process group through DeepSpeed; returns the backend used."""
    import deepspeed
    import torch.distributed as dist

    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ.setdefault("LOCAL_RANK", "0" if torch.cuda.is_available() else str(rank))
    if dist.is_initialized():  # an existing group of the right size is joined as it is
        if dist.get_world_size() != world_size:
            raise RuntimeError(f"a process group of size {dist.get_world_size()} exists; asked for {world_size}")
    else:
        if world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
            # A one-rank group of our own: a fresh port, never one inherited from a parent process that may be
            # listening on it (a test or driver process running its own in-process learner).
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(free_port())
        elif "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise UserError("a multi-rank learner needs MASTER_ADDR and MASTER_PORT (torchrun or LearnerGroup sets "
                            "them)")
        _skip_shm_build()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, rank=rank, world_size=world_size)
    _drop_stale_deepspeed_groups()
    return backend


def _drop_stale_deepspeed_groups() -> None:
    """Forget DeepSpeed's cached sub-groups whose process group was destroyed since they were made.

    DeepSpeed caches a clone of the world group (``deepspeed.utils.groups``) the first time an engine is built.
    If the default group is then destroyed — an in-process vLLM engine tears its own down on exit, and it is the
    same default group — the next engine in this process would use the dead clone ("Group ... is not
    registered"). Clearing the cache makes DeepSpeed clone the live group again.
    """
    import torch.distributed as dist
    from deepspeed.utils import groups

    for name, value in list(vars(groups).items()):
        if isinstance(value, dist.ProcessGroup):
            try:
                dist.get_global_rank(value, 0)
            except (ValueError, RuntimeError):
                setattr(groups, name, None)


# Config attributes through which HF causal LMs post-process ``lm_head(hidden)`` (Gemma-2/3 softcapping, Cohere's
# logit_scale, Granite's logits_scaling, Falcon-H1's lm_head_multiplier): chunked log-probs would miss them.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")
_warned_full_logits: set[str] = set()


def _head_unsupported(module) -> str | None:
    """Why log-probs cannot come from ``module``'s final hidden states through its LM head module (None: they can).

    Checked: a separate LM head module and base model, a ``logits_to_keep`` argument (so the forward can skip the
    full logits), and no known logit post-processing in the config. :meth:`PolicyLearner._probe_head` then checks
    numerically that ``head(hidden)`` is the model's own logits, which catches post-processing not listed here.
    """
    import inspect

    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    base = getattr(module, "base_model", None)
    if head is None or base is None or base is module:
        return "it has no separate LM head module"
    if "logits_to_keep" not in inspect.signature(module.forward).parameters:
        return "its forward takes no logits_to_keep"
    for attr in _LOGIT_POSTPROCESSING:
        value = getattr(module.config, attr, None)
        if value not in (None, 0, 0.0, 1, 1.0):
            return f"config.{attr}={value} post-processes the logits"
    return None


@contextmanager
def _hidden_state_head(module, labels: torch.Tensor, chunk_tokens: int, with_entropy: bool):
    """While active, a forward of ``module`` (a causal LM, called directly or through its DeepSpeed engine) also
    returns ``token_logprobs`` (and ``token_entropy``) ``[n, w-1]``: :func:`dsmath.grpo.head_token_logprobs` on the
    base model's last hidden state. Computed inside the module's forward, so DeepSpeed's output hooks (which start
    its backward bookkeeping) see them."""
    head, holder = module.get_output_embeddings(), {}

    def grab(_m, _args, out):
        holder["hidden"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [n, w, H]

    def attach(_m, _args, out):
        hidden = holder.pop("hidden")  # [n, w, H]
        lp, ent = grpo.head_token_logprobs(hidden[:, :-1], head, labels, chunk_tokens, with_entropy=with_entropy)
        out["token_logprobs"] = lp  # [n, w-1]
        if ent is not None:
            out["token_entropy"] = ent  # [n, w-1]
        return out

    handles = [module.base_model.register_forward_hook(grab), module.register_forward_hook(attach)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _load_tokenizer(model_dir: Path):
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None  # AutoTokenizer would invent an empty one from the model config
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception:  # a model folder without a tokenizer is fine for RL; checkpoints just omit it
        return None


class PolicyLearner:
    """A policy (DeepSpeed engine) plus a frozen reference copy, on one rank.

    Guaranteed: ``grpo_step``/``sft_step`` do exactly one optimizer step over the whole local batch
    (gradient accumulation over micro-batches of at most ``learner_cfg.micro_batch_size`` rows and,
    if set, ``max_tokens_per_micro_batch`` padded tokens); every rank must call them together with
    equally sized shards. ZeRO 0–3 are tested on one CPU rank (exact resume), ZeRO-2 on two.
    """

    def __init__(
        self,
        model_dir: str | Path,
        learner_cfg: LearnerConfig,
        algo_cfg: AlgorithmConfig | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        with_reference: bool | None = None,
        total_steps: int | None = None,
        max_tokens: int | None = None,
        max_tokens_per_micro_batch: int | None = None,
    ) -> None:
        """``total_steps`` turns on cosine decay (to 10 % of ``lr``) after warm-up; None keeps the
        lr constant after warm-up. ``max_tokens`` is Dr. GRPO's constant for
        ``loss_agg='seq_mean_token_sum_norm'`` (e.g. ``rollout.max_new_tokens``). ``with_reference`` None builds
        the frozen reference only where ``algo_cfg`` reads it (:func:`dsmath.methods.needs_reference`)."""
        import deepspeed

        self.model_dir = model_folder(model_dir, str(model_dir))
        self.cfg = learner_cfg
        self.algo_cfg = algo_cfg or AlgorithmConfig()
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.max_tokens = max_tokens
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch or (
            getattr(learner_cfg, "max_tokens_per_micro_batch", 0) or None)
        if self.algo_cfg.loss_agg == "seq_mean_token_sum_norm" and not max_tokens:
            raise UserError("algorithm.loss_agg=seq_mean_token_sum_norm (Dr. GRPO) needs the learner's max_tokens "
                            "(pass rollout.max_new_tokens)")
        precision = getattr(learner_cfg, "precision", "fp32")
        if precision == "bf16" and learner_cfg.zero_stage == 0:
            raise UserError("learner.precision=bf16 needs learner.zero_stage >= 1: DeepSpeed's stage-0 bf16 optimizer "
                            "accumulates bf16 gradients and its updates diverge from fp32 Adam's (ZeRO-1 on one rank "
                            "costs the same memory)")
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.backend = init_distributed(rank, world_size, learner_cfg.backend)
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}") if self.backend == "nccl" else torch.device("cpu")
        torch.manual_seed(seed)

        model = self._load_model()  # a causal LM; the reward-model learner loads a scoring head instead
        model.config.use_cache = False
        if getattr(learner_cfg, "gradient_checkpointing", False):  # the policy only; the reference never trains
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise UserError(f"learner.gradient_checkpointing: {type(model).__name__} does not support it")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.tokenizer = _load_tokenizer(self.model_dir)
        if with_reference is None:
            with_reference = methods.needs_reference(self.algo_cfg)
        self._reference_reset = False
        self.reference = self._build_reference(model) if with_reference else None

        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=learner_cfg.lr, weight_decay=learner_cfg.weight_decay
        )
        warmup, lr_total = learner_cfg.warmup_steps, total_steps

        def lr_factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if lr_total and lr_total > warmup:
                progress = min(1.0, (step - warmup) / (lr_total - warmup))
                return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self._ds_config()
        )
        self.steps = 0
        self._chunk_tokens = int(getattr(learner_cfg, "logprob_chunk_tokens", 0) or 0)
        if self._chunk_tokens:
            reason = _head_unsupported(self.engine.module) or self._probe_head()
            if reason:
                name = type(self.engine.module).__name__
                if name not in _warned_full_logits:
                    _warned_full_logits.add(name)
                    warnings.warn(f"learner.logprob_chunk_tokens: {name}: {reason}; using the full logits",
                                  stacklevel=2)
                self._chunk_tokens = 0

    def _ds_config(self, *, train: bool = True) -> dict:
        """The DeepSpeed config: the policy's (``train``) or a frozen ZeRO-3 reference's (no optimizer)."""
        cfg = self.cfg
        ds_config = {
            # We own micro-batching (variable count per step): one DeepSpeed "step" per optimizer step.
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "train_batch_size": self.world_size,
            "managed_gradient_accumulation": False,
            "gradient_clipping": cfg.grad_clip if cfg.grad_clip > 0 else 0.0,
            "zero_optimization": {"stage": cfg.zero_stage if train else 3, "overlap_comm": False},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if self.dtype == torch.bfloat16:
            # bf16 weights and compute; DeepSpeed keeps fp32 master weights and Adam state, and we ask it to
            # accumulate gradients over micro-batches in fp32 too.
            ds_config["bf16"] = {"enabled": True}
            ds_config["data_types"] = {"grad_accum_dtype": "fp32"}
        return ds_config

    def _build_reference(self, model):
        """The frozen reference: in host memory (``learner.reference=host``), else a second model in the learner's
        precision — under ZeRO-3 partitioned over the ranks like the policy (a DeepSpeed engine without optimizer)."""
        from transformers import AutoModelForCausalLM

        if getattr(self.cfg, "reference", "copy") == "host":
            from learner.reference import HostReference

            return HostReference(model)  # no second model on the device: swapped in per reference pass
        reference = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=self.dtype)
        reference.config.use_cache = False
        reference.to(self.device).eval().requires_grad_(False)
        if self.cfg.zero_stage == 3:  # shard it like the policy: each rank holds 1/world_size of it
            import deepspeed

            reference, *_ = deepspeed.initialize(model=reference, config=self._ds_config(train=False))
            reference.eval()
        return reference

    @property
    def _reference_sharded(self) -> bool:
        return self.reference is not None and self.cfg.zero_stage == 3 and hasattr(self.reference, "module")

    def _load_reference(self, state: dict[str, torch.Tensor]) -> None:
        """Overwrite the reference's weights with ``state`` (all ranks call this under ZeRO-3)."""
        if not self._reference_sharded:
            self.reference.load_state_dict(state, strict=False)
            return
        import deepspeed

        for name, param in self.reference.module.named_parameters():
            if name in state:
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if self.rank == 0:
                        param.data.copy_(state[name])

    def _reference_state(self) -> dict[str, torch.Tensor]:
        """The reference's full weights on CPU (gathered under ZeRO-3: all ranks call this)."""
        if self._reference_sharded:
            return dict(_gathered_state(self.reference.module))
        return {k: v.detach().cpu().contiguous() for k, v in self.reference.state_dict().items()}

    def _load_model(self):
        """The trained module in the learner's precision (``self.dtype``), from ``self.model_dir`` (subclasses
        train other model types; DeepSpeed casts whatever they load to bf16 under ``learner.precision=bf16``)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=self.dtype)

    @torch.no_grad()
    def _probe_head(self) -> str | None:
        """None when ``lm_head(last hidden state)`` reproduces the model's own logits exactly on a short input."""
        module, holder = self.engine.module, {}
        ids = torch.arange(2, 10, device=self.device)[None] % module.config.vocab_size  # [1, 8]

        def grab(_m, _args, out):
            holder["hidden"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [1, 8, H]

        handle = module.base_model.register_forward_hook(grab)
        was_training = module.training
        try:
            module.eval()
            logits = module(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits  # [1, 8, V]
            mine = module.get_output_embeddings()(holder["hidden"])  # [1, 8, V]
        finally:
            handle.remove()
            module.train(was_training)
        if mine.shape != logits.shape or not torch.equal(mine.float(), logits.float()):
            return "its logits are not lm_head(last hidden state) (post-processed)"
        return None

    @classmethod
    def from_env(cls, model_dir: str | Path, learner_cfg: LearnerConfig, algo_cfg: AlgorithmConfig | None = None,
                 **kwargs) -> "PolicyLearner":
        """Under ``torchrun``: rank and world size from ``RANK``/``WORLD_SIZE``."""
        return cls(model_dir, learner_cfg, algo_cfg, rank=int(os.environ.get("RANK", "0")),
                   world_size=int(os.environ.get("WORLD_SIZE", "1")), **kwargs)

    # ------------------------------------------------------------------ forward helpers

    @property
    def model(self):
        return self.engine.module

    def _logprobs(self, model, mb: TrainBatch, *, with_entropy: bool = False):
        """Token log-probs ``[n, w]`` (and detached entropy) of ``mb`` under ``model`` (the engine or a frozen
        module), float32 in either precision. With ``learner.logprob_chunk_tokens`` > 0 they come from the final
        hidden states through the LM head that many tokens at a time (no ``[n, w, V]`` logits kept)."""
        mb = mb.to(self.device)
        if self._chunk_tokens:
            module = getattr(model, "module", model)  # the HF model inside a DeepSpeed engine
            keep = torch.zeros(0, dtype=torch.long, device=self.device)  # the forward's own logits: none
            with _hidden_state_head(module, mb.input_ids[:, 1:], self._chunk_tokens, with_entropy):
                out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False,
                            logits_to_keep=keep)
            lp = F.pad(out["token_logprobs"], (0, 1))  # [n, w] position t = log p(token t+1)
            ent = F.pad(out["token_entropy"].detach(), (0, 1)) if with_entropy else None  # [n, w]
            return lp, ent
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits  # [n, w, V]
        lp = grpo.token_logprobs(logits[:, :-1], mb.input_ids[:, 1:])  # [n, w-1]
        lp = F.pad(lp, (0, 1))  # [n, w] position t = log p(token t+1)
        ent = None
        if with_entropy:
            with torch.no_grad():
                ent = F.pad(grpo.entropy(logits[:, :-1].detach()), (0, 1))  # [n, w]
        return lp, ent

    @torch.no_grad()
    def _batched_logprobs(self, model, batch: TrainBatch) -> torch.Tensor:
        from learner.reference import HostReference

        if isinstance(model, HostReference):  # swap the reference in once for the whole batch
            with model.swapped_in() as module:
                return self._batched_logprobs(module, batch)
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)  # [N, T]
        for rows, mb in micro_batches(batch, self.cfg.micro_batch_size, self.max_tokens_per_micro_batch):
            lp, _ = self._logprobs(model, mb)
            out[rows, : lp.shape[1]] = lp.float().cpu()
        return out

    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Policy log-probs ``[N, T]`` (position t = token t+1; padding positions hold junk — mask them)."""
        return self._batched_logprobs(self.engine, batch)

    def ref_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Reference-model log-probs ``[N, T]``, same convention as :meth:`logprobs`."""
        if self.reference is None:
            raise RuntimeError("this learner was built with_reference=False")
        return self._batched_logprobs(self.reference, batch)

    # ------------------------------------------------------------------ collectives

    def _all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return t.cpu().tolist()

    def _barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def _dummy_backward(self) -> None:
        """A zero-gradient backward: ZeRO-2 reduces gradients in every backward, so all ranks must
        run the same number of them even when one rank's shard packs into fewer micro-batches."""
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        logits = self.engine(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        self.engine.backward(logits.sum() * 0.0, scale_wrt_gas=False)

    def _run_step(self, batch: TrainBatch, loss_fn) -> tuple[float, list[dict]]:
        """Accumulate ``loss_fn(micro_batch)`` over micro-batches, then one optimizer step."""
        self.engine.train()
        parts = micro_batches(batch, self.cfg.micro_batch_size, self.max_tokens_per_micro_batch)
        (num_micro,) = self._all_reduce([float(len(parts))], op="max")
        local_loss, micro_metrics = 0.0, []
        for _rows, mb in parts:
            loss, m = loss_fn(mb)
            # DeepSpeed averages gradients over ranks; ×world_size makes it the global sum.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            local_loss += float(loss.detach())
            micro_metrics.append(m)
        for _ in range(int(num_micro) - len(parts)):
            self._dummy_backward()
        self._lr_used = float(self.scheduler.get_last_lr()[0])
        self.engine.step()
        self.steps += 1
        (global_loss,) = self._all_reduce([local_loss])
        return global_loss, micro_metrics

    def _common_metrics(self) -> dict[str, float]:
        norm = self.engine.get_global_grad_norm()
        out = {"lr": self._lr_used, "step": float(self.steps)}  # the lr this step used
        if norm is not None:
            out["grad_norm"] = float(norm)
        return out

    # ------------------------------------------------------------------ steps

    def grpo_step(self, batch: TrainBatch) -> dict[str, float]:
        """One GRPO optimizer step on this rank's shard. Returns metrics reduced over all ranks."""
        if batch.advantages is None:
            raise ValueError("grpo_step needs batch.advantages")
        g = self.algo_cfg
        beta = methods.loss_beta(g)  # PPO pays the KL as a per-token reward, not as a loss term
        need_ref = beta > 0
        if need_ref and batch.ref_logprobs is None and self.reference is None:
            raise ValueError("beta > 0 needs batch.ref_logprobs or a learner with a reference model")
        from learner.reference import HostReference

        if need_ref and batch.ref_logprobs is None and isinstance(self.reference, HostReference):
            # Swapping weights inside the step would invalidate the autograd graph: do the reference pass first.
            batch = dataclasses.replace(batch, ref_logprobs=self.ref_logprobs(batch))
        (normalizer,) = self._all_reduce([grpo.loss_normalizer(batch.loss_mask, g.loss_agg, self.max_tokens)])

        def loss_fn(mb: TrainBatch):
            logp, ent = self._logprobs(self.engine, mb, with_entropy=True)
            mb = mb.to(self.device)
            old = mb.old_logprobs if mb.old_logprobs is not None else logp.detach()
            ref = mb.ref_logprobs
            if need_ref and ref is None:
                with torch.no_grad():
                    ref, _ = self._logprobs(self.reference, mb)
            loss, metrics = grpo.grpo_loss(
                logp, old, ref if need_ref else None, mb.advantages, mb.loss_mask,
                clip_eps_low=g.clip_eps_low, clip_eps_high=g.clip_eps_high, beta=beta, loss_agg=g.loss_agg,
                max_tokens=self.max_tokens, is_weights=mb.is_weights, entropy=ent, normalizer=normalizer,
            )
            if mb.behaviour_logprobs is not None:  # sampler vs learner on the sampled tokens: a sync-bug detector
                sel = mb.loss_mask.bool()  # [n, w]
                gap = (logp.detach() - mb.behaviour_logprobs).abs()[sel]
                metrics["logprob_gap"] = float(gap.max()) if gap.numel() else 0.0
            return loss, metrics

        loss, parts = self._run_step(batch, loss_fn)
        # Token-weighted means and global extremes over micro-batches and ranks.
        sums = [sum(m.get("tokens", 0.0) for m in parts)]
        for key in _TOKEN_MEAN_KEYS:
            sums.append(sum(m[key] * m["tokens"] for m in parts if key in m))
        sel = batch.loss_mask.bool()
        adv = batch.advantages[sel].double()
        sums += [float(adv.sum()), float((adv * adv).sum())]
        sums = self._all_reduce(sums)
        big = -1e30
        extremes = self._all_reduce(
            [max([m.get("ratio_max", big) for m in parts] or [big]), -min([m.get("ratio_min", -big) for m in parts] or [-big]),
             float(adv.max()) if adv.numel() else big, -float(adv.min()) if adv.numel() else big],
            op="max",
        )
        tokens = sums[0]
        metrics = {"loss": loss, "tokens": tokens, **self._common_metrics()}
        if batch.behaviour_logprobs is not None:
            (metrics["logprob_gap"],) = self._all_reduce([max([m.get("logprob_gap", 0.0) for m in parts] or [0.0])],
                                                         op="max")
        if tokens:
            present = {k for m in parts for k in m}
            for key, total in zip(_TOKEN_MEAN_KEYS, sums[1:]):
                if key in present:
                    metrics[key] = total / tokens
            mean = sums[-2] / tokens
            metrics.update(
                ratio_max=extremes[0], ratio_min=-extremes[1], adv_mean=mean,
                adv_std=math.sqrt(max(0.0, sums[-1] / tokens - mean * mean)), adv_max=extremes[2], adv_min=-extremes[3],
            )
        return metrics

    def dpo_step(self, batch: TrainBatch, beta: float) -> dict[str, float]:
        """One optimizer step of the paper's DPO loss (A.1.4) against the frozen reference, on pairs.

        Rows 2k and 2k+1 of this rank's ``batch`` are pair k's chosen (right) and rejected (wrong) completion;
        ``loss_mask`` marks their tokens. The gradient is the DPO loss's, computed through its coefficients: a
        no-grad pass gives ρ = mean token log π_θ/π_ref per completion and GC = β·σ(β·(ρ⁻ − ρ⁺)) per pair
        (:func:`dsmath.algorithms.dpo_coefficients`); the step then descends −Σ_pairs GC·(ρ⁺ − ρ⁻)/P with GC held
        fixed, whose gradient at the current weights equals that of mean −log σ(β·(ρ⁺ − ρ⁻)). So micro-batches
        may split pairs. ``dpo/loss``, ``dpo/margin`` and ``dpo/pair_accuracy`` are measured before the step,
        over all ranks' pairs.
        """
        if batch.size % 2:
            raise ValueError(f"dpo_step needs chosen/rejected row pairs; got {batch.size} rows")
        if self.reference is None:
            raise RuntimeError("dpo_step needs the frozen reference model (with_reference=True)")
        logp = self._batched_logprobs(self.engine, batch)  # [N, T]
        ref = self._batched_logprobs(self.reference, batch)  # [N, T]
        rho = algorithms.sequence_log_ratio(logp, ref, batch.loss_mask)  # [N]
        chosen, rejected = rho[0::2], rho[1::2]  # [P] each
        _, local = algorithms.dpo_loss(chosen, rejected, beta)
        coef = algorithms.dpo_coefficients(chosen, rejected, beta)  # [P]
        signed = torch.stack([coef, -coef], dim=1).reshape(-1)  # [N] +GC on chosen rows, −GC on rejected
        pairs_here = float(batch.size // 2)
        (pairs, loss_sum, margin_sum, acc_sum) = self._all_reduce(
            [pairs_here, local["dpo/loss"] * pairs_here, local["dpo/margin"] * pairs_here,
             local["dpo/pair_accuracy"] * pairs_here])
        weighted = dataclasses.replace(batch, advantages=signed[:, None] * batch.loss_mask)  # [N, T]

        def loss_fn(mb: TrainBatch):
            lp, _ = self._logprobs(self.engine, mb)  # [n, w]
            mb = mb.to(self.device)
            # Σ_rows ±GC·ρ_θ(row) / P: per-sequence token mean of GC·logp, summed over rows, over the pairs.
            return grpo.aggregate(-mb.advantages * lp, mb.loss_mask, "seq_mean_token_mean", normalizer=pairs), {}

        self._run_step(weighted, loss_fn)
        return {"loss": loss_sum / max(pairs, 1.0), "dpo/loss": loss_sum / max(pairs, 1.0),
                "dpo/margin": margin_sum / max(pairs, 1.0), "dpo/pair_accuracy": acc_sum / max(pairs, 1.0),
                "dpo/coef_mean": float(coef.mean()) if coef.numel() else 0.0, **self._common_metrics()}

    def sft_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step of token-mean NLL over ``loss_mask`` (global over ranks)."""
        (normalizer,) = self._all_reduce([float(batch.loss_mask.sum())])

        def loss_fn(mb: TrainBatch):
            logp, _ = self._logprobs(self.engine, mb)
            mb = mb.to(self.device)
            return grpo.sft_loss(logp, mb.loss_mask, normalizer=normalizer), {}

        loss, _ = self._run_step(batch, loss_fn)
        return {"loss": loss, "tokens": normalizer, **self._common_metrics()}

    # ------------------------------------------------------------------ weights

    def named_weights(self, on_device: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the policy's state dict under its HF name (full, detached; on the CPU, or with
        ``on_device`` where the learner keeps it — ZeRO ≤ 2 on a GPU: the live GPU tensors, no host copy).

        ZeRO ≤ 2: views of the live parameters, not copies: consume them (serialise, send) before the next
        step, or clone.

        Under ZeRO-3 each parameter is gathered in turn (a collective): all ranks must iterate together, to the
        end. Each yielded tensor is then a host copy (also with ``on_device``: a device copy of every parameter
        would not fit where ZeRO-3 is needed); ranks ≠ 0 may drop them unread.
        """
        module = self.engine.module
        if self.cfg.zero_stage == 3:
            yield from _gathered_state(module)
            return
        for name, tensor in module.state_dict().items():
            yield name, (tensor.detach() if on_device else tensor.detach().cpu())

    def weight_shapes(self) -> list[tuple[str, torch.Tensor]]:
        """What :meth:`named_weights` yields — names, full shapes, dtypes, in its order — as ``meta`` tensors,
        without gathering anything (ZeRO-3: each parameter's ``ds_shape``) or any collective: a sender plans its
        buckets from them and then pulls the weights bucket by bucket."""
        module = self.engine.module
        if self.cfg.zero_stage == 3:
            return [(name, torch.empty(tuple(getattr(t, "ds_shape", t.shape)), dtype=t.dtype, device="meta"))
                    for name, t, _ in _state_entries(module)]
        return [(name, torch.empty(t.shape, dtype=t.dtype, device="meta")) for name, t in module.state_dict().items()]

    def reset_reference(self) -> None:
        """Copy the current policy into the reference model (iterative GRPO, paper §4.1.4)."""
        if self.reference is None:
            raise RuntimeError("this learner was built with_reference=False")
        self._load_reference(dict(self.named_weights()))
        self._reference_reset = True

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str | Path, extra: dict | None = None, tokenizer=None) -> Path:
        """Write a resumable, HF-loadable checkpoint at ``path`` atomically (all ranks call this).

        Layout: HF files (config, safetensors, tokenizer) at the top, so transformers and vLLM load
        ``path`` directly; ``deepspeed/`` holds per-rank optimizer and scheduler shards;
        ``rng_rank<r>.pt`` the RNG states; ``reference.safetensors`` the reference model when it
        was reset; ``trainer_state.json`` the ``extra`` dict and step count; ``manifest.json`` (written
        last) every file's size and sha256. ``path.parent/latest`` names it afterwards. A shared
        filesystem is assumed for more than one node. Older checkpoints are kept (the driver prunes).
        """
        path = Path(path).absolute()
        name = [f"{path.name}.tmp-{uuid.uuid4().hex[:8]}"]
        if self.world_size > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(name, src=0)
        tmp = path.parent / name[0]
        if self.rank == 0:
            tmp.mkdir(parents=True)
        self._barrier()
        try:
            self._write_checkpoint(tmp, extra, tokenizer)
        except BaseException:
            # The last good checkpoint and `latest` are untouched; drop the partial one.
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._barrier()
        if self.rank == 0:
            ckpt.publish(tmp, path)
        self._barrier()
        return path

    def _write_checkpoint(self, tmp: Path, extra: dict | None, tokenizer) -> None:
        from safetensors.torch import save_file

        self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", client_state={}, save_latest=False)
        torch.save(ckpt.rng_state(), tmp / f"rng_rank{self.rank}.pt")
        full_state = dict(self.named_weights()) if self.cfg.zero_stage == 3 else None
        ref_state = self._reference_state() if self._reference_reset and self.reference is not None else None
        if self.rank == 0:
            self.engine.module.save_pretrained(str(tmp), state_dict=full_state, safe_serialization=True)
            tok = tokenizer if tokenizer is not None else self.tokenizer
            if tok is not None:
                tok.save_pretrained(str(tmp))
            if ref_state is not None:
                save_file(_untie(ref_state), str(tmp / "reference.safetensors"))
            state = {"extra": extra or {}, "steps": self.steps, "world_size": self.world_size,
                     "zero_stage": self.cfg.zero_stage, "reference_reset": self._reference_reset,
                     "saved_at": time.time()}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))

    def load_checkpoint(self, path: str | Path) -> dict:
        """Restore weights, optimizer, scheduler, RNG and reference; returns the saved ``extra``.

        ``path`` is a checkpoint (verified against its manifest: a damaged one is a one-line UserError) or a
        folder of checkpoints (then the newest intact one, :func:`learner.checkpoint.pick_intact`, which says
        which newer ones it skipped). The world size must match the one that saved it (ZeRO shards are per rank).
        """
        from safetensors.torch import load_file

        path = Path(path)
        if ckpt.is_checkpoint_root(path):
            path = ckpt.pick_intact(path, log=print if self.rank == 0 else lambda _line: None)
        state_file = path / "trainer_state.json"
        if not state_file.exists():
            raise UserError(f"{path}: not a dsmath learner checkpoint (no trainer_state.json)")
        damage = ckpt.verify(path)
        if damage is not None:
            raise UserError(f"{path}: damaged checkpoint ({damage}); resume from an older one")
        state = json.loads(state_file.read_text())
        if state["world_size"] != self.world_size:
            raise UserError(f"{path} was saved by {state['world_size']} learner ranks; this run has "
                            f"{self.world_size} (set learner.num_ranks={state['world_size']})")
        load_path, _ = self.engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_optimizer_states=True,
                                                   load_lr_scheduler_states=True, load_module_strict=False)
        if load_path is None:
            raise UserError(f"{path}: DeepSpeed state is missing or unreadable")
        if state.get("reference_reset") and self.reference is not None:
            self._load_reference(load_file(str(path / "reference.safetensors")))
            self._reference_reset = True
        rng_file = path / f"rng_rank{self.rank}.pt"
        if rng_file.exists():
            ckpt.set_rng_state(torch.load(rng_file, weights_only=False))
        self.steps = int(state["steps"])
        return state["extra"]


def _state_entries(module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """A ZeRO-3 module's state-dict entries in :func:`_gathered_state`'s order: (name, parameter or buffer, whether
    it is a parameter — partitioned, to be gathered)."""
    keys = set(module.state_dict().keys())  # HF names incl. tied ones; no non-persistent buffers
    for name, param in module.named_parameters(remove_duplicate=False):
        if name in keys:
            yield name, param, True
    for name, buf in module.named_buffers():
        if name in keys:
            yield name, buf, False


def _gathered_state(module) -> Iterator[tuple[str, torch.Tensor]]:
    """A ZeRO-3 module's state dict, one parameter gathered at a time (full, CPU): all ranks must iterate together."""
    import deepspeed

    for name, tensor, partitioned in _state_entries(module):
        if partitioned:
            with deepspeed.zero.GatheredParameters([tensor]):
                yield name, tensor.detach().cpu().clone()
        else:
            yield name, tensor.detach().cpu()


def _untie(state: dict) -> dict:
    """safetensors refuses tensors sharing storage (tied embeddings): give each its own copy."""
    seen, out = set(), {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out
