"""The modern recipe (model.arch=modern, train.optimizer=muon) through every stage on the tiny
preset: each stage builds, trains and saves models of that architecture; and the two recipes
pretrained side by side (labkit/recipes.py)."""

import math
import shutil

import pytest

from labkit import recipes
from labkit.checkpoint import load_checkpoint, load_model
from labkit.config import ConfigError, get_config
from labkit.errors import LabkitError
from labkit.pipeline import ensure, plan
from labkit.run import Run, read_json


def copy_of_inputs(tiny_run, tiny_config, folder) -> Run:
    """A run sharing the tiny run's data and tokenizer (they do not depend on the model)."""
    ensure("tokenizer", tiny_config, tiny_run)
    run = Run("copy", folder)
    for stage in ("data", "tokenizer"):
        shutil.copytree(tiny_run.path / stage, run.path / stage)
    return run


@pytest.fixture(scope="module")
def modern_run(tiny_run, tiny_config, tmp_path_factory):
    run = copy_of_inputs(tiny_run, tiny_config, tmp_path_factory.mktemp("runs"))
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


def test_two_recipes_pretrained_side_by_side(tiny_run, tiny_config, tmp_path, monkeypatch):
    run = copy_of_inputs(tiny_run, tiny_config, tmp_path)
    results = {name: recipes.pretrain_recipe(tiny_config, run, name, steps=20) for name in recipes.RECIPES}
    for name, result in results.items():
        val = [r["val_loss"] for r in result["history"] if "val_loss" in r]
        assert [r["step"] for r in result["history"] if "val_loss" in r] == [0, *range(2, 21, 2)]  # ten passes
        assert val[-1] < val[0] - 0.5, name  # both learn
        metrics = result["metrics"]
        assert metrics["steps"] == 20 and metrics["recipe"] == name and 0 < metrics["val_bpb"] < 8
        assert set(metrics["fact_recall"]) == {"0", "1", "2-4", "5-16", "17+"} and 0 <= metrics["copy_accuracy"] <= 1
        model = load_model(run.path / "recipes" / name / "model.pt")
        assert (model.config.arch, model.config.n_embd) == (name, tiny_config.model.n_embd)
    assert results["gpt2"]["history"][0]["val_loss"] != results["modern"]["history"][0]["val_loss"]
    assert not (run.path / "recipes" / "gpt2" / "train.bin").exists()  # one set of token files: the stage's
    assert (run.path / "base" / "train.bin").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(recipes, "build", no_training)
    assert recipes.pretrain_recipe(tiny_config, run, "modern", steps=20) == results["modern"]  # read back
    with pytest.raises(AssertionError, match="trained again"):
        recipes.pretrain_recipe(tiny_config, run, "modern", steps=30)  # other settings: trained again
    with pytest.raises(LabkitError, match="unknown pretraining recipe 'llama'; allowed: gpt2, modern"):
        recipes.pretrain_recipe(tiny_config, run, "llama")
    with pytest.raises(ConfigError, match="rotates pairs of channels"):
        recipes.recipe_config(get_config("tiny", model=dict(n_embd=20, n_head=4)), "modern")
