"""The package's layering, read from its source: no import cycles, stages never reach up into the
pipeline, no private name crosses a module boundary, only plots and widgets touch plotly and
ipywidgets, and no module outgrows a reader (600 lines)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "labkit"
STAGES = {
    "data",
    "tokenizer",
    "pretrain",
    "sft",
    "rlhf",
    "preferences",
    "reward_model",
    "ppo",
    "dpo",
    "grpo",
    "grpo_compare",
    "halluc",
    "search",
    "engine",
    "train",
    "model",
    "chat",
    "checkpoint",
}


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(labkit module imported, names taken from it) for every import in the file, function-level ones too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.append((node.module, [a.name for a in node.names]))
            else:  # from . import x, y
                out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name.removeprefix("labkit."), []) for a in node.names if a.name.startswith("labkit.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("labkit"):
            out.append((node.module.removeprefix("labkit").lstrip(".") or "__init__", [a.name for a in node.names]))
    return out


def third_party(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


MODULES = {p.stem: p for p in PACKAGE.glob("*.py")}
GRAPH = {name: {m for m, _ in imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def test_no_import_cycles():
    def visit(name, path):
        for dependency in GRAPH[name]:
            if dependency in path:
                raise AssertionError(" -> ".join(path[path.index(dependency) :] + [dependency]))
            visit(dependency, path + [dependency])

    for name in GRAPH:
        visit(name, [name])


def test_stages_never_import_the_pipeline_or_the_command_line():
    for name in STAGES:
        assert not GRAPH[name] & {"pipeline", "cli", "report"}, name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_is_imported_across_modules(name):
    private = [(m, n) for m, names in imports(MODULES[name]) for n in names if n.startswith("_") and n != "__version__"]
    assert not private, f"{name} imports {private}"


def test_only_plots_and_widgets_import_plotly_and_ipywidgets():
    users = {name for name, path in MODULES.items() if third_party(path) & {"plotly", "ipywidgets", "IPython"}}
    assert users <= {"plots", "widgets"}, users


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_over_600_lines(name):
    assert len(MODULES[name].read_text().splitlines()) <= 600
