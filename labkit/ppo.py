"""PPO (Proximal Policy Optimization) with a KL penalty: the assistant learns to please the reward model.

The lesson: sample answers, score them with the reward model, and push up the probability of
tokens that did better than the value head expected (advantages by GAE), in small clipped
steps. The reward also pays `-kl_coef * KL(policy || reference)` per token: without it the
policy drifts to whatever odd text the reward model happens to overrate (reward hacking). With
`kl_target` set, the coefficient adapts after every batch (`KLController`, Ziegler et al. 2019):
it grows while the KL is above the target and shrinks while it is below.

One PPO step, as in TRL's PPOTrainer:

1. *Rollout* (no gradients): the policy samples one answer per prompt (`engine.generate`); the
   policy and the frozen reference score every answer token (`engine.score`, at the sampling
   temperature, so the log-probabilities are those of the distribution sampled from); the value
   model gives a value per token and the reward model a score per answer. Per-token rewards,
   advantages (GAE, whitened) and returns follow.
2. *Update*: `epochs` passes over the rollouts in `minibatches` shuffled minibatches, one
   optimizer step each: clipped surrogate + `vf_coef` * clipped value loss. A minibatch goes
   through the model `micro_batch_size` rollouts at a time, its gradients accumulated, so
   memory depends on that setting, not on the batch.

The losses below are written out one by one and tested to equal TRL's on the same tensors
(tests/test_rlhf.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .chat import render_prompt
from .checkpoint import resume, rng_state, save_checkpoint, set_rng_state
from .config import check_config
from .engine import chunks, decode_reply, fit, generate, logprobs, pack, reply_stops, score
from .run import notify
from .train import autocast, autocast_dtype, rl_optimizer

# --- losses ---------------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean 0 and unit variance over the masked entries (unbiased variance); the masked-out
    entries are set to 0. Whitened advantages make the step size independent of the reward's scale."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask) * (mask.sum() / (mask.sum() - 1))
    return ((values - mean) * torch.rsqrt(var + 1e-8)) * mask


def per_token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """An estimate of KL(policy || reference) at each sampled token (joschu.net/blog/kl-approx.html):
    k1 = log pi - log ref (unbiased, noisy, can be negative), k3 = (r - 1) - log r with
    r = ref / pi (unbiased, never negative, lower variance)."""
    if estimator not in ("k1", "k3"):
        raise ValueError(f"kl estimator {estimator!r} is not allowed; allowed: k1, k3")
    log_ratio = ref_logprobs - logprobs
    return -log_ratio if estimator == "k1" else (log_ratio.exp() - 1) - log_ratio


def ppo_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards [B, T]: -kl_coef * KL at every answer token, plus the reward model's score
    on each answer's last token. Returns (rewards, kl), both 0 outside `mask`."""
    kl = per_token_kl(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    last = mask.size(1) - 1 - mask.flip(1).float().argmax(1)  # index of each row's last answer token
    rewards[torch.arange(rewards.size(0), device=rewards.device), last] += scores
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, right to left: delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = delta_t + gamma lam A_{t+1}; returns A + V are the value head's targets.
    Rewards and values must be 0 after each answer's end (the episode is over there)."""
    advantages = torch.zeros_like(rewards)
    last_advantage = torch.zeros_like(rewards[:, 0])
    T = rewards.size(1)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_advantage = delta + gamma * lam * last_advantage
        advantages[:, t] = last_advantage
    return advantages, advantages + values


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate: the ratio pi_new / pi_old may move the objective only within
    [1 - eps, 1 + eps]; of the clipped and unclipped loss the larger (pessimistic) one counts.
    Returns (loss, share of tokens where the clipped loss was the one used)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared error to the returns, with the new values kept within cliprange_value of the old
    ones (the larger of the two errors counts). Returns (0.5 * mean error, clip fraction)."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    errors, clipped_errors = torch.square(values - returns), torch.square(clipped_values - returns)
    loss = 0.5 * masked_mean(torch.max(errors, clipped_errors), mask)
    return loss, masked_mean((clipped_errors > errors).float(), mask).detach()


class KLController:
    """The KL coefficient. Fixed when `target` is 0; otherwise adaptive, as in Ziegler et al. 2019
    (TRL's former AdaptiveKLController): after each batch, with KL the batch's mean KL per answer,

        coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_rollouts / horizon

    so the coefficient rises while the policy is further from the reference than the target and
    falls while it is closer, by at most 20% per `horizon` rollouts."""

    def __init__(self, coef: float, target: float = 0.0, horizon: int = 10_000):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_rollouts: int) -> None:
        if self.target > 0:
            error = float(np.clip(kl / self.target - 1, -0.2, 0.2))
            self.value *= 1 + error * n_rollouts / self.horizon


