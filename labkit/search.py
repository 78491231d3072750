"""The search tool of stage 7: look a fact up instead of recalling it.

The model writes `<|tool_call|>search: NAME WORDS<|tool_call_end|>`; generation stops there,
the engine runs the search over the cleaned corpus (TF-IDF from scikit-learn) and inserts the
passages as a `tool` turn (`<|tool_result|>...<|tool_result_end|>`, rendered by
`chat.render_tools`, with no loss on it: the model reads it, it never learns to write it), and
the model answers from them. A fact in the context window is working memory; a fact in the
weights is a vague recollection.

Here: the index, the conversations that teach the tool (half of them about strangers whose
only page is the one the search finds, so the answer has to be read, not recalled), and
`answer_with_search`, the loop that lets a model call the tool once while it answers.
"""

from __future__ import annotations

import dataclasses
import random
import re

from .chat import render_prompt, tool_call_ids, tool_turn
from .conversations import ANSWERS, IDK_ANSWERS, QUESTIONS, make_conversations, mentions, split_people
from .engine import decode_reply, generate, reply_stops
from .web import person_page
from .world import FACTS, Person, World, made_up_word

SEARCH_IDK = "I don't know: the search found nothing about {name}."
# words a search call adds to the name, to rank the passages that hold the asked fact first
SEARCH_WORDS = {
    "birth_city": "born city",
    "birth_year": "born year",
    "university": "university",
    "field": "field work",
    "employer": "works company",
}


# --- the index ---------------------------------------------------------------------------------------

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


# --- the conversations that teach the tool -------------------------------------------------------


def invented_people(world: World, n: int, seed: int) -> list[Person]:
    """People who are nowhere in the world: a fresh surname, and each fact taken from a different
    person, so that no page the model read holds them together."""
    rng = random.Random(f"{seed}-invented")
    taken = {w for p in world.people for w in p.name.split()}
    people = []
    while len(people) < n:
        surname = made_up_word(rng, rng.randint(2, 3))
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
    return dict(
        kind="tool",
        name=person.name,
        fact=fact,
        messages=[
            {"role": "user", "content": question},
            {"role": "assistant", "content": tool_call(query)},
            {"role": "tool", "content": result},
            {"role": "assistant", "content": answer},
        ],
    )


def stranger_conversation(
    person: Person, fact: str, world: World, results: int, rng: random.Random, max_chars: int
) -> dict:
    """A search about someone the model never read about, whose page only the search engine holds
    (a page the mini-web's own generator writes). Nothing in the weights can answer it: the
    answer has to be read from the results."""
    page = person_page(world, person, rng, rng.randrange(1000)).to_dict()
    return tool_conversation(dataclasses.replace(person, n_pages=1), fact, SearchIndex([page], results), rng, max_chars)


def tool_conversations(
    world: World, index: SearchIndex, n: int, seed: int, heldout_fraction: float, max_chars: int
) -> list[dict]:
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
    others = [
        c
        for c in make_conversations(world, 2 * n_other + 10, seed + 2, False, heldout_fraction)
        if c["kind"] not in ("qa", "multi_turn")
    ]
    out += others[:n_other]
    rng.shuffle(out)
    return out


# --- answering with the tool ------------------------------------------------------------------------


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
    end, eot, call, call_end = (
        special(t) for t in ("<|im_end|>", "<|endoftext|>", "<|tool_call|>", "<|tool_call_end|>")
    )
    stop = next((i for i, t in enumerate(ids) if t in (end, eot, call_end)), len(ids))
    ids = ids[: stop + 1] if stop < len(ids) and ids[stop] == call_end else ids[:stop]
    if call not in ids:
        return dict(kind="answer", kept=ids, query=None, error=None)
    start = ids.index(call)
    if call_end not in ids:
        return dict(
            kind="unclosed",
            kept=ids[: start + 1] + [call_end],
            query=None,
            error="error: the search call was never closed with <|tool_call_end|>",
        )
    stop = ids.index(call_end)
    query, error = parse_call(tokenizer.decode(ids[start + 1 : stop]))
    return dict(kind="call" if query else "malformed", kept=ids[: stop + 1], query=query, error=error)


def answer_with_search(
    model,
    tokenizer,
    index: SearchIndex | None,
    questions: list[str],
    max_new_tokens: int = 24,
    max_chars: int = 240,
    queries: list[str] | None = None,
    max_batch: int = 64,
) -> list[dict]:
    """Answer each question, letting the model call the search tool once: generate; if it wrote a
    search call, run the search (`index=None`: search is off, the tool answers that), insert the
    results as a tool turn, and generate the answer. A call that is malformed or never closed gets
    an error message as its result, and the model still answers: the conversation never crashes.
    Each row holds the answer and the ids it was generated from (`prompt_ids`, `answer_ids`).

    `queries` puts those search calls in the model's mouth instead of its own: the model then only
    reads the results, which measures reading apart from writing the query."""
    special = tokenizer.encode_special
    block = model.config.block_size
    max_new_tokens = max(1, min(max_new_tokens, (block - 24) // 3))
    # a long question keeps its end; room for the call, the tool turn, the answer
    keep = max(1, block - 2 * max_new_tokens - 24)
    prompts = [render_prompt([{"role": "user", "content": q}], tokenizer)[-keep:] for q in questions]
    if not prompts:
        return []
    first_stops = [special(t) for t in ("<|im_end|>", "<|endoftext|>", "<|tool_call_end|>")]
    calls = (
        [tool_call_ids(q, tokenizer) for q in queries]
        if queries is not None
        else generate(model, prompts, max_new_tokens, temperature=0, stop_tokens=first_stops, max_batch=max_batch)
    )
    rows, second_prompts = [], []
    for question, prompt, first in zip(questions, prompts, (after_generation(ids, tokenizer) for ids in calls)):
        row = dict(
            question=question,
            call=first["kind"],
            query=first["query"],
            passages=[],
            tool_result=None,
            prompt_ids=prompt,
            answer_ids=first["kept"],
        )
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
            # a long call keeps its end, as a long question does
            row["prompt_ids"] = continued[-(block - max_new_tokens) :]
            second_prompts.append(row["prompt_ids"])
        rows.append(row)
    seconds = iter(
        generate(
            model,
            second_prompts,
            max_new_tokens,
            temperature=0,
            stop_tokens=reply_stops(tokenizer),
            max_batch=max_batch,
        )
        if second_prompts
        else ()
    )
    special_ids = set(tokenizer.special_tokens.values())
    for row in rows:
        if row["call"] != "answer":
            row["answer_ids"] = decode_reply(next(seconds), tokenizer).ids
        row["answer"] = tokenizer.decode([t for t in row["answer_ids"] if t not in special_ids]).strip()
    return rows


def load_index(run, config) -> SearchIndex:
    from .data import read_corpus

    return SearchIndex(read_corpus(run), config.halluc.search_results)
