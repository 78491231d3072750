"""Stage 7, hallucinations: measure them against the world's truth, then reduce them twice.

The lesson, in three parts:

1. *The probe.* Every fact of the mini-web is known, so every answer can be judged by rule:
   correct (it states the truth), "I don't know" (it declines), or wrong: a *hallucination*, a
   confident answer that is false. The assistant learned from conversations in which every
   question got a confident answer, so it imitates that tone even about people it has never
   read about: for people with no page at all, anything but "I don't know" is a hallucination.
   Two signals hint at it from inside: sampled several times, a hallucinated answer changes
   (low *consistency*), and its tokens get low probabilities (low *confidence*).
2. *Knowledge-based refusal.* Probe the assistant on the training people; wherever it was wrong,
   write a conversation whose answer is "I don't know" (several phrasings), keep the right
   answers as they were, and fine-tune. The model already carries a sense of what it knows; the
   new data teaches it to say so. Measured on held-out people: fewer hallucinations, and few
   facts it knew are lost (`known_recall_after`: no blanket refusal).
3. *Tool use.* Instead of recalling, look it up: the model writes
   `<|tool_call|>search: NAME WORDS<|tool_call_end|>`, generation stops there, the engine runs
   the search over the cleaned corpus (TF-IDF from scikit-learn) and inserts the passages as a
   `tool` turn (`<|tool_result|>...<|tool_result_end|>`, no loss on it: the model reads it, it
   never learns to write it), and the model answers from them. A fact in the context window is
   working memory; a fact in the weights is a vague recollection. Half the searches it is taught
   on are about strangers whose only page is the one the search finds, so the answer has to be
   read, not recalled. Measured twice: with the model's own search call, and with the right call
   made for it (reading alone, apart from writing the query).

Writes to `runs/<run>/halluc/`:
  probe_before.jsonl, probe_idk.jsonl, probe_search.jsonl   every held-out question, answer and verdict
  probe_search_given_query.jsonl                             the same with the right search call made for the model
  probe_train.jsonl                                          the assistant on training people (mitigation 1's data)
  idk_train.jsonl, tool_train.jsonl                          the fine-tuning conversations
  idk/model.pt, search/model.pt, model.pt                    the two fine-tuned models (model.pt: the idk one, for chat)
  metrics.json                                               rates overall and per page-frequency bucket
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from collections import Counter, defaultdict

import torch
from torch.nn import functional as F

from .chat import _turn, check, render_prompt
from .config import Config, ConfigError, resolve_device
from .conversations import ANSWERS, QUESTIONS, make_conversations, mentions, refuses, split_people
from .pretrain import BUCKET_NAMES, greedy_many, load_model, save_model
from .run import Run, atomic_write
from .sft import finetune as sft_finetune
from .web import person_page
from .world import FACTS, Person, World, _word, bucket

IDK_ANSWERS = [
    "I don't know.",
    "I don't know that about {name}.",
    "I'm not sure. I have no information about {name}.",
    "I do not know, sorry: I have not read about {first}.",
]
SEARCH_IDK = "I don't know: the search found nothing about {name}."
IDK_PATTERN = re.compile(r"\b(I don't know|I do not know|I'm not sure|I am not sure|I have no information)\b", re.I)
# words a search call adds to the name, to rank the passages that hold the asked fact first
SEARCH_WORDS = {"birth_city": "born city", "birth_year": "born year", "university": "university",
                "field": "field work", "employer": "works company"}
VERDICTS = ("correct", "idk", "wrong")


# --- judging ------------------------------------------------------------------------------------

def says_idk(reply: str) -> bool:
    """The reply declines: it says it does not know (or refuses, as a harmful request would be)."""
    return IDK_PATTERN.search(reply) is not None or refuses(reply)


def judge(reply: str, truth: str, n_pages: int) -> str:
    """'idk' if the reply declines, 'correct' if it states the truth, else 'wrong' (a hallucination).
    About a person with no page nothing can be known: a lucky guess is still a hallucination."""
    if says_idk(reply):
        return "idk"
    return "correct" if n_pages > 0 and mentions(reply, truth) else "wrong"


def is_right(verdict: str, n_pages: int) -> bool:
    """The right answer: the truth about a person with pages, "I don't know" about one with none."""
    return verdict == ("idk" if n_pages == 0 else "correct")


_TEMPLATE_WORDS = {w.lower() for a in ANSWERS.values() for t in a for w in re.findall(r"\w+", re.sub(r"\{\w+\}", "", t))}


def claim(reply: str, name: str) -> str:
    """What an answer asserts, without the person's name and the answer templates' words, so that
    "X was born in Y." and "X was born in the city of Y." make the same claim."""
    if says_idk(reply):
        return "idk"
    words = [w for w in re.findall(r"\w+", reply.replace(name, " ")) if w.lower() not in _TEMPLATE_WORDS]
    return " ".join(w for w in words if w != name.split()[0]).lower()


# --- the questions --------------------------------------------------------------------------------

def probe_questions(people: list[Person], seed: int, heldout_phrasing: bool = True, tag: str = "probe") -> list[dict]:
    """Every fact of every person, one phrasing each (the SFT stage's held-out phrasings by default)."""
    rng = random.Random(f"{seed}-{tag}")
    rows = []
    for person in people:
        first = person.name.split()[0]
        for fact in FACTS:
            question = rng.choice(QUESTIONS[fact][heldout_phrasing]).format(name=person.name, first=first)
            rows.append(dict(name=person.name, fact=fact, truth=person.fact(fact), n_pages=person.n_pages,
                             bucket=bucket(person.n_pages), question=question))
    return rows


def heldout_people(world: World, config: Config) -> list[Person]:
    """The people the measures are taken on: SFT's held-out people and everyone with no page."""
    _, held = split_people(world, config.sft.heldout_people)
    return held + [p for p in world.people if p.n_pages == 0]


# --- answering: greedy, sampled, and how sure -------------------------------------------------------

def _cut(ids: list[int], stops: set[int]) -> list[int]:
    return ids[:next((i for i, t in enumerate(ids) if t in stops), len(ids))]


@torch.no_grad()
def sample_many(model, prompts: list[list[int]], max_new_tokens: int, n: int, temperature: float, seed: int) -> list[list[list[int]]]:
    """`n` sampled continuations of every prompt; prompts of one length go through as one batch."""
    from .engine import KVCache, sample_next

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    by_length = defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    out: list[list[list[int]]] = [[] for _ in prompts]
    for length, rows in by_length.items():
        x = torch.tensor([prompts[i] for i in rows for _ in range(n)], dtype=torch.long, device=device)
        cache = KVCache(model.config.n_layer, length + max_new_tokens)
        new = []
        for _ in range(max_new_tokens):
            x = sample_next(model.lm_head(model.hidden_states(x, kv_cache=cache)[:, -1]), temperature, generator=generator)
            new.append(x)
        samples = torch.cat(new, dim=1).tolist()
        for j, i in enumerate(rows):
            out[i] = samples[j * n:(j + 1) * n]
    return out


@torch.no_grad()
def token_probs(model, prompts: list[list[int]], answers: list[list[int]]) -> list[list[float]]:
    """The probability the model gave each token of each answer, after its prompt (one padded batch;
    the model is causal, so padding on the right changes nothing before it)."""
    device = next(model.parameters()).device
    sequences = [p + a for p, a in zip(prompts, answers)]
    length = max(len(s) for s in sequences)
    x = torch.zeros(len(sequences), length, dtype=torch.long, device=device)
    for row, s in enumerate(sequences):
        x[row, :len(s)] = torch.tensor(s)
    logprobs = F.log_softmax(model.lm_head(model.hidden_states(x)).float(), dim=-1)
    out = []
    for row, (p, a) in enumerate(zip(prompts, answers)):
        positions = torch.arange(len(p) - 1, len(p) + len(a) - 1, device=device)
        out.append(logprobs[row, positions, torch.tensor(a, dtype=torch.long, device=device)].exp().tolist())
    return out


def confidence(probs: list[float]) -> float | None:
    """Geometric mean of the answer's token probabilities: how sure the model was of the whole answer."""
    return round(float(torch.tensor(probs).log().mean().exp()), 4) if probs else None


def _prompt(question: str, tokenizer, keep: int) -> list[int]:
    return render_prompt([{"role": "user", "content": question}], tokenizer)[-keep:]


def probe(model, tokenizer, rows: list[dict], max_new_tokens: int, n_samples: int = 0, temperature: float = 1.0,
          seed: int = 0, batch: int = 64) -> list[dict]:
    """Ask every question (greedy), judge the answer; with `n_samples`, also sample that many answers
    and measure how often they make the same claim (consistency)."""
    model.eval()
    end, eot = tokenizer.encode_special("<|im_end|>"), tokenizer.encode_special("<|endoftext|>")
    special = set(tokenizer.special_tokens.values())
    max_new_tokens = max(1, min(max_new_tokens, model.config.block_size // 2))
    prompts = [_prompt(r["question"], tokenizer, model.config.block_size - max_new_tokens) for r in rows]
    out = []
    for start in range(0, len(rows), batch):
        chunk, chunk_prompts = rows[start:start + batch], prompts[start:start + batch]
        answers = [_cut(ids, {end, eot}) for ids in greedy_many(model, chunk_prompts, max_new_tokens)]
        probs = token_probs(model, chunk_prompts, [a or [end] for a in answers])
        samples = (sample_many(model, chunk_prompts, max_new_tokens, n_samples, temperature, seed + start)
                   if n_samples else [[] for _ in chunk])
        for r, ids, p, drawn in zip(chunk, answers, probs, samples):
            reply = tokenizer.decode([t for t in ids if t not in special]).strip()
            row = dict(r, answer=reply, verdict=judge(reply, r["truth"], r["n_pages"]),
                       tokens=[tokenizer.decode([t]) for t in ids], token_probs=[round(q, 4) for q in p[:len(ids)]],
                       confidence=confidence(p[:len(ids)] or p))
            if drawn:
                texts = [tokenizer.decode([t for t in _cut(s, {end, eot}) if t not in special]).strip() for s in drawn]
                claims = [claim(t, r["name"]) for t in texts]
                row["samples"] = texts
                row["sample_verdicts"] = [judge(t, r["truth"], r["n_pages"]) for t in texts]
                row["consistency"] = round(Counter(claims).most_common(1)[0][1] / len(claims), 4)
            out.append(row)
    return out


# --- summaries ---------------------------------------------------------------------------------------

def _share(flags) -> float | None:
    flags = list(flags)
    return round(sum(flags) / len(flags), 4) if flags else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def per_bucket(rows: list[dict], measure) -> dict:
    """`measure(rows)` overall ('all') and for each page-frequency bucket (None where a bucket is empty)."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["bucket"]].append(r)
    return {"all": measure(rows), **{b: measure(groups[b]) if groups[b] else None for b in BUCKET_NAMES}}


def summarize(rows: list[dict]) -> dict:
    """Hallucination rate, accuracy (the right answer: the truth, or "I don't know" with no page),
    "I don't know" rate and question counts, overall and per bucket."""
    return dict(
        hallucination_rate=per_bucket(rows, lambda rs: _share(r["verdict"] == "wrong" for r in rs)),
        accuracy=per_bucket(rows, lambda rs: _share(is_right(r["verdict"], r["n_pages"]) for r in rs)),
        idk_rate=per_bucket(rows, lambda rs: _share(r["verdict"] == "idk" for r in rs)),
        n_questions=per_bucket(rows, len),
    )


def signals(rows: list[dict]) -> dict:
    """Mean confidence and consistency of the greedy answers, by verdict: are hallucinations less sure?"""
    by = {v: [r for r in rows if r["verdict"] == v] for v in VERDICTS}
    return dict(confidence_by_verdict={v: _mean(r["confidence"] for r in rs) for v, rs in by.items()},
                consistency_by_verdict={v: _mean(r.get("consistency") for r in rs) for v, rs in by.items()})


def compare(before: list[dict], after: list[dict]) -> dict:
    """Mitigation 1 on the same questions: of the "I don't know"s after, the share about facts the
    model really did not know before (idk_precision); of the facts it knew, the share it still
    answers (known_recall_after)."""
    pairs = list(zip(before, after))
    for b, a in pairs:
        assert (b["name"], b["fact"]) == (a["name"], a["fact"]), "before and after must ask the same questions"

    def rows_of(selected):
        return [dict(bucket=b["bucket"], ok=ok) for b, a, ok in selected]

    idk = rows_of((b, a, b["verdict"] != "correct") for b, a in pairs if a["verdict"] == "idk")
    known = rows_of((b, a, a["verdict"] == "correct") for b, a in pairs if b["verdict"] == "correct")
    return dict(idk_precision=per_bucket(idk, lambda rs: _share(r["ok"] for r in rs)), n_idk_after=per_bucket(idk, len),
                known_recall_after=per_bucket(known, lambda rs: _share(r["ok"] for r in rs)),
                n_known_before=per_bucket(known, len))


# --- mitigation 1: "I don't know" where the model was wrong --------------------------------------------

def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def idk_conversations(probed: list[dict], world: World, n: int, seed: int, heldout_fraction: float) -> list[dict]:
    """The refusal fine-tuning data, `n` conversations: questions the model got wrong (training
    phrasings) answered "I don't know" (several phrasings), as many questions it got right answered
    with the truth, so it keeps saying what it knows, and a third of the SFT mix, so it keeps the
    rest of its manners."""
    rng = random.Random(f"{seed}-idk")
    wrong = [r for r in probed if r["verdict"] != "correct"]
    right = [r for r in probed if r["verdict"] == "correct"]
    n_regular = n // 3
    n_facts = n - n_regular
    # half and half: a model that is mostly right about its training people would otherwise learn
    # mostly "answer confidently" from this data, and refuse nothing
    n_idk = n_facts // 2 if right else n_facts
    out = []
    for k in range(n_facts):
        pool, answer_idk = (wrong, True) if (k < n_idk and wrong) or not right else (right, False)
        r = rng.choice(pool)
        person = world.person(r["name"])
        slots = dict(vars(person), first=person.name.split()[0])
        question = rng.choice(QUESTIONS[r["fact"]][0]).format(**slots)
        answer = rng.choice(IDK_ANSWERS if answer_idk else ANSWERS[r["fact"]]).format(**slots)
        out.append(dict(kind="idk" if answer_idk else "qa", name=r["name"], fact=r["fact"],
                        messages=[_user(question), _assistant(answer)]))
    out += make_conversations(world, max(1, n_regular), seed + 1, False, heldout_fraction)[:n_regular]
    rng.shuffle(out)
    return out


# --- mitigation 2: the search tool ---------------------------------------------------------------------

_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


class SearchIndex:
    """TF-IDF search over the passages (sentences) of the cleaned corpus.

    Each passage is indexed with its page's title, so "Alan was born in 1981." on the page
    "Alan Vundsas" is found by "Alan Vundsas". The words of a query that start with a capital
    letter are a name and must all appear in a passage (a web search engine's AND); the other
    words only rank. So a name that no page holds finds nothing, instead of near misses.
    """

    def __init__(self, pages: list[dict], k: int = 2):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.k = k
        self.passages, seen = [], set()
        for page in pages:
            title, _, body = page["text"].partition("\n")
            for sentence in _SENTENCE.split(body):
                sentence = sentence.strip()
                if len(sentence) > 3 and (title, sentence) not in seen:
                    seen.add((title, sentence))
                    self.passages.append(dict(url=page.get("url", ""), title=title.strip(), text=sentence))
        if not self.passages:
            raise ValueError("the search index needs at least one page with text; the corpus given has none")
        self.vectorizer = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b", sublinear_tf=True)
        self.matrix = self.vectorizer.fit_transform([f"{p['title']} {p['text']}" for p in self.passages]).tocsc()
        self.analyze = self.vectorizer.build_analyzer()

    def search(self, query: str, k: int | None = None) -> list[dict]:
        """The best `k` passages for `query` (each with its score), or [] when none matches."""
        k = self.k if k is None else k
        terms = self.analyze(query)
        if not terms:
            return []
        required = set(self.analyze(" ".join(w for w in query.split() if w[:1].isupper())))
        vocabulary = self.vectorizer.vocabulary_
        if any(t not in vocabulary for t in required):
            return []  # a name no page holds
        scores = (self.matrix @ self.vectorizer.transform([query]).T).toarray().ravel()
        if required:
            columns = self.matrix[:, [vocabulary[t] for t in required]]
            scores[(columns > 0).sum(axis=1).A.ravel() < len(required)] = 0.0
        best = [i for i in scores.argsort()[::-1][:k] if scores[i] > 0]
        return [dict(self.passages[i], score=round(float(scores[i]), 4)) for i in best]


def format_results(passages: list[dict], max_chars: int) -> str:
    """What the model reads in the tool turn: the passages' sentences, cut to `max_chars`."""
    if not passages:
        return "no results"
    return " ".join(p["text"] for p in passages)[:max_chars]


def search_query(person: Person, fact: str) -> str:
    return f"{person.name} {SEARCH_WORDS[fact]}"


def tool_call(query: str) -> str:
    """An assistant turn that calls the search tool (the markers become special tokens in `render_tools`)."""
    return f"<|tool_call|>search: {query}<|tool_call_end|>"


_CALL = re.compile(r"<\|tool_call\|>(.*)<\|tool_call_end\|>", re.S)


def render_tools(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Like `chat.render`, with tool use: an assistant turn `<|tool_call|>...<|tool_call_end|>` (our
    own training data, never user text) becomes the special tokens around the call, and a `tool`
    turn's content is wrapped in `<|tool_result|>...<|tool_result_end|>`. The loss mask is 1 on
    what the assistant writes (the call included), 0 on the tool's result: the engine writes it."""
    check(messages, for_training=True)
    special = tokenizer.encode_special
    ids, mask = [special("<|endoftext|>")], [0]
    for message in messages:
        role, content = message["role"], message["content"]
        call = _CALL.fullmatch(content) if role == "assistant" else None
        head = [special("<|im_start|>"), *tokenizer.encode(role), special("<|im_sep|>")]
        if call:
            body = [special("<|tool_call|>"), *tokenizer.encode(call.group(1)), special("<|tool_call_end|>")]
            ids += head + body + [special("<|im_end|>")]
            mask += [0] * len(head) + [1] * len(body) + [0]  # the engine closes the turn after the call
        elif role == "tool":
            body = [special("<|tool_result|>"), *tokenizer.encode(content), special("<|tool_result_end|>"), special("<|im_end|>")]
            ids += head + body
            mask += [0] * (len(head) + len(body))
        else:
            turn_ids, turn_mask = _turn(role, content, tokenizer)
            ids += turn_ids
            mask += turn_mask
    return ids, mask


def invented_people(world: World, n: int, seed: int) -> list[Person]:
    """People who are nowhere in the world: a fresh surname, and each fact taken from a different
    person, so that no page the model read holds them together."""
    rng = random.Random(f"{seed}-invented")
    taken = {w for p in world.people for w in p.name.split()}
    people = []
    while len(people) < n:
        surname = _word(rng, rng.randint(2, 3))
        if surname not in taken:
            taken.add(surname)
            first = rng.choice(world.people).name.split()[0]
            facts = {f: getattr(rng.choice(world.people), f) for f in FACTS}
            people.append(Person(name=f"{first} {surname}", n_pages=0, **facts))
    return people


def tool_conversation(person: Person, fact: str, index: SearchIndex, rng: random.Random, max_chars: int) -> dict:
    """Question -> search call -> the tool's real results -> the answer, if the results hold it, else
    "I don't know"."""
    slots = dict(vars(person), first=person.name.split()[0])
    question = rng.choice(QUESTIONS[fact][0]).format(**slots)
    query = search_query(person, fact)
    result = format_results(index.search(query), max_chars)
    if person.n_pages and mentions(result, person.fact(fact)):
        answer = rng.choice(ANSWERS[fact]).format(**slots)
    else:
        answer = SEARCH_IDK.format(**slots) if result == "no results" else rng.choice(IDK_ANSWERS).format(**slots)
    return dict(kind="tool", name=person.name, fact=fact, messages=[
        _user(question), _assistant(tool_call(query)), {"role": "tool", "content": result}, _assistant(answer)])


def stranger_conversation(person: Person, fact: str, world: World, results: int, rng: random.Random, max_chars: int) -> dict:
    """A search about someone the model never read about, whose page only the search engine holds
    (a page the mini-web's own generator writes). Nothing in the weights can answer it: the
    answer has to be read from the results."""
    page = person_page(world, person, rng, rng.randrange(1000)).to_dict()
    return tool_conversation(dataclasses.replace(person, n_pages=1), fact, SearchIndex([page], results), rng, max_chars)


def tool_conversations(world: World, index: SearchIndex, n: int, seed: int, heldout_fraction: float, max_chars: int) -> list[dict]:
    """`n` conversations, a fifth from the SFT mix (no people questions) and the rest searches:
    - half about strangers whose only page is the one the search finds: the model learns to read
      the answer from the results (about training people it could answer from memory instead);
    - a quarter about training people, searched in the real corpus;
    - a quarter about invented people the search finds nothing about: "I don't know".
    Every stranger and invented person has a fresh name, so the model cannot memorise a list of
    names: it has to copy the name from the question into the search call."""
    rng = random.Random(f"{seed}-tool")
    train_people, _ = split_people(world, heldout_fraction)
    if not train_people:
        raise ValueError("no training people to write search conversations about; use a larger world")
    n_other = n // 5
    fresh = iter(invented_people(world, n - n_other, seed))
    out = []
    for k in range(n - n_other):
        fact = rng.choice(FACTS)
        if k % 4 == 3:
            out.append(tool_conversation(next(fresh), fact, index, rng, max_chars))
        elif k % 4 == 2:
            out.append(tool_conversation(rng.choice(train_people), fact, index, rng, max_chars))
        else:
            out.append(stranger_conversation(next(fresh), fact, world, index.k, rng, max_chars))
    others = [c for c in make_conversations(world, 2 * n_other + 10, seed + 2, False, heldout_fraction)
              if c["kind"] not in ("qa", "multi_turn")]
    out += others[:n_other]
    rng.shuffle(out)
    return out


# --- the engine with a search tool ------------------------------------------------------------------

def parse_call(text: str) -> tuple[str | None, str | None]:
    """The text between the tool tokens -> (query, None), or (None, what is wrong with it)."""
    name, colon, query = text.partition(":")
    if not colon or name.strip() != "search":
        return None, f"error: unknown tool call {text.strip()[:40]!r}; the only tool is 'search: QUERY'"
    if not query.strip():
        return None, "error: the search query is empty; write 'search: QUERY'"
    return query.strip(), None


def after_generation(ids: list[int], tokenizer) -> dict:
    """What the model's first generation is: an answer, or a search call (complete or not).

    Returns dict(kind='answer'|'call'|'unclosed'|'malformed', kept=the ids to keep, query=...)."""
    special = tokenizer.encode_special
    end, eot, call, call_end = (special(t) for t in ("<|im_end|>", "<|endoftext|>", "<|tool_call|>", "<|tool_call_end|>"))
    stop = next((i for i, t in enumerate(ids) if t in (end, eot, call_end)), len(ids))
    ids = ids[:stop + 1] if stop < len(ids) and ids[stop] == call_end else ids[:stop]
    if call not in ids:
        return dict(kind="answer", kept=_cut(ids, {end, eot, call_end}), query=None, error=None)
    start = ids.index(call)
    if call_end not in ids:
        return dict(kind="unclosed", kept=ids[:start + 1] + [call_end], query=None,
                    error="error: the search call was never closed with <|tool_call_end|>")
    stop = ids.index(call_end)
    query, error = parse_call(tokenizer.decode([t for t in ids[start + 1:stop]]))
    return dict(kind="call" if query else "malformed", kept=ids[:stop + 1], query=query, error=error)


def forced_call(query: str, tokenizer) -> list[int]:
    """The ids of a search call for `query`, as the model would write them."""
    special = tokenizer.encode_special
    return [special("<|tool_call|>"), *tokenizer.encode(f"search: {query}"), special("<|tool_call_end|>")]


def tool_turn(result: str, tokenizer, room: int) -> list[int]:
    """`<|im_end|>` closing the call, the tool turn with `result` (cut to `room` tokens in all), and
    the header of the assistant's next turn."""
    special = tokenizer.encode_special
    head = [special("<|im_end|>"), special("<|im_start|>"), *tokenizer.encode("tool"), special("<|im_sep|>"), special("<|tool_result|>")]
    tail = [special("<|tool_result_end|>"), special("<|im_end|>"), special("<|im_start|>"), *tokenizer.encode("assistant"), special("<|im_sep|>")]
    body = tokenizer.encode(result)[:max(0, room - len(head) - len(tail))]
    return head + body + tail


def answer_with_search(model, tokenizer, index: SearchIndex | None, questions: list[str], max_new_tokens: int = 24,
                       max_chars: int = 240, batch: int = 64, queries: list[str] | None = None) -> list[dict]:
    """Answer each question, letting the model call the search tool once: generate; if it wrote a
    search call, run the search (`index=None`: search is off, the tool answers that), insert the
    results as a tool turn, and generate the answer. A call that is malformed or never closed gets
    an error message as its result, and the model still answers: the conversation never crashes.

    `queries` puts those search calls in the model's mouth instead of its own: the model then only
    reads the results, which measures reading apart from writing the query."""
    model.eval()
    special_ids = set(tokenizer.special_tokens.values())
    end, eot = tokenizer.encode_special("<|im_end|>"), tokenizer.encode_special("<|endoftext|>")
    block = model.config.block_size
    max_new_tokens = max(1, min(max_new_tokens, (block - 24) // 3))
    keep = max(1, block - 2 * max_new_tokens - 24)  # a long question keeps its end; room for the call, the tool turn, the answer
    prompts = [_prompt(q, tokenizer, keep) for q in questions]
    out = []
    for start in range(0, len(questions), batch):
        chunk = prompts[start:start + batch]
        calls = ([forced_call(q, tokenizer) for q in queries[start:start + batch]] if queries is not None
                 else greedy_many(model, chunk, max_new_tokens))
        firsts = [after_generation(ids, tokenizer) for ids in calls]
        second_prompts, rows = [], []
        for q, prompt, first in zip(questions[start:start + batch], chunk, firsts):
            row = dict(question=q, call=first["kind"], query=first["query"], passages=[], tool_result=None)
            if first["kind"] != "answer":
                if first["error"]:
                    result = first["error"]
                elif index is None:
                    result = "error: search is off"
                else:
                    row["passages"] = index.search(first["query"])
                    result = format_results(row["passages"], max_chars)
                row["tool_result"] = result
                context = prompt + first["kept"]
                continued = context + tool_turn(result, tokenizer, block - max_new_tokens - len(context))
                second_prompts.append(continued[-(block - max_new_tokens):])  # a long call keeps its end, as a long question does
            row["prompt_ids"], row["answer_ids"] = prompt, first["kept"]
            rows.append(row)
        seconds = iter(greedy_many(model, second_prompts, max_new_tokens)) if second_prompts else iter(())
        tool_prompts = iter(second_prompts)
        for row in rows:
            if row["call"] != "answer":
                row["prompt_ids"], row["answer_ids"] = next(tool_prompts), _cut(next(seconds), {end, eot})
            row["answer"] = tokenizer.decode([t for t in row["answer_ids"] if t not in special_ids]).strip()
        probs = token_probs(model, [r["prompt_ids"] for r in rows], [r["answer_ids"] or [end] for r in rows])
        for row, p in zip(rows, probs):
            row["tokens"] = [tokenizer.decode([t]) for t in row["answer_ids"]]
            row["token_probs"] = [round(q, 4) for q in p[:len(row["answer_ids"])]]
            row["confidence"] = confidence(p[:len(row["answer_ids"])] or p)
            out.append(row)
    return out


def probe_with_search(model, tokenizer, index, rows: list[dict], max_new_tokens: int, max_chars: int,
                      queries: list[str] | None = None) -> list[dict]:
    answers = answer_with_search(model, tokenizer, index, [r["question"] for r in rows], max_new_tokens, max_chars,
                                 queries=queries)
    return [dict(r, **{k: v for k, v in a.items() if k not in ("question", "prompt_ids", "answer_ids")},
                 verdict=judge(a["answer"], r["truth"], r["n_pages"])) for r, a in zip(rows, answers)]


# --- fine-tuning ------------------------------------------------------------------------------------

def finetune(model, conversations: list[dict], tokenizer, config: Config, steps: int, device: str, run: Run,
             checkpoint, resume_key: str, desc: str):
    """The SFT recipe on `conversations` (tool messages rendered), with this stage's settings."""
    h = config.halluc
    return sft_finetune(model, conversations, tokenizer, config, steps=steps, batch_size=h.batch_size,
                        learning_rate=h.learning_rate, min_lr=h.min_lr, warmup_steps=h.warmup_steps, device=device,
                        run=run, checkpoint=checkpoint, resume_key=resume_key, desc=desc, renderer=render_tools)


def _write_jsonl(path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_index(run: Run, config: Config) -> SearchIndex:
    from .data import read_corpus

    return SearchIndex(read_corpus(run), config.halluc.search_results)


# --- the stage ------------------------------------------------------------------------------------------

def build(config: Config, run: Run) -> dict:
    """Probe the SFT model, fine-tune it to say "I don't know" and, separately, to search; measure all three."""
    from .data import read_world
    from .pipeline import stage_fingerprint
    from .sft import model_path
    from .tokenizer import Tokenizer

    start = time.time()
    h, out, device = config.halluc, run.stage_dir("halluc"), resolve_device(config.device)
    world = read_world(run)
    if world is None:
        raise ConfigError("the halluc stage needs the mini-web's world (data.source='mini-web'): its facts judge the answers")
    tokenizer = Tokenizer.load(run.path / "tokenizer")
    sft_path = model_path(run, "sft")
    sft = load_model(sft_path, device)
    key = stage_fingerprint("halluc", config)
    train_people, _ = split_people(world, config.sft.heldout_people)
    questions = probe_questions(heldout_people(world, config), config.seed)

    # the probe: the SFT assistant on held-out people (and people with no page)
    before = probe(sft, tokenizer, questions, h.max_new_tokens, h.n_samples, h.temperature, config.seed)
    _write_jsonl(out / "probe_before.jsonl", before)

    # mitigation 1: "I don't know" wherever it was wrong about training people
    probed_train = probe(sft, tokenizer, probe_questions(train_people, config.seed, False, "train"), h.max_new_tokens)
    _write_jsonl(out / "probe_train.jsonl", probed_train)
    idk_rows = idk_conversations(probed_train, world, h.idk_conversations, config.seed, config.sft.heldout_people)
    _write_jsonl(out / "idk_train.jsonl", idk_rows)
    idk_model = load_model(sft_path, device)
    idk_result, n_idk = finetune(idk_model, idk_rows, tokenizer, config, h.idk_steps, device, run, out / "idk_state.pt",
                                 key + "-idk", "halluc: I don't know")
    save_model(out / "idk" / "model.pt", idk_model, dict(step=idk_result.step))
    save_model(out / "model.pt", idk_model, dict(step=idk_result.step))  # `labkit chat --model halluc` (plain chat, no tool)
    after = probe(idk_model, tokenizer, questions, h.max_new_tokens, h.n_samples, h.temperature, config.seed)
    _write_jsonl(out / "probe_idk.jsonl", after)

    # mitigation 2: the search tool
    index = load_index(run, config)
    tool_rows = tool_conversations(world, index, h.tool_conversations, config.seed, config.sft.heldout_people, h.result_chars)
    _write_jsonl(out / "tool_train.jsonl", tool_rows)
    tool_model = load_model(sft_path, device)
    tool_result, n_tool = finetune(tool_model, tool_rows, tokenizer, config, h.tool_steps, device, run,
                                   out / "search_state.pt", key + "-search", "halluc: search")
    save_model(out / "search" / "model.pt", tool_model, dict(step=tool_result.step))
    searched = probe_with_search(tool_model, tokenizer, index, questions, h.max_new_tokens, h.result_chars)
    unsearched = probe_with_search(tool_model, tokenizer, None, questions, h.max_new_tokens, h.result_chars)
    # the same questions with the right search call made for the model: how well it reads
    canonical = [search_query(world.person(r["name"]), r["fact"]) for r in questions]
    given_query = probe_with_search(tool_model, tokenizer, index, questions, h.max_new_tokens, h.result_chars, canonical)
    _write_jsonl(out / "probe_search.jsonl", searched)
    _write_jsonl(out / "probe_search_given_query.jsonl", given_query)

    s_before, s_after, s_search, s_off = summarize(before), summarize(after), summarize(searched), summarize(unsearched)
    metrics = dict(
        hallucination_rate_before=s_before["hallucination_rate"], hallucination_rate_after=s_after["hallucination_rate"],
        **compare(before, after),
        search_accuracy=s_search["accuracy"], accuracy_before=s_before["accuracy"], accuracy_after=s_after["accuracy"],
        search_off_accuracy=s_off["accuracy"], search_accuracy_given_query=summarize(given_query)["accuracy"],
        hallucination_rate_search=s_search["hallucination_rate"],
        hallucination_rate_search_off=s_off["hallucination_rate"],
        idk_rate_before=s_before["idk_rate"], idk_rate_after=s_after["idk_rate"], idk_rate_search=s_search["idk_rate"],
        search_call_rate=per_bucket(searched, lambda rs: _share(r["call"] != "answer" for r in rs)),
        search_query_ok=per_bucket(searched, lambda rs: _share(bool(r["query"]) and r["name"] in r["query"] for r in rs)),
        # how often the right search call finds the asked fact at all (people with pages): the retrieval alone
        retrieval_recall=per_bucket([r for r in given_query if r["n_pages"]],
                                    lambda rs: _share(mentions(r["tool_result"], r["truth"]) for r in rs)),
        n_questions=s_before["n_questions"],
        n_heldout_people=len({r["name"] for r in questions}),
        train_hallucination_rate=summarize(probed_train)["hallucination_rate"]["all"],
        n_idk_train=sum(c["kind"] == "idk" for c in idk_rows), n_idk_conversations=n_idk, n_tool_conversations=n_tool,
        n_passages=len(index.passages),
        idk_train_seconds=round(idk_result.train_seconds, 2), search_train_seconds=round(tool_result.train_seconds, 2),
        device=device,
        **{f"{k}_before": v for k, v in signals(before).items()},
    )
    metrics["seconds"] = round(time.time() - start, 2)
    return metrics
