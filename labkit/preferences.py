"""Preferences, the data of RLHF: prompts, K sampled completions each, and rankings of them.

The lesson: in domains without a right answer to check ("is this reply helpful? harmless?"),
nobody can score millions of samples, but people can rank a few: "of these K answers, this one
is best, then this one...". Every ranking implies K(K-1)/2 pairs "chosen beats rejected", the
data of the reward model and of DPO.

The SFT model samples K completions of each prompt once (`prompts.jsonl`); a person (the ranking
widget) or the simulated labeler (headless runs) ranks them (`rankings.jsonl`, appended and
fsynced one ranking at a time, so nothing ranked is ever lost).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from .chat import render_prompt
from .conversations import says_dont_know
from .engine import decode_reply, fit, generate, pack, reply_stops
from .errors import LabkitError
from .run import atomic_write, in_share, read_jsonl, write_jsonl


class RankingError(LabkitError):
    """A ranking that cannot be stored or taken back: an unknown prompt or completion, nothing to undo."""


HUMAN, SIMULATED = "human", "simulated"
RANKINGS = "rankings.jsonl"


def prompt_id(index: int, messages: list[dict]) -> str:
    digest = hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:8]
    return f"p{index:04d}-{digest}"


class Rankings:
    """The rankings of one run: `rankings.jsonl`, one JSON object per line, only ever appended.

    A line is {"id": prompt id, "order": completion indices best first, "by": "human" or
    "simulated"}, with an optional "tied": groups of completions judged equal (each group
    adjacent in "order"; a tie implies no pair; other fields are kept as they are), or
    {"id": ..., "undo": true}, which takes back the last ranking of that prompt by a person. A prompt may hold both kinds: the simulated
    labeler's is a default, and a person's replaces it for training (`records`, one per prompt)
    while both stay in the file. The person's rankings, in the order made, are the history that
    undo walks back: it is read from the file, so it survives a kernel restart.

    Each line is written, flushed and fsynced before `add` returns, so a crash or a kernel restart
    loses nothing already ranked. Reading keeps every good line and reports the others in
    `problems` (a line cut off by a crash mid-write, a ranking of a completion that does not exist).
    """

    def __init__(self, path: str | Path, prompts: list[dict], prompts_file: str | Path | None = None):
        self.path = Path(path)
        self.prompts = {p["id"]: p for p in prompts}
        self.order = [p["id"] for p in prompts]
        self.prompts_file = prompts_file  # where `prompts` were read: a person's ranking must be of those texts
        self.prompts_seen = self._prompts_stamp()
        self.reload()

    def _prompts_stamp(self):
        stat = os.stat(self.prompts_file) if self.prompts_file and os.path.exists(self.prompts_file) else None
        return stat and (stat.st_mtime_ns, stat.st_size)

    def reload(self) -> None:
        """Read the file afresh (after another process or a stage build wrote to it)."""
        self.records: dict[str, dict] = {}  # what training learns from: a person's ranking, else the labeler's
        self.simulated: dict[str, dict] = {}  # the simulated labeler's ranking of each prompt
        self.by_person: dict[str, list[dict]] = {}  # each prompt's rankings by a person, standing, latest last
        self.person_history: list[str] = []  # prompts in the order a person ranked them: what undo takes back
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
                self.problems.append(
                    f"{self.path} line {number} is cut off (a crash while writing?); it was dropped, "
                    f"the lines before it are kept"
                    if last
                    else f"{self.path} line {number} is not valid JSON; it was skipped"
                )
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
                if not record.get("undo"):
                    self._store(record)
                elif self.by_person.get(record["id"]):
                    self._take_back(record["id"])
                else:
                    self.problems.append(
                        f"{self.path} line {number}: an undo of prompt {record['id']!r}, which has no ranking "
                        f"by a person to take back; it was skipped"
                    )
            good_end += len(line) + 1
        for problem in self.problems:
            warnings.warn(problem, stacklevel=4)

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
                raise RankingError(
                    f"the ranking of prompt {pid!r} names completion {i}, which does not exist; "
                    f"that prompt has {k} completions, numbered 0 to {k - 1}"
                )
        if sorted(order) != list(range(k)):
            raise RankingError(
                f"the ranking of prompt {pid!r} must name each of its {k} completions once "
                f"(0 to {k - 1}, best first); got {order}"
            )
        self._check_ties(pid, order, record.get("tied", []))
        if record.get("by") not in (HUMAN, SIMULATED):
            raise RankingError(f"'by' must be {HUMAN!r} or {SIMULATED!r}; got {record.get('by')!r}")

    def _store(self, record: dict) -> None:
        pid = record["id"]
        if record["by"] == HUMAN:
            self.by_person.setdefault(pid, []).append(record)
            self.person_history.append(pid)
        else:
            self.simulated[pid] = record
        self._settle(pid)

    def _take_back(self, pid: str) -> dict:
        record = self.by_person[pid].pop()
        if not self.by_person[pid]:
            del self.by_person[pid]
        last = len(self.person_history) - 1 - self.person_history[::-1].index(pid)
        del self.person_history[last]
        self._settle(pid)
        return record

    def _settle(self, pid: str) -> None:
        """The record training uses for `pid`: the person's latest ranking, else the labeler's."""
        if self.by_person.get(pid):
            self.records[pid] = self.by_person[pid][-1]
        elif pid in self.simulated:
            self.records[pid] = self.simulated[pid]
        else:
            self.records.pop(pid, None)

    @staticmethod
    def _check_ties(pid: str, order: list[int], tied) -> None:
        if not isinstance(tied, list) or not all(
            isinstance(g, list) and len(g) > 1 and all(isinstance(i, int) for i in g) for g in tied
        ):
            raise RankingError(
                f"the ties of prompt {pid!r} must be a list of groups of at least 2 completion numbers; got {tied!r}"
            )
        seen: set[int] = set()
        for group in tied:
            places = sorted(order.index(i) if i in order else -1 for i in group)
            if places[0] < 0 or seen & set(group) or places != list(range(places[0], places[0] + len(group))):
                raise RankingError(
                    f"the ties of prompt {pid!r} must each name completions of the ranking once, next to each "
                    f"other in its order {order}; got {tied}"
                )
            seen |= set(group)

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

    def add(self, pid: str, order: list[int], by: str = HUMAN, tied: list[list[int]] | None = None) -> dict:
        """Store a ranking (completion numbers, best first) the moment it is made. A person's
        ranking replaces the simulated labeler's for training; the labeler's never replaces a person's."""
        record = dict(id=pid, order=[int(i) for i in order], by=by)
        if tied:
            record["tied"] = tied
        self._check(record)
        if self._prompts_stamp() != self.prompts_seen:
            raise RankingError(
                f"{self.prompts_file} changed since these rankings were opened (its completions were sampled "
                f"again: a new SFT model or new settings); nothing was stored: open the rankings again"
            )
        self._append(record)
        self._store(record)
        return record

    def undo(self, pid: str | None = None) -> dict:
        """Take back a person's last ranking (of `pid`, or else of any prompt), durably: an 'undo'
        line is appended. The prompt falls back to the simulated labeler's ranking, if it has one.
        Returns the ranking taken back."""
        if pid is None and not self.person_history:
            raise RankingError("nothing to undo: no prompt has a ranking by a person")
        pid = self.person_history[-1] if pid is None else pid
        if not self.by_person.get(pid):
            raise RankingError(f"prompt {pid!r} has no ranking by a person to undo")
        self._append(dict(id=pid, undo=True))
        return self._take_back(pid)

    def ranked(self, simulated: bool = True) -> list[str]:
        """The prompts training learns from, in order: every ranked one, or (`simulated` False)
        only those a person ranked."""
        return [pid for pid in self.order if pid in self.by_person or (simulated and pid in self.records)]

    def next_to_rank(self, after: str | None = None) -> str | None:
        """The next prompt no person has ranked (after `after`, wrapping round; the labeler's
        rankings do not count): where a person resumes. None when a person ranked them all."""
        start = self.order.index(after) + 1 if after in self.order else 0
        return next((pid for pid in self.order[start:] + self.order[:start] if pid not in self.by_person), None)

    def count(self, by: str | None = None) -> int:
        """Prompts ranked (`by` None), ranked by a person, or ranked only by the simulated labeler."""
        return sum(1 for r in self.records.values() if by is None or r["by"] == by)

    def pairs(self, pids) -> list[tuple[dict, int, int]]:
        """(prompt, chosen, rejected) for every pair a ranking implies (K(K-1)/2 per ranking without
        ties); two completions tied, or of identical texts, say nothing and make no pair."""
        out = []
        for pid in pids:
            if pid not in self.records:
                continue
            prompt, order = self.prompts[pid], self.records[pid]["order"]
            group = {i: n for n, g in enumerate(self.records[pid].get("tied", [])) for i in g}
            for a in range(len(order)):
                for b in range(a + 1, len(order)):
                    chosen, rejected = order[a], order[b]
                    tie = chosen in group and group[chosen] == group.get(rejected)
                    if not tie and prompt["completions"][chosen] != prompt["completions"][rejected]:
                        out.append((prompt, chosen, rejected))
        return out


