"""Induction heads: how a small GPT learns to copy from its context, and the moment it does.

The lesson: in-context learning rests on a simple circuit. Two attention heads in two layers
work together (Olsson et al., 2022, "In-context learning and induction heads"):

- a *previous-token head* writes into every position which token came just before it;
- an *induction head*, one layer later, looks for an earlier position whose previous token is
  the current token, i.e. the token that followed the last time the current token appeared, and
  copies it: having seen "... A B ... A", it predicts "B".

Here a tiny GPT (2 layers, width 64) trains on nothing but random token sequences whose second
half repeats the first. The first half cannot be predicted at all (the tokens are random); the
second half can, but only by reading the first half. For a few dozen steps the model learns
next to nothing; then, within some tens of steps, the repeated half's loss falls far below the
first half's, which stays at chance: a *phase change*. The attention read-out
(`attention_patterns`, `head_scores`) shows what formed. With the repeat always 24 tokens back,
it is a shortcut, not an induction pair: one layer-0 head attends 23 positions back by position
alone, and a repeat at another distance is not copied (`shifted_repeats`). Repeats of varying
length and place (`ToyConfig.shortest`) rule the shortcut out, and then this model needs far
more steps than the toy's few hundred.

The in-context learning (ICL) score is Olsson's: the loss late in the context minus the loss
early in it (they took token 500 minus token 50). It is negative when the context helps. For
the toy, late is the repeated half and early the first half; for the base model of stage 3,
the last eighth of the context and its second sixteenth (`loss_by_position`, `icl_score`).
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

# the toy: 24 random tokens, then the same 24 again (a 48-token context)
HALF, VOCAB = 24, 256


def repeated_sequences(
    n: int, half: int = HALF, vocab_size: int = VOCAB, seed: int = 0, generator=None
) -> torch.Tensor:
    """[n, 2 * half] token ids: `half` random tokens followed by the same tokens again (drawn
    from `generator` when given, else from `seed`)."""
    generator = generator or torch.Generator().manual_seed(seed)
    first = torch.randint(0, vocab_size, (n, half), generator=generator)
    return torch.cat([first, first], dim=1)


class RepeatedBatches:
    """Fresh repeated sequences at every `next()`, as (inputs, targets) for `labkit.train.train`.

    With `shortest` below `half`, each row instead holds a segment of `shortest` .. `half` random
    tokens repeated right after it, at a random place among random tokens: the distance to the
    earlier copy varies, so only finding it by its content works (the knob the notebook names)."""

    def __init__(
        self, batch_size: int, half: int = HALF, vocab_size: int = VOCAB, seed: int = 0, shortest: int | None = None
    ):
        self.batch_size, self.half, self.vocab_size = batch_size, half, vocab_size
        self.shortest = half if shortest is None else shortest
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = repeated_sequences(self.batch_size, self.half, self.vocab_size, generator=self.generator)
        if self.shortest < self.half:
            for row in ids:
                length = int(torch.randint(self.shortest, self.half + 1, (), generator=self.generator))
                start = int(torch.randint(0, 2 * (self.half - length) + 1, (), generator=self.generator))
                row[:] = torch.randint(0, self.vocab_size, row.shape, generator=self.generator)
                row[start + length : start + 2 * length] = row[start : start + length]
        return ids[:, :-1], ids[:, 1:]


def shifted_repeats(n: int, half: int, length: int, start: int, vocab_size: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """[n, length] random tokens with `half` tokens at `start` repeated right after them: a repeat
    at another distance and place than the training sequences'. A model that finds the earlier
    copy by its content copies it as well; one that learned "the token 23 places back" does not."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (n, length), generator=generator)
    ids[:, start + half : start + 2 * half] = ids[:, start : start + half]
    return ids


def next_token_loss(model, batch):
    x, y = batch
    _, loss = model(x, y)
    return loss, {}


# --- measuring ------------------------------------------------------------------------------------


@torch.no_grad()
def copy_measures(model, ids: torch.Tensor, half: int = HALF, start: int = 0) -> dict:
    """Loss (nats per token) on a sequence's first copy and on its repeat, copy accuracy (greedy
    next token right on the repeat) and the ICL score (the repeat's loss minus the first copy's),
    for ids [B, T] whose positions start .. start + half - 1 repeat right after.

    The first token of each copy is left out of both: nothing before it says what it will be.
    Position t predicts token t + 1, so the first copy's targets are tokens start + 1 ..
    start + half - 1 and the repeat's are start + half + 1 .. start + 2 * half - 1."""
    model.eval()
    ids = ids.to(next(model.parameters()).device)
    logits, _ = model(ids[:, :-1])
    losses = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T - 1]
    first = losses[:, start : start + half - 1]
    repeat = slice(start + half, start + 2 * half - 1)
    right = logits[:, repeat].argmax(-1) == ids[:, repeat.start + 1 : repeat.stop + 1]
    return dict(
        first_half_loss=first.mean().item(),
        repeated_half_loss=losses[:, repeat].mean().item(),
        copy_accuracy=right.float().mean().item(),
        icl_score=(losses[:, repeat].mean() - first.mean()).item(),
    )


