"""GRPO's loss variants side by side: a second policy, trained with another loss, from the same start.

The GRPO stage (labkit/grpo.py) trains one policy with `grpo.loss_type`. `compare` trains another one
with a loss recipe (labkit/presets.py's LOSS_RECIPES: a loss type with the settings its paper pairs it
with) from the stage's own starting point, the cold-started policy in grpo/start.pt, through the same
loop (`train_grpo`), on the same problems in the same order with the same sampling seeds and the same
reference (a frozen copy of that start). Only the recipe's fields differ, so pass@1 against step shows
what the loss does. The formulas are in labkit/grpo.py's docstring.

Writes to `runs/<run>/grpo/compare_<recipe>/`:
  history.json    per step, as the stage's history.json (pass@1 at its evaluations)
  metrics.json    the recipe and the settings it changed, pass@1 at the first and last evaluation, and the
                  fingerprint (the stage's, the settings') a rerun must match to reuse the history
"""

from __future__ import annotations

import dataclasses

import torch

from .checkpoint import load_model
from .config import Config, GRPOConfig, check_config, loss_recipe, resolve_device
from .errors import LabkitError
from .grpo import load_tasks, train_grpo
from .rewards import parse_weights
from .run import Run, fingerprint, read_json, write_json
from .train import autocast_dtype


def compare(config: Config, run: Run, recipe: str) -> list[dict]:
    """The history of a policy trained like the run's GRPO stage but with the loss recipe `recipe`.
    Build the stage first with the same `config` (`ensure("grpo", config, run)`): the comparison
    starts from its start.pt. A rerun with the same settings reads the saved history back."""
    cfg = compared_config(config, recipe)
    stage, start = run.metrics("grpo"), run.path / "grpo" / "start.pt"
    if stage is None or not start.exists():
        raise LabkitError(
            f"run {run.path} has no finished GRPO stage with its starting policy ({start}); build it first: "
            f"`labkit run{run.where} --stages grpo` (add --force if the stage predates start.pt)"
        )
    out = run.stage_dir("grpo") / f"compare_{recipe}"
    made_from = fingerprint([stage["fingerprint"], dataclasses.asdict(cfg)])
    done = out / "metrics.json"
    if done.exists() and read_json(done).get("fingerprint") == made_from:
        return read_json(out / "history.json")
    history = train_from_start(config, run, cfg, start, out / "train_state.pt", made_from)
    evals = [r["pass_at_1"] for r in history if "pass_at_1" in r]
    write_json(out / "history.json", history)
    changed = {k: v for k, v in dataclasses.asdict(cfg).items() if v != getattr(config.grpo, k)}
    summary = dict(recipe=recipe, changed=changed, pass_at_1_first=evals[0], pass_at_1_last=evals[-1])
    write_json(done, dict(summary, steps=len(history), fingerprint=made_from))  # last: the mark of a finished one
    (out / "train_state.pt").unlink(missing_ok=True)  # the history is what is kept
    return history


def compared_config(config: Config, recipe: str) -> GRPOConfig:
    """The run's `grpo` settings with the recipe's fields, checked by every rule (a recipe that does not go
    with the other settings, e.g. reinforce with num_iterations=2, fails here, before any training)."""
    cfg = dataclasses.replace(config.grpo, **loss_recipe(recipe))
    check_config(dataclasses.replace(config, grpo=cfg))
    return cfg


def train_from_start(config: Config, run: Run, cfg: GRPOConfig, start, checkpoint, resume_key: str) -> list[dict]:
    """`train_grpo` with `cfg` from the policy saved at `start`, on the stage's task stream and seed."""
    from .data import read_world
    from .tokenizer import Tokenizer

    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = load_model(start, device)
    tokenizer = Tokenizer.load(run.path / "tokenizer")
    stream, heldout = load_tasks(config, read_world(run) if cfg.source == "mini-web" else None)
    result = train_grpo(
        model,
        tokenizer,
        stream,
        heldout,
        cfg,
        parse_weights(cfg.rewards),
        seed=config.seed,
        device=device,
        train=config.train,
        checkpoint=checkpoint,
        resume_key=resume_key,
        dtype=autocast_dtype(config.train, device),
        max_batch=config.max_batch,
    )
    return result["history"]


def loss_label(cfg: GRPOConfig) -> str:
    """A legend's name for a GRPO loss and the settings that go with it."""
    advantage = "A = (r - mean) / std" if cfg.scale_rewards else "A = r - mean"
    if cfg.loss_type == "reinforce":
        return f"reinforce: {advantage}, no ratio, no clip, no KL"
    clip = f"[{1 - cfg.epsilon:g}, {1 + cfg.epsilon_high:g}]"
    return f"{cfg.loss_type}: {advantage}, ratio clipped to {clip}, beta {cfg.beta:g}"
