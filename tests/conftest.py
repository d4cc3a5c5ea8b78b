import os

from dsmath.env import apply_cpu_env_defaults

# The CPU stack's environment (dsmath/env.py), also when pytest is run without the Makefile.
apply_cpu_env_defaults()


import pytest  # noqa: E402 - the environment above must be set before anything imports torch or ray


# Test files by measured wall time, longest first (a fresh-clone run on the 2-core machine, 2026-12-05: the docs
# blocks and the checks on their runs about 670 s, the golden run (README's `make run` block) about 320 s,
# train_loop 165 s, ...). With pytest-xdist (`make
# test` runs 2 workers, a whole file each, in this order: --no-loadscope-reorder) the longest files start first, so
# no long file is left to run alone at the end. Only the order changes; a file missing from this list runs after
# these.
LONGEST_FIRST = ("test_docs_commands", "test_golden", "test_train_loop", "test_two_nodes", "test_async_loop",
                 "test_paradigm_loop", "test_job_submit", "test_cli_quiet", "test_eval", "test_zero3_sync",
                 "test_tool_loop", "test_bench_gpu_learner", "test_resume_config", "test_storage",
                 "test_corpus_pipeline", "test_generator_ray", "test_pretrain", "test_cli_fuzz",
                 "test_learner_precision", "test_user_data_loop", "test_sandbox_isolation")


def _longest_first(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the order within a file is kept


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the longest files first; ``@pytest.mark.gpu`` tests are skipped, with the reason,
    where torch sees no CUDA device."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _longest_first(items)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA GPU (none visible to torch here)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster for one test module: 4 logical CPUs (actors share the 2 cores), no GPUs.
    Modules that need another shape define their own ``ray_cluster``."""
    import ray

    ray.init(num_cpus=4, num_gpus=0, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Bootstrap cache shared by the loop tests: same settings, built once per session."""
    return tmp_path_factory.mktemp("bootstrap-cache")
