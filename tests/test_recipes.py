"""The modern recipe (model.arch=modern, train.optimizer=muon) through every stage on the tiny
preset: each stage builds, trains and saves models of that architecture."""

import math
import shutil

import pytest

from labkit.checkpoint import load_checkpoint, load_model
from labkit.config import get_config
from labkit.pipeline import ensure, plan
from labkit.run import Run, read_json


@pytest.fixture(scope="module")
def modern_run(tiny_run, tiny_config, tmp_path_factory):
    """A run sharing the tiny run's data and tokenizer (they do not depend on the model)."""
    ensure("tokenizer", tiny_config, tiny_run)
    run = Run("modern", tmp_path_factory.mktemp("runs"))
    for stage in ("data", "tokenizer"):
        shutil.copytree(tiny_run.path / stage, run.path / stage)
    return run, get_config("tiny", model=dict(arch="modern"), train=dict(optimizer="muon"))


def test_the_modern_recipe_goes_through_every_stage(modern_run):
    run, config = modern_run
    assert plan("halluc", config, run) == ["base", "sft", "halluc"]  # data and tokenizer are reused

    base = ensure("base", config, run)
    assert 0 < base["val_loss"] < math.log(base["vocab_size"]) and 0 < base["val_bpb"] < 8
    val = [row["val_loss"] for row in read_json(run.path / "base" / "history.json") if "val_loss" in row]
    assert val[-1] < val[0] - 0.5  # it learned here: the validation loss fell while training
    muon, adamw = load_checkpoint(run.path / "base" / "train_state.pt")["optimizer"]["optimizers"]
    assert len(muon["state"]) == 6 * config.model.n_layer  # every block matrix has its momentum
    assert len(adamw["state"]) == 2  # the token embedding and the head

    for stage in ("sft", "rlhf", "grpo", "halluc"):
        assert ensure(stage, config, run), stage
    for name in ("base", "sft", "rlhf/rm", "ppo", "dpo", "grpo", "halluc"):
        model = load_model(run.path / name / "model.pt")
        body = getattr(model, "body", model)  # the reward model: a GPT body and a scalar head
        assert body.config.arch == "modern" and not hasattr(body.transformer, "wpe"), name
