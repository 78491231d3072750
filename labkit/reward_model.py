"""The reward model: a neural simulation of the people who ranked.

The SFT model's body with a scalar head (`model.ScalarModel`) that reads the last token of a
prompt + answer, trained with the Bradley-Terry loss on the pairs the rankings imply: the
probability that `chosen` beats `rejected` is sigmoid(r_chosen - r_rejected), and training
maximises its log. It is a model of the labelers, so it can be wrong, and a policy optimised
against it can find where (reward hacking).

`reward_loss` is written out and tested to equal Hugging Face TRL's RewardTrainer loss.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch.nn import functional as F

from .checkpoint import save_model
from .distributed import is_main_process
from .engine import chunks, pack
from .model import ScalarModel
from .preferences import PairBatches, pair_examples, prompt_and_reply
from .run import write_json
from .train import fine_tuning, to_device, train


def reward_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Bradley-Terry: the probability that `chosen` beats `rejected` is sigmoid(r_c - r_r); maximise
    its log. An optional margin asks for a bigger gap; the centring term keeps rewards near 0."""
    gap = chosen - rejected if margin is None else chosen - rejected - margin
    loss = -F.logsigmoid(gap).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    return loss


def pair_scores(model: ScalarModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores of a batch of pairs, in one forward pass."""
    B = batch["chosen_last"].size(0)
    scores = model.score(
        torch.cat([batch["chosen"].ids, batch["rejected"].ids]),
        torch.cat([batch["chosen_last"], batch["rejected_last"]]),
    )
    return scores[:B].float(), scores[B:].float()


def make_reward_loss(margin: float = 0.0, center_rewards_coefficient: float = 0.0):
    def loss_fn(model, batch):
        chosen, rejected = pair_scores(model, batch)
        margins = torch.full_like(chosen, margin) if margin else None
        loss = reward_loss(chosen, rejected, margins, center_rewards_coefficient or None)
        return loss, dict(accuracy=(chosen > rejected).float().mean().item(), margin=(chosen - rejected).mean().item())

    return loss_fn


@torch.no_grad()
def pair_accuracy(model: ScalarModel, batches) -> float | None:
    """Share of pairs whose chosen answer the reward model scores higher."""
    model.eval()
    right = total = 0
    device = next(model.parameters()).device
    for batch in batches:
        chosen, rejected = pair_scores(model, to_device(batch, device))
        right += (chosen > rejected).sum().item()
        total += chosen.size(0)
    return right / total if total else None


@torch.no_grad()
def reward_scores(
    reward_model: ScalarModel, tokenizer, prompts: list[dict], replies: list[dict], max_batch: int = 64
) -> list[float]:
    """The reward model's score of each (prompt, reply) (reply: a dict with reply and ended)."""
    if not prompts:
        return []
    device = next(reward_model.parameters()).device
    block = reward_model.config.block_size
    rows = [prompt_and_reply(p, r["reply"], r["ended"], tokenizer, block) for p, r in zip(prompts, replies)]
    batch = pack([p for p, _ in rows], [c for _, c in rows], device, tokenizer.encode_special("<|endoftext|>"))
    last = torch.tensor([len(p) + len(c) - 1 for p, c in rows], device=device)
    return torch.cat(
        [reward_model.score(batch.ids[part], last[part]) for part in chunks(len(rows), max_batch)]
    ).tolist()


def train_reward_model(
    sft, tokenizer, train_pairs, heldout_pairs, config, run, folder: Path, device: str, resume_key: str
):
    """The SFT model's body + a scalar head, trained on the pairs with the shared loop."""
    rm = config.reward_model
    pad = tokenizer.encode_special("<|endoftext|>")
    torch.manual_seed(config.seed)
    model = ScalarModel(copy.deepcopy(sft))
    block = sft.config.block_size
    batches = PairBatches(pair_examples(train_pairs, tokenizer, block), rm.batch_size, config.seed, pad)
    heldout = (
        PairBatches(pair_examples(heldout_pairs, tokenizer, block), rm.batch_size, config.seed, pad)
        if heldout_pairs
        else None
    )
    result = train(
        model,
        make_reward_loss(rm.margin, rm.center_rewards_coefficient),
        batches,
        fine_tuning(config.train, steps=rm.steps, batch_size=rm.batch_size, learning_rate=rm.learning_rate),
        device=device,
        val_batches=heldout.all if heldout else None,
        checkpoint=folder / "train_state.pt",
        resume_key=resume_key,
        run=run,
        desc="reward model",
    )
    model.eval()
    if not is_main_process():  # the same weights on every process; the files and the measuring are rank 0's
        return model, {}
    save_model(folder / "model.pt", model, dict(step=result.step))
    write_json(folder / "history.json", result.history)
    return model, dict(
        rm_pair_accuracy=pair_accuracy(model, heldout.all()) if heldout else None,
        rm_train_pair_accuracy=pair_accuracy(model, batches.all()),
        rm_train_pairs=len(train_pairs),
        rm_heldout_pairs=len(heldout_pairs),
    )
