"""GRPO's groups: the G sampled replies to one prompt, their rewards, and the advantages the
rewards become (the formula is in labkit/grpo.py's docstring).

A group whose G rewards are all equal (all right, or all wrong) has a zero-variance flag and
advantages of exactly 0: it teaches nothing. Exactly, not nearly: the mean of eight rewards of
1.2 is not 1.2 in float32, and that rounding, divided by (std + 1e-4) = 1e-4, would become
advantages of about 1e-3, a small push in a random direction on every sample of the group.
"""

from __future__ import annotations

import torch

from .rewards import combine

STD_EPS = 1e-4  # TRL's constant: advantages / (std + 1e-4)


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool = True):
    """Rewards [B] (B = prompts * G, grouped prompt by prompt) -> (advantages [B], zero-variance
    flag per group [B // G]). The std is the unbiased one (Bessel's correction), as TRL's `nanstd`.
    A group is zero-variance when its rewards are all equal (or their std is 0 to within rounding,
    TRL's test); its advantages are then exactly 0, whatever the dtype."""
    grouped = rewards.view(-1, group_size)
    mean, std = grouped.mean(dim=1, keepdim=True), grouped.std(dim=1, keepdim=True)
    zero_variance = (grouped == grouped[:, :1]).all(dim=1, keepdim=True) | torch.isclose(std, torch.zeros_like(std))
    advantages = grouped - mean
    if scale_rewards:
        advantages = advantages / (std + STD_EPS)
    return advantages.masked_fill(zero_variance, 0.0).view(-1), zero_variance.squeeze(1)


def score_groups(samples: list[dict], weights: dict[str, float], group_size: int, scale_rewards: bool = True):
    """Rewards and advantages of sampled groups, written into each sample dict; returns the
    zero-variance flag per group."""
    totals, per_reward = combine([s["text"] for s in samples], [s["task"] for s in samples], weights)
    advantages, zero_variance = group_advantages(torch.tensor(totals, dtype=torch.float32), group_size, scale_rewards)
    for i, s in enumerate(samples):
        s["reward"], s["advantage"] = totals[i], advantages[i].item()
        s["rewards"] = {name: values[i] for name, values in per_reward.items()}
    return zero_variance


def group_view(samples: list[dict], g: int, group_size: int) -> dict:
    """One prompt's group, JSON-able: the prompt, the answer, whether it teaches nothing (every
    advantage 0: all its rewards were equal), and each sample's text, rewards, advantage."""
    rows = samples[g * group_size : (g + 1) * group_size]
    task = rows[0]["task"]
    return dict(
        task=task["task"],
        prompt=task["prompt"],
        answer=task["answer"],
        zero_variance=all(s["advantage"] == 0.0 for s in rows),
        samples=[
            dict(
                text=s["text"],
                reward=s["reward"],
                rewards=s["rewards"],
                advantage=round(s["advantage"], 4),
                tokens=len(s["ids"]),
                ended=s["ended"],
            )
            for s in rows
        ],
    )
