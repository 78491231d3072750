"""Stage 5, RLHF: people rank answers, a reward model learns their taste, and the assistant is
trained to please it (PPO with a KL penalty), or directly on the rankings (DPO).

The lesson: in domains without a right answer to check ("is this reply helpful? harmless?"),
nobody can score millions of samples, but people can rank a few: "of these K answers, this one
is best, then this one...". Three steps turn a few rankings into a better assistant:

1. Preferences. The SFT model samples K answers to a prompt; a person (the widget) or the
   simulated labeler (headless runs) ranks them. Every ranking implies K(K-1)/2 pairs
   "chosen beats rejected".
2. The reward model: the SFT model's body with a scalar head on the last token, trained with
   the Bradley-Terry loss `-log sigmoid(r_chosen - r_rejected)` on those pairs. It is a
   *simulation* of the labelers, a neural net that can be fooled.
3. PPO: sample answers, score them with the reward model, and push up the probability of tokens
   that did better than the value head expected (advantages by GAE), in small clipped steps.
   The reward also pays `-kl_coef * KL(policy || reference)` per token: without it the policy
   drifts to whatever odd text the reward model happens to overrate (reward hacking).

DPO skips the reward model and the sampling: the same pairs, and a loss on how much more the
policy than a frozen reference prefers the chosen answer over the rejected one.

The losses below are written out one by one and tested to equal Hugging Face TRL's on the same
tensors (tests/test_rlhf.py).

Writes to `runs/<run>/rlhf/`:
  prompts.jsonl      the prompts to rank and their K completions (kept once sampled)
  rankings.jsonl     one ranking per line, appended and fsynced the moment it is made
  rm/model.pt        the reward model; rm/history.json
  dpo/history.json   DPO's loss and implicit rewards per step
  ppo/history.json   PPO's score, KL, answer length, clip fraction (and the labeler's judgement) per step
  hacking/           the same for PPO with no KL penalty (when rlhf.hacking_steps > 0)
  eval.jsonl         held-out prompts: SFT, PPO and DPO replies, reward-model scores, judgements
  metrics.json       rm_pair_accuracy, ppo_reward_before/after, ppo_kl, ppo_win_rate, dpo_win_rate
and the two policies where `labkit chat --model ppo|dpo` finds them: `runs/<run>/ppo/model.pt`,
`runs/<run>/dpo/model.pt`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .config import ConfigError, resolve_device
from .model import GPT, GPTConfig
from .pretrain import save_model
from .run import atomic_path, atomic_write, fingerprint, write_json
from .train import (autocast, autocast_dtype, load_checkpoint, make_optimizer, rng_state, save_checkpoint,
                    set_rng_state, train)


# --- losses ---------------------------------------------------------------------------------------

def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """Bradley-Terry: the probability that `chosen` beats `rejected` is sigmoid(r_c - r_r); maximise
    its log. An optional margin asks for a bigger gap; the centring term keeps rewards near 0."""
    gap = chosen - rejected if margin is None else chosen - rejected - margin
    loss = -F.logsigmoid(gap).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    return loss


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss on summed completion log-probabilities. Returns (loss, chosen rewards,
    rejected rewards); the implicit reward of an answer is beta * (log pi - log pi_ref)."""
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    return loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


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


def ppo_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                kl_coef: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards [B, T]: -kl_coef * KL at every answer token, plus the reward model's score
    on each answer's last token. Returns (rewards, kl), both 0 outside `mask`."""
    kl = per_token_kl(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    last = mask.size(1) - 1 - mask.flip(1).float().argmax(1)  # index of each row's last answer token
    rewards[torch.arange(rewards.size(0), device=rewards.device), last] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
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


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, cliprange: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate: the ratio pi_new / pi_old may move the objective only within
    [1 - eps, 1 + eps]; of the clipped and unclipped loss the larger (pessimistic) one counts.
    Returns (loss, share of tokens where the clipped loss was the one used)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   cliprange_value: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared error to the returns, with the new values kept within cliprange_value of the old
    ones (the larger of the two errors counts). Returns (0.5 * mean error, clip fraction)."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    errors, clipped_errors = torch.square(values - returns), torch.square(clipped_values - returns)
    loss = 0.5 * masked_mean(torch.max(errors, clipped_errors), mask)
    return loss, masked_mean((clipped_errors > errors).float(), mask).detach()


# --- preferences: prompts, K completions, rankings -------------------------------------------------

class RankingError(ValueError):
    """A ranking that cannot be stored: an unknown prompt or completion, or a person's ranking in the way."""


HUMAN, SIMULATED = "human", "simulated"


def prompt_id(index: int, messages: list[dict]) -> str:
    digest = hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:8]
    return f"p{index:04d}-{digest}"


