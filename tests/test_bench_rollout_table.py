"""bench/rollout.py's bandwidth table: exact device names only; anything else is unknown, never a near match."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "rollout.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_rollout", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_known_devices_and_near_misses_are_unknown():
    rollout = _load()
    assert rollout.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert rollout.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert rollout.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12  # not the SXM figure
    assert rollout.peak_bandwidth("NVIDIA L4") == 0.3e12
    # Similar names that a substring match would have mapped to a wrong figure.
    for name in ("NVIDIA L40", "NVIDIA H100", "NVIDIA A100", "NVIDIA GeForce RTX 4090", "AMD Instinct MI300X", ""):
        assert rollout.peak_bandwidth(name) is None, name
