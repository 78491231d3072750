"""Two pretraining recipes side by side: GPT-2's (2019) and the modern small-GPT recipe (2025).

The base stage trains whatever `model.arch` and `train.optimizer` say. `pretrain_recipe` trains the
run's base model again with one of RECIPES, on the same token files, with the same seed, batches,
schedule and number of steps (`steps`: fewer than the stage's for a quick look), through the same
stage code (`labkit.pretrain.build`): only the recipe's fields differ, so the validation loss
curves and the facts recalled show what the recipe does. The recipes:

- gpt2: learned positions, LayerNorm, GELU, a tied head, AdamW on everything;
- modern: rotary positions, parameter-free RMSNorm and QK-norm, ReLU², an untied head, zero-
  initialised output projections, a logit softcap (labkit/model.py), and Muon on the blocks'
  matrices with AdamW on the rest (labkit/train.py), as nanochat and modded-nanogpt train.

Writes to `runs/<run>/recipes/<recipe>/` what the base stage writes (model.pt, history.json,
fact_recall.json, ...), and metrics.json with the fingerprint a rerun must match to reuse them.
"""

from __future__ import annotations

import dataclasses

from . import __version__
from .config import Config, check_config
from .errors import LabkitError
from .pretrain import build
from .run import Run, fingerprint, read_json, write_json

RECIPES = {
    "gpt2": dict(model=dict(arch="gpt2"), train=dict(optimizer="adamw")),
    "modern": dict(model=dict(arch="modern"), train=dict(optimizer="muon")),
}
LABELS = {"gpt2": "GPT-2: learned positions, GELU, AdamW", "modern": "modern: RoPE, ReLU², QK-norm, Muon"}


def recipe_config(config: Config, recipe: str, steps: int | None = None) -> Config:
    """`config` with the recipe's model and optimizer, and `steps` optimizer steps when given (the
    warmup then at most a tenth of them, ten validation passes, one checkpoint at the end); checked
    by every rule."""
    if recipe not in RECIPES:
        raise LabkitError(f"unknown pretraining recipe {recipe!r}; allowed: {', '.join(RECIPES)}")
    train = dataclasses.replace(config.train, **RECIPES[recipe]["train"])
    if steps is not None:
        train = dataclasses.replace(
            train,
            max_steps=steps,
            warmup_steps=min(train.warmup_steps, steps // 10),
            eval_every=max(1, steps // 10),
            checkpoint_every=0,
        )
    model = dataclasses.replace(config.model, **RECIPES[recipe]["model"])
    return check_config(dataclasses.replace(config, model=model, train=train))


def pretrain_recipe(config: Config, run: Run, recipe: str, steps: int | None = None) -> dict:
    """Pretrain with `recipe` (see RECIPES) into runs/<run>/recipes/<recipe>/; returns
    dict(history=..., metrics=...) as the base stage writes them. The run needs its tokenizer
    (`ensure("tokenizer", config, run)`). A rerun with the same settings reads them back."""
    cfg = recipe_config(config, recipe, steps)
    tokenizer = run.metrics("tokenizer")
    if tokenizer is None:
        raise LabkitError(
            f"run {run.path} has no tokenizer; build it first: `labkit run{run.where} --stages tokenizer`"
        )
    out = run.path / "recipes" / recipe
    made_from = fingerprint(
        [__version__, tokenizer["fingerprint"], cfg.seed, dataclasses.asdict(cfg.model), cfg.train.__dict__]
    )
    done = out / "metrics.json"
    if done.exists() and read_json(done).get("fingerprint") == made_from:
        metrics = read_json(done)
    else:
        metrics = dict(build(cfg, run, made_from, out), recipe=recipe, fingerprint=made_from)
        write_json(done, metrics)  # last: the mark of a finished one
        (out / "train_state.pt").unlink(missing_ok=True)  # the model and the history are what is kept
    return dict(history=read_json(out / "history.json"), metrics=metrics)
