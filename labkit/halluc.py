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
3. *Tool use* (labkit/search.py). Instead of recalling, look it up: the model writes
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

import random
import re
import time
from collections import Counter, defaultdict

import torch

from .chat import render_prompt, render_tools
from .checkpoint import load_model, model_path, save_model
from .config import Config, ConfigError, resolve_device
from .conversations import (
    ANSWERS,
    IDK_ANSWERS,
    QUESTIONS,
    make_conversations,
    mentions,
    refuses,
    says_dont_know,
    split_people,
)
from .distributed import barrier, is_main_process
from .engine import decode_reply, fit, generate, reply_stops, score
from .pretrain import BUCKET_NAMES
from .run import Run, read_jsonl, write_jsonl
from .search import answer_with_search, load_index, search_query, tool_conversations
from .sft import finetune as sft_finetune
from .world import FACTS, Person, World, bucket

VERDICTS = ("correct", "idk", "wrong")


# --- judging ------------------------------------------------------------------------------------


def says_idk(reply: str) -> bool:
    """The reply declines: it says it does not know (or refuses, as a harmful request would be)."""
    return says_dont_know(reply) or refuses(reply)


def judge(reply: str, truth: str, n_pages: int) -> str:
    """'idk' if the reply declines, 'correct' if it states the truth, else 'wrong' (a hallucination).
    About a person with no page nothing can be known: a lucky guess is still a hallucination."""
    if says_idk(reply):
        return "idk"
    return "correct" if n_pages > 0 and mentions(reply, truth) else "wrong"


def is_right(verdict: str, n_pages: int) -> bool:
    """The right answer: the truth about a person with pages, "I don't know" about one with none."""
    return verdict == ("idk" if n_pages == 0 else "correct")


_TEMPLATE_WORDS = {
    w.lower() for a in ANSWERS.values() for t in a for w in re.findall(r"\w+", re.sub(r"\{\w+\}", "", t))
}


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
            rows.append(
                dict(
                    name=person.name,
                    fact=fact,
                    truth=person.fact(fact),
                    n_pages=person.n_pages,
                    bucket=bucket(person.n_pages),
                    question=question,
                )
            )
    return rows


def heldout_people(world: World, config: Config) -> list[Person]:
    """The people the measures are taken on: SFT's held-out people and everyone with no page."""
    _, held = split_people(world, config.sft.heldout_people)
    return held + [p for p in world.people if p.n_pages == 0]


# --- answering: greedy, sampled, and how sure -------------------------------------------------------


def with_probabilities(model, tokenizer, rows: list[dict], max_batch: int = 64) -> list[dict]:
    """Add to each row (holding `prompt_ids` and `answer_ids`) its answer's tokens, the probability
    the model gave each, and their geometric mean (`confidence`). An empty answer is judged by the
    probability of ending there."""
    end = tokenizer.encode_special("<|im_end|>")
    answers = [r["answer_ids"] or [end] for r in rows]
    logps, _ = score(model, [r["prompt_ids"] for r in rows], answers, max_batch=max_batch) if rows else (None, None)
    for i, (row, answer) in enumerate(zip(rows, answers)):
        probs = logps[i, : len(answer)].exp().tolist()
        row["tokens"] = [tokenizer.decode([t]) for t in row["answer_ids"]]
        row["token_probs"] = [round(q, 4) for q in probs[: len(row["answer_ids"])]]
        row["confidence"] = confidence(probs[: len(row["answer_ids"])] or probs)
    return rows


def confidence(probs: list[float]) -> float | None:
    """Geometric mean of the answer's token probabilities: how sure the model was of the whole answer."""
    return round(float(torch.tensor(probs).log().mean().exp()), 4) if probs else None


def probe(
    model,
    tokenizer,
    rows: list[dict],
    max_new_tokens: int,
    n_samples: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    max_batch: int = 64,
) -> list[dict]:
    """Ask every question (greedy), judge the answer; with `n_samples`, also sample that many answers
    and measure how often they make the same claim (consistency)."""
    if not rows:
        return []
    questions = [render_prompt([{"role": "user", "content": r["question"]}], tokenizer) for r in rows]
    prompts, budget = fit(questions, max_new_tokens, model.config.block_size)
    replies = [
        decode_reply(ids, tokenizer)
        for ids in generate(
            model, prompts, budget, temperature=0, stop_tokens=reply_stops(tokenizer), max_batch=max_batch
        )
    ]
    out = [
        dict(
            r,
            answer=reply.text,
            verdict=judge(reply.text, r["truth"], r["n_pages"]),
            prompt_ids=prompt,
            answer_ids=reply.ids,
        )
        for r, reply, prompt in zip(rows, replies, prompts)
    ]
    with_probabilities(model, tokenizer, out, max_batch)
    if n_samples:
        drawn = generate(
            model,
            prompts,
            budget,
            temperature=temperature,
            num_samples=n_samples,
            stop_tokens=reply_stops(tokenizer),
            seed=seed,
            max_batch=max_batch,
        )
        for i, row in enumerate(out):
            texts = [decode_reply(ids, tokenizer).text for ids in drawn[i * n_samples : (i + 1) * n_samples]]
            claims = [claim(t, row["name"]) for t in texts]
            row["samples"] = texts
            row["sample_verdicts"] = [judge(t, row["truth"], row["n_pages"]) for t in texts]
            row["consistency"] = round(Counter(claims).most_common(1)[0][1] / len(claims), 4)
    for row in out:
        del row["prompt_ids"], row["answer_ids"]
    return out


