import json
import os

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
