"""Shared fixtures: one `tiny` run built once per test session, in a temporary runs folder."""

import os
import tempfile

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
# the tests never write into a person's runs folder: every run without a folder of its own goes here
os.environ["LABKIT_RUNS_DIR"] = tempfile.mkdtemp(prefix="labkit-tests-")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_config():
    from labkit.config import get_config

    return get_config("tiny")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_config):
    """A run folder with the `data` stage built on the tiny preset (later stages: call ensure)."""
    from labkit.pipeline import ensure
    from labkit.run import Run

    run = Run("tiny", tmp_path_factory.mktemp("runs"))
    ensure("data", tiny_config, run)
    return run


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread: their ops are too small to share out."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rows_seen(monkeypatch):
    """`rows_seen(model)` -> a list that records how many rows each forward pass of `model` takes
    (every pass, sampling, scoring or training, goes through `hidden_states`)."""

    def watch(model):
        seen = []
        forward = type(model).hidden_states.__get__(model)  # the model's own, not an earlier watcher

        def counting(idx, *args, **kwargs):
            seen.append(idx.size(0))
            return forward(idx, *args, **kwargs)

        monkeypatch.setattr(model, "hidden_states", counting)
        return seen

    return watch
