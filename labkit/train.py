"""The training loop: one loop for pretraining, SFT, the reward model and DPO.

The lesson: every stage of an LLM's life trains the same way, and only the loss changes.
A stage hands this loop a model, a batch source and a `loss_fn(model, batch) -> (loss, metrics)`;
the loop does the rest, the way nanoGPT does it:

- AdamW (the fused kernel on CUDA), with weight decay on 2-D weights only; or Muon on the
  blocks' weight matrices and AdamW on the rest (`train.optimizer`);
- the learning rate rises linearly for `warmup_steps` (early gradients are large and noisy),
  then follows a cosine down to `min_lr` at `max_steps`;
- `grad_accum` micro-batches are summed into one step (a big batch on a small machine: each
  micro-loss is divided by `grad_accum`, so the gradient equals the big batch's);
- the gradient norm is clipped to `grad_clip` (one bad batch cannot throw the weights away);
- bf16 autocast and `torch.compile` on CUDA;
- a validation pass every `eval_every` steps, progress with tqdm, metrics to wandb;
- atomic checkpoints (labkit/checkpoint.py) holding everything the next step depends on (weights, optimizer moments,
  step, every random generator, the batch source's position): a run killed at any moment
  resumes from its last checkpoint and ends with the same weights as a run never killed;
- several processes through `torchrun` and PyTorch DDP (labkit/distributed.py): each process
  takes its equal share of every global batch, and the gradients are averaged across processes
  on the last micro-batch of a step. The gradient of the mean loss over the global batch is the
  mean of the shards' gradients, so N processes take the same steps as one process on the whole
  batch, and every process holds the same weights; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from .checkpoint import resume, rng_state, save_checkpoint, set_rng_state
from .config import ConfigError, TrainConfig
from .distributed import Distributed, setup_distributed
from .model import Block
from .run import notify


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


# --- devices, precision, processes ------------------------------------------------------------


def autocast_dtype(cfg: TrainConfig, device: str) -> torch.dtype | None:
    """bf16 autocast on CUDA ('auto' or 'bfloat16'), none elsewhere."""
    on_cuda = torch.device(device).type == "cuda"
    if cfg.dtype == "bfloat16" and not on_cuda:
        raise ConfigError(
            f"train.dtype='bfloat16' needs a CUDA device, got device={device!r}; allowed here: auto, float32"
        )
    return torch.bfloat16 if on_cuda and cfg.dtype in ("auto", "bfloat16") else None


# dense bf16 tensor-core peak of common GPUs, for model FLOPs utilisation (MFU)
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "4090": 165e12,
    "3090": 71e12,
}


def peak_flops(device: str) -> float | None:
    """The bf16 peak FLOP/s of the CUDA device, when it is one we know (else None)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def autocast(device: str, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def shard(batch, rank: int, world_size: int):
    """This process's rows of a global batch (tensors, or tuples / dicts of them, batch dim first)."""
    if world_size == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        if batch.size(0) % world_size:
            raise ValueError(
                f"a batch of {batch.size(0)} rows does not split over {world_size} processes; "
                f"make train.batch_size a multiple of the number of processes"
            )
        return batch.chunk(world_size)[rank]
    return _map(batch, lambda t: shard(t, rank, world_size))


def to_device(batch, device: str):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return _map(batch, lambda t: to_device(t, device))


def _map(batch, fn):
    """`fn` applied to each part of a dict, tuple or named tuple of batch parts."""
    if isinstance(batch, dict):
        return {k: fn(v) for k, v in batch.items()}
    items = [fn(v) for v in batch]
    return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)


def _first_tensor(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, dict) else batch
    return _first_tensor(next(iter(values)))


