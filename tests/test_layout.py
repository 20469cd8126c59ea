"""The layout holds: the product (``ale_backend``) imports with its runtime requirements alone, and never reaches
into the benchmarks or the test kit, so the Docker image (which ships ``ale_backend`` and ``requirements.txt``) is
complete."""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import ale_backend
from tests.conftest import ROOT


def _requirements(path) -> set[str]:
    names = set()
    for line in (ROOT / path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(canonicalize_name(Requirement(line).name))
    return names


def _with_dependencies(names: set[str]) -> set[str]:
    """``names`` and every distribution they require, as installed."""
    seen: set[str] = set()
    stack = list(names)
    while stack:
        name = canonicalize_name(stack.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for spec in requires:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                stack.append(requirement.name)
    return seen


def test_the_product_imports_with_its_runtime_requirements_alone():
    dev_only = _requirements("requirements-dev.txt") - _with_dependencies(_requirements("requirements.txt"))
    blocked = {module for module, dists in metadata.packages_distributions().items()
               if any(canonicalize_name(d) in dev_only for d in dists) and re.fullmatch(r"\w+", module)}
    blocked |= {"tests", "testkit", "benchmarks"}
    assert {"sklearn", "skimage", "pytest"} <= blocked  # the check has teeth: the benchmark's data needs these
    modules = sorted(m.name for m in pkgutil.walk_packages(ale_backend.__path__, "ale_backend."))
    assert "ale_backend.worker" in modules and not any(".bench" in m for m in modules)
    script = (
        "import importlib, sys\n"
        f"blocked = {sorted(blocked)!r}\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in blocked:\n"
        "            raise ImportError(f'{name} is not a runtime requirement')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        f"for module in {modules!r}:\n"
        "    importlib.import_module(module)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
