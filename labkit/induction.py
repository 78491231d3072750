"""Induction heads: how a small GPT learns to copy from its context, and the moment it does.

The lesson: in-context learning rests on a simple circuit. Two attention heads in two layers
work together (Olsson et al., 2022, "In-context learning and induction heads"):

- a *previous-token head* writes into every position which token came just before it;
- an *induction head*, one layer later, looks for an earlier position whose previous token is
  the current token, i.e. the token that followed the last time the current token appeared, and
  copies it: having seen "... A B ... A", it predicts "B".

Here a tiny GPT (2 layers, 2 heads, width 64) trains on nothing but random tokens that repeat:
a segment of 8 to 24 random tokens, repeated until the 48-token context is full. The first copy
of the segment cannot be predicted (its tokens are random); every later token can, but only by
finding the same token earlier in the context and reading what followed it, since the distance
back (the segment's length) differs from sequence to sequence. No fixed offset, no memorised
token works: only an induction pair does. For a few hundred steps the model gains little from
the context; then, within some tens of steps, the loss on the repeats falls far below the first
copy's, which stays at chance: a *phase change*. The attention read-out (`attention_patterns`,
`head_scores`) shows the two heads that formed, and segments shorter than any the toy trained on
(`ToyConfig.unseen_period`) are copied as well: the rule found is the general one.

The model uses rotary positions (`arch="modern"`): attending to the previous token is one fixed
rotation away. With GPT-2's learned position embeddings the same toy first has to learn what
"previous" means for each of the 48 positions, and no jump comes within the toy's budget.

The in-context learning (ICL) score is Olsson's: the loss late in the context minus the loss
early in it (they took token 500 minus token 50). It is negative when the context helps. For
the toy, late is the repeats and early the first copy; for the base model of stage 3, the last
eighth of the context and its second sixteenth (`loss_by_position`, `icl_score`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .config import TrainConfig
from .dataloader import sequential_batches
from .model import GPT, GPTConfig
from .train import train


@dataclass
class ToyConfig:
    """The toy's data, model and optimizer. With these, copy accuracy passes 50% at steps 325,
    350 and 400 for seeds 0, 1 and 2, and ends at 0.90-0.92 (with 4 heads a layer: about step 450;
    arch gpt2: a slow climb, 0.19 at step 500 and 0.45 at step 2,500)."""

    length: int = 48  # the context
    shortest: int = 8  # the repeated segment's length is drawn from shortest .. longest
    longest: int = 24
    vocab_size: int = 64
    arch: str = "modern"
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    batch_size: int = 32
    learning_rate: float = 3e-3
    steps: int = 600
    record_every: int = 25  # steps between measurements
    n_probes: int = 128  # held-out sequences the measurements average over
    # a segment length outside shortest .. longest: copied only by the general rule. Shorter, not
    # longer: no training sequence needed to look back further than `longest` tokens, and segments
    # of 32 are copied at 0.37 after the jump (those of 4-20 at 0.92-0.95)
    unseen_period: int = 5


def periodic_sequences(n: int, toy: ToyConfig, generator: torch.Generator, period: int | None = None):
    """(ids [n, toy.length], periods [n]): each row a segment of random tokens repeated until the
    context is full, the segment `period` long, or shortest .. longest drawn per row."""
    if period is None:
        periods = torch.randint(toy.shortest, toy.longest + 1, (n,), generator=generator)
    else:
        periods = torch.full((n,), period)
    ids = torch.empty(n, toy.length, dtype=torch.long)
    for row, p in zip(ids, periods.tolist()):
        row[:] = torch.randint(0, toy.vocab_size, (p,), generator=generator).repeat(toy.length // p + 1)[: toy.length]
    return ids, periods


def probe_sequence(toy: ToyConfig, period: int = 16, seed: int = 0) -> torch.Tensor:
    """[toy.length] ids: `period` distinct random tokens, repeated. Distinct, so that each token's
    earlier copies are the segment's repeats only and an induction head draws clean diagonals."""
    segment = torch.randperm(toy.vocab_size, generator=torch.Generator().manual_seed(seed))[:period]
    return segment.repeat(toy.length // period + 1)[: toy.length]


class PeriodicBatches:
    """Fresh periodic sequences at every `next()`, as (inputs, targets) for `labkit.train.train`."""

    def __init__(self, toy: ToyConfig, seed: int = 0):
        self.toy, self.generator = toy, torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids, _ = periodic_sequences(self.toy.batch_size, self.toy, self.generator)
        return ids[:, :-1], ids[:, 1:]


def next_token_loss(model, batch):
    x, y = batch
    _, loss = model(x, y)
    return loss, {}


# --- measuring ------------------------------------------------------------------------------------


@torch.no_grad()
def copy_measures(model, ids: torch.Tensor, periods: torch.Tensor) -> dict:
    """Loss (nats per token) on each sequence's first copy of its segment and on the repeats,
    copy accuracy (greedy next token right on the repeats) and the ICL score (the repeats' loss
    minus the first copy's), for periodic ids [B, T] with segment lengths periods [B].

    Target j (predicted at position j - 1) is in the first copy for 1 <= j < period (token 0 is
    no target), in the repeats for j >= period."""
    model.eval()
    device = next(model.parameters()).device
    ids = ids.to(device)
    logits, _ = model(ids[:, :-1])
    losses = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T - 1]
    target = torch.arange(1, ids.size(1), device=device)[None]
    repeat = target >= periods.to(device)[:, None]
    right = (logits.argmax(-1) == ids[:, 1:]).float()
    first_loss, repeat_loss = losses[~repeat].mean(), losses[repeat].mean()
    return dict(
        first_copy_loss=first_loss.item(),
        repeat_loss=repeat_loss.item(),
        copy_accuracy=right[repeat].mean().item(),
        icl_score=(repeat_loss - first_loss).item(),
    )


