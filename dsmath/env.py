"""The environment the CPU stack needs, in one place.

Offline hub, no Ray token auth, DeepSpeed's CPU accelerator, a small vLLM KV cache, the in-process vLLM engine,
one OpenMP thread per process (two busy processes at two threads each run 20-30× slower on 2 cores), and one fp32
code path on every x86 CPU (:func:`same_numbers_env`). The Makefile exports the same values; tests, benches and the
CLI set them as defaults (a value already set wins).
"""

from __future__ import annotations

import os
import platform

# MKL, oneDNN and PyTorch's own kernels each pick a code path by CPU model: the same fp32 run then gives other
# numbers on another x86 machine (measured: the default job's held-out accuracy before RL 30.0 % on one 2-core
# cloud VM, 28.0 % on another) and, on some, at another thread count. Pinned to AVX2 (every x86 CPU since 2013):
# MKL's conditional numerical reproducibility mode (STRICT: the same bits at any thread count), oneDNN's and
# PyTorch's AVX2 kernels. Cost on the tiny model: bootstrap SFT about 20 % slower (15 -> 12 steps/s here).
# Guaranteed: the same numbers at 1 or 2 threads (tests/test_threads.py); across CPU models, as far as the three
# libraries keep their promise (tests/golden.py records where its trace was measured).
SAME_NUMBERS_ENV: dict[str, str] = {
    "MKL_CBWR": "AVX2,STRICT",
    "DNNL_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
}

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


def same_numbers_env() -> dict[str, str]:
    """:data:`SAME_NUMBERS_ENV` on an x86 machine; nothing elsewhere (the values name x86 code paths)."""
    return dict(SAME_NUMBERS_ENV) if platform.machine().lower() in ("x86_64", "amd64") else {}


def apply_cpu_env_defaults() -> None:
    """Set every :data:`CPU_STACK_ENV` and :func:`same_numbers_env` variable that is not set already (imports
    nothing heavy)."""
    for key, value in {**CPU_STACK_ENV, **same_numbers_env()}.items():
        os.environ.setdefault(key, value)


# What the driver forwards to its actors (when set in its own environment): the CPU stack's variables
# except the ones that only matter to the process that starts Ray.
WORKER_ENV_KEYS: tuple[str, ...] = (tuple(k for k in CPU_STACK_ENV if k != "RAY_USAGE_STATS_ENABLED")
                                    + tuple(SAME_NUMBERS_ENV))


def env_to_add(ours: dict[str, str], job_env: dict[str, str]) -> dict[str, str]:
    """The variables of ``ours`` that the job's runtime env does not set already.

    Ray refuses a ``ray.init(runtime_env=...)`` whose ``env_vars`` repeat a key of the submitted job's runtime env
    (``ray job submit --runtime-env``), even with the same value; the job's value wins, ours fill the gaps.
    """
    return {k: v for k, v in ours.items() if k not in job_env}
