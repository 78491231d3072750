"""Stage 5, RLHF: people rank answers, a reward model learns their taste, and the assistant is
trained to please it (PPO with a KL penalty), or directly on the rankings (DPO).

The lesson: in domains without a right answer to check ("is this reply helpful? harmless?"),
people rank a few answers, and three steps turn those rankings into a better assistant, each in
its own file:

1. `preferences.py`: the SFT model samples K answers to a prompt; a person (the widget) or the
   simulated labeler (headless runs) ranks them. Every ranking implies K(K-1)/2 pairs.
2. `reward_model.py`: the SFT model's body with a scalar head, trained with the Bradley-Terry
   loss on those pairs: a *simulation* of the labelers, a neural net that can be fooled.
3. `ppo.py`: sample answers, score them with the reward model, and push up what scored better
   than expected, in small clipped steps, with a KL penalty that keeps the policy near the SFT
   model. `dpo.py` skips the reward model and the sampling: a loss on the pairs themselves.

This file is the stage: it runs the three, then measures the SFT, PPO and DPO assistants on
held-out prompts: the reward model's score, the simulated labeler's score (1 right, 0.5 "I don't
know", 0 wrong, -0.5 not an answer), how often the labeler prefers PPO's or DPO's reply to SFT's
(wins, ties, losses), empty replies, and the KL to the SFT model. A reward-model score that rises
while the labeler's falls is reward hacking, not progress.

Writes to `runs/<run>/rlhf/`:
  prompts.jsonl      the prompts to rank and their K completions (kept while the SFT model is the same)
  rankings.jsonl     one ranking per line, appended and fsynced the moment it is made
  archive/<source>/  completions sampled from an earlier SFT model, with every ranking made of them
  rm/model.pt        the reward model; rm/history.json
  dpo/history.json   DPO's loss and implicit rewards per step
  ppo/history.json   PPO's score, KL, KL coefficient, answer length, clip fraction (and the labeler's judgement) per step
  hacking/           the same for PPO with no KL penalty and no controller (when rlhf.hacking_steps > 0)
  eval.jsonl         held-out prompts: SFT, PPO and DPO replies, reward-model scores, judgements
  metrics.json       rm_pair_accuracy, ppo_reward_before/after, ppo_kl; for ppo and dpo against sft:
                     _wins, _ties, _losses (n_eval prompts), _win_rate ((wins + ties / 2) / n_eval),
                     _labeler_score and _labeler_change, _empty_replies, _eval_kl
and the two policies where `labkit chat --model ppo|dpo` finds them: `runs/<run>/ppo/model.pt`,
`runs/<run>/dpo/model.pt`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
import warnings
from pathlib import Path

import torch

from .chat import render_prompt
from .checkpoint import save_model
from .config import ConfigError, check_config, resolve_device
from .distributed import is_main_process, main_first
from .dpo import train_dpo
from .engine import fit, generate, replies, reply_stops, score
from .ppo import ppo_train
from .preferences import (
    HUMAN,
    RANKINGS,
    RankingError,
    Rankings,
    compare,
    eval_prompts,
    fill_with_simulated_labeler,
    is_heldout,
    labeler_score,
    prepare_prompts,
)
from .reward_model import reward_scores, train_reward_model
from .run import fingerprint, read_jsonl, write_json, write_jsonl

PPO_LOOP, HACKING_LOOP = "ppo", "ppo, no KL"  # the loops' names, for `labkit.run.watch`


def completions_source(run, config) -> str | None:
    """What the completions to rank are sampled from: the SFT model (its stage's fingerprint) and
    the sampling settings. Completions from another source are sampled again (the old ones and
    their rankings go to the archive). None while the SFT stage is not built."""
    sft = run.metrics("sft")
    if sft is None:
        return None
    r = config.rlhf
    return fingerprint([sft["fingerprint"], r.k, r.max_new_tokens, r.temperature])


def open_rankings(run, config, device: str = "cpu") -> Rankings:
    """The run's prompts (sampling their K completions from the SFT model the first time, and
    again when that model changed) and rankings, for the ranking widget and the stage."""
    from .data import read_world
    from .sft import load_assistant

    check_config(config)
    world = read_world(run)
    if world is None:
        raise ConfigError(
            "the rlhf stage writes its prompts from the mini-web's world and judges answers by it; "
            "this run's data stage read a dataset alone (use data.source='mini-web', or data.mini_web_share > 0)"
        )
    model, tokenizer = load_assistant(run, device)
    out = run.stage_dir("rlhf")
    prompts = prepare_prompts(model, tokenizer, world, config, out, completions_source(run, config))
    return Rankings(out / RANKINGS, prompts, prompts_file=out / "prompts.jsonl")


def ranked_prompts(run, config, device: str = "cpu") -> Rankings:
    """`open_rankings`, with every prompt nobody ranked ranked by the simulated labeler when the
    config says so."""
    rankings = open_rankings(run, config, device)
    if config.rlhf.simulated_labeler:
        fill_with_simulated_labeler(rankings)
    return rankings


def made_from_files(config, run) -> list:
    """What the stage learns from beyond its settings and the SFT model, for the pipeline's key:
    where the completions come from, and each prompt's ranking by a person. (The simulated
    labeler's rankings follow from the completions, so they add nothing.) Rankings of completions
    that will be sampled again do not count: they go to the archive before training."""
    source, folder = completions_source(run, config), run.path / "rlhf"
    rows = read_jsonl(folder / "prompts.jsonl") if source and (folder / "prompts.jsonl").exists() else []
    with warnings.catch_warnings():  # the stage reports a bad line when it opens the rankings
        warnings.simplefilter("ignore")
        rankings = Rankings(folder / RANKINGS, [p for p in rows if p.get("sampled_from") == source])
    return [source, sorted((pid, rankings.records[pid]) for pid in rankings.by_person)]


def evaluate_models(
    models: dict, reward_model, tokenizer, prompts: list[dict], max_new_tokens: int, max_batch: int = 64
) -> list[dict]:
    """Every model's greedy reply to every held-out prompt, its reward-model score and the labeler's judgement."""
    rows = [dict(p) for p in prompts]
    for name, model in models.items():
        answers = [
            dict(reply=r.text, ended=r.ended)
            for r in replies(model, tokenizer, [p["messages"] for p in prompts], max_new_tokens, max_batch=max_batch)
        ]
        scores = reward_scores(reward_model, tokenizer, prompts, answers, max_batch)
        for row, answer, rm_score in zip(rows, answers, scores):
            row[name] = dict(answer, rm_score=rm_score, labeler=labeler_score(row, answer["reply"], answer["ended"]))
    return rows


def wins_ties_losses(rows: list[dict], model: str, baseline: str = "sft") -> tuple[int, int, int]:
    """On how many held-out prompts the labeler prefers `model`'s reply to the baseline's, judges
    them equal, or prefers the baseline's."""
    outcomes = [compare(r, r[model], r[baseline]) for r in rows]
    return outcomes.count(1.0), outcomes.count(0.5), outcomes.count(0.0)


