"""The base library must import nothing distributed (DESIGN §2)."""

import subprocess
import sys

BASE = ["dsmath", "dsmath.config", "dsmath.records", "dsmath.datasets", "dsmath.prompts", "dsmath.tasks.arithmetic",
        "dsmath.grpo", "dsmath.grading", "dsmath.sandbox", "dsmath.cli", "dsmath.evaluation",
        "dsmath.reward_models"]
FORBIDDEN = ["ray", "vllm", "deepspeed", "actors", "learner", "data_pipeline"]


def test_base_imports_nothing_distributed():
    code = (
        "import importlib, importlib.util, sys\n"
        f"for m in {BASE!r}:\n"
        "    if importlib.util.find_spec(m) is not None: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"base library pulled in: {out.stdout.strip()}"