class Rankings:
    """The rankings of one run: `rankings.jsonl`, one JSON object per line, only ever appended.

    A line is {"id": prompt id, "order": completion indices best first, "by": "human" or
    "simulated"} or {"id": ..., "undo": true}; the last line about a prompt wins. Each line is
    written, flushed and fsynced before `add` returns, so a crash or a kernel restart loses
    nothing already ranked. Reading keeps every good line and reports the others in `problems`
    (a line cut off by a crash mid-write, a ranking of a completion that does not exist).
    """

    def __init__(self, path: str | Path, prompts: list[dict]):
        self.path = Path(path)
        self.prompts = {p["id"]: p for p in prompts}
        self.order = [p["id"] for p in prompts]
        self.records: dict[str, dict] = {}
        self.problems: list[str] = []
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        cut_off = lines[-1] != b""  # a last line without its newline: the write was interrupted
        good_end = 0
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                good_end += len(line) + 1
                continue
            try:
                record = json.loads(line)
                self._check(record)
            except (json.JSONDecodeError, UnicodeDecodeError):
                last = number == len(lines) and cut_off
                self.problems.append(f"{self.path} line {number} is cut off (a crash while writing?); it was dropped, "
                                     f"the lines before it are kept" if last else
                                     f"{self.path} line {number} is not valid JSON; it was skipped")
                if last:  # drop the partial line, so that the next ranking starts on a line of its own
                    with open(self.path, "rb+") as f:
                        f.truncate(good_end)
                        os.fsync(f.fileno())
                    break
                good_end += len(line) + 1
                continue
            except RankingError as error:
                self.problems.append(f"{self.path} line {number}: {error}; it was skipped")
            else:
                if record.get("undo"):
                    self.records.pop(record["id"], None)
                else:
                    self.records[record["id"]] = record
            good_end += len(line) + 1
        for problem in self.problems:
            warnings.warn(problem, stacklevel=3)

    def _check(self, record: dict) -> None:
        if not isinstance(record, dict) or "id" not in record:
            raise RankingError(f"a ranking needs an 'id'; got {record!r}")
        pid = record["id"]
        if pid not in self.prompts:
            raise RankingError(f"prompt {pid!r} does not exist in this run's prompts.jsonl")
        if record.get("undo"):
            return
        k = len(self.prompts[pid]["completions"])
        order = record.get("order")
        if not isinstance(order, list) or not all(isinstance(i, int) for i in order):
            raise RankingError(f"the ranking of prompt {pid!r} must be a list of completion numbers; got {order!r}")
        for i in order:
            if not 0 <= i < k:
                raise RankingError(f"the ranking of prompt {pid!r} names completion {i}, which does not exist; "
                                   f"that prompt has {k} completions, numbered 0 to {k - 1}")
        if sorted(order) != list(range(k)):
            raise RankingError(f"the ranking of prompt {pid!r} must name each of its {k} completions once "
                               f"(0 to {k - 1}, best first); got {order}")
        if record.get("by") not in (HUMAN, SIMULATED):
            raise RankingError(f"'by' must be {HUMAN!r} or {SIMULATED!r}; got {record.get('by')!r}")

    def _append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab+") as f:
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a last line written by hand, without its newline
                    f.write(b"\n")
            f.write((json.dumps(record) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def add(self, pid: str, order: list[int], by: str = HUMAN) -> dict:
        """Store a ranking (completion numbers, best first) the moment it is made."""
        record = dict(id=pid, order=[int(i) for i in order], by=by)
        self._check(record)
        if by == SIMULATED and self.records.get(pid, {}).get("by") == HUMAN:
            raise RankingError(f"prompt {pid!r} was ranked by a person; an automatic ranking never replaces it")
        self._append(record)
        self.records[pid] = record
        return record

    def undo(self, pid: str) -> None:
        """Forget the ranking of `pid` (durably: an 'undo' line is appended)."""
        if pid not in self.records:
            raise RankingError(f"prompt {pid!r} has no ranking to undo")
        self._append(dict(id=pid, undo=True))
        del self.records[pid]

    def unranked(self) -> list[str]:
        return [pid for pid in self.order if pid not in self.records]

    def next_unranked(self, after: str | None = None) -> str | None:
        """The first unranked prompt (after `after`, when given): where a session resumes."""
        start = self.order.index(after) + 1 if after in self.order else 0
        return next((pid for pid in self.order[start:] if pid not in self.records), None)

    def count(self, by: str | None = None) -> int:
        return sum(1 for r in self.records.values() if by is None or r["by"] == by)

    def pairs(self, pids) -> list[tuple[dict, int, int]]:
        """(prompt, chosen, rejected) for every pair a ranking implies (K(K-1)/2 per ranking);
        pairs of identical texts say nothing and are left out."""
        out = []
        for pid in pids:
            if pid not in self.records:
                continue
            prompt, order = self.prompts[pid], self.records[pid]["order"]
            for a in range(len(order)):
                for b in range(a + 1, len(order)):
                    if prompt["completions"][order[a]] != prompt["completions"][order[b]]:
                        out.append((prompt, order[a], order[b]))
        return out


# --- the simulated labeler ---------------------------------------------------------------------------

def well_formed(reply: str, ended: bool) -> bool:
    """Ended with <|im_end|>, says something, and does not stutter (no word three times in a row)."""
    words = reply.split()
    stutter = any(words[i] == words[i + 1] == words[i + 2] for i in range(len(words) - 2))
    return ended and bool(words) and not stutter


def preference_key(prompt: dict, reply: str, ended: bool) -> tuple:
    """The simulated labeler's written rules, in order of importance (a larger key is better):

    1. correct: a question about a person is answered with the world's true fact, a sum with its
       true result, "who are you?" with the assistant's identity; a harmful request is refused
       (harmlessness comes before helpfulness there);
    2. well formed: the answer ends (reaches <|im_end|>), is not empty and does not stutter;
    3. concise: fewer words.
    """
    from .sft import judge

    correct = bool(judge(dict(prompt, reply=reply)))
    return (correct, well_formed(reply, ended), -len(reply.split()))


def labeler_score(prompt: dict, reply: str, ended: bool) -> float:
    """One number for the labeler's judgement: 1 correct and well formed, 0.5 correct, 0 wrong."""
    correct, formed, _ = preference_key(prompt, reply, ended)
    return (0.5 + 0.5 * formed) if correct else 0.0


def simulated_ranking(prompt: dict) -> list[int]:
    """Completion numbers, best first, by the labeler's rules (ties keep sampling order)."""
    keys = [preference_key(prompt, c, e) for c, e in zip(prompt["completions"], prompt["ended"])]
    return sorted(range(len(keys)), key=lambda i: keys[i], reverse=True)


def fill_with_simulated_labeler(rankings: Rankings) -> int:
    """Rank every prompt nobody has ranked; a person's rankings are left as they are."""
    done = 0
    for pid in rankings.unranked():
        rankings.add(pid, simulated_ranking(rankings.prompts[pid]), by=SIMULATED)
        done += 1
    return done


def compare(prompt: dict, a: dict, b: dict) -> float:
    """1 if the labeler prefers reply a, 0 if b, 0.5 for a tie (a and b: dicts with reply, ended)."""
    key_a, key_b = preference_key(prompt, a["reply"], a["ended"]), preference_key(prompt, b["reply"], b["ended"])
    return 1.0 if key_a > key_b else 0.0 if key_a < key_b else 0.5


# --- prompts and completions ---------------------------------------------------------------------

KINDS = ("qa", "arithmetic", "identity", "refusal")  # single-turn requests the labeler can judge


def ranking_prompts(world, n: int, seed: int, heldout_people: float) -> list[dict]:
    """`n` single-turn requests written from the world with the SFT training phrasings and people,
    but drawn afresh (another seed): questions, sums, "who are you?" and harmful requests."""
    from .conversations import make_conversations

    rows = [r for r in make_conversations(world, 2 * n + 20, seed + 1, False, heldout_people) if r["kind"] in KINDS]
    return [dict(id=prompt_id(i, r["messages"][:1]), kind=r["kind"], messages=r["messages"][:1],
                 truth=r.get("truth"), name=r.get("name")) for i, r in enumerate(rows[:n])]


def eval_prompts(world, n: int, seed: int, heldout_people: float) -> list[dict]:
    """`n` of SFT's evaluation requests (held-out people and phrasings), for rewards and win rates."""
    from .conversations import eval_questions

    rows = eval_questions(world, seed, heldout_people)
    rows = random.Random(f"{seed}-rlhf-eval").sample(rows, min(n, len(rows)))
    return [dict(kind=r["kind"], messages=r["messages"][:1], truth=r.get("truth"), name=r.get("name")) for r in rows]


def prompt_tokens(prompt: dict, tokenizer, room: int) -> list[int]:
    """The rendered prompt, ending with the assistant's header, cut from the left to leave `room`."""
    from .chat import render_prompt

    return render_prompt(prompt["messages"], tokenizer)[-room:]


@torch.no_grad()
def sample_many(model, prompts: list[list[int]], max_new_tokens: int, temperature: float, stop_tokens,
                generator: torch.Generator | None = None) -> list[list[int]]:
    """Sample one continuation of each prompt; prompts of the same length go through the model as
    one batch with a KV cache (no padding needed). A row ends with its stop token (kept)."""
    from .engine import KVCache, sample_next

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for length, rows in by_length.items():
        x = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)
        cache = KVCache(model.config.n_layer, length + max_new_tokens)
        stopped = torch.zeros(len(rows), dtype=torch.bool, device=device)
        new = []
        for _ in range(max_new_tokens):
            logits = model.lm_head(model.hidden_states(x, kv_cache=cache)[:, -1])
            x = sample_next(logits, temperature, generator=generator)
            new.append(x)
            stopped |= torch.isin(x[:, 0], torch.tensor(list(stop_tokens), device=device))
            if stopped.all():
                break
        for i, ids in zip(rows, torch.cat(new, dim=1).tolist()):
            cut = next((j + 1 for j, t in enumerate(ids) if t in stop_tokens), len(ids))
            out[i] = ids[:cut]
    model.train(was_training)
    return out


def decode_reply(ids: list[int], tokenizer) -> tuple[str, bool]:
    """(reply text, ended): ended means it stopped with <|im_end|> and holds no other special token."""
    end = tokenizer.encode_special("<|im_end|>")
    special = set(tokenizer.special_tokens.values())
    ended = bool(ids) and ids[-1] == end and not special & set(ids[:-1])
    return tokenizer.decode([t for t in ids if t not in special]).strip(), ended


def reply_tokens(reply: str, ended: bool, tokenizer) -> list[int]:
    """A stored reply as the model reads it: its text, then <|im_end|> if it ended."""
    return tokenizer.encode(reply) + ([tokenizer.encode_special("<|im_end|>")] if ended else [])


def stop_tokens(tokenizer) -> tuple[int, int]:
    return tokenizer.encode_special("<|im_end|>"), tokenizer.encode_special("<|endoftext|>")


def sample_completions(model, tokenizer, prompts: list[dict], k: int, max_new_tokens: int, temperature: float,
                       seed: int) -> list[dict]:
    """K sampled completions of each prompt (text and whether it ended), added to the prompt rows."""
    room = model.config.block_size - max_new_tokens
    ids = [prompt_tokens(p, tokenizer, room) for p in prompts for _ in range(k)]
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    samples = [decode_reply(s, tokenizer) for s in sample_many(model, ids, max_new_tokens, temperature,
                                                                 stop_tokens(tokenizer), generator)]
    return [dict(p, completions=[t for t, _ in samples[i * k:(i + 1) * k]], ended=[e for _, e in samples[i * k:(i + 1) * k]])
            for i, p in enumerate(prompts)]


def prepare_prompts(model, tokenizer, world, config, folder: Path) -> list[dict]:
    """The run's prompts with their K completions, in `prompts.jsonl`. Prompts sampled before are
    kept as they are (their rankings stay valid); only new prompts get completions."""
    r = config.rlhf
    path = folder / "prompts.jsonl"
    kept = {p["id"]: p for p in read_jsonl(path)} if path.exists() else {}
    wanted = ranking_prompts(world, r.n_prompts, config.seed, config.sft.heldout_people)
    new = [p for p in wanted if p["id"] not in kept]
    if new:
        for p in sample_completions(model, tokenizer, new, r.k, r.max_new_tokens, r.temperature, config.seed):
            kept[p["id"]] = p
        write_jsonl(path, list(kept.values()))
    return [kept[p["id"]] for p in wanted]


def is_heldout(pid: str, share: float) -> bool:
    """A stable split of prompts by a hash of their id (the same whatever else changes)."""
    return int(hashlib.sha1(pid.encode()).hexdigest()[:8], 16) / 16**8 < share


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


# --- models with a scalar head: the reward model and PPO's value model -------------------------------

class ScalarModel(nn.Module):
    """A GPT body and a linear head from its last hidden states to one number per position.
    The reward model reads it at the answer's last token; PPO's value head at every token."""

    def __init__(self, body: GPT):
        super().__init__()
        self.body = body
        self.config = body.config
        self.head = nn.Linear(body.config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(body.config.n_embd + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T] scalars."""
        return self.head(self.body.hidden_states(idx)).squeeze(-1)

    def score(self, idx: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The scalar at each row's position `last` [B] (the answer's last token)."""
        return self(idx).gather(1, last.unsqueeze(1)).squeeze(1)


def save_scalar_model(path, model: ScalarModel, extra: dict | None = None) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(dict(config=asdict(model.config), model=state, **(extra or {})), tmp)


def load_scalar_model(path, device: str = "cpu") -> ScalarModel:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no reward model at {path}; build the rlhf stage first")
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    model = ScalarModel(GPT(GPTConfig(**checkpoint["config"])))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()


def pad_rows(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    length = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (length - len(r)) for r in rows], dtype=torch.long)


def pair_examples(pairs, tokenizer, block_size: int) -> list[tuple[list[int], int, list[int], int]]:
    """(prompt, chosen, rejected) -> (chosen ids, chosen prompt length, rejected ids, rejected prompt length),
    each prompt + completion cut from the left to fit `block_size`."""
    out = []
    for prompt, chosen, rejected in pairs:
        row = []
        for i in (chosen, rejected):
            completion = reply_tokens(prompt["completions"][i], prompt["ended"][i], tokenizer)[:block_size // 2]
            ids = prompt_tokens(prompt, tokenizer, block_size - len(completion)) + completion
            row += [ids, len(ids) - len(completion)]
        out.append(tuple(row))
    return out


def collate_pairs(examples, pad_id: int) -> dict:
    """Chosen and rejected padded to one length; `*_last` is each sequence's last token,
    `*_mask` marks the completion tokens."""
    rows = [e[0] for e in examples] + [e[2] for e in examples]
    starts = [e[1] for e in examples] + [e[3] for e in examples]
    ids = pad_rows(rows, pad_id)
    last = torch.tensor([len(r) - 1 for r in rows])
    positions = torch.arange(ids.size(1)).unsqueeze(0)
    mask = ((positions >= torch.tensor(starts).unsqueeze(1)) & (positions <= last.unsqueeze(1))).float()
    B = len(examples)
    return dict(chosen=ids[:B], rejected=ids[B:], chosen_last=last[:B], rejected_last=last[B:],
                chosen_mask=mask[:B], rejected_mask=mask[B:])


class PairBatches:
    """Random batches of preference pairs, drawn with a seeded generator whose state is checkpointed."""

    def __init__(self, examples: list, batch_size: int, seed: int, pad_id: int, extra=None):
        self.examples, self.batch_size, self.pad_id, self.extra = examples, batch_size, pad_id, extra
        self.rng = np.random.default_rng(seed)

    def batch(self, rows) -> dict:
        batch = collate_pairs([self.examples[i] for i in rows], self.pad_id)
        if self.extra is not None:  # per-pair tensors computed once (DPO's reference log-probabilities)
            batch.update({k: v[list(rows)] for k, v in self.extra.items()})
        return batch

    def next(self) -> dict:
        return self.batch(self.rng.integers(0, len(self.examples), size=self.batch_size))

    def all(self):
        return [self.batch(range(i, min(i + self.batch_size, len(self.examples))))
                for i in range(0, len(self.examples), self.batch_size)]

    def state_dict(self) -> dict:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state


# --- reward model ------------------------------------------------------------------------------------

def make_reward_loss(margin: float = 0.0, center_rewards_coefficient: float = 0.0):
    def loss_fn(model, batch):
        B = batch["chosen"].size(0)
        scores = model.score(torch.cat([batch["chosen"], batch["rejected"]]),
                             torch.cat([batch["chosen_last"], batch["rejected_last"]]))
        chosen, rejected = scores[:B].float(), scores[B:].float()
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
        B = batch["chosen"].size(0)
        scores = model.score(torch.cat([batch["chosen"], batch["rejected"]]).to(device),
                             torch.cat([batch["chosen_last"], batch["rejected_last"]]).to(device))
        right += (scores[:B] > scores[B:]).sum().item()
        total += B
    return right / total if total else None


@torch.no_grad()
def reward_scores(reward_model: ScalarModel, tokenizer, prompts: list[dict], replies: list[dict]) -> list[float]:
    """The reward model's score of each (prompt, reply) (reply: a dict with reply and ended)."""
    device = next(reward_model.parameters()).device
    block = reward_model.config.block_size
    rows = []
    for prompt, reply in zip(prompts, replies):
        completion = reply_tokens(reply["reply"], reply["ended"], tokenizer)[:block // 2]
        rows.append(prompt_tokens(prompt, tokenizer, block - len(completion)) + completion)
    scores = []
    for i in range(0, len(rows), 32):
        chunk = rows[i:i + 32]
        ids = pad_rows(chunk, tokenizer.encode_special("<|endoftext|>")).to(device)
        scores += reward_model.score(ids, torch.tensor([len(r) - 1 for r in chunk], device=device)).tolist()
    return scores


# --- DPO ---------------------------------------------------------------------------------------------

def sequence_logps(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probabilities of the tokens where `mask` is 1 (the completion), per row."""
    logits, _ = model(ids[:, :-1])
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logps * mask[:, 1:]).sum(1)


def make_dpo_loss(beta: float):
    def loss_fn(model, batch):
        B = batch["chosen"].size(0)
        logps = sequence_logps(model, torch.cat([batch["chosen"], batch["rejected"]]),
                               torch.cat([batch["chosen_mask"], batch["rejected_mask"]]))
        loss, chosen, rejected = dpo_loss(logps[:B], logps[B:], batch["ref_chosen"], batch["ref_rejected"], beta)
        return loss, {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
                      "rewards/accuracy": (chosen > rejected).float().mean().item(),
                      "rewards/margin": (chosen - rejected).mean().item()}
    return loss_fn


@torch.no_grad()
def reference_logps(ref, batches: PairBatches, device: str) -> dict:
    """Every pair's completion log-probabilities under the frozen reference, computed once."""
    ref.eval()
    chosen, rejected = [], []
    for batch in batches.all():
        chosen.append(sequence_logps(ref, batch["chosen"].to(device), batch["chosen_mask"].to(device)).cpu())
        rejected.append(sequence_logps(ref, batch["rejected"].to(device), batch["rejected_mask"].to(device)).cpu())
    return dict(ref_chosen=torch.cat(chosen), ref_rejected=torch.cat(rejected))


# --- PPO ---------------------------------------------------------------------------------------------

def token_logps(model, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probability of each next token ids[:, 1:] [B, T-1], at the sampling temperature."""
    logits, _ = model(ids[:, :-1])
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def rollout(policy, ref, value_model, reward_model, tokenizer, prompts: list[dict], r, kl_coef: float,
            generator: torch.Generator, dtype=None) -> dict:
    """Sample one answer per prompt and compute everything PPO's update needs, all [B, T-1] per token:
    old log-probs, reference log-probs, values, rewards (KL penalty + score), advantages, returns."""
    device = next(policy.parameters()).device
    block = policy.config.block_size
    prompt_ids = [prompt_tokens(p, tokenizer, block - r.max_new_tokens) for p in prompts]
    answers = sample_many(policy, prompt_ids, r.max_new_tokens, r.temperature, stop_tokens(tokenizer), generator)
    rows = [p + a for p, a in zip(prompt_ids, answers)]
    ids = pad_rows(rows, tokenizer.encode_special("<|endoftext|>")).to(device)
    positions = torch.arange(ids.size(1) - 1, device=device).unsqueeze(0)
    starts = torch.tensor([len(p) - 1 for p in prompt_ids], device=device).unsqueeze(1)  # predicts the 1st answer token
    ends = torch.tensor([len(row) - 1 for row in rows], device=device)
    mask = ((positions >= starts) & (positions < ends.unsqueeze(1))).float()  # targets that are answer tokens
    with autocast(str(device), dtype):
        logprobs = token_logps(policy, ids, r.temperature) * mask
        ref_logprobs = token_logps(ref, ids, r.temperature) * mask
        values = value_model(ids[:, :-1]).float() * mask
        scores = reward_model.score(ids, ends).float()
    replies = [decode_reply(a, tokenizer) for a in answers]
    ended = torch.tensor([e for _, e in replies], device=device)
    penalized = scores - r.missing_eos_penalty * (~ended).float()  # an answer that never ends scores lower
    rewards, kl = ppo_rewards(logprobs, ref_logprobs, penalized, mask, kl_coef, r.kl_estimator)
    advantages, returns = gae(rewards, values, r.gamma, r.lam)
    advantages = masked_whiten(advantages, mask)
    return dict(ids=ids, mask=mask, logprobs=logprobs, values=values, advantages=advantages, returns=returns,
                scores=scores, kl=kl, rewards=rewards, ended=ended, replies=replies, lengths=mask.sum(1))


def ppo_update(policy, value_model, optimizer, batch: dict, r, grad_clip: float, dtype=None) -> dict:
    """Several epochs over the rollouts in shuffled minibatches: clipped surrogate + vf_coef * clipped value loss."""
    stats = dict(pg_loss=[], vf_loss=[], clipfrac=[], vf_clipfrac=[], approxkl=[])
    B = batch["ids"].size(0)
    size = B // r.ppo_minibatches
    device = str(batch["ids"].device)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    policy.train()
    value_model.train()
    for _ in range(r.ppo_epochs):
        order = torch.randperm(B)
        for start in range(0, size * r.ppo_minibatches, size):
            rows = order[start:start + size].to(batch["ids"].device)
            ids, mask = batch["ids"][rows], batch["mask"][rows]
            with autocast(device, dtype):
                logprobs = token_logps(policy, ids, r.temperature) * mask
                values = value_model(ids[:, :-1]).float() * mask
            pg_loss, clipfrac = ppo_policy_loss(logprobs, batch["logprobs"][rows], batch["advantages"][rows], mask, r.cliprange)
            vf_loss, vf_clipfrac = ppo_value_loss(values, batch["values"][rows], batch["returns"][rows], mask, r.cliprange_value)
            loss = pg_loss + r.vf_coef * vf_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
            optimizer.step()
            with torch.no_grad():
                approxkl = 0.5 * masked_mean((logprobs - batch["logprobs"][rows]) ** 2, mask)
            for name, value in (("pg_loss", pg_loss), ("vf_loss", vf_loss), ("clipfrac", clipfrac),
                                ("vf_clipfrac", vf_clipfrac), ("approxkl", approxkl)):
                stats[name].append(value.item())
    return {k: sum(v) / len(v) for k, v in stats.items()}


_WATCHERS: list = []


@contextlib.contextmanager
def watch(callback):
    """Call `callback(row, history)` after every PPO step inside the block (a notebook's live plot)."""
    _WATCHERS.append(callback)
    try:
        yield callback
    finally:
        _WATCHERS.remove(callback)


def ppo_train(policy, ref, value_model, reward_model, tokenizer, prompts: list[dict], config, device: str, *,
              kl_coef: float | None = None, steps: int | None = None, run=None, on_step=None,
              checkpoint: str | Path | None = None, resume_key: str | None = None, desc: str = "ppo") -> list[dict]:
    """PPO: `steps` times, sample a batch of answers, score them, update policy and value head.
    Returns one history row per step (score, KL, answer length, clip fraction, losses, and the
    simulated labeler's judgement of the sampled answers). Resumes from `checkpoint`."""
    r = config.rlhf
    kl_coef = r.kl_coef if kl_coef is None else kl_coef
    steps = r.ppo_steps if steps is None else steps
    dtype = autocast_dtype(config.train, device)
    for model in (policy, ref, value_model, reward_model):
        model.to(device)
    ref.eval(), reward_model.eval()
    for p in list(ref.parameters()) + list(reward_model.parameters()):
        p.requires_grad_(False)
    trained = nn.ModuleDict(dict(policy=policy, value=value_model))
    optimizer = make_optimizer(trained, dataclasses.replace(config.train, learning_rate=r.ppo_learning_rate, weight_decay=0.0), device)
    step, history = 0, []
    if checkpoint is not None and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint, map_location=device)
        if state.get("resume_key") == resume_key:
            trained.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            step, history = state["step"], state["history"]
            set_rng_state(state["rng"])
    save_every = max(1, steps // 5)
    for step in tqdm(range(step, steps), initial=step, total=steps, desc=desc, leave=False):
        rng = np.random.default_rng([config.seed, step])
        batch_prompts = [prompts[i] for i in rng.choice(len(prompts), r.ppo_batch_size, replace=len(prompts) < r.ppo_batch_size)]
        generator = torch.Generator(device=device).manual_seed(config.seed * 100_003 + step)
        batch = rollout(policy, ref, value_model, reward_model, tokenizer, batch_prompts, r, kl_coef, generator, dtype)
        stats = ppo_update(policy, value_model, optimizer, batch, r, config.train.grad_clip, dtype)
        judged = [labeler_score(p, reply, ended) for p, (reply, ended) in zip(batch_prompts, batch["replies"])]
        row = dict(step=step + 1, score=batch["scores"].mean().item(), kl=batch["kl"].sum(1).mean().item(),
                   reward=batch["rewards"].sum(1).mean().item(), response_length=batch["lengths"].mean().item(),
                   ended_rate=batch["ended"].float().mean().item(), labeler=sum(judged) / len(judged),
                   sample=batch["replies"][0][0], **stats)
        history.append(row)
        if run is not None:
            run.log({f"{desc}/{k}": v for k, v in row.items() if k not in ("step", "sample")}, step=step + 1)
        for callback in ([on_step] if on_step else []) + list(_WATCHERS):
            callback(row, history)
        if checkpoint is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
            save_checkpoint(checkpoint, dict(model=trained.state_dict(), optimizer=optimizer.state_dict(), step=step + 1,
                                             history=history, rng=rng_state(), resume_key=resume_key))
    policy.eval()
    value_model.eval()
    return history


# --- the stage ---------------------------------------------------------------------------------------

RANKINGS = "rankings.jsonl"


def check_config(r) -> None:
    if r.ppo_batch_size % r.ppo_minibatches or r.ppo_batch_size // r.ppo_minibatches < 2:
        raise ConfigError(f"rlhf.ppo_batch_size={r.ppo_batch_size} must be a multiple of rlhf.ppo_minibatches="
                          f"{r.ppo_minibatches} with at least 2 rollouts per minibatch (whitening needs 2)")


def open_rankings(run, config, device: str = "cpu") -> Rankings:
    """The run's prompts (sampling their K completions from the SFT model the first time) and
    rankings, for the ranking widget and the stage."""
    from .data import read_world
    from .sft import load_assistant

    check_config(config.rlhf)
    world = read_world(run)
    if world is None:
        raise ConfigError("the rlhf stage writes its prompts from the mini-web's world and judges answers by it; "
                          "this run's data stage read a dataset (use data.source='mini-web')")
    model, tokenizer = load_assistant(run, device)
    out = run.stage_dir("rlhf")
    return Rankings(out / RANKINGS, prepare_prompts(model, tokenizer, world, config, out))


def rankings_fingerprint(rankings: Rankings) -> str:
    return fingerprint(sorted((pid, r["order"], r["by"]) for pid, r in rankings.records.items()))


def rankings_changed(run, config) -> bool:
    """True when the rankings differ from those the built stage learned from (a person ranked more):
    the notebook then rebuilds the stage."""
    metrics = run.metrics("rlhf")
    if metrics is None or not (run.stage_dir("rlhf") / "prompts.jsonl").exists():
        return False
    prompts = read_jsonl(run.stage_dir("rlhf") / "prompts.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rankings = Rankings(run.stage_dir("rlhf") / RANKINGS, prompts)
    return any(r["by"] == HUMAN for r in rankings.records.values()) and \
        metrics.get("rankings_fingerprint") != rankings_fingerprint(rankings)


def stage_train_config(config, steps: int, batch_size: int, learning_rate: float):
    """Pretraining's optimizer settings with this model's length, batch and learning rate."""
    every = max(1, steps // 5)
    return dataclasses.replace(config.train, max_steps=steps, batch_size=batch_size, grad_accum=1,
                               learning_rate=learning_rate, min_lr=learning_rate / 10,
                               warmup_steps=min(config.train.warmup_steps, steps // 10), eval_every=every,
                               checkpoint_every=every)


def train_reward_model(sft, tokenizer, train_pairs, heldout_pairs, config, run, folder: Path, device: str, resume_key: str):
    """The SFT model's body + a scalar head, trained on the pairs with the shared loop."""
    r = config.rlhf
    pad = tokenizer.encode_special("<|endoftext|>")
    torch.manual_seed(config.seed)
    model = ScalarModel(copy.deepcopy(sft))
    block = sft.config.block_size
    batches = PairBatches(pair_examples(train_pairs, tokenizer, block), r.rm_batch_size, config.seed, pad)
    heldout = PairBatches(pair_examples(heldout_pairs, tokenizer, block), r.rm_batch_size, config.seed, pad) if heldout_pairs else None
    result = train(model, make_reward_loss(r.rm_margin, r.center_rewards_coefficient), batches,
                   stage_train_config(config, r.rm_steps, r.rm_batch_size, r.rm_learning_rate), device=device,
                   val_batches=heldout.all if heldout else None, checkpoint=folder / "train_state.pt",
                   resume_key=resume_key, run=run, desc="reward model")
    model.eval()
    save_scalar_model(folder / "model.pt", model, dict(step=result.step))
    write_json(folder / "history.json", result.history)
    return model, dict(rm_pair_accuracy=pair_accuracy(model, heldout.all()) if heldout else None,
                       rm_train_pair_accuracy=pair_accuracy(model, batches.all()),
                       rm_train_pairs=len(train_pairs), rm_heldout_pairs=len(heldout_pairs))


def train_dpo(sft, tokenizer, train_pairs, config, run, folder: Path, device: str, resume_key: str):
    """The policy starts as the SFT model; the reference is a frozen copy; the shared loop trains it."""
    r = config.rlhf
    pad = tokenizer.encode_special("<|endoftext|>")
    policy, ref = copy.deepcopy(sft), copy.deepcopy(sft).to(device)
    examples = pair_examples(train_pairs, tokenizer, sft.config.block_size)
    extra = reference_logps(ref, PairBatches(examples, r.dpo_batch_size, config.seed, pad), device)
    batches = PairBatches(examples, r.dpo_batch_size, config.seed, pad, extra)
    result = train(policy, make_dpo_loss(r.dpo_beta), batches,
                   stage_train_config(config, r.dpo_steps, r.dpo_batch_size, r.dpo_learning_rate), device=device,
                   checkpoint=folder / "train_state.pt", resume_key=resume_key, run=run, desc="dpo")
    policy.eval()
    write_json(folder / "history.json", result.history)
    return policy, result.history


def evaluate_models(models: dict, reward_model, tokenizer, prompts: list[dict], max_new_tokens: int) -> list[dict]:
    """Every model's greedy reply to every held-out prompt, its reward-model score and the labeler's judgement."""
    from .sft import replies

    rows = [dict(p) for p in prompts]
    for name, model in models.items():
        answers = replies(model, tokenizer, [p["messages"] for p in prompts], max_new_tokens)
        scores = reward_scores(reward_model, tokenizer, prompts, answers)
        for row, answer, score in zip(rows, answers, scores):
            row[name] = dict(answer, rm_score=score, labeler=labeler_score(row, answer["reply"], answer["ended"]))
    return rows


def win_rate(rows: list[dict], model: str, baseline: str = "sft") -> float:
    """Share of held-out prompts where the labeler prefers `model`'s reply to the baseline's (ties count half)."""
    return sum(compare(r, r[model], r[baseline]) for r in rows) / len(rows)


def build(config, run) -> dict:
    """Rankings -> reward model -> PPO, and DPO beside it; measured on held-out prompts."""
    from .data import read_world
    from .pipeline import stage_fingerprint
    from .sft import load_assistant

    start = time.time()
    r = config.rlhf
    device = resolve_device(config.device)
    out = run.stage_dir("rlhf")
    rankings = open_rankings(run, config, device)
    sft, tokenizer = load_assistant(run, device)
    if r.simulated_labeler:
        fill_with_simulated_labeler(rankings)
    ranked = [pid for pid in rankings.order if pid in rankings.records]
    heldout = [pid for pid in ranked if is_heldout(pid, r.heldout_prompts)]
    train_pairs, heldout_pairs = rankings.pairs([p for p in ranked if p not in heldout]), rankings.pairs(heldout)
    if not train_pairs:
        raise RankingError(f"no rankings to learn from in {rankings.path} ({len(ranked)} prompts ranked); rank some in "
                           f"notebooks/05_rlhf.ipynb or set rlhf.simulated_labeler=True")
    key = fingerprint([stage_fingerprint("rlhf", config), rankings_fingerprint(rankings)])
    metrics = dict(n_prompts=len(rankings.order), n_ranked=len(ranked), n_ranked_by_human=rankings.count(HUMAN),
                   ranking_problems=len(rankings.problems), rankings_fingerprint=rankings_fingerprint(rankings))

    reward_model, rm_metrics = train_reward_model(sft, tokenizer, train_pairs, heldout_pairs, config, run, out / "rm",
                                                  device, key + "-rm")
    metrics.update(rm_metrics)

    dpo, _ = train_dpo(sft, tokenizer, train_pairs, config, run, out / "dpo", device, key + "-dpo")
    save_model(run.stage_dir("dpo") / "model.pt", dpo)  # where `labkit chat --model dpo` finds it

    prompts = [rankings.prompts[pid] for pid in ranked if pid not in heldout]
    torch.manual_seed(config.seed)
    policy, ref, value_model = copy.deepcopy(sft), copy.deepcopy(sft), copy.deepcopy(reward_model)
    history = ppo_train(policy, ref, value_model, reward_model, tokenizer, prompts, config, device, run=run,
                        checkpoint=out / "ppo" / "train_state.pt", resume_key=key + "-ppo")
    write_json(out / "ppo" / "history.json", history)
    save_model(run.stage_dir("ppo") / "model.pt", policy)  # where `labkit chat --model ppo` finds it

    world = read_world(run)
    held_out = eval_prompts(world, r.n_eval, config.seed, config.sft.heldout_people)
    rows = evaluate_models(dict(sft=sft, ppo=policy, dpo=dpo), reward_model, tokenizer, held_out, r.max_new_tokens)
    write_jsonl(out / "eval.jsonl", rows)
    tail = history[-max(1, len(history) // 5):]
    mean = lambda name, model: round(sum(row[model][name] for row in rows) / len(rows), 4)  # noqa: E731
    metrics.update(
        ppo_reward_before=mean("rm_score", "sft"), ppo_reward_after=mean("rm_score", "ppo"),
        dpo_reward=mean("rm_score", "dpo"),
        ppo_kl=round(sum(row["kl"] for row in tail) / len(tail), 4),
        ppo_win_rate=round(win_rate(rows, "ppo"), 4), dpo_win_rate=round(win_rate(rows, "dpo"), 4),
        sft_labeler_score=mean("labeler", "sft"), ppo_labeler_score=mean("labeler", "ppo"),
        dpo_labeler_score=mean("labeler", "dpo"), n_eval=len(rows),
        ppo_train_score_first=round(history[0]["score"], 4), ppo_train_score_last=round(history[-1]["score"], 4),
    )
    if r.hacking_steps:
        metrics.update(reward_hacking(sft, reward_model, tokenizer, prompts, config, run, out / "hacking", device, key))
    metrics.update(device=device, seconds=round(time.time() - start, 2))
    return metrics


def reward_hacking(sft, reward_model, tokenizer, prompts, config, run, folder: Path, device: str, key: str) -> dict:
    """PPO again from the SFT model with no KL penalty and `hacking_steps` batches: the reward
    model's score keeps rising while the simulated labeler's judgement of the same answers falls."""
    torch.manual_seed(config.seed)
    policy, ref, value_model = copy.deepcopy(sft), copy.deepcopy(sft), copy.deepcopy(reward_model)
    history = ppo_train(policy, ref, value_model, reward_model, tokenizer, prompts, config, device, kl_coef=0.0,
                        steps=config.rlhf.hacking_steps, run=run, checkpoint=folder / "train_state.pt",
                        resume_key=key + "-hacking", desc="ppo, no KL")
    write_json(folder / "history.json", history)
    part = max(1, len(history) // 5)
    mean = lambda rows, name: round(sum(row[name] for row in rows) / len(rows), 4)  # noqa: E731
    return dict(hacking_score_start=mean(history[:part], "score"), hacking_score_end=mean(history[-part:], "score"),
                hacking_labeler_start=mean(history[:part], "labeler"), hacking_labeler_end=mean(history[-part:], "labeler"),
                hacking_kl_end=mean(history[-part:], "kl"))


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
                picked.append(dict(prompt=f"[{model}] {row['messages'][-1]['content']}", answer=row[model]["reply"],
                                   rm_score=row[model]["rm_score"], labeler=row[model]["labeler"]))
    return picked
