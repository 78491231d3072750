"""The notebooks as committed: valid nbformat 4.5 (every cell with a unique id, so that nbformat
does not warn and papermill and nbval keep them), no outputs, one `parameters` cell each."""

import warnings
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing or duplicate id is a warning, then an error
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
    assert (notebook.nbformat, notebook.nbformat_minor) >= (4, 5)
    ids = [cell.get("id") for cell in notebook.cells]
    assert all(ids) and len(set(ids)) == len(ids), ids
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), path.name
    assert sum("parameters" in cell.metadata.get("tags", []) for cell in code) == 1


def test_every_notebook_is_checked():
    assert len(NOTEBOOKS) == 7
