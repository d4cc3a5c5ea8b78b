"""The folder tree is the architecture, checked from the source: every ``import`` of every file, function-local ones
included, read with ``ast``.

    dsmath/         the base library: no Ray, vLLM, DeepSpeed, and nothing of actors/, learner/, wiring/, data_pipeline/
    actors/         Ray actors: the base, Ray and vLLM; never the learner or the wiring
    learner/        the DeepSpeed learner: the base, DeepSpeed and Ray; never the actors or the wiring
    data_pipeline/  the corpus pipeline: the base and Ray Data; never the actors, the learner or the wiring
    wiring/         the driver, rollout producers, bootstrap, iterative GRPO, RM rounds, job submission, the CLI
    bench/          benchmarks (anything)

Nothing imports ``wiring`` but ``wiring`` and ``bench``, and no files import each other in a loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dsmath", "actors", "learner", "data_pipeline", "wiring", "bench")
FORBIDDEN = {
    "dsmath": {"ray", "vllm", "deepspeed", "actors", "learner", "wiring", "data_pipeline"},
    "actors": {"deepspeed", "learner", "wiring", "data_pipeline"},
    "learner": {"vllm", "actors", "wiring", "data_pipeline"},
    "data_pipeline": {"vllm", "deepspeed", "actors", "learner", "wiring"},
    "wiring": set(),
    "bench": set(),
}


def _files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "_pb2" not in p.name)


def _module(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth."""
    out = []
    module = _module(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names]  # `from pkg import module`
    return out


def test_no_layer_imports_what_it_must_not() -> None:
    bad = []
    for path in _files():
        layer = path.relative_to(ROOT).parts[0]
        for line, name in _imports(path):
            if name.split(".")[0] in FORBIDDEN[layer]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {layer}/ imports {name}")
    assert not bad, "layering broken:\n" + "\n".join(sorted(set(bad)))


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in _files()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, path in modules.items():
        for _line, name in _imports(path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != m and not (modules[name].name == "__init__.py" and m.startswith(name + ".")):
                graph[m].add(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles() -> None:
    assert _cycles(_graph()) == []


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The parser sees a function-local import, and the cycle finder finds a loop."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    import ray\n    from .x import y\n")
    assert (2, "ray") in _imports(src, tmp_path)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
