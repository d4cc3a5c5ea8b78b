"""Makes this interpreter look like a bare GPU machine: no Ray, no vLLM (put this folder first on PYTHONPATH).

``sys.modules[name] = None`` is Python's own way to mark a module absent: ``import ray`` raises
ModuleNotFoundError and ``importlib.util.find_spec("ray")`` returns None, as where it is not installed; the
meta-path finder refuses submodules (``ray.util``) too. Child processes inherit PYTHONPATH, hence the block.
"""

import importlib.abc
import sys

BLOCKED = ("ray", "vllm")


class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: a bare GPU machine has no Ray/vLLM)",
                                      name=name)
        return None


for _name in BLOCKED:
    sys.modules[_name] = None
sys.meta_path.insert(0, _Blocked())
