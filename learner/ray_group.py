"""K learner ranks as Ray actors (one learner each: :class:`~learner.policy.PolicyLearner`, or
:class:`~learner.value.ValueLearner` for ``kind='value'`` — each a :class:`~learner.engine.LearnerEngine` composed
with its objectives).

The group picks rank 0's node address and a free port there, sets ``MASTER_ADDR``/``MASTER_PORT``,
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in each actor, and initialises all ranks together.
Global batches are split into equal contiguous shards (one per rank); metrics come back from rank
0, already reduced over ranks by the learner. With ``num_gpus=0`` it runs on CPU with gloo.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator

import torch

from dsmath import transports
from dsmath.config import AlgorithmConfig, LearnerConfig
from dsmath.errors import UserError
from dsmath.records import ModelFiles
from learner.batch import Rows, TrainBatch, ValueBatch


def _materialise(model: ModelFiles, rank: int) -> str:
    """``model`` written to a scratch folder on this node (removed by :meth:`LearnerRank.remove_files`, or when the
    process is gone: ``dsmath.model_folder.scratch_folder``)."""
    from dsmath.model_folder import scratch_folder, write_model_files

    return str(write_model_files(model, scratch_folder(f"learner{rank}")))


def _policy(model_dir, learner_cfg, algo_cfg, **kw):
    from learner.policy import PolicyLearner

    return PolicyLearner(model_dir, learner_cfg, algo_cfg, **kw)


def _value(model_dir, learner_cfg, algo_cfg, **kw):  # PPO's value model: the engine around a scalar head
    from learner.value import ValueLearner

    return ValueLearner(model_dir, learner_cfg, **kw)


# What a rank can host, by ``kind``: a new learner is one entry here (its module imported when first built).
LEARNERS = {"policy": _policy, "value": _value}


class LearnerRank:
    """The actor body: owns one learner (policy or value). Public so tests and drivers can wrap it themselves."""

    def __init__(self) -> None:
        self.learner = None
        self._scratch = None  # the model folder this rank wrote (its node had no copy), removed by remove_files()

    def address(self) -> tuple[str, int]:
        import ray

        from dsmath.utils.net import free_port

        return ray.util.get_node_ip_address(), free_port()

    def has_model(self, model_dir: str) -> bool:
        """Whether this rank's node sees the model folder ``model_dir`` (no shared filesystem: maybe not)."""
        from dsmath.model_folder import has_model_folder

        return has_model_folder(model_dir)

    def setup(self, model_dir: str, learner_cfg: LearnerConfig, algo_cfg: AlgorithmConfig, *, rank: int,
              world_size: int, master_addr: str, master_port: int, seed: int, env: dict[str, str], kwargs: dict,
              kind: str = "policy", model: ModelFiles | None = None) -> bool:
        """Build this rank's learner from ``model_dir``, or from ``model`` (the whole folder, sent through the object
        store because this node has no copy) written to a fresh folder here first."""
        if model is not None:
            model_dir = self._scratch = _materialise(model, rank)
        os.environ.update(env)
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0" if torch.cuda.is_available() else str(rank))
        torch.set_num_threads(max(1, int(env.get("OMP_NUM_THREADS", "1"))))
        if kind not in LEARNERS:
            raise UserError(f"learner kind {kind!r}: one of {sorted(LEARNERS)}")
        self.learner = LEARNERS[kind](model_dir, learner_cfg, algo_cfg, rank=rank, world_size=world_size, seed=seed,
                                      **kwargs)
        return True

    def remove_files(self) -> None:
        """Remove the files this rank wrote on its node (the model it was sent); call it before the actor is
        killed (``ray.kill`` runs no exit handlers). Training after it is not supported."""
        from dsmath.model_folder import remove_scratch_folder

        remove_scratch_folder(self._scratch)
        self._scratch = None

    def call(self, method: str, *args, **kwargs):
        return getattr(self.learner, method)(*args, **kwargs)

    def named_weights(self) -> list[tuple[str, torch.Tensor]] | None:
        """This rank's full weights; under ZeRO-3 every rank must call it together, and ranks ≠ 0 return None
        (they take part in gathering each parameter, then drop it)."""
        if self.learner.rank != 0:
            _drain(self.learner.named_weights())
            return None
        return list(self.learner.named_weights())

    def _weights_for_sync(self, transport: str):
        on_device = transports.info(transport).needs_gpu  # the sender packs on its GPU
        try:
            return self.learner.named_weights(on_device=on_device)
        except TypeError:  # a learner whose named_weights has no on_device (a stand-in in tests)
            return self.learner.named_weights()

    def sync_weights(self, version: int, receivers, cfg=None):
        """Push the weights to ``receivers`` (generator actors) as ``version``; call it on every rank together.

        Rank 0 sends (in its own process, so gloo / NCCL broadcast straight from the learner's memory) and
        returns the :class:`~learner.weight_sync.SyncStats`; the other ranks gather with it (ZeRO-3 shards the
        parameters) and return None. Whatever happens to the send, rank 0 finishes the gather, so the other
        ranks are never left waiting in a collective. One sender is kept for the actor's lifetime (its group is
        reused).
        """
        from learner.weight_sync import make_sender

        if self.learner.rank != 0:  # no sender, no settings here: only the gather
            _drain(self.learner.named_weights())
            return None
        cfg = cfg if cfg is not None else self._sync_cfg
        weights = self._weights_for_sync(cfg.transport)
        if getattr(self, "_sender", None) is None or cfg != self._sender.cfg:
            self._sender = make_sender(cfg)
        try:
            return self._sender.send(weights, version, receivers, shapes=self._streamed_shapes())
        finally:
            _drain(weights, quiet=True)

    def _streamed_shapes(self):
        """ZeRO-3: the weights' shapes, so that rank 0 sends each bucket as soon as it is gathered and never holds
        the full weights (:meth:`~learner.weight_sync.WeightSender.send`); None otherwise (the weights are local)."""
        learner = self.learner
        if getattr(getattr(learner, "cfg", None), "zero_stage", 0) != 3 or not hasattr(learner, "weight_shapes"):
            return None
        return learner.weight_shapes()

    def push_weights(self, version: int, receivers) -> dict | None:
        """Bring freshly started receivers (a restarted generator) to ``version`` through the object store; call it
        on every rank together (as :meth:`sync_weights`). Rank 0 returns the stats as a dict, the others None.

        A one-off sender: the configured (collective) sender and its group are left untouched; the group
        re-forms with the new member at the next regular sync.
        """
        from dataclasses import replace

        from learner.weight_sync import make_sender

        weights = self.learner.named_weights()
        if self.learner.rank != 0:
            _drain(weights)
            return None
        cfg = replace(self._sync_cfg, transport="object_store")
        try:
            return make_sender(cfg).send(weights, version, receivers, shapes=self._streamed_shapes()).as_dict()
        finally:
            _drain(weights, quiet=True)

    def configure_sync(self, cfg) -> None:
        self._sync_cfg = cfg
        self._sender = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.learner.named_weights()}

    def upload_checkpoint(self, path: str, root_uri: str, keep: int) -> list[str]:
        """On rank 0, whose node holds the published checkpoint ``path``: keep this node's newest ``keep``, copy
        ``path`` to ``root_uri`` (manifest last) and keep storage's newest ``keep``
        (:func:`learner.checkpoint.upload`). Returns the names pruned from storage."""
        from learner.checkpoint import prune, upload

        prune(Path(path).parent, keep, Path(path))
        return upload(Path(path), root_uri, keep)

    def has_checkpoint(self, path: str) -> bool:
        """Whether this rank's node holds a published checkpoint at ``path`` (its manifest is there)."""
        from learner.checkpoint import MANIFEST

        return (Path(path) / MANIFEST).is_file()

    def put_checkpoint(self, path: str, bundle) -> None:
        """Publish checkpoint ``bundle`` (the driver's copy) at ``path`` on this rank's node."""
        from learner.checkpoint import write_checkpoint_files

        write_checkpoint_files(bundle, Path(path))

    def checkpoint_files(self, path: str):
        """The published checkpoint ``path`` on this rank's node, every file (:func:`learner.checkpoint.checkpoint_files`)."""
        from learner.checkpoint import checkpoint_files

        return checkpoint_files(Path(path))

    def fetch_checkpoint(self, path: str, root_uri: str) -> bool:
        """Download checkpoint ``path`` from ``root_uri`` onto this rank's node unless it is already there
        (:func:`learner.checkpoint.fetch`); True when it downloaded."""
        from learner.checkpoint import fetch

        return fetch(Path(path), root_uri)


