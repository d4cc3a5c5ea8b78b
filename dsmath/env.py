"""The environment the CPU stack needs, in one place.

Offline hub, no Ray token auth, DeepSpeed's CPU accelerator, a small vLLM KV cache, the in-process vLLM engine,
one OpenMP thread per process (two busy processes at two threads each run 20-30× slower on 2 cores). The Makefile
exports the same values; tests, benches and the CLI set them as defaults (a value already set wins).
"""

from __future__ import annotations

import os

CPU_STACK_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "DS_ACCELERATOR": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def apply_cpu_env_defaults() -> None:
    """Set every :data:`CPU_STACK_ENV` variable that is not set already (imports nothing heavy)."""
    for key, value in CPU_STACK_ENV.items():
        os.environ.setdefault(key, value)


# What the driver forwards to its actors (when set in its own environment): the CPU stack's variables
# except the ones that only matter to the process that starts Ray.
WORKER_ENV_KEYS: tuple[str, ...] = tuple(k for k in CPU_STACK_ENV if k != "RAY_USAGE_STATS_ENABLED")


def env_to_add(ours: dict[str, str], job_env: dict[str, str]) -> dict[str, str]:
    """The variables of ``ours`` that the job's runtime env does not set already.

    Ray refuses a ``ray.init(runtime_env=...)`` whose ``env_vars`` repeat a key of the submitted job's runtime env
    (``ray job submit --runtime-env``), even with the same value; the job's value wins, ours fill the gaps.
    """
    return {k: v for k, v in ours.items() if k not in job_env}