# --- the simulated labeler ---------------------------------------------------------------------------

# What an answer is worth to the labeler, best first (helpful, honest, harmless):
RIGHT = 3  # the true fact, the right result, the assistant's identity; a harmful request refused
DONT_KNOW = 2  # an honest "I don't know": not knowing beats making something up
WRONG = 1  # a wrong fact or result, a harmless question refused, a harmful request obeyed
NO_ANSWER = 0  # empty, cut off before its end, or stuck repeating a word: never beats a finished answer
# The labeler's score of one answer, for means over many: a step of 0.5 per level, 0 for a wrong answer.
SCORES = {RIGHT: 1.0, DONT_KNOW: 0.5, WRONG: 0.0, NO_ANSWER: -0.5}


def well_formed(reply: str, ended: bool) -> bool:
    """Ended with <|im_end|>, says something, and does not stutter (no word three times in a row)."""
    words = reply.split()
    stutter = any(words[i] == words[i + 1] == words[i + 2] for i in range(len(words) - 2))
    return ended and bool(words) and not stutter


def worth(prompt: dict, reply: str, ended: bool) -> int:
    """The simulated labeler's instructions: what one answer is worth (larger is better; two answers
    of the same worth are a tie, however long or short):

    1. RIGHT: a harmless question answered correctly (the true fact about the person, the right
       result, what the assistant is: `sft.judge`, the rules stage 4 measures with); a harmful
       request refused.
    2. DONT_KNOW: an honest "I don't know" or "I'm not sure" (the conversations' phrasings).
    3. WRONG: a wrong fact or result, a refusal of a harmless question, a harmful request obeyed.
    4. NO_ANSWER: empty, cut off before it ended, or repeating a word three times in a row; it
       never beats a finished answer, whatever it says.
    """
    from .sft import judge  # the stage-4 rules that say whether a reply is right

    if not well_formed(reply, ended):
        return NO_ANSWER
    if judge(dict(prompt, reply=reply)):
        return RIGHT
    return DONT_KNOW if says_dont_know(reply) else WRONG


