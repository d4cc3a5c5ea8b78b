"""The CPU recipe's pinned versions (constraints-cpu.txt, which the Makefile installs with) agree with what
pyproject.toml declares, so `make lock` cannot pin a version that a plain `pip install -e .` would refuse; pip and
the setuptools that builds are pinned as well."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints-cpu.txt"
EXTRAS = ("cpu", "dev", "corpus")  # the extras the Makefile installs


def pins() -> dict[str, Version]:
    """name -> pinned version, from ``name==version`` lines (comments and blank lines skipped)."""
    found = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
            assert match, f"constraints-cpu.txt: not a name==version pin: {line!r}"
            found[canonicalize_name(match[1])] = Version(match[2])
    return found


def test_every_package_the_recipe_installs_is_pinned_within_what_pyproject_declares() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(s) for s in project["dependencies"]]
    declared += [Requirement(s) for extra in EXTRAS for s in project["optional-dependencies"][extra]]
    pinned = pins()
    missing = sorted(r.name for r in declared if canonicalize_name(r.name) not in pinned)
    outside = sorted(f"{r.name}=={pinned[canonicalize_name(r.name)]} not {r.specifier}" for r in declared
                     if canonicalize_name(r.name) in pinned
                     and not r.specifier.contains(pinned[canonicalize_name(r.name)], prereleases=True))
    assert (missing, outside) == ([], []), "constraints-cpu.txt disagrees with pyproject.toml (make lock rewrites it)"


def test_the_makefiles_torch_is_the_pinned_one() -> None:
    makefile = (ROOT / "Makefile").read_text()
    wanted = re.search(r"pip install -q -c \$\(CONSTRAINTS\) torch==(\S+)", makefile)
    assert wanted, "the Makefile no longer installs torch==X with the constraints"
    assert pins()["torch"].public == wanted[1], (pins()["torch"], wanted[1])


def test_pip_and_the_setuptools_that_builds_are_pinned_within_the_build_requirements() -> None:
    """`make lock` freezes with --all, so pip (which the Makefile upgrades to the pin) and setuptools (the build
    constraint for dsmath's own build and DeepSpeed's sdist) are pinned too."""
    pinned = pins()
    build = [Requirement(s) for s in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]]
    assert {"pip", "setuptools"} <= set(pinned), sorted(pinned)[:5]
    assert [str(r) for r in build if not r.specifier.contains(pinned.get(canonicalize_name(r.name), Version("0")))] == []
    assert "--build-constraint $(CONSTRAINTS)" in (ROOT / "Makefile").read_text()