def win_rate(rows: list[dict], model: str, baseline: str = "sft") -> float:
    """(wins + ties / 2) / n: a tie counts as half a win, so two models that answer alike score
    0.5. Read it beside `wins_ties_losses` and the change in the labeler's score."""
    wins, ties, _ = wins_ties_losses(rows, model, baseline)
    return (wins + ties / 2) / len(rows)


@torch.no_grad()
def sampled_kl(policy, ref, tokenizer, prompts: list[dict], config) -> float:
    """KL(policy || ref) per answer, as PPO's history measures it: one answer per prompt sampled
    from the policy at the rollout temperature, log pi - log ref summed over its tokens, averaged."""
    r = config.rlhf
    ids, budget = fit(
        [render_prompt(p["messages"], tokenizer) for p in prompts], r.max_new_tokens, ref.config.block_size
    )
    sampling = dict(temperature=r.temperature, max_batch=config.max_batch)
    answers = generate(policy, ids, budget, stop_tokens=reply_stops(tokenizer), seed=config.seed, **sampling)
    logps, mask = score(policy, ids, answers, **sampling)
    ref_logps, _ = score(ref, ids, answers, **sampling)
    return ((logps - ref_logps) * mask).sum(1).mean().item()


def comparison_metrics(rows: list[dict], models=("ppo", "dpo"), baseline: str = "sft") -> dict:
    """For each model against the baseline on the held-out prompts: wins, ties, losses and the
    win rate by the labeler, its mean score and the change from the baseline's, empty replies."""
    n = len(rows)
    mean = lambda model, name: round(sum(row[model][name] for row in rows) / n, 4)  # noqa: E731
    empty = lambda model: sum(not row[model]["reply"].strip() for row in rows)  # noqa: E731
    metrics = {
        f"{baseline}_labeler_score": mean(baseline, "labeler"),
        f"{baseline}_empty_replies": empty(baseline),
        "n_eval": n,
    }
    for model in models:
        wins, ties, losses = wins_ties_losses(rows, model, baseline)
        metrics.update(
            {
                f"{model}_wins": wins,
                f"{model}_ties": ties,
                f"{model}_losses": losses,
                f"{model}_win_rate": round(win_rate(rows, model, baseline), 4),
                f"{model}_labeler_score": mean(model, "labeler"),
                f"{model}_labeler_change": round(mean(model, "labeler") - mean(baseline, "labeler"), 4),
                f"{model}_empty_replies": empty(model),
            }
        )
    return metrics