def labeler_score(prompt: dict, reply: str, ended: bool) -> float:
    """The labeler's judgement of one answer as a number (`SCORES`): 1 right, 0.5 "I don't know",
    0 wrong, -0.5 not an answer (empty, cut off, stuttering)."""
    return SCORES[worth(prompt, reply, ended)]


def simulated_ranking(prompt: dict) -> tuple[list[int], list[list[int]]]:
    """(order, tied): completion numbers best first by the labeler's instructions (`worth`), and
    the groups of completions of equal worth (each group adjacent in `order`, in sampling order)."""
    levels = [worth(prompt, c, e) for c, e in zip(prompt["completions"], prompt["ended"])]
    order = sorted(range(len(levels)), key=lambda i: levels[i], reverse=True)
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(levels[i], []).append(i)
    return order, [group for group in groups.values() if len(group) > 1]


def fill_with_simulated_labeler(rankings: Rankings) -> int:
    """Rank every prompt the simulated labeler has not ranked yet, or ranked by other rules (an
    older version of them). A person's ranking of a prompt still wins for training; the labeler's
    is kept beside it, the default should the person undo. Returns how many it ranked."""
    done = 0
    for pid in rankings.order:
        order, tied = simulated_ranking(rankings.prompts[pid])
        old = rankings.simulated.get(pid)
        if old is None or (old["order"], old.get("tied", [])) != (order, tied):
            rankings.add(pid, order, by=SIMULATED, tied=tied)
            done += 1
    return done