def probe_with_search(
    model,
    tokenizer,
    index,
    rows: list[dict],
    max_new_tokens: int,
    max_chars: int,
    queries: list[str] | None = None,
    max_batch: int = 64,
) -> list[dict]:
    """`probe` for the search model: it may call the tool once (`search.answer_with_search`)."""
    answers = answer_with_search(
        model,
        tokenizer,
        index,
        [r["question"] for r in rows],
        max_new_tokens,
        max_chars,
        queries=queries,
        max_batch=max_batch,
    )
    with_probabilities(model, tokenizer, answers, max_batch)
    return [
        dict(
            r,
            **{k: v for k, v in a.items() if k not in ("question", "prompt_ids", "answer_ids")},
            verdict=judge(a["answer"], r["truth"], r["n_pages"]),
        )
        for r, a in zip(rows, answers)
    ]


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
    return dict(
        confidence_by_verdict={v: _mean(r["confidence"] for r in rs) for v, rs in by.items()},
        consistency_by_verdict={v: _mean(r.get("consistency") for r in rs) for v, rs in by.items()},
    )


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
    return dict(
        idk_precision=per_bucket(idk, lambda rs: _share(r["ok"] for r in rs)),
        n_idk_after=per_bucket(idk, len),
        known_recall_after=per_bucket(known, lambda rs: _share(r["ok"] for r in rs)),
        n_known_before=per_bucket(known, len),
    )


# --- mitigation 1: "I don't know" where the model was wrong --------------------------------------------


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
        out.append(
            dict(
                kind="idk" if answer_idk else "qa",
                name=r["name"],
                fact=r["fact"],
                messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            )
        )
    out += make_conversations(world, max(1, n_regular), seed + 1, False, heldout_fraction)[:n_regular]
    rng.shuffle(out)
    return out


# --- fine-tuning ------------------------------------------------------------------------------------


def finetune(
    model,
    conversations: list[dict],
    tokenizer,
    config: Config,
    steps: int,
    device: str,
    run: Run,
    checkpoint,
    resume_key: str,
    desc: str,
):
    """The SFT recipe on `conversations` (tool messages rendered), with this stage's settings."""
    h = config.halluc
    return sft_finetune(
        model,
        conversations,
        tokenizer,
        config,
        steps=steps,
        batch_size=h.batch_size,
        learning_rate=h.learning_rate,
        min_lr=h.min_lr,
        warmup_steps=h.warmup_steps,
        device=device,
        run=run,
        checkpoint=checkpoint,
        resume_key=resume_key,
        desc=desc,
        renderer=render_tools,
    )


# --- the stage ------------------------------------------------------------------------------------------