# --- optimizer, checkpoints --------------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: str):
    """The one way labkit builds an optimizer, for any model (a GPT, a reward model, PPO's policy
    and value together).

    adamw: AdamW with weight decay on tensors of 2 or more dimensions only (shrinking a bias or a
    norm's gain towards zero is no regularisation), fused on CUDA.
    muon: Muon on the 2-D weight matrices inside the Transformer blocks (momentum, then the update
    orthogonalised by Newton-Schulz iterations: every direction of the matrix moves alike), at
    `muon_lr`; AdamW as above on everything else (embeddings, heads, norms, biases), at
    `learning_rate`. Embeddings and heads stay with AdamW because a row of them is one token's,
    not a direction of a linear map (nanochat, modded-nanogpt).
    """
    device_type = torch.device(device).type
    params = [p for p in model.parameters() if p.requires_grad]
    muon_ids = {id(p) for p in block_matrices(model)} if cfg.optimizer == "muon" else set()
    rest = [p for p in params if id(p) not in muon_ids]
    groups = [
        dict(params=[p for p in rest if p.dim() >= 2], weight_decay=cfg.weight_decay),
        dict(params=[p for p in rest if p.dim() < 2], weight_decay=0.0),
    ]
    adamw = torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.learning_rate,
        betas=(cfg.beta1, cfg.beta2),
        fused=device_type == "cuda",
    )
    if not muon_ids:
        return adamw
    # Muon follows the same schedule as AdamW, at muon_lr / learning_rate times its rate; no
    # weight decay (modded-nanogpt's records: weight_decay stays AdamW's)
    muon = Muon(
        [p for p in params if id(p) in muon_ids],
        lr=cfg.muon_lr,
        momentum=cfg.muon_momentum,
        weight_decay=0.0,
        ns_dtype=torch.bfloat16 if device_type == "cuda" else torch.float32,
    )
    for group in muon.param_groups:
        group["lr_scale"] = cfg.muon_lr / cfg.learning_rate if cfg.learning_rate > 0 else 0.0
    return Optimizers(muon, adamw)


def rl_optimizer(model: torch.nn.Module, cfg: TrainConfig, learning_rate: float, device: str):
    """The optimizer of an RL loop (PPO, GRPO): pretraining's kind, betas and Muon-to-AdamW ratio at
    `learning_rate`, without weight decay (the KL term, not decay, holds the policy near its start)."""
    rates = dict(learning_rate=learning_rate, muon_lr=muon_lr_at(cfg, learning_rate), weight_decay=0.0)
    return make_optimizer(model, dataclasses.replace(cfg, **rates), device)


class Muon(torch.optim.Muon):
    """torch's Muon, with the Newton-Schulz iterations in a chosen precision. torch runs them in
    bfloat16, cheap on a GPU; on a CPU without bfloat16 matrix units that is about 25x slower than
    float32 (the `cpu` preset's 24 block matrices: about 5 s a step against 0.2 s). The update is
    torch's otherwise (tested)."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **kw):
        super().__init__(params, **kw)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = orthogonalise(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                # a tall matrix takes a larger step: its orthogonalised update has a smaller RMS
                p.add_(update, alpha=-group["lr"] * max(1, p.shape[0] / p.shape[1]) ** 0.5)
        return loss


def orthogonalise(g: torch.Tensor, coefficients, steps: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Newton-Schulz: a quintic polynomial in g g^T applied `steps` times pushes every singular
    value of g towards 1 (roughly U V^T of g's SVD), so every direction of the update moves alike."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def block_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The 2-D weights of every Transformer block in `model` (Muon's share)."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    return [p for block in blocks for p in block.parameters() if p.dim() == 2 and p.requires_grad]


class Optimizers:
    """Several optimizers stepped as one (Muon and AdamW): the loop, the schedule and the
    checkpoints see one `param_groups`, `step`, `zero_grad`, `state_dict`."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return dict(optimizers=[o.state_dict() for o in self.optimizers])

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)


def set_lr(optimizer, lr: float) -> None:
    """Every group at `lr` (AdamW's rate), times its `lr_scale` (Muon's groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# --- the loop ------------------------------------------------------------------------------------


class LossOf(torch.nn.Module):
    """A model and its loss as one module, the one DDP wraps. DDP averages gradients only for
    what runs inside its own forward: a loss that called `ddp.module.score(...)` would train each
    process on its own shard, silently. Here DDP's forward is `loss_fn(model, batch)`, and
    `loss_fn` gets the model itself, whatever it calls (`score`, `hidden_states`, ...)."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    train_seconds: float
    history: list[dict] = field(default_factory=list)  # one row per step: step, loss, lr (+ val_loss on evals)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def val_loss(self) -> float | None:
        return next((row["val_loss"] for row in reversed(self.history) if "val_loss" in row), None)


@torch.no_grad()
def evaluate(model, loss_fn, batches, device: str, dtype=None, dist_info: Distributed | None = None) -> float:
    """Mean loss over `batches`: each process evaluates every world_size-th batch, and the sums
    are added up across processes, so the result is the same as one process gets alone."""
    dist_info = dist_info or Distributed()
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        if i % dist_info.world_size != dist_info.rank:
            continue
        batch = to_device(batch, device)
        with autocast(device, dtype):
            loss, _ = loss_fn(model, batch)
        total += loss.float()
        count += 1
    if dist_info.world_size > 1:
        dist.all_reduce(total)
        dist.all_reduce(count)
    model.train(was_training)
    return (total / count.clamp(min=1)).item()


