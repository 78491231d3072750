"""The stages in order, and `ensure`: build a stage (and whatever it needs first) into a run.

A stage is a function `build(config, run, made_from) -> metrics`, named "module" (its `build`)
or "module:function" in STAGE_SPECS; `made_from` is the stage's fingerprint, handed down so that
a stage can key its resumable checkpoints by it (stages never import this module). It is
complete when its
`metrics.json` exists and carries the fingerprint of the configuration it was made from:
the stage's own config sections, the seed, the labkit version that builds it, and its inputs'
fingerprints. Change `vocab_size` and the tokenizer (and everything after it) is rebuilt; install
a new labkit and every stage is rebuilt; change nothing and it is reused.

Under torchrun (labkit/distributed.py) rank 0 plans, builds the stages that train nothing alone
and writes every stage's metrics and wandb run; the stages in TRAINED_TOGETHER are built by every
process, whose training loops share out each batch. After each stage all processes meet at a
barrier, so the next one reads what rank 0 wrote.

A stage that also learns from files a person edits (rlhf: the rankings) names in MADE_FROM_FILES
a function `(config, run) -> JSON-able` that sums up their content; that summary is part of the
stage's fingerprint, so `labkit run` rebuilds the stage after a new ranking, as a notebook does.
"""

from __future__ import annotations

import contextlib
import importlib

from tqdm.auto import tqdm

from . import __version__
from .config import STAGES, Config, ConfigError, resolve_device
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


# the stages every process builds under torchrun (their training loops go through DDP), and the
# batch sizes each process takes an equal share of
TRAINED_TOGETHER = {
    "base": ("train.batch_size",),
    "sft": ("sft.batch_size",),
    "rlhf": ("reward_model.batch_size", "dpo.batch_size"),
    "grpo": ("sft.batch_size",),  # the cold start
    "halluc": ("halluc.batch_size",),
}


def check_world_size(stages, config: Config, world_size: int) -> None:
    """Every batch the stages share out splits evenly over the processes, before any work starts."""
    for stage in stages:
        for name in TRAINED_TOGETHER.get(stage, ()):
            section, field = name.split(".")
            size = getattr(getattr(config, section), field)
            if size % world_size:
                raise ConfigError(
                    f"{name}={size} does not split over {world_size} processes (torchrun --nproc_per_node="
                    f"{world_size}); allowed: a multiple of {world_size}, or another number of processes"
                )


def _check(stage: str) -> None:
    if stage not in STAGE_SPECS:
        raise ConfigError(f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}")


def stage_fingerprint(stage: str, config: Config, run: Run) -> str:
    _, sections, inputs = STAGE_SPECS[stage]
    made_from = {s: getattr(config, s).__dict__ for s in sections}
    parts = [stage, __version__, config.seed, made_from, [stage_fingerprint(i, config, run) for i in inputs]]
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

    from .distributed import barrier, broadcast, setup_distributed

    processes = setup_distributed(resolve_device(config.device))
    main = processes.is_main
    # rank 0's plan: the others would look at a folder that rank 0 may be changing
    todo = broadcast(plan(stage, config, run, force) if main else None)
    check_world_size(todo, config, processes.world_size)
    for name in tqdm(todo, desc=f"building {stage}", disable=len(todo) < 2 or not main):
        if not main and name not in TRAINED_TOGETHER:
            barrier()  # rank 0 builds it alone
            continue
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        module, _, function = STAGE_SPECS[name][0].partition(":")
        build = getattr(importlib.import_module(module), function or "build")
        if main:
            run.metrics_path(name).unlink(missing_ok=True)  # incomplete until the new metrics land
        made_from = stage_fingerprint(name, config, run)
        with run.tracking(name, config.to_dict()) if main else contextlib.nullcontext() as tracker:
            metrics = build(config, run, made_from)
            if torch.cuda.is_available():  # the memory plan, checked: the most this stage held at once
                metrics["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if main:
                tracker.summary.update(metrics)
        if main:
            run.write_metrics(name, metrics, made_from)
        barrier()  # the next stage, on every process, reads what rank 0 wrote
    return run.metrics(stage)
