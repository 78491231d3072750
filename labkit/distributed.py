"""Several processes, one run: `torchrun --nproc_per_node=N -m labkit run`.

torchrun starts N copies of the same command, each with RANK, LOCAL_RANK and WORLD_SIZE in its
environment. They build one run together:

- the training loops of `train.train` (pretraining, SFT and the fine-tunings that follow its
  recipe, the reward model, DPO) run on every process: each takes its share of every global
  batch and PyTorch DDP averages the gradients, so every process holds the same weights;
- everything else (the data and tokenizer stages, evaluation and sampling, PPO and GRPO, every
  file, the wandb run, what is printed) is rank 0's, while the others wait at a barrier and then
  read what it wrote.

A plain `python` run (a notebook, a test) is one process of rank 0, and every function here is
then a no-op.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

# how long a process waits at a barrier: rank 0 alone may run a whole stage's evaluation, PPO or
# GRPO meanwhile (the default, 10 to 30 minutes, is too short for the gpu preset)
BARRIER_TIMEOUT = datetime.timedelta(hours=12)


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    """How many processes torchrun started (1 for a plain run); known before the group is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True unless this is a torchrun process other than rank 0 (only rank 0 writes files)."""
    return int(os.environ.get("RANK", "0")) == 0


def setup_distributed(device: str = "cpu") -> Distributed:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group (nccl on CUDA,
    each process on its own GPU; gloo on CPU). A plain `python` run is one process of rank 0."""
    if world_size() == 1:
        return Distributed()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        on_cuda = torch.device(device).type == "cuda"
        if on_cuda:
            torch.cuda.set_device(local_rank)  # "cuda" now means this process's GPU
        backend = "nccl" if on_cuda else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size(), timeout=BARRIER_TIMEOUT)
        if rank != 0:  # the other processes would repeat rank 0's warnings word for word
            warnings.simplefilter("ignore")
    return Distributed(rank, local_rank, world_size())


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait until every process gets here (rank 0 has written what the others read next)."""
    if _joined():
        dist.barrier(device_ids=[torch.cuda.current_device()] if dist.get_backend() == "nccl" else None)


def broadcast(obj):
    """Rank 0's `obj` (anything picklable) on every process."""
    if not _joined():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_first(build, *args, **kwargs):
    """`build(*args, **kwargs)` on rank 0 first, which makes and writes what is missing; then, past
    a barrier, on the other processes, which find it made and only read it (so `build` must reuse
    what it finds, as the token files and the rankings do)."""
    result = build(*args, **kwargs) if is_main_process() else None
    barrier()
    return result if is_main_process() else build(*args, **kwargs)


def teardown() -> None:
    """Leave the process group at the end of a run (torch warns when a process exits inside one)."""
    if _joined():
        barrier()
        dist.destroy_process_group()