def train(
    model: torch.nn.Module,
    loss_fn,
    batches,
    cfg: TrainConfig,
    *,
    device: str = "cpu",
    val_batches: Callable[[], object] | None = None,
    checkpoint: str | Path | None = None,
    resume_key: str | None = None,
    run=None,
    on_eval: Callable[[dict], None] | None = None,
    stop_at_step: int | None = None,
    desc: str = "training",
    progress: bool = True,
    loss_terms: Callable[[object], torch.Tensor] | None = None,
) -> TrainResult:
    """Train `model` for `cfg.max_steps` optimizer steps; return the step count and history.

    loss_fn(model, batch) -> (loss tensor: a mean over the batch's rows, or over what `loss_terms`
    counts; metrics dict of floats); it gets the model itself, never a DDP wrapper.
    batches: `.next()` gives the next global micro-batch (tensors or tuples / dicts of them,
    batch dimension first; under torchrun each process takes its share of the rows); if it has
    `state_dict` / `load_state_dict` its position is checkpointed.
    val_batches: a function returning an iterable of batches, the same ones each time.
    checkpoint: the training checkpoint's path; if it exists and carries `resume_key`, training
    resumes from it; it is written every `cfg.checkpoint_every` steps and at the end.
    run: a `labkit.run.Run` whose `log` gets step metrics (wandb).
    on_eval(event): called after each validation pass (and then `labkit.run.watch` callbacks
    watching the loop `desc`);
    keys it adds to `event` (JSON-able: a text sample, say) are kept in that step's history row;
    the random generators are saved and restored around it, so what it does (sampling text,
    drawing plots) never changes the training.
    desc, progress: the progress bar's label (also the loop's name for `watch`), and whether to show it.
    stop_at_step: stop early after this step (a run "killed" there, for tests); the learning
    rate schedule still runs to max_steps.
    loss_terms(batch): how many terms the batch's mean loss averages over, for a loss where that
    varies from row to row (SFT's assistant tokens). Under torchrun each process's loss is then
    weighted by its share of the global batch's terms, so the step is the one-process step: the
    mean over all the batch's terms, not the mean of the processes' means.
    """
    dist_info = setup_distributed(device)
    if dist_info.world_size > 1 and torch.device(device).type == "cuda":
        device = f"cuda:{dist_info.local_rank}"
        torch.cuda.set_device(device)
    dtype = autocast_dtype(cfg, device)
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what float32 matmuls remain (outside autocast) use TF32
        torch.backends.cudnn.allow_tf32 = True
    raw = model.to(device)
    optimizer = make_optimizer(raw, cfg, device)

    step, tokens_seen, train_seconds, history = 0, 0, 0.0, []
    if (state := resume(checkpoint, resume_key)) is not None:
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, tokens_seen, train_seconds, history = (
            state["step"],
            state["tokens_seen"],
            state["train_seconds"],
            state["history"],
        )
        if hasattr(batches, "load_state_dict"):
            batches.load_state_dict(state["batches"])
        set_rng_state(state["rng"])

    compiled = torch.compile(raw) if cfg.compile and torch.device(device).type == "cuda" else raw
    trained = LossOf(compiled, loss_fn)  # compiled before DDP wraps it, as nanoGPT does
    if dist_info.world_size > 1:
        trained = DDP(trained, device_ids=[dist_info.local_rank] if torch.device(device).type == "cuda" else None)

    def save():
        if dist_info.is_main and checkpoint is not None:
            save_checkpoint(
                checkpoint,
                dict(
                    model=raw.state_dict(),
                    optimizer=optimizer.state_dict(),
                    step=step,
                    tokens_seen=tokens_seen,
                    train_seconds=train_seconds,
                    history=history,
                    rng=rng_state(),
                    resume_key=resume_key,
                    batches=batches.state_dict() if hasattr(batches, "state_dict") else None,
                ),
            )

    def validate(row: dict):
        if val_batches is not None:
            row["val_loss"] = evaluate(compiled, loss_fn, val_batches(), device, dtype, dist_info)
        if dist_info.is_main:
            if "val_loss" in row:
                _log(run, {"val/loss": row["val_loss"]}, step)
            event = dict(row, loop=desc, row=row, tokens_seen=tokens_seen, history=history, model=raw)
            saved = rng_state()
            if on_eval is not None:
                on_eval(event)
            notify(event)
            set_rng_state(saved)
            # what a callback adds to the event (a text sample, say) is kept in the history
            row.update(
                {
                    k: v
                    for k, v in event.items()
                    if k not in row and k not in ("loop", "row", "tokens_seen", "history", "model")
                }
            )

    last = min(cfg.max_steps, stop_at_step or cfg.max_steps)
    bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, disable=not (progress and dist_info.is_main), leave=False)
    trained.train()
    if step == 0 and val_batches is not None:  # the loss of the untrained model, for the curve's start
        history.append(dict(step=0, lr=0.0))
        validate(history[-1])
    while step < last:
        start = time.perf_counter()
        lr = lr_at(step, cfg)
        set_lr(optimizer, lr)
        step_loss, step_metrics = torch.zeros((), device=device), {}
        for micro in range(cfg.grad_accum):
            batch = batches.next()
            tokens_seen += _first_tensor(batch).numel()
            batch = to_device(shard(batch, dist_info.rank, dist_info.world_size), device)
            weight = 1.0
            if dist_info.world_size > 1:  # average gradients across processes on the last micro-batch only
                trained.require_backward_grad_sync = micro == cfg.grad_accum - 1
                weight = _share_of_terms(loss_terms, batch, dist_info.world_size)
            with autocast(device, dtype):
                loss, metrics = trained(batch)
            loss = loss * weight
            (loss / cfg.grad_accum).backward()
            step_loss += loss.detach().float() / cfg.grad_accum
            for k, v in metrics.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + float(v) / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(
            raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dist_info.world_size > 1:  # the loss and metrics of the global batch: the processes' mean
            step_loss, step_metrics = _mean_over_processes(step_loss, step_metrics, dist_info.world_size)
        row = dict(step=step + 1, loss=step_loss.item(), lr=lr, grad_norm=grad_norm.item(), **step_metrics)
        step += 1
        train_seconds += time.perf_counter() - start
        history.append(row)
        _log(
            run if dist_info.is_main else None,
            {
                "train/loss": row["loss"],
                "train/lr": lr,
                "train/grad_norm": row["grad_norm"],
                "train/tokens_seen": tokens_seen,
                **{f"train/{k}": v for k, v in step_metrics.items()},
            },
            step,
        )
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}")
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            validate(row)
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == last:
            save()
    bar.close()
    return TrainResult(step, tokens_seen, train_seconds, history)