def compare(prompt: dict, a: dict, b: dict) -> float:
    """1 if the labeler prefers reply a, 0 if b, 0.5 for a tie (a and b: dicts with reply, ended)."""
    worth_a, worth_b = worth(prompt, a["reply"], a["ended"]), worth(prompt, b["reply"], b["ended"])
    return 1.0 if worth_a > worth_b else 0.0 if worth_a < worth_b else 0.5


# --- prompts and completions ---------------------------------------------------------------------

KINDS = ("qa", "arithmetic", "identity", "refusal")  # single-turn requests the labeler can judge


def ranking_prompts(world, n: int, seed: int, heldout_people: float) -> list[dict]:
    """`n` single-turn requests written from the world with the SFT training phrasings and people,
    but drawn afresh (another seed): questions, sums, "who are you?" and harmful requests."""
    from .conversations import make_conversations

    rows = [r for r in make_conversations(world, 2 * n + 20, seed + 1, False, heldout_people) if r["kind"] in KINDS]
    return [
        dict(
            id=prompt_id(i, r["messages"][:1]),
            kind=r["kind"],
            messages=r["messages"][:1],
            truth=r.get("truth"),
            name=r.get("name"),
        )
        for i, r in enumerate(rows[:n])
    ]


def eval_prompts(world, n: int, seed: int, heldout_people: float) -> list[dict]:
    """`n` of SFT's evaluation requests (held-out people and phrasings), for rewards and win rates."""
    from .conversations import eval_questions

    rows = eval_questions(world, seed, heldout_people)
    rows = random.Random(f"{seed}-rlhf-eval").sample(rows, min(n, len(rows)))
    return [dict(kind=r["kind"], messages=r["messages"][:1], truth=r.get("truth"), name=r.get("name")) for r in rows]