def build(config: Config, run: Run, made_from: str) -> dict:
    """Probe the SFT model, fine-tune it to say "I don't know" and, separately, to search; measure all three.
    `made_from` is the stage's fingerprint (what a resumable checkpoint must match)."""
    from .data import read_world
    from .tokenizer import Tokenizer

    start = time.time()
    h, out, device = config.halluc, run.stage_dir("halluc"), resolve_device(config.device)
    world = read_world(run)
    if world is None:
        raise ConfigError(
            "the halluc stage needs the mini-web's world (data.source='mini-web', or data.mini_web_share > 0 to mix "
            "it into a dataset): its facts judge the answers"
        )
    tokenizer = Tokenizer.load(run.path / "tokenizer")
    sft_path = model_path(run, "sft")
    sft = load_model(sft_path, device)
    key, batch, main = made_from, config.max_batch, is_main_process()
    train_people, _ = split_people(world, config.sft.heldout_people)
    questions = probe_questions(heldout_people(world, config), config.seed)

    # under torchrun, the probes and the files are rank 0's; every process fine-tunes (DDP)
    if main:
        # the probe: the SFT assistant on held-out people (and people with no page)
        before = probe(sft, tokenizer, questions, h.max_new_tokens, h.n_samples, h.temperature, config.seed, batch)
        write_jsonl(out / "probe_before.jsonl", before)

        # mitigation 1: "I don't know" wherever it was wrong about training people
        probed_train = probe(
            sft,
            tokenizer,
            probe_questions(train_people, config.seed, False, "train"),
            h.max_new_tokens,
            max_batch=batch,
        )
        write_jsonl(out / "probe_train.jsonl", probed_train)
        idk_rows = idk_conversations(probed_train, world, h.idk_conversations, config.seed, config.sft.heldout_people)
        write_jsonl(out / "idk_train.jsonl", idk_rows)
    barrier()
    idk_rows = idk_rows if main else read_jsonl(out / "idk_train.jsonl")  # the others read what rank 0 wrote
    idk_model = load_model(sft_path, device)
    idk_result, n_idk = finetune(
        idk_model,
        idk_rows,
        tokenizer,
        config,
        h.idk_steps,
        device,
        run,
        out / "idk_state.pt",
        key + "-idk",
        "halluc: I don't know",
    )
    if main:
        save_model(out / "idk" / "model.pt", idk_model, dict(step=idk_result.step))
        # `labkit chat --model halluc` finds it here (plain chat, no tool)
        save_model(out / "model.pt", idk_model, dict(step=idk_result.step))
        after = probe(idk_model, tokenizer, questions, h.max_new_tokens, h.n_samples, h.temperature, config.seed, batch)
        write_jsonl(out / "probe_idk.jsonl", after)

    # mitigation 2: the search tool
    index = load_index(run, config)
    tool_rows = tool_conversations(
        world, index, h.tool_conversations, config.seed, config.sft.heldout_people, h.result_chars
    )
    if main:
        write_jsonl(out / "tool_train.jsonl", tool_rows)
    tool_model = load_model(sft_path, device)
    tool_result, n_tool = finetune(
        tool_model,
        tool_rows,
        tokenizer,
        config,
        h.tool_steps,
        device,
        run,
        out / "search_state.pt",
        key + "-search",
        "halluc: search",
    )
    if not main:
        return {}
    save_model(out / "search" / "model.pt", tool_model, dict(step=tool_result.step))
    searched = probe_with_search(
        tool_model, tokenizer, index, questions, h.max_new_tokens, h.result_chars, max_batch=batch
    )
    unsearched = probe_with_search(
        tool_model, tokenizer, None, questions, h.max_new_tokens, h.result_chars, max_batch=batch
    )
    # the same questions with the right search call made for the model: how well it reads
    canonical = [search_query(world.person(r["name"]), r["fact"]) for r in questions]
    given_query = probe_with_search(
        tool_model, tokenizer, index, questions, h.max_new_tokens, h.result_chars, canonical, batch
    )
    write_jsonl(out / "probe_search.jsonl", searched)
    write_jsonl(out / "probe_search_given_query.jsonl", given_query)

    s_before, s_after, s_search, s_off = summarize(before), summarize(after), summarize(searched), summarize(unsearched)
    metrics = dict(
        hallucination_rate_before=s_before["hallucination_rate"],
        hallucination_rate_after=s_after["hallucination_rate"],
        **compare(before, after),
        search_accuracy=s_search["accuracy"],
        accuracy_before=s_before["accuracy"],
        accuracy_after=s_after["accuracy"],
        search_off_accuracy=s_off["accuracy"],
        search_accuracy_given_query=summarize(given_query)["accuracy"],
        hallucination_rate_search=s_search["hallucination_rate"],
        hallucination_rate_search_off=s_off["hallucination_rate"],
        idk_rate_before=s_before["idk_rate"],
        idk_rate_after=s_after["idk_rate"],
        idk_rate_search=s_search["idk_rate"],
        search_call_rate=per_bucket(searched, lambda rs: _share(r["call"] != "answer" for r in rs)),
        search_query_ok=per_bucket(
            searched, lambda rs: _share(bool(r["query"]) and r["name"] in r["query"] for r in rs)
        ),
        # how often the right search call finds the asked fact at all (people with pages): the retrieval alone
        retrieval_recall=per_bucket(
            [r for r in given_query if r["n_pages"]],
            lambda rs: _share(mentions(r["tool_result"], r["truth"]) for r in rs),
        ),
        n_questions=s_before["n_questions"],
        n_heldout_people=len({r["name"] for r in questions}),
        train_hallucination_rate=summarize(probed_train)["hallucination_rate"]["all"],
        n_idk_train=sum(c["kind"] == "idk" for c in idk_rows),
        n_idk_conversations=n_idk,
        n_tool_conversations=n_tool,
        n_passages=len(index.passages),
        idk_train_seconds=round(idk_result.train_seconds, 2),
        search_train_seconds=round(tool_result.train_seconds, 2),
        device=device,
        **{f"{k}_before": v for k, v in signals(before).items()},
    )
    metrics["seconds"] = round(time.time() - start, 2)
    return metrics
