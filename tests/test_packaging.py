"""What the project says it needs is what it uses: every third-party import of labkit and the
notebooks is declared, and environment.yml lists exactly pyproject.toml's dependencies (the dev
extra included) with the same floors."""

import ast
import json
import sys
from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
IMPORT_TO_DIST = {"sklearn": "scikit-learn", "IPython": "ipython"}  # import names that differ from the package's
CONDA_TO_DIST = {"pytorch": "torch"}


def declared() -> dict[str, str]:
    """Distribution name -> version specifier, from the installed labkit's metadata (pyproject.toml)."""
    return {Requirement(r).name.lower(): str(Requirement(r).specifier) for r in requires("labkit")}


def third_party_imports() -> set[str]:
    sources = [p.read_text() for p in (ROOT / "labkit").glob("*.py")]
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        sources += ["".join(c["source"]) for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    found = set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "labkit"}


def test_every_import_is_declared():
    missing = {m for m in third_party_imports() if IMPORT_TO_DIST.get(m, m).lower() not in declared()}
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


def test_environment_yml_equals_pyproject():
    conda = {}
    text = (ROOT / "environment.yml").read_text()
    for line in text[text.index("\ndependencies:") :].splitlines():
        item = line.strip().removeprefix("- ")
        if line.startswith("  - ") and item not in ("pip", "pip:") and not item.startswith("python="):
            requirement = Requirement(item)
            conda[CONDA_TO_DIST.get(requirement.name, requirement.name).lower()] = str(requirement.specifier)
    assert conda == declared()


def test_every_floor_is_a_tested_version():
    """No open-ended or bare requirement: each says which version it was tested from."""
    assert all(spec.startswith((">=", "==")) for spec in declared().values()), declared()