def build(config, run, made_from: str) -> dict:
    """Rankings -> reward model -> PPO, and DPO beside it; measured on held-out prompts.
    `made_from` is the stage's fingerprint (what a resumable checkpoint must match)."""
    from .data import read_world
    from .sft import load_assistant

    start = time.time()
    r = config.rlhf
    device = resolve_device(config.device)
    out = run.stage_dir("rlhf")
    # rank 0 samples the prompts and ranks them; the other processes then read its files
    rankings = main_first(ranked_prompts, run, config, device)
    sft, tokenizer = load_assistant(run, device)
    ranked = rankings.ranked(simulated=r.simulated_labeler)
    heldout = [pid for pid in ranked if is_heldout(pid, r.heldout_prompts)]
    train_pairs, heldout_pairs = rankings.pairs([p for p in ranked if p not in heldout]), rankings.pairs(heldout)
    if not train_pairs:
        raise RankingError(
            f"no rankings to learn from in {rankings.path} ({len(ranked)} prompts ranked); rank some in "
            f"notebooks/05_rlhf.ipynb or set rlhf.simulated_labeler=True"
        )
    key = made_from  # it holds the person's rankings; the labeler's follow from the completions
    metrics = dict(
        n_prompts=len(rankings.order),
        n_ranked=len(ranked),
        n_ranked_by_human=rankings.count(HUMAN),
        ranking_problems=len(rankings.problems),
    )

    reward_model, rm_metrics = train_reward_model(
        sft, tokenizer, train_pairs, heldout_pairs, config, run, out / "rm", device, key + "-rm"
    )
    metrics.update(rm_metrics)

    dpo, _ = train_dpo(sft, tokenizer, train_pairs, config, run, out / "dpo", device, key + "-dpo")
    if not is_main_process():  # PPO, its files and the measuring are rank 0's (see the README's GPU section)
        return {}
    save_model(run.stage_dir("dpo") / "model.pt", dpo)  # where `labkit chat --model dpo` finds it

    prompts = [rankings.prompts[pid] for pid in ranked if pid not in heldout]
    policy, history = ppo_from_sft(
        sft, reward_model, tokenizer, prompts, config, run, out / "ppo", key + "-ppo", desc=PPO_LOOP
    )
    save_model(run.stage_dir("ppo") / "model.pt", policy)  # where `labkit chat --model ppo` finds it

    world = read_world(run)
    held_out = eval_prompts(world, r.n_eval, config.seed, config.sft.heldout_people)
    rows = evaluate_models(
        dict(sft=sft, ppo=policy, dpo=dpo), reward_model, tokenizer, held_out, r.max_new_tokens, config.max_batch
    )
    write_jsonl(out / "eval.jsonl", rows)
    tail = history[-max(1, len(history) // 5) :]
    mean = lambda name, model: round(sum(row[model][name] for row in rows) / len(rows), 4)  # noqa: E731
    metrics.update(
        ppo_reward_before=mean("rm_score", "sft"),
        ppo_reward_after=mean("rm_score", "ppo"),
        dpo_reward=mean("rm_score", "dpo"),
        ppo_kl=round(sum(row["kl"] for row in tail) / len(tail), 4),
        ppo_kl_coef_last=round(history[-1]["kl_coef"], 4),
        **comparison_metrics(rows),
        ppo_eval_kl=round(sampled_kl(policy, sft, tokenizer, held_out, config), 4),
        dpo_eval_kl=round(sampled_kl(dpo, sft, tokenizer, held_out, config), 4),
        ppo_train_score_first=round(history[0]["score"], 4),
        ppo_train_score_last=round(history[-1]["score"], 4),
    )
    if r.hacking_steps:
        metrics.update(reward_hacking(sft, reward_model, tokenizer, prompts, config, run, out / "hacking", key))
    metrics.update(device=device, seconds=round(time.time() - start, 2))
    return metrics


def ppo_from_sft(sft, reward_model, tokenizer, prompts, config, run, folder: Path, resume_key: str, **options):
    """PPO from the SFT model: the policy and the frozen reference start as copies of it, the value
    model as a copy of the reward model. Resumable from `folder`, where its history is written."""
    torch.manual_seed(config.seed)
    policy, ref, value_model = copy.deepcopy(sft), copy.deepcopy(sft), copy.deepcopy(reward_model)
    device = str(next(sft.parameters()).device)
    history = ppo_train(
        policy,
        ref,
        value_model,
        reward_model,
        tokenizer,
        prompts,
        config,
        device,
        run=run,
        checkpoint=folder / "train_state.pt",
        resume_key=resume_key,
        **options,
    )
    write_json(folder / "history.json", history)
    return policy, history


def reward_hacking(sft, reward_model, tokenizer, prompts, config, run, folder: Path, key: str) -> dict:
    """PPO again from the SFT model with no KL penalty (kl_coef 0, no adaptive controller) and
    `hacking_steps` batches: the reward model's score keeps rising while the simulated labeler's
    judgement of the same answers falls. A run of its own, apart from the stage's PPO, at
    `hacking_learning_rate` when set."""
    if config.rlhf.hacking_learning_rate > 0:
        ppo = dataclasses.replace(config.ppo, learning_rate=config.rlhf.hacking_learning_rate)
        config = dataclasses.replace(config, ppo=ppo)
    _, history = ppo_from_sft(
        sft,
        reward_model,
        tokenizer,
        prompts,
        config,
        run,
        folder,
        key + "-hacking",
        kl_coef=0.0,
        kl_target=0.0,
        steps=config.rlhf.hacking_steps,
        desc=HACKING_LOOP,
    )
    part = max(1, len(history) // 5)
    mean = lambda rows, name: round(sum(row[name] for row in rows) / len(rows), 4)  # noqa: E731
    return dict(
        hacking_score_start=mean(history[:part], "score"),
        hacking_score_end=mean(history[-part:], "score"),
        hacking_labeler_start=mean(history[:part], "labeler"),
        hacking_labeler_end=mean(history[-part:], "labeler"),
        hacking_kl_end=mean(history[-part:], "kl"),
    )


# --- for the notebook ----------------------------------------------------------------------------------


def read_history(run, name: str) -> list[dict]:
    """A history of the built stage: 'rm', 'dpo', 'ppo' or 'hacking' ([] when it was not run)."""
    path = run.path / "rlhf" / name / "history.json"
    return json.loads(path.read_text()) if path.exists() else []


def answer_examples(run, models=("sft", "ppo"), per_kind: int = 1) -> list[dict]:
    """A few held-out prompts, one per kind, with each model's reply, its reward-model score and
    the labeler's judgement: where the reward model agrees with the labeler, and where it does not."""
    rows = read_jsonl(run.path / "rlhf" / "eval.jsonl")
    picked, seen = [], {}
    for row in rows:
        if seen.get(row["kind"], 0) < per_kind:
            seen[row["kind"]] = seen.get(row["kind"], 0) + 1
            for model in models:
                picked.append(
                    dict(
                        prompt=f"[{model}] {row['messages'][-1]['content']}",
                        answer=row[model]["reply"],
                        rm_score=row[model]["rm_score"],
                        labeler=row[model]["labeler"],
                    )
                )
    return picked
