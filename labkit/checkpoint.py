"""The one place models and training states are saved and loaded.

Two kinds of file:

- a *model* (`model.pt`): the weights and the config that rebuilds the network, a GPT or a
  `ScalarModel` (the reward and value models); what later stages, notebooks and `labkit chat`
  load;
- a *training checkpoint* (`train_state.pt` and the like): everything the next step depends
  on (weights, optimizer moments, step, random generators, the batch source's position), so a
  run killed at any moment resumes to the same weights as a run never killed.

Both are written atomically (a temporary file, then a rename) and read onto the CPU first:
a checkpoint written on a GPU loads on a laptop, and the random generators' states, which
torch keeps on the CPU, are restored from CPU tensors whatever the device.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError
from .errors import LabkitError
from .model import GPT, GPTConfig, ScalarModel
from .run import Run, atomic_path

# the post-trained models a run holds, and the stage that makes each
MODEL_STAGE = {"base": "base", "sft": "sft", "ppo": "rlhf", "dpo": "rlhf", "grpo": "grpo", "halluc": "halluc"}


def save_model(path: str | Path, model: GPT | ScalarModel, extra: dict | None = None) -> None:
    """The weights and the GPTConfig that rebuilds the model, written atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    kind = "scalar" if isinstance(model, ScalarModel) else "gpt"
    with atomic_path(path) as tmp:
        torch.save(dict(config=asdict(model.config), model=state, kind=kind, **(extra or {})), tmp)


def load_model(path: str | Path, device: str = "cpu") -> GPT | ScalarModel:
    """A model saved by `save_model`, in eval mode on `device`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model checkpoint at {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not {"config", "model"} <= set(checkpoint):
        raise LabkitError(
            f"{path} is not a labkit model checkpoint (it needs 'config' and 'model'; "
            f"`labkit.checkpoint.save_model` writes one)"
        )
    body = GPT(GPTConfig(**checkpoint["config"]))
    model = ScalarModel(body) if checkpoint.get("kind") == "scalar" else body
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()


def model_path(run: Run, model_name: str = "sft") -> Path:
    """Where a post-trained model lives; a clear error naming the command that makes it if it is missing."""
    if model_name not in MODEL_STAGE:
        raise ConfigError(f"unknown model {model_name!r}; allowed: {', '.join(MODEL_STAGE)}")
    path = run.path / model_name / "model.pt"
    if not path.exists():
        raise FileNotFoundError(
            f"no {model_name} model at {path}; make it with `labkit run{run.where} --stages {MODEL_STAGE[model_name]}`"
        )
    return path


def rng_state() -> dict:
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save into a temporary file that replaces `path` only once it is complete."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint, on the CPU (`load_state_dict` moves weights and optimizer state to
    the parameters' device)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def resume(path: str | Path | None, resume_key: str | None) -> dict | None:
    """The training checkpoint at `path` if it exists and was made by the same run (same key), else None."""
    if path is None or not Path(path).exists():
        return None
    state = load_checkpoint(path)
    return state if state.get("resume_key") == resume_key else None