def _drain(weights, quiet: bool = False) -> None:
    """Run a (ZeRO-3: gathering) weight iterator to its end, dropping each tensor. ``quiet``: after a failed send,
    a failure here must not hide that one."""
    try:
        for _ in weights:
            pass
    except Exception:  # noqa: BLE001
        if not quiet:
            raise


# Submissions to all ranks hold this lock, so that every rank receives the same calls in the same order (a Ray
# actor runs one caller's tasks in submission order): a generator restarted from the rollout thread while the main
# thread trains would otherwise let ZeRO-3 ranks interleave a sync's gathers with a step's collectives, and hang.
_SUBMIT = threading.RLock()


class LearnerGroup:
    """``num_ranks`` learner actors acting as one data-parallel learner.

    Every method blocks until all ranks finish. ``grpo_step``/``sft_step`` need a batch size
    divisible by the number of ranks. Metrics are rank 0's (all-reduced over ranks).
    """

    def __init__(
        self,
        model_dir: str | Path,
        learner_cfg: LearnerConfig,
        algo_cfg: AlgorithmConfig | None = None,
        *,
        seed: int = 0,
        num_ranks: int | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float = 600.0,
        actor_resources: dict[str, float] | None = None,
        rank_options: list[dict] | None = None,
        kind: str = "policy",
        **learner_kwargs,
    ) -> None:
        import ray

        if not ray.is_initialized():
            raise UserError("LearnerGroup needs a running Ray (call ray.init first)")
        self.num_ranks = num_ranks or learner_cfg.num_ranks
        self.timeout_s = timeout_s
        # ``actor_resources``: a cluster's role resources (e.g. {"learner": 1}, see cluster/README.md).
        actor_cls = ray.remote(num_cpus=learner_cfg.cpus_per_rank, num_gpus=learner_cfg.gpus_per_rank,
                               resources=actor_resources or None)(LearnerRank)
        # ``rank_options[r]``: extra ``.options()`` for rank r, e.g. its placement-group bundle.
        opts = rank_options or [{}] * self.num_ranks
        self.actors = [actor_cls.options(**opts[r]).remote() for r in range(self.num_ranks)]
        addr, port = self._get(self.actors[0].address.remote())
        model = self._ship_model_if_missing(model_dir)
        worker_env = {k: os.environ[k] for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "HF_HUB_OFFLINE",
                                                 "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM") if k in os.environ}
        worker_env.update(env or {})
        self._get([
            a.setup.remote(str(model_dir), learner_cfg, algo_cfg or AlgorithmConfig(), rank=r,
                           world_size=self.num_ranks, master_addr=addr, master_port=port, seed=seed, env=worker_env,
                           kwargs=learner_kwargs, kind=kind, model=model[r])
            for r, a in enumerate(self.actors)
        ])

    def _ship_model_if_missing(self, model_dir: str | Path) -> list:
        """Per rank: None where the rank's node sees ``model_dir``, else an object-store reference to the whole
        folder (read here, once) — a cluster without a shared filesystem, e.g. the bootstrap model the driver
        built on the head node, or a model folder kept on the head only."""
        import ray

        from dsmath.model_folder import model_files

        seen = self._get([a.has_model.remote(str(model_dir)) for a in self.actors])
        if all(seen):
            return [None] * self.num_ranks
        bundle = model_files(model_dir, weights=True)
        size = sum(len(data) for _, data in bundle.files)
        ref = ray.put(bundle)
        missing = [r for r, ok in enumerate(seen) if not ok]
        print(f"[dsmath] learner rank(s) {missing}: no {model_dir} on their node; sending the model through the "
              f"object store ({size / 2**20:.1f} MiB)", flush=True)
        return [None if ok else ref for ok in seen]

    def _get(self, refs):
        import ray

        return ray.get(refs, timeout=self.timeout_s)

    def _all(self, method: str, *args, **kwargs) -> list:
        with _SUBMIT:
            refs = [a.call.remote(method, *args, **kwargs) for a in self.actors]
        return self._get(refs)

    def _sharded(self, method: str, batch: Rows) -> list:
        if batch.size % self.num_ranks:
            raise UserError(f"a batch of {batch.size} sequences does not split evenly over {self.num_ranks} learner ranks")
        shards = [batch.shard(r, self.num_ranks) for r in range(self.num_ranks)]
        with _SUBMIT:
            refs = [a.call.remote(method, shard) for a, shard in zip(self.actors, shards)]
        return self._get(refs)

    def grpo_step(self, batch: TrainBatch) -> dict[str, float]:
        return self._sharded("grpo_step", batch)[0]

    def sft_step(self, batch: TrainBatch) -> dict[str, float]:
        return self._sharded("sft_step", batch)[0]

    def dpo_step(self, batch: TrainBatch, beta: float) -> dict[str, float]:
        """Rows (2k, 2k+1) are pair k; each rank's contiguous shard must hold whole pairs (an even row count)."""
        if batch.size % (2 * self.num_ranks):
            raise UserError(f"{batch.size // 2} DPO pairs do not split evenly over {self.num_ranks} learner ranks")
        shards = [batch.shard(r, self.num_ranks) for r in range(self.num_ranks)]
        with _SUBMIT:
            refs = [a.call.remote("dpo_step", shard, beta) for a, shard in zip(self.actors, shards)]
        return self._get(refs)[0]

    def values(self, batch: Rows) -> torch.Tensor:
        """A value group's (``kind='value'``) per-position values ``[N, T]`` of any batch's rows."""
        return torch.cat(self._sharded("values", batch))

    def value_step(self, batch: ValueBatch) -> dict[str, float]:
        """A value group's update on a :class:`~learner.batch.ValueBatch` (GAE returns, old values)."""
        return self._sharded("value_step", batch)[0]

    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        return torch.cat(self._sharded("logprobs", batch))

    def ref_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        return torch.cat(self._sharded("ref_logprobs", batch))

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Rank 0's full weights. Every rank is called (ZeRO-3 gathers each parameter across all of them)."""
        with _SUBMIT:
            refs = [a.named_weights.remote() for a in self.actors]
        yield from self._get(refs)[0]

    def configure_sync(self, cfg) -> None:
        """The weight-sync settings (``WeightSyncConfig``) rank 0 sends with."""
        self._get(self.actors[0].configure_sync.remote(cfg))

    def sync_weights(self, version: int, receivers, cfg):
        """Push ``version`` to ``receivers`` (generator actors, or a name -> actor mapping) with every rank taking
        part (:meth:`LearnerRank.sync_weights`); returns rank 0's ``SyncStats``. Bounded by ``cfg.timeout_s``."""
        from learner.weight_sync import broadcast_weights

        with _SUBMIT:
            return broadcast_weights(self.actors, receivers, version, cfg)

    def push_weights(self, version: int, receivers, timeout_s: float | None = None) -> dict:
        """Bring restarted receivers to ``version`` over the object store, every rank taking part."""
        import ray

        with _SUBMIT:
            refs = [a.push_weights.remote(version, receivers) for a in self.actors]
        return ray.get(refs, timeout=timeout_s if timeout_s is not None else self.timeout_s)[0]

    def reset_reference(self) -> None:
        self._all("reset_reference")

    def save_checkpoint(self, path: str | Path, extra: dict | None = None) -> Path:
        return self._all("save_checkpoint", str(path), extra)[0]

    def load_checkpoint(self, path: str | Path) -> dict:
        return self._all("load_checkpoint", str(path))[0]

    def upload_checkpoint(self, path: str | Path, root_uri: str, keep: int) -> list[str]:
        """Rank 0 copies the checkpoint it just published at ``path`` to ``root_uri`` and prunes there and on its
        node to the newest ``keep`` (:meth:`LearnerRank.upload_checkpoint`). Waits as long as the store takes (no
        timeout: a checkpoint's upload may take longer than any step)."""
        import ray

        return ray.get(self.actors[0].upload_checkpoint.remote(str(path), root_uri, keep))

    def bring_home(self, path: str | Path) -> int:
        """No shared filesystem: checkpoint ``path``, which rank 0 just published on its node, copied onto this
        (the driver's) node through the object store when it is not here, so that the run directory holds its
        checkpoints and ``latest`` as on one node (the next ``dsmath iterate`` iteration starts from it, ``--resume``
        finds it). Returns the bytes copied: 0 when it was already here (one node, or a shared filesystem)."""
        from learner.checkpoint import MANIFEST, write_checkpoint_files

        if (Path(path) / MANIFEST).is_file():
            return 0
        bundle = self._get(self.actors[0].checkpoint_files.remote(str(path)))
        write_checkpoint_files(bundle, Path(path))
        return sum(len(data) for _, data in bundle.files)

    def send_checkpoint(self, path: str | Path) -> int:
        """No shared filesystem, resuming: every rank's node that lacks checkpoint ``path`` gets the driver's copy
        (:meth:`bring_home` put it there) through the object store, one rank after another (ranks sharing a node
        then receive it once). Returns how many ranks were sent it."""
        import ray

        from learner.checkpoint import checkpoint_files

        ref, sent = None, 0
        for actor in self.actors:
            if self._get(actor.has_checkpoint.remote(str(path))):
                continue
            ref = ref if ref is not None else ray.put(checkpoint_files(Path(path)))
            self._get(actor.put_checkpoint.remote(str(path), ref))
            sent += 1
        return sent

    def fetch_checkpoint(self, path: str | Path, root_uri: str) -> int:
        """Every rank's node gets checkpoint ``path`` (from ``root_uri`` where it is not there yet), one rank after
        another (ranks sharing a node then download once). Returns how many ranks downloaded it."""
        import ray

        return sum(bool(ray.get(a.fetch_checkpoint.remote(str(path), root_uri))) for a in self.actors)

    def shutdown(self) -> None:
        """Have every rank remove the model files it wrote on its node, then kill it."""
        import ray

        # A dead rank's call fails at once; a hung one is killed after the wait, and the files it wrote stay until
        # the next sweep on its node (dsmath.model_folder.scratch_folder).
        if closing := [a.remove_files.remote() for a in self.actors]:
            ray.wait(closing, num_returns=len(closing), timeout=30)
        for a in self.actors:
            ray.kill(a)
        self.actors = []
