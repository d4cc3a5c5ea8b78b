from dsmath.env import apply_cpu_env_defaults

# The CPU stack's environment (dsmath/env.py), also when pytest is run without the Makefile.
apply_cpu_env_defaults()


import pytest  # noqa: E402 - the environment above must be set before anything imports torch or ray


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests are skipped, with the reason, where torch sees no CUDA device."""
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
