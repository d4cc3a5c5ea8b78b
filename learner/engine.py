"""The learner's engine: one DeepSpeed-trained model on one rank, and everything about training it that does not
depend on the loss — objectives (:mod:`learner.objectives`) plug into it.

:class:`LearnerEngine` owns: process-group set-up, the model (loaded by a ``load_model`` function: a causal LM or a
scalar-head model), bf16/fp32 precision, gradient checkpointing, the AdamW optimizer and the warm-up + cosine lr
schedule, the DeepSpeed engine (ZeRO 0–3), an optional frozen reference copy of the model, micro-batching with
gradient accumulation (:meth:`LearnerEngine.train_step`), all-reductions of metrics, weights, and checkpoints
(save / verify / load). It is a plain class — launch it under ``torchrun`` or inside a Ray actor
(:mod:`learner.ray_group`); it only needs ``rank``/``world_size`` and, for more than one rank,
``MASTER_ADDR``/``MASTER_PORT`` in the environment.

Loss normalisation across micro-batches and ranks: an objective first all-reduces its batch's loss divisor
(tokens, sequences, labels) so each micro-batch's loss is its share of the *global* loss; DeepSpeed then averages
gradients over ranks, which the engine undoes by scaling by ``world_size``. Hence K ranks on a global batch compute
the same update as one rank on it (up to float summation order), whatever the micro-batch split.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import torch

from dsmath.config import LearnerConfig
from dsmath.errors import UserError
from dsmath.model_folder import model_folder
from dsmath.utils.net import free_port
from learner import checkpoint as ckpt
from learner.batch import Rows, micro_batches


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
        own = world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ
        if not own and ("MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ):
            raise UserError("a multi-rank learner needs MASTER_ADDR and MASTER_PORT (torchrun or LearnerGroup sets "
                            "them)")
        _skip_shm_build()
        for attempt in range(3 if own else 1):
            if own:
                # A one-rank group of our own: a fresh port, never one inherited from a parent process that may be
                # listening on it (a test or driver process running its own in-process learner).
                os.environ["MASTER_ADDR"] = "127.0.0.1"
                os.environ["MASTER_PORT"] = str(free_port())
            try:
                deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, rank=rank,
                                           world_size=world_size)
                break
            except dist.DistNetworkError as e:  # another process bound our fresh port first: take another
                if not own or "EADDRINUSE" not in str(e) or attempt == 2:
                    raise
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


def _load_tokenizer(model_dir: Path):
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None  # AutoTokenizer would invent an empty one from the model config
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception:  # a model folder without a tokenizer is fine for RL; checkpoints just omit it
        return None


# ---------------------------------------------------------------------------------------------- model loaders

def load_causal_lm(model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The policy / LM: an HF causal LM in the learner's precision (``dtype``)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)


def load_scalar_head(model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A one-label token-classification model (value model, reward model): the body from ``model_dir``, the
    ``score`` head freshly initialised by transformers (it consumes the torch RNG) unless the folder has one.

    Loaded in float32 whatever ``dtype`` (DeepSpeed casts it to bf16 under ``learner.precision=bf16``). No dropout
    before the head: V(s) and scores must not depend on train/eval mode."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    config = AutoConfig.from_pretrained(str(model_dir), num_labels=1)
    config.classifier_dropout = 0.0
    return AutoModelForTokenClassification.from_pretrained(str(model_dir), config=config, dtype=torch.float32)


def lr_schedule(warmup: int, total: int | None) -> Callable[[int], float]:
    """The lr factor per step: linear warm-up over ``warmup`` steps, then cosine decay to 10 % at ``total``
    (None or ≤ ``warmup``: constant after warm-up)."""

    def lr_factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if total and total > warmup:
            progress = min(1.0, (step - warmup) / (total - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return lr_factor


class LearnerEngine:
    """One trained model on DeepSpeed, on one rank; objectives supply the loss.

    Guaranteed: :meth:`train_step` does exactly one optimizer step over the whole local batch (gradient
    accumulation over micro-batches of at most ``learner_cfg.micro_batch_size`` rows and, if set,
    ``max_tokens_per_micro_batch`` padded tokens, in :func:`learner.batch.micro_batches` order); every rank must
    call it together with equally sized shards. ZeRO 0–3 are tested on one CPU rank (exact resume), ZeRO-2 on two.
    Construction consumes the torch RNG in a fixed order: seed, model load (fresh heads), reference, optimizer.

    Attributes used by objectives and callers: ``ds`` (the DeepSpeed engine), ``module`` (the HF model inside it),
    ``reference`` (frozen copy or None), ``optimizer``, ``scheduler``, ``tokenizer`` (None without one),
    ``device``, ``dtype``, ``cfg``, ``rank``, ``world_size``, ``steps`` (optimizer steps taken).
    """

    def __init__(self, model_dir: str | Path, learner_cfg: LearnerConfig, *,
                 load_model: Callable[[Path, torch.dtype], torch.nn.Module] = load_causal_lm, rank: int = 0,
                 world_size: int = 1, seed: int = 0, with_reference: bool = False, total_steps: int | None = None,
                 max_tokens_per_micro_batch: int | None = None) -> None:
        """``total_steps`` turns on cosine decay (to 10 % of ``lr``) after warm-up; None keeps the lr constant after
        warm-up. ``with_reference`` builds a frozen copy of the loaded model (:mod:`learner.reference` for
        ``learner.reference=host``)."""
        import deepspeed

        self.model_dir = model_folder(model_dir, str(model_dir))
        self.cfg = learner_cfg
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch or (
            getattr(learner_cfg, "max_tokens_per_micro_batch", 0) or None)
        precision = getattr(learner_cfg, "precision", "fp32")
        if precision == "bf16" and learner_cfg.zero_stage == 0:
            raise UserError("learner.precision=bf16 needs learner.zero_stage >= 1: DeepSpeed's stage-0 bf16 optimizer "
                            "accumulates bf16 gradients and its updates diverge from fp32 Adam's (ZeRO-1 on one rank "
                            "costs the same memory)")
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.backend = init_distributed(rank, world_size, learner_cfg.backend)
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}") if self.backend == "nccl" else torch.device("cpu")
        torch.manual_seed(seed)

        model = load_model(self.model_dir, self.dtype)
        model.config.use_cache = False
        if getattr(learner_cfg, "gradient_checkpointing", False):  # the trained model only; the reference never trains
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise UserError(f"learner.gradient_checkpointing: {type(model).__name__} does not support it")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.tokenizer = _load_tokenizer(self.model_dir)
        self.reference_reset = False
        self.reference = self._build_reference(model) if with_reference else None

        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=learner_cfg.lr, weight_decay=learner_cfg.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(learner_cfg.warmup_steps, total_steps))
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self._ds_config()
        )
        self.steps = 0
        self._lr_used = float("nan")

    @property
    def module(self) -> torch.nn.Module:
        """The HF model inside the DeepSpeed engine (under ZeRO-3 its parameters are partitioned)."""
        return self.ds.module

    def _ds_config(self, *, train: bool = True) -> dict:
        """The DeepSpeed config: the trained model's (``train``) or a frozen ZeRO-3 reference's (no optimizer)."""
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

    # ------------------------------------------------------------------ the frozen reference

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

    def load_reference(self, state: dict[str, torch.Tensor]) -> None:
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

    def reference_state(self) -> dict[str, torch.Tensor]:
        """The reference's full weights on CPU (gathered under ZeRO-3: all ranks call this)."""
        if self._reference_sharded:
            return dict(_gathered_state(self.reference.module))
        return {k: v.detach().cpu().contiguous() for k, v in self.reference.state_dict().items()}

    def reset_reference(self) -> None:
        """Copy the current model into the reference (iterative GRPO, paper §4.1.4); checkpoints then carry it."""
        if self.reference is None:
            raise RuntimeError("this learner was built with_reference=False")
        self.load_reference(dict(self.named_weights()))
        self.reference_reset = True

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """``values`` summed (or maxed) over all ranks, in float64; every rank must call it together."""
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return t.cpu().tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    # ------------------------------------------------------------------ steps

    def micro_batches(self, batch: Rows) -> list:
        """``(row indices, micro-batch)`` pairs of ``batch`` under this learner's limits (:func:`micro_batches`)."""
        return micro_batches(batch, self.cfg.micro_batch_size, self.max_tokens_per_micro_batch)

    @torch.no_grad()
    def per_position(self, model, batch: Rows, forward) -> torch.Tensor:
        """``forward(model, micro_batch)`` ``[n, w]`` for every micro-batch, put back in row order: ``[N, T]``
        float32 on the CPU (columns past a micro-batch's width stay 0). No gradients, no mode change."""
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)  # [N, T]
        for rows, mb in self.micro_batches(batch):
            values = forward(model, mb)  # [n, w]
            out[rows, : values.shape[1]] = values.float().cpu()
        return out

    def _dummy_backward(self) -> None:
        """A zero-gradient backward: ZeRO-2 reduces gradients in every backward, so all ranks must
        run the same number of them even when one rank's shard packs into fewer micro-batches."""
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        logits = self.ds(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        self.ds.backward(logits.sum() * 0.0, scale_wrt_gas=False)

    def run_step(self, batch: Rows, loss_fn) -> tuple[float, list[dict]]:
        """Accumulate ``loss_fn(micro_batch) -> (loss, metrics)`` over micro-batches, then one optimizer step.

        Returns the loss summed over micro-batches and ranks, and this rank's per-micro-batch metrics in order."""
        self.ds.train()
        parts = self.micro_batches(batch)
        (num_micro,) = self.all_reduce([float(len(parts))], op="max")
        local_loss, micro_metrics = 0.0, []
        for _rows, mb in parts:
            loss, m = loss_fn(mb)
            # DeepSpeed averages gradients over ranks; ×world_size makes it the global sum.
            self.ds.backward(loss * self.world_size, scale_wrt_gas=False)
            local_loss += float(loss.detach())
            micro_metrics.append(m)
        for _ in range(int(num_micro) - len(parts)):
            self._dummy_backward()
        self._lr_used = float(self.scheduler.get_last_lr()[0])
        self.ds.step()
        self.steps += 1
        (global_loss,) = self.all_reduce([local_loss])
        return global_loss, micro_metrics

    def train_step(self, objective, batch: Rows) -> dict[str, float]:
        """One optimizer step of ``objective`` (:class:`learner.objectives.Objective`) on this rank's ``batch``:
        ``objective.prepare`` (its collectives), the micro-batches through ``objective.loss``, then
        ``objective.summarize`` (metrics reduced over all ranks)."""
        batch = objective.prepare(self, batch)
        loss, parts = self.run_step(batch, lambda mb: objective.loss(self.ds, mb))
        return objective.summarize(self, batch, loss, parts)

    def common_metrics(self) -> dict[str, float]:
        """``lr`` (the one the last step used), ``step`` and, where DeepSpeed measured it, ``grad_norm``."""
        norm = self.ds.get_global_grad_norm()
        out = {"lr": self._lr_used, "step": float(self.steps)}
        if norm is not None:
            out["grad_norm"] = float(norm)
        return out

    # ------------------------------------------------------------------ weights

    def named_weights(self, on_device: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the model's state dict under its HF name (full, detached; on the CPU, or with
        ``on_device`` where the learner keeps it — ZeRO ≤ 2 on a GPU: the live GPU tensors, no host copy).

        ZeRO ≤ 2: views of the live parameters, not copies: consume them (serialise, send) before the next
        step, or clone.

        Under ZeRO-3 each parameter is gathered in turn (a collective): all ranks must iterate together, to the
        end. Each yielded tensor is then a host copy (also with ``on_device``: a device copy of every parameter
        would not fit where ZeRO-3 is needed); ranks ≠ 0 may drop them unread.
        """
        module = self.ds.module
        if self.cfg.zero_stage == 3:
            yield from _gathered_state(module)
            return
        for name, tensor in module.state_dict().items():
            yield name, (tensor.detach() if on_device else tensor.detach().cpu())

    def weight_shapes(self) -> list[tuple[str, torch.Tensor]]:
        """What :meth:`named_weights` yields — names, full shapes, dtypes, in its order — as ``meta`` tensors,
        without gathering anything (ZeRO-3: each parameter's ``ds_shape``) or any collective: a sender plans its
        buckets from them and then pulls the weights bucket by bucket."""
        module = self.ds.module
        if self.cfg.zero_stage == 3:
            return [(name, torch.empty(tuple(getattr(t, "ds_shape", t.shape)), dtype=t.dtype, device="meta"))
                    for name, t, _ in _state_entries(module)]
        return [(name, torch.empty(t.shape, dtype=t.dtype, device="meta")) for name, t in module.state_dict().items()]

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
        self.barrier()
        try:
            self._write_checkpoint(tmp, extra, tokenizer)
        except BaseException:
            # The last good checkpoint and `latest` are untouched; drop the partial one.
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.barrier()
        if self.rank == 0:
            ckpt.publish(tmp, path)
        self.barrier()
        return path

    def _write_checkpoint(self, tmp: Path, extra: dict | None, tokenizer) -> None:
        from safetensors.torch import save_file

        self.ds.save_checkpoint(str(tmp / "deepspeed"), tag="state", client_state={}, save_latest=False)
        torch.save(ckpt.rng_state(), tmp / f"rng_rank{self.rank}.pt")
        full_state = dict(self.named_weights()) if self.cfg.zero_stage == 3 else None
        ref_state = self.reference_state() if self.reference_reset and self.reference is not None else None
        if self.rank == 0:
            self.ds.module.save_pretrained(str(tmp), state_dict=full_state, safe_serialization=True)
            tok = tokenizer if tokenizer is not None else self.tokenizer
            if tok is not None:
                tok.save_pretrained(str(tmp))
            if ref_state is not None:
                save_file(_untie(ref_state), str(tmp / "reference.safetensors"))
            state = {"extra": extra or {}, "steps": self.steps, "world_size": self.world_size,
                     "zero_stage": self.cfg.zero_stage, "reference_reset": self.reference_reset,
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
        load_path, _ = self.ds.load_checkpoint(str(path / "deepspeed"), tag="state", load_optimizer_states=True,
                                               load_lr_scheduler_states=True, load_module_strict=False)
        if load_path is None:
            raise UserError(f"{path}: DeepSpeed state is missing or unreadable")
        if state.get("reference_reset") and self.reference is not None:
            self.load_reference(load_file(str(path / "reference.safetensors")))
            self.reference_reset = True
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