def _share_of_terms(loss_terms, batch, world_size: int):
    """This process's terms (of `loss_terms`) over the mean per process: 1 for equal shares."""
    if loss_terms is None:  # every row one term, and every process as many rows
        return 1.0
    mine = torch.as_tensor(loss_terms(batch), dtype=torch.float32, device=_first_tensor(batch).device)
    total = mine.clone()
    dist.all_reduce(total)
    return mine * world_size / total


def _mean_over_processes(loss: torch.Tensor, metrics: dict, world_size: int) -> tuple[torch.Tensor, dict]:
    values = torch.tensor([loss.item(), *metrics.values()], dtype=torch.float64, device=loss.device)
    dist.all_reduce(values)  # a sum: gloo has no average
    values /= world_size
    return values[0], dict(zip(metrics, values[1:].tolist()))


def _log(run, metrics: dict, step: int) -> None:
    if run is not None:
        run.log(metrics, step=step)


def fine_tuning(
    cfg: TrainConfig,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    min_lr: float | None = None,
    warmup_steps: int | None = None,
    eval_every: int | None = None,
) -> TrainConfig:
    """Pretraining's optimizer settings (betas, weight decay, clipping, precision) with a later
    model's length, batch and learning rates. Unless given: cosine down to a tenth of the peak,
    pretraining's warmup (at most a tenth of the steps), evaluated and saved 5 times. Muon's rate
    moves with AdamW's (`muon_lr_at`)."""
    every = eval_every or max(1, steps // 5)
    return dataclasses.replace(
        cfg,
        max_steps=steps,
        batch_size=batch_size,
        grad_accum=1,
        learning_rate=learning_rate,
        muon_lr=muon_lr_at(cfg, learning_rate),
        min_lr=learning_rate / 10 if min_lr is None else min_lr,
        warmup_steps=min(cfg.warmup_steps, steps // 10) if warmup_steps is None else warmup_steps,
        eval_every=every,
        checkpoint_every=every,
    )


def muon_lr_at(cfg: TrainConfig, learning_rate: float) -> float:
    """Muon's rate for a later stage whose AdamW rate is `learning_rate`: pretraining's ratio of the
    two is kept (a fine-tuning rate lowers every group alike, as nanochat's SFT does)."""
    return cfg.muon_lr * learning_rate / cfg.learning_rate if cfg.learning_rate > 0 else cfg.muon_lr
