import json
import os
from pathlib import Path

import pytest

from labkit.run import Run, atomic_path, atomic_write, load_run, read_json, write_json


def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "a" / "metrics.json"
    write_json(path, {"x": 1})
    write_json(path, {"x": 2})
    assert read_json(path) == {"x": 2}
    assert os.listdir(path.parent) == ["metrics.json"]  # no temporary files left behind


def test_an_interrupted_write_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "model.bin"
    atomic_write(path, b"old contents")
    with pytest.raises(KeyboardInterrupt), atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half of the new")
        raise KeyboardInterrupt  # killed mid-way
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_a_killed_process_leaves_the_old_file_intact(tmp_path):
    """A real kill (SIGKILL in the middle of the write) leaves the old file, never half of the new one."""
    import subprocess
    import sys

    path = tmp_path / "data.txt"
    atomic_write(path, "old")
    code = (
        "import os, signal, sys\n"
        "from labkit.run import atomic_path\n"
        f"with atomic_path({str(path)!r}) as tmp:\n"
        "    open(tmp, 'w').write('new' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode != 0
    assert path.read_text() == "old"


def test_run_folder_and_completion(tmp_path):
    run = Run("r1", tmp_path)
    assert run.stage_dir("data") == tmp_path / "r1" / "data"
    assert not run.is_complete("data", "abc")
    run.write_metrics("data", {"pages_in": 3}, "abc")
    assert run.is_complete("data", "abc") and not run.is_complete("data", "other")
    loaded = load_run("r1", tmp_path)
    assert loaded.stages == ["data"] and loaded.metrics["data"]["pages_in"] == 3
    assert json.loads((tmp_path / "r1" / "data" / "metrics.json").read_text())["fingerprint"] == "abc"


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden"])
def test_bad_run_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="run name"):
        Run(name, tmp_path)


def test_load_run_of_a_missing_folder_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="labkit run --run nope"):
        load_run("nope", tmp_path)


# --- one runs folder, whatever the entry point -----------------------------------------------------


def test_the_default_runs_folder_is_the_same_from_any_working_folder(monkeypatch, tmp_path):
    from labkit.run import default_runs_dir

    root = Path(__file__).resolve().parent.parent
    monkeypatch.delenv("LABKIT_RUNS_DIR", raising=False)
    for folder in (root, root / "notebooks", tmp_path):
        monkeypatch.chdir(folder)
        assert default_runs_dir() == root / "runs" and Run().path == root / "runs" / "default"
    monkeypatch.setenv("LABKIT_RUNS_DIR", str(tmp_path / "elsewhere"))
    assert Run("x").path == tmp_path / "elsewhere" / "x"  # the environment variable wins
    assert Run("x", "mine").path == Path("mine") / "x"  # and a folder given by name wins over both


def test_a_notebook_in_notebooks_reuses_what_the_cli_built_from_the_root(monkeypatch, tmp_path):
    """What JupyterLab does after the README's main command: the kernel starts in notebooks/, and the
    notebook finds the run the command line made, instead of building another one there."""
    import papermill

    from labkit.cli import main
    from labkit.run import default_runs_dir

    root = Path(__file__).resolve().parent.parent
    monkeypatch.delenv("LABKIT_PRESET", raising=False)
    monkeypatch.chdir(root)
    assert main(["run", "--preset", "tiny", "--run", "shared", "--stages", "data"]) == 0
    metrics = default_runs_dir() / "shared" / "data" / "metrics.json"
    built = metrics.stat().st_mtime_ns
    out = papermill.execute_notebook(
        str(root / "notebooks" / "01_data.ipynb"),
        str(tmp_path / "out.ipynb"),
        parameters=dict(run="shared", preset="tiny"),
        cwd=str(root / "notebooks"),
        kernel_name="python3",
        progress_bar=False,
    )
    printed = "".join(o.get("text", "") for c in out.cells for o in c.get("outputs", []))
    assert f"run folder: {default_runs_dir() / 'shared'}" in printed
    assert metrics.stat().st_mtime_ns == built  # reused, not rebuilt


def test_a_changed_tokenizer_remakes_the_token_files_in_the_same_run(tiny_run, tiny_config, tmp_path):
    """In one run folder: the base stage built with the gpt4 pattern, then again with gpt2 at the same
    vocabulary size. Tokenizer and base are rebuilt, and pretraining reads tokens of the new tokenizer."""
    import shutil

    import numpy as np

    from labkit.config import get_config
    from labkit.data import read_corpus
    from labkit.dataloader import EOT, document_text
    from labkit.pipeline import ensure, plan
    from labkit.tokenizer import Tokenizer

    run = Run("pattern", tmp_path)
    shutil.copytree(tiny_run.path / "data", run.path / "data")  # the same corpus, built once
    ensure("base", tiny_config, run)
    gpt2 = get_config("tiny", tokenizer=dict(pattern="gpt2"))
    assert plan("base", gpt2, run) == ["tokenizer", "base"]
    ensure("base", gpt2, run)
    tokenizer = Tokenizer.load(run.path / "tokenizer")
    ids = np.asarray(np.memmap(run.path / "base" / "train.bin", dtype=np.uint16, mode="r"))
    starts = np.flatnonzero(ids == tokenizer.special_tokens[EOT])
    page = ids[starts[0] + 1 : starts[1]].tolist()
    texts = {document_text(p) for p in read_corpus(run)}
    assert tokenizer.decode(page) in texts and tokenizer.encode(tokenizer.decode(page)) == page


def test_another_labkit_version_rebuilds_every_stage(tiny_run, tiny_config, monkeypatch):
    from labkit import pipeline

    assert pipeline.plan("data", tiny_config, tiny_run) == []
    monkeypatch.setattr(pipeline, "__version__", "99.0")
    assert pipeline.plan("data", tiny_config, tiny_run) == ["data"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_run_files_get_the_users_umask(tmp_path, umask):
    """An atomic write gives the file the mode open() would (0o666 less the umask), not mkstemp's 0o600."""
    old = os.umask(umask)
    try:
        write_json(tmp_path / "metrics.json", {"x": 1})
        atomic_write(tmp_path / "model.bin", b"weights")
        plain = tmp_path / "plain.txt"
        plain.write_text("made by open()")
    finally:
        os.umask(old)
    for name in ("metrics.json", "model.bin", "plain.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
