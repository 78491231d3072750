import subprocess
import sys

import pytest

from labkit.cli import main


def labkit(*args, env=None):
    import os

    env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    env.pop("LABKIT_PRESET", None)
    return subprocess.run([sys.executable, "-m", "labkit", *args], capture_output=True, text=True, env=env)


def test_run_then_report_end_to_end(tmp_path):
    done = labkit("run", "--preset", "tiny", "--runs-dir", str(tmp_path), "--run", "e2e", "--stages", "data")
    assert done.returncode == 0, done.stderr
    assert "| url |" in done.stdout and "PII strings leaked into the cleaned corpus: **0**" in done.stdout
    assert (tmp_path / "e2e" / "report.md").read_text().strip() == done.stdout.strip()
    assert list((tmp_path / "e2e" / "wandb").glob("offline-run-*")), "wandb logs offline inside the run folder"
    report = labkit("report", "--runs-dir", str(tmp_path), "--run", "e2e")
    assert report.returncode == 0 and "## 1. Data: crawl and clean" in report.stdout


def test_a_complete_stage_is_reused_and_force_rebuilds_it(tmp_path, capsys):
    args = ["run", "--preset", "tiny", "--runs-dir", str(tmp_path), "--stages", "data"]
    assert main(args) == 0
    metrics = tmp_path / "default" / "data" / "metrics.json"
    first = metrics.stat().st_mtime_ns
    assert main(args) == 0 and metrics.stat().st_mtime_ns == first
    assert main(args + ["--force"]) == 0 and metrics.stat().st_mtime_ns != first


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["run", "--preset", "tiny", "--set", "data.n_people=lots"],
            "data.n_people='lots' has the wrong type; expected int",
        ),
        (["run", "--preset", "tiny", "--set", "data.colour=red"], "unknown field 'data.colour'"),
        (
            ["run", "--preset", "tiny", "--stages", "data,pretrain"],
            "unknown stage 'pretrain'; allowed: data, tokenizer",
        ),
        (["report", "--run", "missing"], "no run folder"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, args, message):
    done = labkit(*args, "--runs-dir", str(tmp_path))
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "default").exists()  # nothing half-made


def test_unknown_preset_is_refused_by_the_parser(tmp_path):
    done = labkit("run", "--preset", "huge", "--runs-dir", str(tmp_path))
    assert done.returncode == 2 and "invalid choice: 'huge'" in done.stderr


def test_help_explains_every_option():
    done = labkit("run", "--help")
    assert done.returncode == 0
    for option in (
        "--preset",
        "--run",
        "--runs-dir",
        "--stages",
        "--set",
        "--force",
        "data.n_people",
        "tokenizer.vocab_size",
    ):
        assert option in done.stdout
