"""Stage 6, reasoning through reinforcement learning on verifiable rewards: GRPO.

The lesson: the assistant from SFT can already *try* a sum; reinforcement learning makes it try
better by practising. For every prompt it writes G answers (sampled, so they differ), a rule
scores each one (labkit/rewards.py), and the answers that scored better than their siblings
become more likely, the others less. That is Group Relative Policy Optimization (GRPO, from
DeepSeekMath, used for DeepSeek-R1), which needs no value network: the group is the baseline.

For a group of G samples of one prompt with rewards r_1..r_G:

    advantage_i = (r_i - mean(r)) / (std(r) + 1e-4)        std with Bessel's correction, as TRL
                  (r_i - mean(r))                           with scale_rewards=False (Dr. GRPO)

and per completion token t of sample i, with ratio = pi(t) / pi_old(t):

    loss_t = -min(ratio * A_i, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A_i) + beta * k3_t
    k3_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1    (KL to the frozen SFT model, always >= 0)

summed over the step's B samples and their N completion tokens by `loss_type`:

    grpo       sum_i (sum_t loss_t / |o_i|) / B     each sequence's mean (a long answer's tokens count less each)
    bnpo       sum_i sum_t loss_t / N               every token of the batch counts the same
    dr_grpo    sum_i sum_t loss_t / (B * max_new_tokens)    no length bias
    dapo       sum_i sum_t loss_t / N               DAPO's token-level normalisation (below)
    reinforce  sum_i sum_t -logp_t * A_i / N        nanochat's RL (below)

The first four are TRL's definitions (1.16, trl/trainer/grpo_trainer.py, `_compute_loss`);
tests/test_grpo.py checks them against TRL itself. In TRL, bnpo and dapo differ only when a step is split
into micro-batches (gradient accumulation): bnpo divides each micro-batch by its own tokens and averages
the micro-batches, dapo divides each by the whole batch's tokens (`num_items_in_batch`), so that every
token of the step weighs the same. On one batch they are the same number. Here micro-batches never change
the loss: each is divided by the whole batch's B and N (`grpo_backward`), so labkit's bnpo and dapo are
both that sum / N: TRL's bnpo on one batch, and TRL's dapo however it is accumulated. DAPO pairs it with
a raised upper clip, epsilon_high=0.28 ("clip-higher": an unlikely token that did well may grow more);
choosing loss_type "dapo" does not change epsilon_high, and the recipe LOSS_RECIPES["dapo"]
(labkit/presets.py) sets both. (DAPO's paper also drops the KL and resamples groups that teach nothing;
the recipe leaves beta as it is, and labkit does not resample.)

"reinforce" is nanochat's RL (scripts/chat_rl.py): on-policy REINFORCE with the group mean as the
baseline, A_i = r_i - mean(r) (no std), no ratio, no clip, no KL. Its gradient is REINFORCE's,
-sum_i sum_t A_i * grad logp_t / N. (On-policy the ratio is 1 with the same gradient, so with beta 0
and the same advantages dapo takes the same step; what sets nanochat's recipe apart is r - mean and no
reference.) The settings it has no place for are refused, not ignored (labkit/rules.py): the advantages
are made once for every loss type (labkit/groups.py), so scale_rewards must be False there, or the
advantages that groups.json shows would not be the ones it trains on; beta must be 0; num_iterations
must be 1 (a second step on the same samples, with no ratio, is no longer on-policy); epsilon and
epsilon_high stay at their defaults. nanochat divides each device batch by its own tokens and averages
the batches: on one batch the same / N.

RL can only reinforce what the policy already does now and then, so the stage begins the way
DeepSeek-R1 did, with a short *cold start*: SFT on worked solutions of training problems
(`grpo.cold_start_steps`), after which the policy writes the checked format and gets some problems
right. The reference model for the KL is that cold-started policy. pass@1 is measured on the SFT
model (`pass_at_1_sft`), after the cold start (`pass_at_1_before`) and after GRPO (`pass_at_1_after`).

A group whose samples all score the same (all right, or all wrong) has every advantage 0: it
teaches nothing. The share of such groups (`zero_variance_group_fraction`) says how much of the
sampling was wasted: prompts too easy or too hard for the model.

Writes to `runs/<run>/grpo/`:
  model.pt, train_state.pt     the policy after training; the resumable training checkpoint
  cold_start_state.pt          the cold start's checkpoint
  start.pt                     the policy GRPO starts from (after the cold start), which labkit/grpo_compare.py reuses
  history.json                 per step: mean reward (and per reward), KL, response length, ...; pass@1 at evaluations
  groups.json                  some prompts' groups of G samples with their rewards and advantages
  heldout.jsonl                every held-out problem with the replies before and after, right or wrong
  metrics.json                 pass_at_1_sft / before / after (overall, per task), n_heldout, mean_response_tokens, ...
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections import defaultdict
from collections.abc import Callable

import torch

from .chat import render, render_prompt
from .checkpoint import load_model, model_path, resume, rng_state, save_checkpoint, save_model, set_rng_state
from .config import Config, ConfigError, GRPOConfig, TrainConfig, check_config, resolve_device
from .distributed import is_main_process
from .engine import Completions, chunks, decode_reply, fit, generate, logprobs, pack, reply_stops, score
from .groups import group_view, score_groups
from .rewards import combine, parse_weights
from .rules import LOSS_TYPES
from .run import Run, atomic_write, notify, write_json
from .tasks import TaskStream, heldout_problems, load_gsm8k, parse_tasks
from .train import autocast, autocast_dtype, rl_optimizer, set_lr

# --- the algorithm -----------------------------------------------------------------------------------


def grpo_loss(
    logps,
    old_logps,
    ref_logps,
    advantages,
    mask,
    *,
    epsilon=0.2,
    epsilon_high=None,
    beta=0.0,
    loss_type="grpo",
    max_completion_length=None,
    n_rows=None,
    n_tokens=None,
):
    """The per-token policy loss (clipped, or REINFORCE's) with a k3 KL penalty, normalised by `loss_type`.

    logps, old_logps, ref_logps, mask: [B, T] (completion tokens; mask 1 on real tokens);
    advantages: [B]. old_logps are the sampling policy's (detached; unused by reinforce); ref_logps the
    frozen reference's (ignored when beta is 0). For a micro-batch of a larger batch, `n_rows` and
    `n_tokens` are the whole batch's (the normalisers), so that the micro-batches' losses add up
    to the batch's. Returns (loss, stats)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not allowed; allowed: {', '.join(LOSS_TYPES)}")
    if loss_type == "reinforce" and beta != 0.0:
        raise ValueError(f"loss_type='reinforce' has no KL penalty; beta must be 0, got {beta}")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    advantages = advantages.unsqueeze(1)
    n_tokens = mask.sum().clamp(min=1.0) if n_tokens is None else n_tokens
    clip_fraction = 0.0
    if loss_type == "reinforce":
        per_token = -logps * advantages
    else:
        ratio = torch.exp(logps - old_logps)
        clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
        per_token = -torch.min(ratio * advantages, clipped * advantages)
        with torch.no_grad():  # a token mean over the whole batch, as the loss's normaliser
            high, low = (ratio > 1 + epsilon_high) & (advantages > 0), (ratio < 1 - epsilon) & (advantages < 0)
            clip_fraction = (((high | low) * mask).sum() / n_tokens).item()
    kl = None
    if beta != 0.0:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * kl
    n_rows = per_token.size(0) if n_rows is None else n_rows
    loss = normalise(per_token * mask, mask, loss_type, n_rows, n_tokens, max_completion_length)
    with torch.no_grad():
        kl = ((kl * mask).sum() / n_tokens).item() if kl is not None else 0.0
    return loss, dict(clip_fraction=clip_fraction, kl=kl)


def normalise(masked, mask, loss_type: str, n_rows, n_tokens, max_completion_length=None):
    """The per-token losses (masked: 0 off the completion) summed into one number by `loss_type`."""
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / n_rows
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' divides by batch * max_completion_length; give max_completion_length")
        return masked.sum() / (n_rows * max_completion_length)
    return masked.sum() / n_tokens  # bnpo, dapo, reinforce: every token of the batch counts the same


# --- sampling and scoring ----------------------------------------------------------------------------


def prompt_ids(task: dict, tokenizer, prefill: str = "") -> list[int]:
    """The task as a one-message conversation, ready for the assistant's reply (and, for the
    forced-answer experiment, the start of that reply)."""
    return render_prompt([{"role": "user", "content": task["prompt"]}], tokenizer) + tokenizer.encode(prefill)


def sample_groups(
    model, tokenizer, tasks: list[dict], cfg: GRPOConfig, seed: int | None = None, max_batch: int = 64
) -> list[dict]:
    """G sampled replies to each task, all in one batched generation: one dict per sample with the
    task, prompt and reply ids, text, and whether it ended. Samples come task by task (the group
    layout of the advantages)."""
    prompts, budget = fit([prompt_ids(task, tokenizer) for task in tasks], cfg.max_new_tokens, model.config.block_size)
    rows = generate(
        model,
        prompts,
        budget,
        temperature=cfg.temperature,
        num_samples=cfg.num_generations,
        stop_tokens=reply_stops(tokenizer),
        seed=seed,
        max_batch=max_batch,
    )
    samples = []
    for i, ids in enumerate(rows):
        task, prompt = tasks[i // cfg.num_generations], prompts[i // cfg.num_generations]
        reply = decode_reply(ids, tokenizer)
        samples.append(dict(task=task, prompt=prompt, ids=ids, text=reply.text, ended=reply.ended))
    return samples


def greedy_replies(
    model, tokenizer, tasks: list[dict], max_new_tokens: int, prefill: str = "", max_batch: int = 64
) -> list[dict]:
    """Greedy replies to many tasks, in batches: text, ended, tokens."""
    if not tasks:
        return []
    prompts, budget = fit([prompt_ids(t, tokenizer, prefill) for t in tasks], max_new_tokens, model.config.block_size)
    outputs = generate(model, prompts, budget, temperature=0, stop_tokens=reply_stops(tokenizer), max_batch=max_batch)
    replies = [decode_reply(ids, tokenizer) for ids in outputs]
    return [dict(reply=f"{prefill} {r.text}" if prefill else r.text, ended=r.ended, tokens=r.tokens) for r in replies]


def pass_at_1(
    model, tokenizer, tasks: list[dict], max_new_tokens: int, prefill: str = "", max_batch: int = 64
) -> tuple[list[dict], dict]:
    """Greedy replies to the held-out problems, judged by the `correct` rule: (rows, summary)
    where summary has pass_at_1 overall and per task, n per task and the mean reply length."""
    replies = greedy_replies(model, tokenizer, tasks, max_new_tokens, prefill, max_batch)
    _, per_reward = combine([r["reply"] for r in replies], tasks, {"correct": 1.0})
    rows = [
        dict(r, task=t["task"], key=t["key"], answer=t["answer"], correct=bool(c))
        for t, r, c in zip(tasks, replies, per_reward["correct"])
    ]
    by_task = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r["correct"])
    summary = dict(
        pass_at_1=_share(r["correct"] for r in rows),
        pass_at_1_by_task={k: _share(v) for k, v in by_task.items()},
        n_by_task={k: len(v) for k, v in by_task.items()},
        mean_response_tokens=round(sum(r["tokens"] for r in rows) / max(1, len(rows)), 2),
    )
    return rows, summary


def _share(flags) -> float:
    flags = list(flags)
    return round(sum(flags) / len(flags), 4) if flags else 0.0


# --- training ----------------------------------------------------------------------------------------


def grpo_backward(model, batch: Completions, advantages, old_logps, ref_logps, cfg: GRPOConfig, dtype=None) -> dict:
    """GRPO's loss on one batch of samples and its gradients, accumulated over micro-batches of
    `cfg.micro_batch_size` samples (normalised by the whole batch, so the sum is the batch's loss).
    `old_logps` None: the samples come from the current policy (ratio 1, a detached copy)."""
    n_rows, n_tokens = batch.mask.size(0), batch.mask.sum().clamp(min=1.0)
    stats = defaultdict(float)
    for part in chunks(n_rows, cfg.micro_batch_size):
        micro = batch.rows(part)
        with autocast(str(micro.ids.device), dtype):
            logps = logprobs(model, micro, temperature=cfg.temperature)
        loss, micro_stats = grpo_loss(
            logps,
            logps.detach() if old_logps is None else old_logps[part],
            None if ref_logps is None else ref_logps[part],
            advantages[part],
            micro.mask,
            epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high,
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            max_completion_length=cfg.max_new_tokens,
            n_rows=n_rows,
            n_tokens=n_tokens,
        )
        loss.backward()
        for k, v in dict(micro_stats, loss=loss.item()).items():
            stats[k] += v
    return dict(stats)


def grpo_step(
    model,
    ref_model,
    optimizer,
    samples: list[dict],
    cfg: GRPOConfig,
    grad_clip: float = 1.0,
    dtype=None,
    max_batch: int = 64,
) -> dict:
    """Optimizer steps (`num_iterations` of them) on one batch of scored groups; returns stats.
    Every log-probability is taken at the sampling temperature (the KL to the reference too)."""
    device = next(model.parameters()).device
    batch = pack([s["prompt"] for s in samples], [s["ids"] for s in samples], device)
    advantages = torch.tensor([s["advantage"] for s in samples], device=device)
    old_logps = ref_logps = None
    with autocast(str(device), dtype):
        if cfg.num_iterations > 1:  # the sampling policy's log-probs, fixed while we take several steps
            old_logps, _ = score(model, batch, temperature=cfg.temperature, max_batch=max_batch)
        if cfg.beta != 0.0:
            ref_logps, _ = score(ref_model, batch, temperature=cfg.temperature, max_batch=max_batch)
    stats = defaultdict(float)
    model.train()
    for _ in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        step_stats = grpo_backward(model, batch, advantages, old_logps, ref_logps, cfg, dtype)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        optimizer.step()
        for k, v in dict(step_stats, grad_norm=grad_norm.item()).items():
            stats[k] += v / cfg.num_iterations
    model.eval()
    return dict(stats)


def train_grpo(
    model,
    tokenizer,
    stream: TaskStream,
    heldout: list[dict],
    cfg: GRPOConfig,
    weights: dict[str, float],
    *,
    seed: int = 0,
    device: str = "cpu",
    train: TrainConfig | None = None,
    run: Run | None = None,
    checkpoint=None,
    resume_key: str | None = None,
    on_step: Callable[[dict], None] | None = None,
    keep_groups: int = 3,
    stop_at_step: int | None = None,
    dtype=None,
    max_batch: int = 64,
) -> dict:
    """GRPO from `model` (the reference is a frozen copy of it as given). Returns history and groups.
    `train`: pretraining's settings, whose optimizer (AdamW, or Muon with AdamW), betas and gradient
    clip GRPO keeps, at `cfg.learning_rate` and without weight decay (as PPO does).
    `dtype`: the autocast dtype (bf16 on CUDA); `max_batch`: rows per pass when sampling and scoring."""
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta != 0.0 else None
    train = train or TrainConfig()
    optimizer = rl_optimizer(model, train, cfg.learning_rate, device)
    step, history, groups, seconds = 0, [], [], 0.0
    if (state := resume(checkpoint, resume_key)) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, history, groups, seconds = state["step"], state["history"], state["groups"], state["seconds"]
        stream.load_state_dict(state["stream"])
        set_rng_state(state["rng"])

    def save():
        if checkpoint is not None:
            save_checkpoint(
                checkpoint,
                dict(
                    model=model.state_dict(),
                    optimizer=optimizer.state_dict(),
                    step=step,
                    history=history,
                    groups=groups,
                    seconds=seconds,
                    rng=rng_state(),
                    stream=stream.state_dict(),
                    resume_key=resume_key,
                ),
            )

    last = min(cfg.max_steps, stop_at_step or cfg.max_steps)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, desc="grpo", leave=False)
    while step < last:
        start = time.perf_counter()
        lr = cfg.learning_rate * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        set_lr(optimizer, lr)
        tasks = stream.next(cfg.prompts_per_step)
        samples = sample_groups(model, tokenizer, tasks, cfg, seed=seed * 1_000_003 + step, max_batch=max_batch)
        zero_variance = score_groups(samples, weights, cfg.num_generations, cfg.scale_rewards)
        stats = grpo_step(model, ref_model, optimizer, samples, cfg, train.grad_clip, dtype, max_batch)
        step += 1
        seconds += time.perf_counter() - start
        row = dict(
            step=step,
            lr=lr,
            reward=_mean(s["reward"] for s in samples),
            **{f"reward_{name}": _mean(s["rewards"][name] for s in samples) for name in weights},
            response_tokens=_mean(len(s["ids"]) for s in samples),
            zero_variance_fraction=round(zero_variance.float().mean().item(), 4),
            zero_variance_groups=int(zero_variance.sum().item()),
            groups=len(tasks),
            **stats,
        )
        if step == 1 or step % cfg.eval_every == 0 or step == cfg.max_steps:
            _, summary = pass_at_1(model, tokenizer, heldout, cfg.max_new_tokens, max_batch=max_batch)
            row.update(pass_at_1=summary["pass_at_1"], heldout_response_tokens=summary["mean_response_tokens"])
            groups += [
                dict(step=step, **group_view(samples, g, cfg.num_generations))
                for g in range(min(keep_groups, len(tasks)))
            ]
        history.append(row)
        if run is not None:
            run.log({f"grpo/{k}": v for k, v in row.items() if k != "step"}, step=step)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.4f}")
        event = dict(loop="grpo", row=row, history=history, step=step, model=model)
        saved = rng_state()
        if on_step is not None:
            on_step(event)
        notify(event)
        set_rng_state(saved)
        if "pass_at_1" in row or step == last:
            save()
    bar.close()
    return dict(history=history, groups=groups, seconds=seconds, step=step)


