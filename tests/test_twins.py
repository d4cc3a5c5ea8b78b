"""Plain-loop twins in one style: every vectorised kernel ``f`` that has a twin has it as ``f_loop``, defined
right after ``f`` in the same module, and a test compares the two.

A twin is the slow, obvious version (sample by sample, token by token, as the paper's formulas read) that the
vectorised kernel is tested against. This test fails when a twin lives elsewhere (a separate ``*_reference``
module, a test-local helper), is named in another style, or is never compared in a test.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dsmath", "data_pipeline", "learner", "actors", "wiring", "bench")
OTHER_STYLES = re.compile(r"^(?!_)(\w+?)_(reference|ref|naive|slow|plain)$")


def _modules():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def _twins() -> list[tuple[Path, str, str | None]]:
    """(module, twin name, name of the function defined just before it) for every public ``*_loop``."""
    found = []
    for path in _modules():
        body = ast.parse(path.read_text()).body
        funcs = [n for n in body if isinstance(n, ast.FunctionDef)]
        for prev, node in zip([None] + funcs, funcs):
            if node.name.endswith("_loop") and not node.name.startswith("_"):
                found.append((path, node.name, prev.name if prev else None))
    return found


def test_there_are_twins_to_check():
    names = {name for _, name, _ in _twins()}
    assert {"grpo_loss_loop", "group_advantages_loop", "gae_loop", "pass_at_k_loop", "minhash_signature_loop"} <= names


def test_every_twin_sits_right_after_its_kernel():
    bad = [f"{p.relative_to(ROOT)}: {name} follows {prev!r}, not {name[:-5]!r}"
           for p, name, prev in _twins() if prev != name[: -len("_loop")]]
    assert not bad, "\n".join(bad)


def test_every_twin_is_compared_in_a_test():
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != Path(__file__).name)
    untested = [f"{p.relative_to(ROOT)}:{name}" for p, name, _ in _twins() if not re.search(rf"\b{name}\(", tests)]
    assert not untested, f"twins no test calls: {untested}"


def test_no_twin_in_another_style():
    other = []
    for path in _modules():
        if path.stem.endswith("_reference"):
            other.append(str(path.relative_to(ROOT)))
        names = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        for name in names:
            m = OTHER_STYLES.match(name)
            if m and m.group(1) in names:  # f beside f_reference: a twin named in another style
                other.append(f"{path.relative_to(ROOT)}:{name}")
    assert not other, f"name plain-loop twins f_loop and put them right after f: {other}"
