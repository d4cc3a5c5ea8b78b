"""The rollout generator: a real ``vllm.LLM`` behind a small, versioned API.

``Generator`` is a plain class (usable and tested without Ray); ``GeneratorActor`` is the same class as a Ray
actor. One engine per instance; on CPU it is the in-process engine: ``distributed_executor_backend=
"uni"``, ``enforce_eager=True``, ``dtype="float32"``, a ``rollout.kv_cache_space_gib`` KV cache and one OpenMP
thread, all set before the engine is made.

Log-probs: ``Rollout.logprobs[i]`` is vLLM's *raw* log-prob of the sampled token (its default
``logprobs_mode="raw_logprobs"``: log-softmax of the model's logits, before temperature / top-p), i.e. the
temperature-1 log-prob the learner recomputes. Measured against an HF forward pass of the same float32 weights on
CPU: max abs difference ≈ 5e-7 (see tests/test_generator.py).

Seeds: per-request seeds fail on vLLM's CPU sampler ("CPU Generator does not use offset"), so the engine is
seeded once (``seed=``) and ``SamplingParams.seed`` is ignored on CPU (honoured on GPU). Runs are reproducible
for the same sequence of calls, not per request.

Versioning: ``generate(requests, expected_version)`` refuses (``StaleWeightVersion``) when the caller expects a
version other than the one loaded, and refuses any sampling while a weight update is in flight.

Weight updates (:mod:`dsmath.weight_receiver`, any transport of :mod:`dsmath.transports`): floating weights
arrive in the engine's dtype (``weight_dtype()``). Over ``object_store``/``gloo`` the buckets are staged in host
memory and loaded in one ``reload_weights`` at the end. Over ``cuda_ipc``/``nccl`` with one GPU per engine they stream: each bucket is
loaded from device memory as it arrives (``cuda_ipc``: straight from the learner's buffer) between vLLM's public
``start_weight_update`` / ``finish_weight_update`` (the engine is built with a ``weight_transfer_config``), and
this process holds at most one bucket; an update that fails half-way leaves the engine refusing to sample until
a complete one. With tensor parallelism > 1 device buckets are staged in host memory (the engine's workers are
other processes).

Model source: ``model`` is a model folder on this node (loaded by vLLM as usual) or a
:class:`~dsmath.records.ModelFiles` (``rollout.weights_from=learner``): its config and tokenizer files are written
to a fresh folder here, the engine is built with ``load_format="dummy"`` (random weights, no weight file read)
and ``weight_version`` must be one below the learner's, which pushes its weights before the first sample; until
then ``generate`` refuses. In that case the generator's node needs no copy of ``model.path``.

Tool mode (``RolloutConfig.mode == "tool"``): generation stops at "```output"; the last ```python block runs in
``dsmath.sandbox`` (this process's pool, or the gRPC sandbox service at ``sandbox_address``, e.g.
``reward.sandbox_address``; token from $DSMATH_SANDBOX_TOKEN); its ```output block is appended (``loss_mask`` 0,
``logprobs`` 0.0 for those tokens) and generation continues from the token ids so far, at most ``max_tool_rounds``
times, within ``max_new_tokens`` model-generated tokens in total. A sandbox failure (not the program's: the
service unreachable or busy) is retried ``TOOL_ATTEMPTS`` times, then the ``generate`` call raises: a made-up
output block is never trained on.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any, Sequence

from dsmath.config import RolloutConfig
from dsmath.records import GenerationRequest, GeneratorHealth, ModelFiles, Rollout, WeightBucket, check_schema
from dsmath.weight_receiver import BucketReceiver
from dsmath.weight_wire import BucketLayout, StaleWeightVersion, WeightSyncError

TOOL_STOP = "```output"
TOOL_ATTEMPTS = 3  # runs of one tool call before a failing sandbox fails the generate call


def _configure_cpu_env(rollout: RolloutConfig) -> None:
    # Must happen before vLLM creates its engine: it reads these once, and disables set_num_threads afterwards.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(rollout.kv_cache_space_gib)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # One OpenMP thread: two busy processes with 2 threads each on 2 cores run 20-30x slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


class Generator:
    """Hosts one vLLM engine for ``model`` (an HF model folder holding the tokenizer too, or a
    :class:`~dsmath.records.ModelFiles` whose weights the learner sends).

    ``weight_version`` is the policy version the loaded weights correspond to (0 = as loaded from disk).
    """

    def __init__(
        self,
        model: str | ModelFiles,
        rollout: RolloutConfig | None = None,
        *,
        generator_id: str = "generator-0",
        seed: int = 0,
        weight_version: int = 0,
        device: str = "auto",
        sandbox_timeout_s: float = 5.0,
        sandbox_address: str = "",
    ):
        import torch

        self.rollout = rollout or RolloutConfig()
        self.generator_id = generator_id
        self.on_gpu = torch.cuda.is_available() if device == "auto" else device == "cuda"
        if not self.on_gpu:
            _configure_cpu_env(self.rollout)
        from vllm import LLM

        from dsmath.model_folder import scratch_folder, temp_files_in

        # This generator's files on its node (vLLM's rendezvous file; the model files sent to it) go in one folder
        # that remove_files() removes: ray.kill runs no exit handlers.
        self._scratch = scratch_folder(generator_id)
        self.model_dir, self.model_source = _materialise(model, self._scratch)
        model_path = self.model_dir
        kwargs: dict[str, Any] = dict(model=model_path, tokenizer=model_path, seed=seed,
                                      # the weight-loading bar follows the Hugging Face bars (off while dsmath is quiet)
                                      use_tqdm_on_load=os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "1")
        if self.on_gpu:
            kwargs.update(
                gpu_memory_utilization=self.rollout.gpu_memory_utilization,
                tensor_parallel_size=self.rollout.tensor_parallel_size,
                # vLLM's RL weight-transfer session (start/finish_weight_update: layer-wise reload around the
                # streamed buckets); "ipc" needs no rendezvous.
                weight_transfer_config={"backend": "ipc"},
            )
            if self.rollout.tensor_parallel_size == 1:
                kwargs["distributed_executor_backend"] = "uni"
        else:
            kwargs.update(enforce_eager=True, dtype="float32", distributed_executor_backend="uni")
        if isinstance(model, ModelFiles):
            kwargs["load_format"] = "dummy"  # random weights in place; the learner's arrive before the first sample
        # Building the engine, vLLM runs the collector several times over every object the imports made, then
        # freezes the heap (vllm.utils.gc_utils.freeze_gc_heap). Freezing it first (after one collection) spares
        # those walks and ends in the same state: LLM() for the tiny model 2.0 -> 1.4 CPU-s on the 2-core machine.
        gc.collect()
        gc.freeze()
        with temp_files_in(self._scratch):  # vLLM's vllm_dist_* rendezvous file, which it never removes
            self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.sandbox_timeout_s = sandbox_timeout_s
        self.sandbox_address = sandbox_address
        self._sandbox = None  # the runner tool calls use, made on the first call
        # Device buckets stream into the engine only where it runs in this process (one GPU, the "uni" executor).
        in_process = not self.on_gpu or self.rollout.tensor_parallel_size == 1
        self._receiver = BucketReceiver(generator_id, device=("cuda" if self.on_gpu else "cpu"),
                                        dtype=self.llm.llm_engine.model_config.dtype,
                                        stream=None if in_process else False)
        self._receiver.version = weight_version
        self._engine_session = False  # a vLLM weight-update session is open (streamed updates)
        self._partial = False  # the engine holds part of an update that did not complete
        self.requests_served = 0
        self.tokens_generated = 0
        self.last_error = ""

    # ------------------------------------------------------------------------------------------ sampling

    @property
    def weight_version(self) -> int:
        return self._receiver.version

    def get_weight_version(self) -> int:
        return self._receiver.version

    def _check_can_sample(self, expected_version: int | None) -> None:
        if self._receiver.updating:
            raise WeightSyncError(f"{self.generator_id}: a weight update is in flight; sampling refused")
        if self._partial:
            raise WeightSyncError(f"{self.generator_id}: holds part of a weight update that failed; sampling refused "
                                  f"until a complete update")
        if expected_version is not None and expected_version != self.weight_version:
            raise StaleWeightVersion(
                f"{self.generator_id}: asked to sample with weight version {expected_version}, "
                f"it holds version {self.weight_version}"
            )

    def _vllm_params(self, sampling, *, n: int, max_tokens: int, extra_stop: Sequence[str] = ()):
        from vllm import SamplingParams as VllmSamplingParams

        kwargs: dict[str, Any] = dict(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=max_tokens,
            stop=list(sampling.stop) + list(extra_stop) or None,
            # Keep the stop string in the text so that text and token ids describe the same completion.
            include_stop_str_in_output=True,
            logprobs=0 if sampling.logprobs else None,
        )
        if self.on_gpu and sampling.seed is not None:
            kwargs["seed"] = sampling.seed
        return VllmSamplingParams(**kwargs)

    @staticmethod
    def _sampled_logprobs(output) -> list[float]:
        if output.logprobs is None:
            return []
        return [float(step[token].logprob) for step, token in zip(output.logprobs, output.token_ids)]

    def generate(self, requests: Sequence[GenerationRequest], expected_version: int | None = None,
                 mode: str | None = None) -> list[Rollout]:
        """``request.sampling.n`` rollouts per request, in request order then sample order. ``mode`` overrides
        ``rollout.mode`` for this call ("tool" runs the tool loop; anything else samples plainly).

        Raises ``StaleWeightVersion`` if ``expected_version`` is given and differs from the loaded version.
        """
        for request in requests:
            check_schema(request)
        self._check_can_sample(expected_version)
        if not self.on_gpu and requests and requests[0].sampling.seed is not None:
            # vLLM's CPU sampler rejects per-request generators but draws from the process's torch RNG:
            # seeding it per call makes a chunk's samples a function of (weights, prompts, seed) alone, so a
            # resumed run samples exactly what an uninterrupted one would, whichever generator gets the chunk.
            import torch

            torch.manual_seed(requests[0].sampling.seed)
        try:
            if (mode or self.rollout.mode) == "tool":
                rollouts = self._generate_tool(requests)
            else:
                rollouts = self._generate_plain(requests)
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            raise
        self.requests_served += len(requests)
        self.tokens_generated += sum(len(r.completion_ids) for r in rollouts)
        return rollouts

    def _generate_plain(self, requests: Sequence[GenerationRequest]) -> list[Rollout]:
        if not requests:
            return []
        params = [self._vllm_params(r.sampling, n=r.sampling.n, max_tokens=r.sampling.max_new_tokens) for r in requests]
        outputs = self.llm.generate([r.prompt for r in requests], params, use_tqdm=False)
        rollouts = []
        for request, output in zip(requests, outputs):
            for index, sample in enumerate(output.outputs):
                ids = tuple(sample.token_ids)
                rollouts.append(
                    Rollout(
                        request_id=request.request_id,
                        sample_index=index,
                        problem=request.problem,
                        prompt=request.prompt,
                        prompt_ids=tuple(output.prompt_token_ids),
                        completion=sample.text,
                        completion_ids=ids,
                        logprobs=tuple(self._sampled_logprobs(sample)),
                        finish_reason=str(sample.finish_reason),
                        weight_version=self.weight_version,
                        generator_id=self.generator_id,
                        loss_mask=(1,) * len(ids),
                    )
                )
        return rollouts

    # ------------------------------------------------------------------------------- tool-integrated mode

    def _run_tool(self, code: str) -> str:
        """The ```output block (with its fences) for ``code``."""
        from dsmath.sandbox import SandboxError, format_tool_output, runner_for

        for attempt in range(TOOL_ATTEMPTS):
            try:
                if self._sandbox is None:
                    self._sandbox = runner_for(self.sandbox_address)
                result = self._sandbox.run(code, timeout_s=self.sandbox_timeout_s, memory_mb=512,
                                           max_output_bytes=16 * 1024)
                break
            except SandboxError:  # the sandbox failed, not the program: a busy service gets a moment
                if attempt == TOOL_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
        return format_tool_output(result)

    def _generate_tool(self, requests: Sequence[GenerationRequest]) -> list[Rollout]:
        from vllm.inputs import TokensPrompt

        from dsmath.sandbox import split_tool_call

        # One state per (request, sample): each sample's tool calls differ, so they continue independently.
        states = []
        for request in requests:
            prompt_ids = list(self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"])
            for index in range(request.sampling.n):
                states.append(dict(request=request, index=index, prompt_ids=prompt_ids, ids=[], logprobs=[],
                                   mask=[], text="", generated=0, rounds=0, finish=None))
        active = list(states)
        while active:
            prompts, params = [], []
            for s in active:
                budget = s["request"].sampling.max_new_tokens - s["generated"]
                budget = min(budget, self.max_model_len - len(s["prompt_ids"]) - len(s["ids"]))
                prompts.append(TokensPrompt(prompt_token_ids=s["prompt_ids"] + s["ids"]))
                params.append(self._vllm_params(s["request"].sampling, n=1, max_tokens=max(1, budget),
                                                extra_stop=(TOOL_STOP,)))
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            still_active = []
            for s, output in zip(active, outputs):
                sample = output.outputs[0]
                s["ids"] += list(sample.token_ids)
                s["logprobs"] += self._sampled_logprobs(sample) or [0.0] * len(sample.token_ids)
                s["mask"] += [1] * len(sample.token_ids)
                s["text"] += sample.text
                s["generated"] += len(sample.token_ids)
                s["finish"] = str(sample.finish_reason)
                code = split_tool_call(s["text"]) if sample.stop_reason == TOOL_STOP else None
                out_of_budget = s["generated"] >= s["request"].sampling.max_new_tokens
                if code is None or s["rounds"] >= self.rollout.max_tool_rounds or out_of_budget:
                    continue
                block = self._run_tool(code)
                if s["text"].endswith(TOOL_STOP):
                    block = block[len(TOOL_STOP):]  # the model already wrote the opening fence
                block_ids = list(self.tokenizer(block, add_special_tokens=False)["input_ids"])
                if len(s["prompt_ids"]) + len(s["ids"]) + len(block_ids) >= self.max_model_len:
                    s["finish"] = "length"
                    continue
                s["ids"] += block_ids
                s["logprobs"] += [0.0] * len(block_ids)
                s["mask"] += [0] * len(block_ids)  # tool output is not the policy's: never trained on
                s["text"] += block
                s["rounds"] += 1
                still_active.append(s)
            active = still_active
        return [
            Rollout(
                request_id=s["request"].request_id,
                sample_index=s["index"],
                problem=s["request"].problem,
                prompt=s["request"].prompt,
                prompt_ids=tuple(s["prompt_ids"]),
                completion=s["text"],
                completion_ids=tuple(s["ids"]),
                logprobs=tuple(s["logprobs"]) if s["request"].sampling.logprobs else (),
                finish_reason=s["finish"],
                weight_version=self.weight_version,
                generator_id=self.generator_id,
                loss_mask=tuple(s["mask"]),
            )
            for s in states
        ]

    # ---------------------------------------------------------------------------------------------- health

    def remove_files(self) -> None:
        """Remove the files this generator wrote on its node (its scratch folder: vLLM's rendezvous file, the model
        files it was sent); call it before the actor is killed (``ray.kill`` runs no exit handlers). Sampling
        after it is not supported."""
        from dsmath.model_folder import remove_scratch_folder

        remove_scratch_folder(self._scratch)
        self._scratch = None

    def health(self) -> GeneratorHealth:
        return GeneratorHealth(
            generator_id=self.generator_id,
            weight_version=self.weight_version,
            alive=True,
            requests_served=self.requests_served,
            tokens_generated=self.tokens_generated,
            last_error=self.last_error,
        )

    def describe(self) -> dict[str, Any]:
        """Where this generator runs and what it loaded: host, Ray node (None outside Ray), process id, the folder
        vLLM loaded and where that came from."""
        import socket

        node = None
        try:
            import ray

            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        except ImportError:
            pass
        return {"generator_id": self.generator_id, "host": socket.gethostname(), "node_id": node, "pid": os.getpid(),
                "model_dir": self.model_dir, "model_source": self.model_source}

    # ------------------------------------------------------------------------- weight receiving (see learner/weight_sync)

    def weight_dtype(self) -> str | None:
        """The dtype the engine holds its weights in: senders cast floating weights to it before sending."""
        return self._receiver.wire_dtype()

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str,
                          timeout_s: float) -> None:
        self._receiver.join_group(host, port, rank, world_size, backend, timeout_s)

    def begin_weight_update(self, version: int, num_buckets: int, transport: str, timeout_s: float = 120.0) -> None:
        """Start receiving ``version``; refused unless it is the loaded version + 1. Sampling is refused until
        ``finish_weight_update``."""
        self._receiver.begin(version, num_buckets, transport, timeout_s)
        if self._receiver.streaming:
            if self._engine_session:  # an earlier streamed update failed half-way: close its session first
                self.llm.finish_weight_update()
            self.llm.start_weight_update()
            self._engine_session = True

    def receive_bucket(self, bucket: WeightBucket, layout: BucketLayout, payload: Any = None) -> float:
        start = time.perf_counter()
        try:
            tensors = self._receiver.receive(bucket, layout, payload)
            if tensors is not None:  # streamed: device tensors, loaded now, released by the next bucket
                self._partial = True
                self.llm.collective_rpc(_load_into_model, args=(tensors,))
                del tensors
        except Exception:
            self._receiver.abort()
            raise
        return time.perf_counter() - start

    def finish_weight_update(self, version: int) -> float:
        """Apply the update to the engine in place and switch to ``version``. Returns the apply seconds (streamed:
        vLLM's finishing pass only; the loads happened per bucket)."""
        weights = self._receiver.finish(version)
        start = time.perf_counter()
        try:
            if self._receiver.streaming:
                self.llm.finish_weight_update()
                self._engine_session = False
            else:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        except Exception as exc:
            self._receiver.abort()
            self.last_error = f"finish_weight_update: {exc}"
            raise
        self._receiver.commit(version)
        self._partial = False
        self.llm.update_weight_version(str(version))  # keep vLLM's own notion in step (metrics, logs)
        return time.perf_counter() - start

    def load_weights(self, named_weights: Sequence[tuple[str, Any]], version: int) -> float:
        """Apply a full set of weights in one call, no transport (colocated or test use); same version rule."""
        if version != self.weight_version + 1 or self._receiver.updating:
            raise StaleWeightVersion(
                f"{self.generator_id}: load of version {version} refused, it holds version {self.weight_version}"
            )
        start = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_weights)})
        self._receiver.commit(version)
        self._partial = False
        return time.perf_counter() - start


def _materialise(model: str | ModelFiles, scratch: Path) -> tuple[str, str]:
    """The folder vLLM loads and where it came from: ``model`` itself, or ``ModelFiles`` written to ``scratch`` (this
    generator's scratch folder, which :meth:`Generator.remove_files` removes)."""
    if not isinstance(model, ModelFiles):
        return model, f"folder {model}"
    from dsmath.model_folder import write_model_files

    folder = str(write_model_files(model, scratch))
    return folder, f"config and tokenizer of {model.source} via the object store, weights from the learner"


def _load_into_model(worker, weights: list) -> None:
    """Runs in vLLM's worker (``collective_rpc``, in-process executor): load one bucket's device tensors into the
    model inside the open weight-update session — what vLLM's own IPC weight-transfer engine does per chunk."""
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config):
        worker.model_runner.get_model().load_weights(weights)


def generator_actor_class(num_cpus: float = 1.0, num_gpus: float = 0.0):
    """``Generator`` as a Ray actor class with these resources (``.remote(model_path, rollout, ...)``)."""
    import ray

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(Generator)


def __getattr__(name: str):
    # ``GeneratorActor`` is built on first use so that importing this module does not import Ray.
    if name == "GeneratorActor":
        return generator_actor_class()
    raise AttributeError(name)