def _mean(values) -> float:
    values = list(values)
    return round(sum(values) / max(1, len(values)), 4)


# --- the stage ---------------------------------------------------------------------------------------


def load_tasks(config: Config, world) -> tuple[TaskStream, list[dict]]:
    """(training stream, held-out problems): generated from the world, or split from a GSM8K-format source."""
    g = config.grpo
    if g.source == "mini-web":
        names = parse_tasks(g.tasks)
        return TaskStream(names, config.seed, world), heldout_problems(names, g.n_heldout, config.seed, world)
    rows = load_gsm8k(g.source, split=g.split, config=g.config)
    if len(rows) < 2:
        raise ConfigError(
            f"grpo.source={g.source!r} holds {len(rows)} problem; at least 2 are needed (train and held-out)"
        )
    random.Random(config.seed).shuffle(rows)
    n = min(g.n_heldout, len(rows) // 2)
    return TaskStream(["gsm8k"], config.seed, pool=rows[n:]), rows[:n]


def cold_start(
    model, tokenizer, stream: TaskStream, config: Config, device: str, run: Run, checkpoint, resume_key: str
) -> dict:
    """DeepSeek-R1's cold start: before RL, a short SFT on worked solutions of training problems, so
    that the policy writes the steps in the checked format often enough for some samples to be right.
    (RL can only reinforce what the policy already does now and then.)"""
    g, s = config.grpo, config.sft
    if g.cold_start_steps == 0:
        return dict(steps=0, problems=0, seconds=0.0)
    from .sft import finetune

    problems = stream.fork("cold-start").next(g.cold_start_steps * s.batch_size)
    conversations = [
        dict(messages=[dict(role="user", content=t["prompt"]), dict(role="assistant", content=t["solution"])])
        for t in problems
    ]
    keep = model.config.block_size + 1

    def render_end(messages, tokenizer):  # too long for the context: keep the end, as `fit` does when sampling
        ids, mask = render(messages, tokenizer)
        return ids[-keep:], mask[-keep:]

    result, _ = finetune(
        model,
        conversations,
        tokenizer,
        config,
        steps=g.cold_start_steps,
        batch_size=s.batch_size,
        learning_rate=g.cold_start_learning_rate,
        min_lr=g.cold_start_learning_rate / 10,
        warmup_steps=s.warmup_steps,
        device=device,
        run=run,
        checkpoint=checkpoint,
        resume_key=resume_key,
        desc="grpo: cold start",
        renderer=render_end,
    )
    return dict(steps=result.step, problems=len({t["key"] for t in problems}), seconds=round(result.train_seconds, 2))


def build(config: Config, run: Run, made_from: str) -> dict:
    """GRPO from the run's SFT model on verifiable tasks; pass@1 on held-out problems before and after.
    `made_from` is the stage's fingerprint (what a resumable checkpoint must match)."""
    from .data import read_world
    from .tokenizer import Tokenizer

    start = time.time()
    check_config(config)
    g, out, device = config.grpo, run.stage_dir("grpo"), resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = load_model(model_path(run, "sft"), device)
    batch = config.max_batch
    tokenizer = Tokenizer.load(run.path / "tokenizer")
    world = read_world(run) if g.source == "mini-web" else None
    stream, heldout = load_tasks(config, world)
    weights = parse_weights(g.rewards)

    main = is_main_process()  # every process runs the cold start (DDP); GRPO and the measuring are rank 0's
    sft_rows, sft = pass_at_1(model, tokenizer, heldout, g.max_new_tokens, max_batch=batch) if main else (None, None)
    warm = cold_start(
        model, tokenizer, stream, config, device, run, out / "cold_start_state.pt", made_from + "-cold-start"
    )
    if not main:
        return {}
    save_model(out / "start.pt", model, dict(cold_start_steps=warm["steps"]))  # the comparisons start here too
    # without a cold start GRPO starts from the SFT model: no need to measure it twice
    before_rows, before = (
        pass_at_1(model, tokenizer, heldout, g.max_new_tokens, max_batch=batch) if warm["steps"] else (sft_rows, sft)
    )
    _, immediate_before = pass_at_1(model, tokenizer, heldout, 8, prefill="The answer is", max_batch=batch)
    result = train_grpo(
        model,
        tokenizer,
        stream,
        heldout,
        g,
        weights,
        seed=config.seed,
        device=device,
        train=config.train,
        run=run,
        checkpoint=out / "train_state.pt",
        resume_key=made_from,
        dtype=autocast_dtype(config.train, device),
        max_batch=batch,
    )
    model.eval()
    save_model(out / "model.pt", model, dict(step=result["step"]))
    after_rows, after = pass_at_1(model, tokenizer, heldout, g.max_new_tokens, max_batch=batch)
    _, immediate_after = pass_at_1(model, tokenizer, heldout, 8, prefill="The answer is", max_batch=batch)
    history = result["history"]
    write_json(out / "history.json", history)
    write_json(out / "groups.json", result["groups"])
    atomic_write(
        out / "heldout.jsonl",
        "".join(
            json.dumps(
                dict(
                    task=t["task"],
                    prompt=t["prompt"],
                    answer=t["answer"],
                    before=b["reply"],
                    before_correct=b["correct"],
                    after=a["reply"],
                    after_correct=a["correct"],
                )
            )
            + "\n"
            for t, b, a in zip(heldout, before_rows, after_rows)
        ),
    )
    n_groups = sum(r["groups"] for r in history)
    return dict(
        pass_at_1_sft=sft["pass_at_1"],
        pass_at_1_sft_by_task=sft["pass_at_1_by_task"],
        cold_start_steps=warm["steps"],
        cold_start_problems=warm["problems"],
        cold_start_seconds=warm["seconds"],
        pass_at_1_before=before["pass_at_1"],
        pass_at_1_after=after["pass_at_1"],
        pass_at_1_before_by_task=before["pass_at_1_by_task"],
        pass_at_1_after_by_task=after["pass_at_1_by_task"],
        n_heldout=len(heldout),
        n_heldout_by_task=before["n_by_task"],
        mean_response_tokens=after["mean_response_tokens"],
        mean_response_tokens_before=before["mean_response_tokens"],
        mean_response_tokens_after=after["mean_response_tokens"],
        immediate_pass_at_1_before=immediate_before["pass_at_1"],
        immediate_pass_at_1_after=immediate_after["pass_at_1"],
        immediate_pass_at_1_before_by_task=immediate_before["pass_at_1_by_task"],
        immediate_pass_at_1_after_by_task=immediate_after["pass_at_1_by_task"],
        zero_variance_group_fraction=round(sum(r["zero_variance_groups"] for r in history) / max(1, n_groups), 4),
        zero_variance_groups=sum(r["zero_variance_groups"] for r in history),
        reward_first=history[0]["reward"] if history else None,
        reward_last=history[-1]["reward"] if history else None,
        kl_last=history[-1]["kl"] if history else None,
        steps=result["step"],
        samples=n_groups * g.num_generations,
        train_seconds=round(result["seconds"], 2),
        source=g.source,
        tasks=g.tasks if g.source == "mini-web" else "gsm8k",
        device=device,
        seconds=round(time.time() - start, 2),
    )


def load_policy(run: Run, device: str = "cpu"):
    """(model, tokenizer) of the run's GRPO stage."""
    from .sft import load_assistant

    return load_assistant(run, device, "grpo")
