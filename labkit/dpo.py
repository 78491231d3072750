"""DPO (Direct Preference Optimization): learn from the rankings without a reward model or sampling.

The policy starts as the SFT model and a frozen copy is the reference. For each pair, the loss
asks the policy to raise the chosen answer's log-probability relative to the reference more than
the rejected one's:

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

so beta * (log pi - log ref) acts as an implicit reward. The completions' log-probabilities come
from `engine.logprobs` (summed over each completion's tokens). `dpo_loss` is tested to equal
Hugging Face TRL's DPOTrainer sigmoid loss.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch.nn import functional as F

from .distributed import is_main_process
from .engine import Completions, logprobs, score
from .preferences import PairBatches, pair_examples
from .run import write_json
from .train import fine_tuning, train


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss on summed completion log-probabilities. Returns (loss, chosen rewards,
    rejected rewards); the implicit reward of an answer is beta * (log pi - log pi_ref)."""
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    return loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def make_dpo_loss(beta: float):
    def loss_fn(model, batch):
        B = batch["chosen"].ids.size(0)
        both = Completions(*(torch.cat(parts) for parts in zip(batch["chosen"], batch["rejected"])))
        logps = logprobs(model, both).sum(1)
        loss, chosen, rejected = dpo_loss(logps[:B], logps[B:], batch["ref_chosen"], batch["ref_rejected"], beta)
        return loss, {
            "rewards/chosen": chosen.mean().item(),
            "rewards/rejected": rejected.mean().item(),
            "rewards/accuracy": (chosen > rejected).float().mean().item(),
            "rewards/margin": (chosen - rejected).mean().item(),
        }

    return loss_fn


def reference_logps(ref, examples: list, max_batch: int) -> dict:
    """Every pair's summed completion log-probabilities under the frozen reference, computed once."""
    ref.eval()
    chosen, _ = score(ref, [e[0] for e in examples], [e[1] for e in examples], max_batch=max_batch)
    rejected, _ = score(ref, [e[2] for e in examples], [e[3] for e in examples], max_batch=max_batch)
    return dict(ref_chosen=chosen.sum(1).cpu(), ref_rejected=rejected.sum(1).cpu())


def train_dpo(sft, tokenizer, train_pairs, config, run, folder: Path, device: str, resume_key: str):
    """The policy starts as the SFT model; the reference is a frozen copy; the shared loop trains it."""
    d = config.dpo
    pad = tokenizer.encode_special("<|endoftext|>")
    policy, ref = copy.deepcopy(sft), copy.deepcopy(sft).to(device)
    examples = pair_examples(train_pairs, tokenizer, sft.config.block_size)
    batches = PairBatches(examples, d.batch_size, config.seed, pad, reference_logps(ref, examples, config.max_batch))
    result = train(
        policy,
        make_dpo_loss(d.beta),
        batches,
        fine_tuning(config.train, steps=d.steps, batch_size=d.batch_size, learning_rate=d.learning_rate),
        device=device,
        checkpoint=folder / "train_state.pt",
        resume_key=resume_key,
        run=run,
        desc="dpo",
    )
    policy.eval()
    if is_main_process():
        write_json(folder / "history.json", result.history)
    return policy, result.history