def train_toy(toy: ToyConfig | None = None, seed: int = 0, device: str = "cpu"):
    """Train a tiny GPT on periodic sequences only, measuring it every `toy.record_every` steps.

    Returns (model, history): history holds a row per measurement with `step`, `first_copy_loss`,
    `repeat_loss`, `copy_accuracy` and `icl_score` (on `toy.n_probes` held-out sequences) and
    `unseen_period_copy_accuracy` (on sequences whose segment is `toy.unseen_period` long), plus
    the training loss of every step, as `labkit.train.train` records it."""
    toy = toy or ToyConfig()
    torch.manual_seed(seed)
    shape = dict(n_layer=toy.n_layer, n_head=toy.n_head, n_embd=toy.n_embd, arch=toy.arch)
    model = GPT(GPTConfig(block_size=toy.length, vocab_size=toy.vocab_size, **shape))
    cfg = TrainConfig(
        max_steps=toy.steps,
        batch_size=toy.batch_size,
        learning_rate=toy.learning_rate,
        min_lr=toy.learning_rate,  # constant after warmup: a shorter run is a longer one's start
        warmup_steps=10,
        weight_decay=0.0,  # nothing to regularise: every batch is fresh
        eval_every=toy.record_every,
        checkpoint_every=0,
    )
    held_out = torch.Generator().manual_seed(-1 - seed)  # never a training batch
    probes = periodic_sequences(toy.n_probes, toy, held_out)
    unseen = periodic_sequences(toy.n_probes, toy, held_out, period=toy.unseen_period)

    def measure(event: dict) -> None:
        event.update({k: round(v, 4) for k, v in copy_measures(event["model"], *probes).items()})
        event["unseen_period_copy_accuracy"] = round(copy_measures(event["model"], *unseen)["copy_accuracy"], 4)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the toy's ops are too small to share out: more threads only wait on each other
    try:
        result = train(
            model,
            next_token_loss,
            PeriodicBatches(toy, seed),
            cfg,
            device=device,
            val_batches=lambda: [(probes[0][:, :-1], probes[0][:, 1:])],
            on_eval=measure,
            desc="induction",
            # no bar: in notebooks its ~10 updates a second for a minute made nbval lose the
            # kernel's output now and then ("Timeout of 5 seconds exceeded waiting for output")
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, result.history


def measurements(history: list[dict]) -> list[dict]:
    """The rows of a toy's history that hold measurements (every `record_every` steps)."""
    return [row for row in history if "copy_accuracy" in row]


def jump_step(history: list[dict], threshold: float = 0.5) -> int | None:
    """The first measured step at which copy accuracy passes `threshold` (None: never)."""
    return next((row["step"] for row in measurements(history) if row["copy_accuracy"] >= threshold), None)


# --- attention patterns ---------------------------------------------------------------------------


def attention_weights(attn, x: torch.Tensor, rope=None) -> torch.Tensor:
    """The attention weights [B, n_head, T, T] of a `CausalSelfAttention` given its input
    x [B, T, C] (already normed): softmax(q k^T / sqrt(head_size)) with the causal mask, from
    the layer's own queries and keys (rotated by `rope` in the modern recipe). Row i is how
    position i spreads its attention over positions 0 .. i."""
    q, k, _ = attn.queries_keys_values(x, rope)
    T = x.size(1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(diagonal=1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


@torch.no_grad()
def attention_patterns(model, ids: torch.Tensor) -> torch.Tensor:
    """Every head's attention weights on a sequence: ids [T] -> [n_layer, n_head, T, T]
    (ids [B, T] -> [B, n_layer, n_head, T, T]). The blocks run as in the model's forward."""
    model.eval()
    batched = ids.dim() == 2
    ids = (ids if batched else ids[None]).to(next(model.parameters()).device)
    x, rope = model.embed(ids, torch.arange(ids.size(1), device=ids.device))
    patterns = []
    for block in model.transformer.h:
        patterns.append(attention_weights(block.attn, block.ln_1(x), rope))
        x = block(x, rope=rope)
    patterns = torch.stack(patterns, dim=1).cpu()
    return patterns if batched else patterns[0]


def induction_targets(ids: torch.Tensor) -> torch.Tensor:
    """[T, T] bool for ids [T]: key j is an induction target of query i when the token before j
    is the token at i (j <= i): what followed the current token when it appeared before."""
    T = ids.size(-1)
    previous = torch.cat([ids.new_full((1,), -1), ids[:-1]])  # the token before each key
    return (previous[None, :] == ids[:, None]) & torch.ones(T, T, dtype=torch.bool).tril()


def previous_token_score(pattern: torch.Tensor) -> float:
    """Mean attention of position i to position i - 1 (i >= 1), for one head's [T, T] pattern."""
    return pattern.diagonal(offset=-1).mean().item()


def induction_score(pattern: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean attention a position puts on its induction targets (`induction_targets`), over the
    positions of ids [T] that have any, for one head's [T, T] pattern."""
    targets = induction_targets(ids.cpu())
    has = targets.any(-1)
    return (pattern * targets).sum(-1)[has].mean().item() if has.any() else 0.0


def head_scores(patterns: torch.Tensor, ids: torch.Tensor) -> list[dict]:
    """One row per (layer, head) of patterns [n_layer, n_head, T, T] on ids [T]: its
    previous-token and induction scores."""
    return [
        dict(
            layer=layer,
            head=head,
            previous_token=round(previous_token_score(patterns[layer, head]), 4),
            induction=round(induction_score(patterns[layer, head], ids), 4),
        )
        for layer in range(patterns.size(0))
        for head in range(patterns.size(1))
    ]


def best_heads(scores: list[dict]) -> dict:
    """The rows of `head_scores` with the highest previous-token score and induction score."""
    return dict(
        previous_token=max(scores, key=lambda r: r["previous_token"]),
        induction=max(scores, key=lambda r: r["induction"]),
    )


# --- the base model: loss by position ---------------------------------------------------------------


def text_windows(tokens, block_size: int, n: int = 64) -> torch.Tensor:
    """[n, block_size + 1] consecutive windows of a token stream (fewer if it is short)."""
    x, y = next(sequential_batches(tokens, block_size, n, max_batches=1))
    return torch.cat([x[:, :1], y], dim=1)


@torch.no_grad()
def loss_by_position(model, windows: torch.Tensor, max_batch: int = 64) -> list[float]:
    """Mean loss (nats) at each position 0 .. T-2 of windows [N, T] of text: position t predicts
    token t + 1 from the t + 1 tokens before it. A window may be one token longer than the
    context (`engine.score` would feed that last token too, one past the context, so the model's
    forward is used here, `max_batch` rows at a time)."""
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(windows.size(1) - 1, device=device)
    # a pass's logits stay under 2**27 numbers (512 MB): a 1024-token context and a 32k vocabulary take 4 rows
    max_batch = max(1, min(max_batch, 2**27 // (windows.size(1) * model.config.vocab_size)))
    for rows in windows.to(device).split(max_batch):
        logits, _ = model(rows[:, :-1])
        total += F.cross_entropy(logits.float().transpose(1, 2), rows[:, 1:], reduction="none").sum(0)
    return (total / windows.size(0)).tolist()


def icl_score(losses: list[float]) -> float:
    """Olsson's ICL score on a loss-by-position curve: mean loss over the last eighth of the
    context minus mean loss over its second sixteenth (positions T/16 .. T/8; Olsson took token
    500 minus token 50 of 1024). Negative: later tokens are easier, the context helps."""
    T = len(losses)
    early = losses[T // 16 : max(T // 8, T // 16 + 1)]
    late = losses[T - max(1, T // 8) :]
    return sum(late) / len(late) - sum(early) / len(early)