@dataclass
class ToyConfig:
    """The toy's sizes and optimizer: what REFERENCES.md measured (2 layers, width 64, vocabulary
    256, 24-token halves, batch 32, AdamW at 3e-3)."""

    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    vocab_size: int = VOCAB
    half: int = HALF
    batch_size: int = 32
    learning_rate: float = 3e-3
    record_every: int = 10  # steps between measurements
    n_probes: int = 128  # held-out sequences the measurements average over
    other_half: int = 16  # the repeat at another distance: 16 tokens at position 16, repeated at 32
    shortest: int | None = None  # below `half`: repeats of varying length and place (RepeatedBatches)


def toy_steps(preset: str) -> int:
    """The toy's length for a preset. It takes seconds anywhere, so only `tiny` is cut (to a
    length still well past the jump)."""
    return 150 if preset == "tiny" else 300


def train_toy(steps: int = 300, seed: int = 0, toy: ToyConfig | None = None, device: str = "cpu"):
    """Train a tiny GPT on repeated sequences only, measuring it every `toy.record_every` steps.

    Returns (model, history): history holds a row per measurement with `step`, `first_half_loss`,
    `repeated_half_loss`, `copy_accuracy` and `icl_score` (on `toy.n_probes` held-out sequences)
    and `other_distance_copy_accuracy` (on repeats at another distance, `shifted_repeats`), plus
    the training loss of every step, as `labkit.train.train` records it."""
    toy = toy or ToyConfig()
    torch.manual_seed(seed)
    shape = dict(n_layer=toy.n_layer, n_head=toy.n_head, n_embd=toy.n_embd)
    model = GPT(GPTConfig(block_size=2 * toy.half, vocab_size=toy.vocab_size, **shape))
    cfg = TrainConfig(
        max_steps=steps,
        batch_size=toy.batch_size,
        learning_rate=toy.learning_rate,
        min_lr=toy.learning_rate,  # constant after warmup: a shorter run is a longer one's start
        warmup_steps=10,
        weight_decay=0.0,  # nothing to regularise: every batch is fresh
        eval_every=toy.record_every,
        checkpoint_every=0,
    )
    probes = repeated_sequences(toy.n_probes, toy.half, toy.vocab_size, seed=-1 - seed)  # never a training batch
    start = toy.half - toy.other_half // 2
    others = shifted_repeats(toy.n_probes, toy.other_half, 2 * toy.half, start, toy.vocab_size, seed=-2 - seed)

    def measure(event: dict) -> None:
        event.update({k: round(v, 4) for k, v in copy_measures(event["model"], probes, toy.half).items()})
        other = copy_measures(event["model"], others, toy.other_half, start)["copy_accuracy"]
        event["other_distance_copy_accuracy"] = round(other, 4)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the toy's ops are too small to share out: more threads only wait on each other
    try:
        result = train(
            model,
            next_token_loss,
            RepeatedBatches(toy.batch_size, toy.half, toy.vocab_size, seed, toy.shortest),
            cfg,
            device=device,
            val_batches=lambda: [(probes[:, :-1], probes[:, 1:])],
            on_eval=measure,
            desc="induction",
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


def attention_weights(attn, x: torch.Tensor) -> torch.Tensor:
    """The attention weights [B, n_head, T, T] of a `CausalSelfAttention` given its input
    x [B, T, C] (already layer-normed): softmax(q k^T / sqrt(head_size)) with the causal mask,
    from the layer's own query and key projections. Row i is how position i spreads its
    attention over positions 0 .. i."""
    B, T, C = x.size()
    q, k, _ = attn.c_attn(x).split(C, dim=2)
    q, k = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k))
    scores = q @ k.transpose(-2, -1) / math.sqrt(C // attn.n_head)
    future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(diagonal=1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


@torch.no_grad()
def attention_patterns(model, ids: torch.Tensor) -> torch.Tensor:
    """Every head's attention weights on a sequence: ids [T] -> [n_layer, n_head, T, T]
    (ids [B, T] -> [B, n_layer, n_head, T, T]). The blocks run as in the model's forward."""
    model.eval()
    batched = ids.dim() == 2
    ids = (ids if batched else ids[None]).to(next(model.parameters()).device)
    t = model.transformer
    x = t.wte(ids) + t.wpe(torch.arange(ids.size(1), device=ids.device))
    patterns = []
    for block in t.h:
        patterns.append(attention_weights(block.attn, block.ln_1(x)))
        x = block(x)
    patterns = torch.stack(patterns, dim=1).cpu()
    return patterns if batched else patterns[0]


def previous_token_score(pattern: torch.Tensor) -> float:
    """Mean attention of position i to position i - 1 (i >= 1), for one head's [T, T] pattern."""
    return pattern.diagonal(offset=-1).mean().item()


def induction_score(pattern: torch.Tensor, half: int = HALF) -> float:
    """Mean attention, over the repeated half, to the token right after the earlier copy of the
    current token: position i (i >= half) holds the token of i - half, which was followed by
    the token at i - half + 1."""
    return pattern.diagonal(offset=-(half - 1))[1:].mean().item()


def head_scores(patterns: torch.Tensor, half: int = HALF) -> list[dict]:
    """One row per (layer, head) of patterns [n_layer, n_head, T, T]: its previous-token and
    induction scores."""
    return [
        dict(
            layer=layer,
            head=head,
            previous_token=round(previous_token_score(patterns[layer, head]), 4),
            induction=round(induction_score(patterns[layer, head], half), 4),
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