# --- one step -------------------------------------------------------------------------------------


@torch.no_grad()
def rollout(
    policy,
    ref,
    value_model,
    reward_model,
    tokenizer,
    prompts: list[dict],
    config,
    kl_coef: float,
    seed: int,
    dtype=None,
) -> dict:
    """Sample one answer per prompt and compute everything PPO's update needs, all [B, T] over the
    answer tokens: old log-probs, reference log-probs, values, rewards (KL penalty + score),
    advantages, returns. Every forward pass takes at most `config.max_batch` rows."""
    r, p, max_batch = config.rlhf, config.ppo, config.max_batch
    device = next(policy.parameters()).device
    block = policy.config.block_size
    prompt_ids, budget = fit([render_prompt(q["messages"], tokenizer) for q in prompts], r.max_new_tokens, block)
    answers = generate(
        policy,
        prompt_ids,
        budget,
        temperature=r.temperature,
        stop_tokens=reply_stops(tokenizer),
        seed=seed,
        max_batch=max_batch,
    )
    batch = pack(prompt_ids, answers, device, tokenizer.encode_special("<|endoftext|>"))
    mask = batch.mask
    ends = torch.tensor([len(q) + len(a) - 1 for q, a in zip(prompt_ids, answers)], device=device)
    with autocast(str(device), dtype):
        old_logprobs, _ = score(policy, batch, temperature=r.temperature, max_batch=max_batch)
        ref_logprobs, _ = score(ref, batch, temperature=r.temperature, max_batch=max_batch)
        parts = chunks(len(prompts), max_batch)
        values = torch.cat([batch.rows(c).at_positions(value_model(batch.ids[c])).float() for c in parts]) * mask
        scores = torch.cat([reward_model.score(batch.ids[c], ends[c]).float() for c in parts])
    replies = [decode_reply(a, tokenizer) for a in answers]
    ended = torch.tensor([reply.ended for reply in replies], device=device)
    penalized = scores - p.missing_eos_penalty * (~ended).float()  # an answer that never ends scores lower
    rewards, kl = ppo_rewards(old_logprobs, ref_logprobs, penalized, mask, kl_coef, p.kl_estimator)
    advantages, returns = gae(rewards, values, p.gamma, p.lam)
    advantages = masked_whiten(advantages, mask)
    return dict(
        batch=batch,
        mask=mask,
        logprobs=old_logprobs,
        values=values,
        advantages=advantages,
        returns=returns,
        scores=scores,
        kl=kl,
        rewards=rewards,
        ended=ended,
        replies=[(x.text, x.ended) for x in replies],
        lengths=mask.sum(1),
    )


def minibatch_backward(
    policy, value_model, rollouts: dict, rows: torch.Tensor, p, temperature: float, dtype=None
) -> dict:
    """Loss of one minibatch (`rows` of the rollouts) and its gradients, accumulated over
    micro-batches of `p.micro_batch_size` rollouts. Each micro-batch's masked means are weighted
    by its share of the minibatch's tokens, so loss and gradients equal one pass over the
    minibatch. Returns the minibatch's statistics."""
    device = str(rollouts["mask"].device)
    n_tokens = rollouts["mask"][rows].sum()
    stats = dict(pg_loss=0.0, vf_loss=0.0, clipfrac=0.0, vf_clipfrac=0.0, approxkl=0.0)
    for part in chunks(len(rows), p.micro_batch_size):
        micro = rows[part]
        batch, mask = rollouts["batch"].rows(micro), rollouts["mask"][micro]
        with autocast(device, dtype):
            new_logprobs = logprobs(policy, batch, temperature=temperature)
            values = batch.at_positions(value_model(batch.ids)).float() * mask
        old = rollouts["logprobs"][micro]
        pg_loss, clipfrac = ppo_policy_loss(new_logprobs, old, rollouts["advantages"][micro], mask, p.cliprange)
        vf_loss, vf_clipfrac = ppo_value_loss(
            values, rollouts["values"][micro], rollouts["returns"][micro], mask, p.cliprange_value
        )
        weight = mask.sum() / n_tokens  # masked means over the micro-batch -> over the minibatch
        ((pg_loss + p.vf_coef * vf_loss) * weight).backward()
        with torch.no_grad():
            approxkl = 0.5 * masked_mean((new_logprobs - old) ** 2, mask)
        for name, value in (
            ("pg_loss", pg_loss),
            ("vf_loss", vf_loss),
            ("clipfrac", clipfrac),
            ("vf_clipfrac", vf_clipfrac),
            ("approxkl", approxkl),
        ):
            stats[name] += (value.detach() * weight).item()
    return stats