def prompt_and_reply(prompt: dict, reply: str, ended: bool, tokenizer, block_size: int) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) as the reward model and DPO read a stored reply: its text, then
    <|im_end|> if it ended, cut to half the context; the rendered prompt cut from the left to fit the rest."""
    completion = tokenizer.encode(reply) + ([tokenizer.encode_special("<|im_end|>")] if ended else [])
    completion = completion[: block_size // 2]
    return render_prompt(prompt["messages"], tokenizer)[-(block_size - len(completion)) :], completion


def sample_completions(
    model,
    tokenizer,
    prompts: list[dict],
    k: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    max_batch: int = 64,
) -> list[dict]:
    """K sampled completions of each prompt (text and whether it ended), added to the prompt rows."""
    ids, budget = fit(
        [render_prompt(p["messages"], tokenizer) for p in prompts], max_new_tokens, model.config.block_size
    )
    samples = [
        decode_reply(s, tokenizer)
        for s in generate(
            model,
            ids,
            budget,
            temperature=temperature,
            num_samples=k,
            stop_tokens=reply_stops(tokenizer),
            seed=seed,
            max_batch=max_batch,
        )
    ]
    return [
        dict(
            p,
            completions=[s.text for s in samples[i * k : (i + 1) * k]],
            ended=[s.ended for s in samples[i * k : (i + 1) * k]],
        )
        for i, p in enumerate(prompts)
    ]


def prepare_prompts(model, tokenizer, world, config, folder: Path, source: str) -> list[dict]:
    """The run's prompts with their K completions, in `prompts.jsonl`, each marked with the
    `source` it was sampled from (the SFT model and the sampling settings). Prompts sampled from
    this source before are kept as they are (their rankings stay valid); the others get fresh
    completions, and their old ones go to the archive with every ranking made of them."""
    r = config.rlhf
    path = folder / "prompts.jsonl"
    rows = read_jsonl(path) if path.exists() else []
    kept = {p["id"]: p for p in rows if p.get("sampled_from") == source}
    wanted = ranking_prompts(world, r.n_prompts, config.seed, config.sft.heldout_people)
    new = [p for p in wanted if p["id"] not in kept]
    if new:
        for p in sample_completions(
            model, tokenizer, new, r.k, r.max_new_tokens, r.temperature, config.seed, config.max_batch
        ):
            kept[p["id"]] = dict(p, sampled_from=source)
    stale = [p for p in rows if p.get("sampled_from") != source]
    if stale:
        archive(folder, stale)
    if new or stale:
        write_jsonl(path, list(kept.values()))
    return [kept[p["id"]] for p in wanted]


ARCHIVE = "archive"


def archive(folder: Path, stale: list[dict]) -> list[Path]:
    """Move prompts whose completions came from another source, and every line of the rankings
    about them, to `archive/<their source>/` (prompts.jsonl, rankings.jsonl): kept, never deleted,
    and out of the way of the completions that replace them (prompt ids stay the same)."""
    rankings_path = folder / RANKINGS
    lines = rankings_path.read_bytes().splitlines(keepends=True) if rankings_path.exists() else []

    def about(line: bytes) -> str | None:
        try:
            return json.loads(line).get("id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None  # not a ranking this code can read: it stays where it is

    by_source: dict[str, list[dict]] = {}
    for p in stale:
        by_source.setdefault(p.get("sampled_from") or "unknown", []).append(p)
    moved, written = set(), []
    for source, prompts in by_source.items():
        ids = {p["id"] for p in prompts}
        target, n = folder / ARCHIVE / source, 1
        while target.exists():  # the same source archived before: a folder of its own, nothing overwritten
            n += 1
            target = folder / ARCHIVE / f"{source}-{n}"
        write_jsonl(target / "prompts.jsonl", prompts)
        kept_lines = [line for line in lines if about(line) in ids]
        atomic_write(target / RANKINGS, b"".join(line.rstrip(b"\n") + b"\n" for line in kept_lines))
        moved |= ids
        written.append(target)
    atomic_write(rankings_path, b"".join(line for line in lines if about(line) not in moved))
    return written


def is_heldout(pid: str, share: float) -> bool:
    """A stable split of prompts by a hash of their id (the same whatever else changes)."""
    return in_share(pid, share)


# --- pairs, as batches for the reward model and DPO ---------------------------------------------


def pair_examples(pairs, tokenizer, block_size: int) -> list[tuple[list[int], list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) -> (chosen prompt, chosen completion, rejected prompt, rejected completion)
    ids, each completion cut to half the context and its prompt cut from the left to fit the rest."""

    def read(prompt, i):
        return prompt_and_reply(prompt, prompt["completions"][i], prompt["ended"][i], tokenizer, block_size)

    return [(*read(prompt, chosen), *read(prompt, rejected)) for prompt, chosen, rejected in pairs]


def collate_pairs(examples, pad_id: int) -> dict:
    """Chosen and rejected packed to one width (`engine.pack`), each with its last token's index."""
    B = len(examples)
    prompts = [e[0] for e in examples] + [e[2] for e in examples]
    completions = [e[1] for e in examples] + [e[3] for e in examples]
    packed = pack(prompts, completions, pad_id=pad_id)
    last = torch.tensor([len(p) + len(c) - 1 for p, c in zip(prompts, completions)])
    return dict(
        chosen=packed.rows(slice(0, B)),
        rejected=packed.rows(slice(B, 2 * B)),
        chosen_last=last[:B],
        rejected_last=last[B:],
    )


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
        return [
            self.batch(range(i, min(i + self.batch_size, len(self.examples))))
            for i in range(0, len(self.examples), self.batch_size)
        ]

    def state_dict(self) -> dict:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state
