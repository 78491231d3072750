"""The stages in order, and `ensure`: build a stage (and whatever it needs first) into a run.

A stage is a function `build(config, run, made_from) -> metrics`, named "module" (its `build`)
or "module:function" in STAGE_SPECS; `made_from` is the stage's fingerprint, handed down so that
a stage can key its resumable checkpoints by it (stages never import this module). It is
complete when its
`metrics.json` exists and carries the fingerprint of the configuration it was made from:
the stage's own config sections, the seed, and its inputs' fingerprints. Change `vocab_size`
and the tokenizer (and everything after it) is rebuilt; change nothing and it is reused.

A stage that also learns from files a person edits (rlhf: the rankings) names in MADE_FROM_FILES
a function `(config, run) -> JSON-able` that sums up their content; that summary is part of the
stage's fingerprint, so `labkit run` rebuilds the stage after a new ranking, as a notebook does.
"""

from __future__ import annotations

import importlib

from tqdm.auto import tqdm

from .config import STAGES, Config, ConfigError
from .run import Run, fingerprint

# stage -> (module, config sections it reads, stages it reads from)
STAGE_SPECS = {
    "data": ("labkit.data", ("data",), ()),
    "tokenizer": ("labkit.tokenizer", ("tokenizer",), ("data",)),
    "base": ("labkit.pretrain", ("model", "train"), ("tokenizer",)),
    "sft": ("labkit.sft", ("sft",), ("base",)),
    "grpo": ("labkit.grpo", ("grpo",), ("sft",)),
    "rlhf": ("labkit.rlhf", ("rlhf", "reward_model", "dpo", "ppo"), ("sft",)),
    "halluc": ("labkit.halluc", ("halluc",), ("sft",)),
}

# stage -> (module, function) summing up the content of the files it learns from besides its inputs' models
MADE_FROM_FILES = {"rlhf": ("labkit.rlhf", "made_from_files")}


def _check(stage: str) -> None:
    if stage not in STAGE_SPECS:
        raise ConfigError(f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}")


def stage_fingerprint(stage: str, config: Config, run: Run) -> str:
    _, sections, inputs = STAGE_SPECS[stage]
    made_from = {s: getattr(config, s).__dict__ for s in sections}
    parts = [stage, config.seed, made_from, [stage_fingerprint(i, config, run) for i in inputs]]
    if stage in MADE_FROM_FILES:
        module, function = MADE_FROM_FILES[stage]
        parts.append(getattr(importlib.import_module(module), function)(config, run))
    return fingerprint(parts)


def plan(stage: str, config: Config, run: Run, force: bool = False) -> list[str]:
    """The stages that must be built, in order, for `stage` to be complete."""
    _check(stage)
    todo: list[str] = []
    for dependency in STAGE_SPECS[stage][2]:
        todo += [s for s in plan(dependency, config, run) if s not in todo]
    if force or todo or not run.is_complete(stage, stage_fingerprint(stage, config, run)):
        todo.append(stage)
    return todo


def ensure(stage: str, config: Config, run: Run, force: bool = False) -> dict:
    """Make `stage` complete in `run`, building its missing inputs first; return its metrics."""
    import torch

    todo = plan(stage, config, run, force)
    for name in tqdm(todo, desc=f"building {stage}", disable=len(todo) < 2):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        module, _, function = STAGE_SPECS[name][0].partition(":")
        build = getattr(importlib.import_module(module), function or "build")
        run.metrics_path(name).unlink(missing_ok=True)  # incomplete until the new metrics land
        made_from = stage_fingerprint(name, config, run)
        with run.tracking(name, config.to_dict()) as tracker:
            metrics = build(config, run, made_from)
            if torch.cuda.is_available():  # the memory plan, checked: the most this stage held at once
                metrics["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            tracker.summary.update(metrics)
        run.write_metrics(name, metrics, made_from)
    return run.metrics(stage)