def ppo_update(
    policy, value_model, optimizer, rollouts: dict, p, temperature: float, grad_clip: float, dtype=None
) -> dict:
    """Several epochs over the rollouts in shuffled minibatches, one optimizer step each."""
    B = rollouts["mask"].size(0)
    size = B // p.minibatches
    params = [q for g in optimizer.param_groups for q in g["params"]]
    policy.train()
    value_model.train()
    totals: dict[str, list[float]] = {}
    for _ in range(p.epochs):
        order = torch.randperm(B).to(rollouts["mask"].device)
        for start in range(0, size * p.minibatches, size):
            optimizer.zero_grad(set_to_none=True)
            stats = minibatch_backward(
                policy, value_model, rollouts, order[start : start + size], p, temperature, dtype
            )
            torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
            optimizer.step()
            for name, value in stats.items():
                totals.setdefault(name, []).append(value)
    return {k: sum(v) / len(v) for k, v in totals.items()}


# --- training -------------------------------------------------------------------------------------


def ppo_train(
    policy,
    ref,
    value_model,
    reward_model,
    tokenizer,
    prompts: list[dict],
    config,
    device: str,
    *,
    kl_coef: float | None = None,
    kl_target: float | None = None,
    steps: int | None = None,
    run=None,
    on_step=None,
    checkpoint: str | Path | None = None,
    resume_key: str | None = None,
    desc: str = "ppo",
) -> list[dict]:
    """PPO: `steps` times, sample a batch of answers, score them, update policy and value head.
    Returns one history row per step (score, KL, the KL coefficient used, answer length, clip
    fraction, losses, and the simulated labeler's judgement of the sampled answers). `kl_coef`,
    `kl_target` and `steps` override the config's. Resumes from `checkpoint`."""
    from .preferences import labeler_score

    r, p = config.rlhf, config.ppo
    check_config(config)
    kl = KLController(
        p.kl_coef if kl_coef is None else kl_coef, p.kl_target if kl_target is None else kl_target, p.kl_horizon
    )
    steps = p.steps if steps is None else steps
    dtype = autocast_dtype(config.train, device)
    for model in (policy, ref, value_model, reward_model):
        model.to(device)
    ref.eval(), reward_model.eval()
    for q in list(ref.parameters()) + list(reward_model.parameters()):
        q.requires_grad_(False)
    trained = nn.ModuleDict(dict(policy=policy, value=value_model))
    # a value model copied from a reward model an earlier run froze must still learn
    trained.requires_grad_(True)
    optimizer = rl_optimizer(trained, config.train, p.learning_rate, device)
    step, history = 0, []
    if (state := resume(checkpoint, resume_key)) is not None:
        trained.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        kl.value = state["kl_coef"]
        set_rng_state(state["rng"])
    save_every, first = max(1, steps // 5), step
    for step in tqdm(range(first, steps), initial=first, total=steps, desc=desc, leave=False):
        rng = np.random.default_rng([config.seed, step])
        batch_prompts = [
            prompts[i] for i in rng.choice(len(prompts), p.batch_size, replace=len(prompts) < p.batch_size)
        ]
        rollouts = rollout(
            policy,
            ref,
            value_model,
            reward_model,
            tokenizer,
            batch_prompts,
            config,
            kl.value,
            config.seed * 100_003 + step,
            dtype,
        )
        stats = ppo_update(policy, value_model, optimizer, rollouts, p, r.temperature, config.train.grad_clip, dtype)
        judged = [labeler_score(q, reply, ended) for q, (reply, ended) in zip(batch_prompts, rollouts["replies"])]
        row = dict(
            step=step + 1,
            score=rollouts["scores"].mean().item(),
            kl=rollouts["kl"].sum(1).mean().item(),
            kl_coef=kl.value,
            reward=rollouts["rewards"].sum(1).mean().item(),
            response_length=rollouts["lengths"].mean().item(),
            ended_rate=rollouts["ended"].float().mean().item(),
            labeler=sum(judged) / len(judged),
            sample=rollouts["replies"][0][0],
            **stats,
        )
        history.append(row)
        kl.update(row["kl"], p.batch_size)
        if run is not None:
            run.log({f"{desc}/{k}": v for k, v in row.items() if k not in ("step", "sample")}, step=step + 1)
        event = dict(loop=desc, step=step + 1, row=row, history=history)
        if on_step is not None:
            on_step(event)
        notify(event)
        if checkpoint is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
            save_checkpoint(
                checkpoint,
                dict(
                    model=trained.state_dict(),
                    optimizer=optimizer.state_dict(),
                    step=step + 1,
                    history=history,
                    kl_coef=kl.value,
                    rng=rng_state(),
                    resume_key=resume_key,
                ),
            )
    policy.eval()
    value_model.eval()
    return history
