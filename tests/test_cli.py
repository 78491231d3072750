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


# --- every labkit error: exit status 2 and one line, never a traceback ----------------------------


def assert_one_line_error(done, command: str, message: str) -> None:
    """Exit status 2; the last line of stderr is the error, the only one; no traceback."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert lines[-1].startswith(f"labkit {command}: error: ") and message in lines[-1], done.stderr
    assert sum("error:" in line for line in lines) == 1, done.stderr


@pytest.mark.parametrize(
    "assignments, message",
    [
        (["train.learning_rate=nan"], "train.learning_rate=nan is not a finite number; allowed: a finite number"),
        (["sft.min_lr=0.5"], "sft.min_lr=0.5 is above sft.learning_rate=0.003; min_lr must be <= learning_rate"),
        (["grpo.rewards=bogus=1"], "grpo.rewards='bogus=1': unknown reward 'bogus'"),
        (["data.source=docs.jsonl"], "stage rlhf judges answers by the mini-web's facts, and data.source='docs.jsonl'"),
    ],
)
def test_a_bad_setting_exits_2_before_anything_runs(tmp_path, assignments, message):
    done = labkit("run", "--preset", "tiny", "--runs-dir", str(tmp_path), *[f"--set={a}" for a in assignments])
    assert_one_line_error(done, "run", message)
    assert len(done.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())  # nothing made


def test_a_chat_with_a_missing_model_exits_2(tmp_path):
    done = labkit("chat", "--runs-dir", str(tmp_path), "--run", "nothing", "--model", "ppo")
    assert_one_line_error(done, "chat", "no ppo model at")


@pytest.fixture(scope="module")
def sft_run(tiny_run, tiny_config, tmp_path_factory):
    """A copy of the tiny run with its SFT model built, for the commands below to break."""
    import shutil

    from labkit.pipeline import ensure

    ensure("sft", tiny_config, tiny_run)
    runs = tmp_path_factory.mktemp("cli-runs")
    shutil.copytree(tiny_run.path, runs / "tiny", ignore=shutil.ignore_patterns("wandb"))
    return runs


def test_a_message_too_long_for_the_context_exits_2(sft_run):
    done = subprocess.run(
        [sys.executable, "-m", "labkit", "chat", "--runs-dir", str(sft_run), "--run", "tiny"],
        input="hello " * 200 + "\n",
        capture_output=True,
        text=True,
    )
    assert_one_line_error(done, "chat", "more than the model's block_size=64 leaves room for; write a shorter message")


def test_a_broken_tokenizer_file_exits_2(sft_run, tmp_path):
    import shutil

    shutil.copytree(sft_run / "tiny", tmp_path / "broken")
    (tmp_path / "broken" / "tokenizer" / "tokenizer.tiktoken").unlink()
    done = labkit("chat", "--runs-dir", str(tmp_path), "--run", "broken")
    assert_one_line_error(done, "chat", "tokenizer.tiktoken is missing (Tokenizer.save writes it)")


def test_no_rankings_to_learn_from_exits_2(sft_run, tmp_path):
    import shutil

    # without the rlhf folder: other tests may have ranked prompts in the shared tiny run
    shutil.copytree(sft_run / "tiny", tmp_path / "unranked", ignore=shutil.ignore_patterns("rlhf"))
    args = ["run", "--preset", "tiny", "--runs-dir", str(tmp_path), "--run", "unranked", "--stages", "rlhf"]
    done = labkit(*args, "--set", "rlhf.simulated_labeler=false")
    assert_one_line_error(done, "run", "no rankings to learn from in")
    assert not (tmp_path / "unranked" / "rlhf" / "metrics.json").exists()  # the stage is not marked complete


def labkit_error_classes():
    """Every exception class labkit defines, read from its source."""
    import ast
    import importlib
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "labkit"
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                yield getattr(importlib.import_module(f"labkit.{path.stem}"), node.name)


def test_every_labkit_error_is_a_labkit_error():
    from labkit.errors import LabkitError

    names = {cls.__name__ for cls in labkit_error_classes()}
    assert {"ConfigError", "ChatError", "RankingError", "TokenizerError", "RewardError"} <= names
    assert all(issubclass(cls, LabkitError) for cls in labkit_error_classes())


@pytest.mark.parametrize("error", list(labkit_error_classes()), ids=lambda cls: cls.__name__)
def test_each_kind_of_labkit_error_raised_by_a_stage_exits_2(error, tmp_path, monkeypatch, capsys):
    def failing_stage(stage, config, run, force=False):
        raise error(f"{error.__name__} from stage {stage}:\nsaid on two lines")

    monkeypatch.setattr("labkit.pipeline.ensure", failing_stage)
    assert main(["run", "--preset", "tiny", "--runs-dir", str(tmp_path), "--stages", "data"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"labkit run: error: {error.__name__} from stage data: said on two lines"
