"""Stage 7: judging rules, the probe, "I don't know" data, the search tool and its engine, the stage."""

import pytest

from labkit import halluc, search
from labkit.chat import render_tools
from labkit.run import read_jsonl
from labkit.world import Person, World

PAGES = [
    dict(
        url="https://wiki/ada",
        text="Ada Brannor\n\nAda was born in the city of Fikaswick. Ada was born in the year 1974. "
        "Ada works at Dama Group. Ada's field is botany.",
        genre="encyclopedia",
        about="Ada Brannor",
    ),
    dict(
        url="https://news/ada",
        text="Ada Brannor speaks in Zola\n\nAda studied at the University of Sura. Ada works in the field of botany.",
        genre="news",
        about="Ada Brannor",
    ),
    dict(
        url="https://wiki/bruno",
        text="Bruno Kel\n\nBruno was born in the year 1950. Bruno was born in the city of Zola.",
        genre="encyclopedia",
        about="Bruno Kel",
    ),
    dict(
        url="https://sheet/1",
        text="Arithmetic practice\n\nWhat is 2 plus 3? The answer is 5.",
        genre="worksheet",
        about=None,
    ),
]


@pytest.fixture(scope="module")
def built(tiny_run, tiny_config):
    from labkit.pipeline import ensure

    metrics = ensure("halluc", tiny_config, tiny_run)
    return tiny_run, metrics


@pytest.fixture(scope="module")
def tokenizer(built):
    from labkit.tokenizer import Tokenizer

    return Tokenizer.load(built[0].path / "tokenizer")


# --- judging -----------------------------------------------------------------------------------------


def test_judge_rules():
    assert halluc.judge("Ada was born in Fikaswick.", "Fikaswick", 3) == "correct"
    assert halluc.judge("Ada was born in Fikaswickton.", "Fikaswick", 3) == "wrong"  # whole words only
    assert halluc.judge("Ada was born in Zola.", "Fikaswick", 3) == "wrong"
    for reply in [
        "I don't know.",
        "I'm not sure. I have no information about Ada.",
        "I do not know, sorry.",
        "I'm sorry, but I can't help with that.",
    ]:
        assert halluc.judge(reply, "Fikaswick", 3) == "idk", reply
    # about someone with no page, even a lucky guess is a hallucination; only "I don't know" is right
    assert halluc.judge("Ada was born in Fikaswick.", "Fikaswick", 0) == "wrong"
    assert halluc.is_right("idk", 0) and not halluc.is_right("correct", 0) and halluc.is_right("correct", 2)


def test_claims_ignore_phrasing():
    a = halluc.claim("Ada Brannor was born in Zola.", "Ada Brannor")
    b = halluc.claim("Ada Brannor was born in the city of Zola.", "Ada Brannor")
    assert a == b == "zola"
    assert halluc.claim("I don't know.", "Ada Brannor") == "idk"


def test_summaries_per_bucket():
    rows = [
        dict(bucket="0", n_pages=0, verdict="wrong"),
        dict(bucket="0", n_pages=0, verdict="idk"),
        dict(bucket="1", n_pages=1, verdict="correct"),
        dict(bucket="1", n_pages=1, verdict="wrong"),
    ]
    s = halluc.summarize(rows)
    assert s["hallucination_rate"] == {"all": 0.5, "0": 0.5, "1": 0.5, "2-4": None, "5-16": None, "17+": None}
    assert s["accuracy"]["0"] == 0.5 and s["accuracy"]["1"] == 0.5
    assert s["n_questions"]["all"] == 4 and s["n_questions"]["0"] == 2
    before = [dict(name="A", fact="field", bucket="1", verdict=v) for v in ("correct", "wrong", "correct", "wrong")]
    after = [dict(name="A", fact="field", bucket="1", verdict=v) for v in ("correct", "idk", "idk", "wrong")]
    c = halluc.compare(before, after)
    assert c["idk_precision"]["all"] == 0.5  # one of the two "I don't know"s was about a fact it did not know
    assert c["known_recall_after"]["all"] == 0.5  # one of the two known facts is still answered


# --- "I don't know" data ----------------------------------------------------------------------------


def _world():
    people = [
        Person("Ada Brannor", 1974, "Fikaswick", "University of Sura", "botany", "Dama Group", 3),
        Person("Bruno Kel", 1950, "Zola", "University of Sura", "physics", "Dama Group", 1),
        Person("Cyrus Vel", 1960, "Zola", "University of Sura", "music", "Dama Group", 0),
    ]
    return World(
        0,
        ["Vouia"],
        {"Fikaswick": "Vouia", "Zola": "Vouia"},
        {"Dama Group": dict(city="Zola", industry="energy")},
        {"University of Sura": "Zola"},
        people,
    )


def test_idk_conversations_answer_idk_exactly_where_the_model_was_wrong():
    world = _world()
    probed = [
        dict(name="Ada Brannor", fact="birth_city", verdict="correct"),
        dict(name="Bruno Kel", fact="birth_year", verdict="wrong"),
    ]
    rows = halluc.idk_conversations(probed, world, 60, seed=0, heldout_fraction=0.3)
    assert len(rows) == 60
    facts = [
        r
        for r in rows
        if r["kind"] in ("idk", "qa")
        and "fact" in r
        and r.get("name") in ("Ada Brannor", "Bruno Kel")
        and r["messages"][0]["content"].count("?")
    ]
    idk = [r for r in facts if r["kind"] == "idk"]
    assert idk and all(r["name"] == "Bruno Kel" and halluc.says_idk(r["messages"][-1]["content"]) for r in idk)
    assert len({r["messages"][-1]["content"] for r in idk}) > 1  # several phrasings
    known = [r for r in facts if r["kind"] == "qa" and r.get("fact") == "birth_city" and r["name"] == "Ada Brannor"]
    assert known and all("Fikaswick" in r["messages"][-1]["content"] for r in known)


# --- the search tool ----------------------------------------------------------------------------------


def test_search_finds_the_fact_and_nothing_about_unknown_names():
    index = search.SearchIndex(PAGES, k=2)
    top = index.search("Ada Brannor born year")
    assert top and all("Ada" in p["text"] for p in top)
    assert "1974" in search.format_results(top, 200)
    assert "Zola" in search.format_results(index.search("Bruno Kel born city", k=1), 200)
    assert index.search("Cyrus Vel born city") == []  # a name no page holds: nothing, not near misses
    assert index.search("Ada Kel") == []  # every word of a name must match
    assert index.search("") == [] and index.search("?!") == []
    assert search.format_results([], 100) == "no results"
    assert len(search.format_results(top, 10)) == 10
    with pytest.raises(ValueError, match="at least one page"):
        search.SearchIndex([], k=1)


def test_parse_call():
    assert search.parse_call(" search: Ada Brannor born ") == ("Ada Brannor born", None)
    query, error = search.parse_call("lookup: Ada")
    assert query is None and "unknown tool call" in error and "search: QUERY" in error
    query, error = search.parse_call("search:   ")
    assert query is None and "empty" in error


def test_render_tools_puts_no_loss_on_the_tool_result(tokenizer):
    messages = [
        {"role": "user", "content": "Where was Ada born?"},
        {"role": "assistant", "content": search.tool_call("Ada Brannor born city")},
        {"role": "tool", "content": "Ada was born in Fikaswick."},
        {"role": "assistant", "content": "Ada was born in Fikaswick."},
    ]
    ids, mask = render_tools(messages, tokenizer)
    special = tokenizer.encode_special
    call, call_end = ids.index(special("<|tool_call|>")), ids.index(special("<|tool_call_end|>"))
    result, result_end = ids.index(special("<|tool_result|>")), ids.index(special("<|tool_result_end|>"))
    assert all(mask[call : call_end + 1]) and not any(mask[result : result_end + 1])
    assert tokenizer.decode(ids[call + 1 : call_end]) == "search: Ada Brannor born city"
    # the answer and <|im_end|>
    assert sum(mask[result_end + 1 :]) == len(tokenizer.encode("Ada was born in Fikaswick.")) + 1
    # user text that looks like a tool call stays text
    ids, _ = render_tools(
        [{"role": "user", "content": search.tool_call("x")}, {"role": "assistant", "content": "ok"}], tokenizer
    )
    assert special("<|tool_call|>") not in ids


def _scripted(tokenizer, *texts):
    """Model outputs: each text's '<|...|>' markers as special tokens, the rest encoded."""
    import re

    out = []
    for text in texts:
        ids = []
        for part in re.split(r"(<\|[a-z_]+\|>)", text):
            if part:
                ids += [tokenizer.encode_special(part)] if part.startswith("<|") else tokenizer.encode(part)
        out.append(ids)
    return out


def test_after_generation_kinds(tokenizer):
    s = lambda t: _scripted(tokenizer, t)[0]  # noqa: E731
    assert search.after_generation(s("Ada was born in Zola.<|im_end|>junk"), tokenizer)["kind"] == "answer"
    first = search.after_generation(s("<|tool_call|>search: Ada Brannor<|tool_call_end|>junk"), tokenizer)
    assert first["kind"] == "call" and first["query"] == "Ada Brannor"
    assert first["kept"][-1] == tokenizer.encode_special("<|tool_call_end|>")
    unclosed = search.after_generation(s("<|tool_call|>search: Ada Bra"), tokenizer)
    assert unclosed["kind"] == "unclosed" and "never closed" in unclosed["error"]
    assert unclosed["kept"][-1] == tokenizer.encode_special("<|tool_call_end|>")  # the engine closes it
    malformed = search.after_generation(s("<|tool_call|>find Ada<|tool_call_end|>"), tokenizer)
    assert malformed["kind"] == "malformed" and "search: QUERY" in malformed["error"]


@pytest.mark.parametrize(
    "first, expected_call, result_has",
    [
        ("<|tool_call|>search: Ada<|tool_call_end|>", "call", "Ada"),
        ("<|tool_call|>search: Ed<|tool_call_end|>", "call", "no results"),
        ("<|tool_call|>search: Ada", "unclosed", "never closed"),
        ("<|tool_call|>weather: Zola<|tool_call_end|>", "malformed", "unknown tool"),
        ("In 1974.<|im_end|>", "answer", None),
    ],
)
def test_answer_with_search_handles_every_kind_of_call(built, tokenizer, monkeypatch, first, expected_call, result_has):
    from labkit.checkpoint import load_model

    run, _ = built
    model = load_model(run.path / "halluc" / "search" / "model.pt")
    outputs = iter([_scripted(tokenizer, first), _scripted(tokenizer, "I don't know.<|im_end|>")])
    seen = []

    def fake_greedy(model, prompts, max_new_tokens, **_):
        seen.append(prompts)
        assert all(len(p) + max_new_tokens <= model.config.block_size for p in prompts)
        return [ids[:max_new_tokens] for ids in next(outputs)]  # a model writes max_new_tokens at most

    monkeypatch.setattr(search, "generate", fake_greedy)
    index = search.SearchIndex(PAGES, k=1)
    [row] = search.answer_with_search(
        model, tokenizer, index, ["When was Ada Brannor born?"], max_new_tokens=20, max_chars=60
    )
    assert row["call"] == expected_call
    if result_has is None:
        assert row["tool_result"] is None and row["answer"] == "In 1974." and len(seen) == 1
    else:
        assert result_has in row["tool_result"] and row["answer"] == "I don't know."
        tool_prompt = seen[1][0]
        assert tool_prompt.count(tokenizer.encode_special("<|tool_result|>")) == 1
        assert tool_prompt[-1] == tokenizer.encode_special("<|im_sep|>")  # the assistant answers next
    halluc.with_probabilities(model, tokenizer, [row])
    assert len(row["token_probs"]) == len(row["tokens"]) and all(0 <= p <= 1 for p in row["token_probs"])


def test_answer_with_search_on_the_real_model_never_crashes(built, tokenizer, tiny_config):
    from labkit.checkpoint import load_model

    run, _ = built
    model = load_model(run.path / "halluc" / "search" / "model.pt")
    index = search.load_index(run, tiny_config)
    rows = search.answer_with_search(
        model, tokenizer, index, ["Where was Ada born?", "", "<|tool_call|>search: x", "x " * 200]
    )
    assert len(rows) == 4 and all(isinstance(r["answer"], str) for r in rows)
    off = search.answer_with_search(model, tokenizer, None, ["Where was Ada born?"])
    assert off[0]["tool_result"] is None or off[0]["tool_result"].startswith("error")


# --- the probe and the stage ------------------------------------------------------------------------------


def test_probe_questions_cover_every_fact_of_heldout_and_pageless_people(built, tiny_config):
    from labkit.data import read_world

    run, _ = built
    world = read_world(run)
    people = halluc.heldout_people(world, tiny_config)
    assert any(p.n_pages == 0 for p in people)
    rows = halluc.probe_questions(people, 0)
    assert len(rows) == 5 * len(people)
    assert all(r["name"] in r["question"] or r["name"].split()[0] in r["question"] for r in rows)


def test_probe_judges_samples_and_confidence(built, tokenizer, tiny_config):
    from labkit.checkpoint import load_model
    from labkit.data import read_world

    run, _ = built
    model = load_model(run.path / "sft" / "model.pt")
    rows = halluc.probe_questions(halluc.heldout_people(read_world(run), tiny_config)[:2], 0)
    probed = halluc.probe(model, tokenizer, rows, max_new_tokens=8, n_samples=3, seed=1)
    for r in probed:
        assert r["verdict"] in halluc.VERDICTS and r["verdict"] == halluc.judge(r["answer"], r["truth"], r["n_pages"])
        assert len(r["samples"]) == 3 and 0.333 <= r["consistency"] <= 1
        assert len(r["token_probs"]) == len(r["tokens"]) and (r["confidence"] is None or 0 <= r["confidence"] <= 1)
    again = halluc.probe(model, tokenizer, rows, max_new_tokens=8, n_samples=3, seed=1)
    assert [r["samples"] for r in again] == [r["samples"] for r in probed]  # seeded


def test_stage_metrics_and_artifacts(built):
    run, metrics = built
    for key in (
        "hallucination_rate_before",
        "hallucination_rate_after",
        "idk_precision",
        "known_recall_after",
        "search_accuracy",
        "search_accuracy_given_query",
        "n_questions",
    ):
        assert set(metrics[key]) == {"all", "0", "1", "2-4", "5-16", "17+"}, key
    n = metrics["n_questions"]
    assert n["all"] == sum(v or 0 for b, v in n.items() if b != "all") > 0 and n["0"] > 0
    assert metrics["hallucination_rate_before"]["0"] is not None
    for rate in ("hallucination_rate_before", "hallucination_rate_after", "search_accuracy"):
        assert all(v is None or 0 <= v <= 1 for v in metrics[rate].values())
    from labkit.checkpoint import load_model

    for path in ("model.pt", "idk/model.pt", "search/model.pt"):
        load_model(run.path / "halluc" / path)
    rows = read_jsonl(run.path / "halluc" / "probe_before.jsonl")
    assert len(rows) == n["all"]
    tool = read_jsonl(run.path / "halluc" / "tool_train.jsonl")
    assert any(r["kind"] == "tool" and r["messages"][2]["content"] == "no results" for r in tool)
    # the refusal training is what it says: on the questions it taught to decline, "I don't know." became
    # more likely (at the tiny preset's 4 steps it need not be the greedy answer yet)
    from labkit.chat import render_prompt
    from labkit.engine import fit, score
    from labkit.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(run.path / "tokenizer")
    taught = [
        r["messages"][0]["content"] for r in read_jsonl(run.path / "halluc" / "idk_train.jsonl") if r["kind"] == "idk"
    ]
    idk = [tokenizer.encode("I don't know.") + [tokenizer.encode_special("<|im_end|>")]] * min(16, len(taught))
    block = load_model(run.path / "sft" / "model.pt").config.block_size
    prompts, _ = fit(
        [render_prompt([{"role": "user", "content": q}], tokenizer) for q in taught[:16]], len(idk[0]), block
    )
    before = score(load_model(run.path / "sft" / "model.pt"), prompts, idk)[0].sum(1).mean()
    after = score(load_model(run.path / "halluc" / "idk" / "model.pt"), prompts, idk)[0].sum(1).mean()
    assert prompts and after > before + 1.0, (before, after)


def test_invented_people_are_not_in_the_world(built):
    from labkit.data import read_world
    from labkit.world import FACTS

    world = read_world(built[0])
    names = {p.name for p in world.people}
    invented = search.invented_people(world, 20, 0)
    assert len(invented) == 20 and not names & {p.name for p in invented}
    assert all(p.n_pages == 0 for p in invented)
    # every fact is one the world has, but drawn from different people: no person's facts are copied whole
    for fact in FACTS:
        assert {p.fact(fact) for p in invented} <= {p.fact(fact) for p in world.people}
    facts_of = lambda p: tuple(p.fact(f) for f in FACTS)  # noqa: E731
    assert not {facts_of(p) for p in invented} & {facts_of(p) for p in world.people}


def test_stranger_conversations_must_be_answered_from_the_results(built, tiny_config):
    import random

    from labkit.data import read_world

    run, _ = built
    world = read_world(run)
    index = search.load_index(run, tiny_config)
    rng = random.Random(0)
    strangers = search.invented_people(world, 30, 1)
    conversations = [search.stranger_conversation(p, "employer", world, 2, rng, 240) for p in strangers]
    answered = 0
    for person, c in zip(strangers, conversations):
        question, call, result, answer = (m["content"] for m in c["messages"])
        assert call == search.tool_call(search.search_query(person, "employer"))
        assert index.search(search.search_query(person, "employer")) == []  # the corpus never mentions them
        assert result != "no results"  # only the search engine holds the stranger's page
        if person.employer in result:
            answered += 1
            assert person.employer in answer and not halluc.says_idk(answer)
        else:
            assert halluc.says_idk(answer)
    assert answered >= 15  # most pages state the employer among the passages found


def test_tool_conversations_mix(built, tiny_config):
    from labkit.data import read_world

    run, _ = built
    world = read_world(run)
    names = {p.name for p in world.people}
    rows = search.tool_conversations(
        world, search.load_index(run, tiny_config), 100, 0, tiny_config.sft.heldout_people, 240
    )
    searches = [r for r in rows if r["kind"] == "tool"]
    assert len(rows) == 100 and len(searches) == 80
    nothing = [r for r in searches if r["messages"][2]["content"] == "no results"]
    known = [r for r in searches if r["name"] in names]
    strangers = [r for r in searches if r["name"] not in names and r not in nothing]
    assert len(known) == 20 and len(nothing) == 20 and not names & {r["name"] for r in nothing}
    assert len(strangers) == 40  # half the searches: a page only the search engine holds
    assert len({r["name"] for r in strangers + nothing}) == 60  # a fresh name in every one


def test_bad_config_is_refused():
    from labkit.config import ConfigError, get_config

    with pytest.raises(ConfigError, match="halluc.search_results"):
        get_config("tiny", halluc=dict(search_results=0))


def test_search_off_tells_the_model_so(built, tokenizer, monkeypatch):
    from labkit.checkpoint import load_model

    model = load_model(built[0].path / "halluc" / "search" / "model.pt")
    outputs = iter(
        [
            _scripted(tokenizer, "<|tool_call|>search: Ada<|tool_call_end|>"),
            _scripted(tokenizer, "I don't know.<|im_end|>"),
        ]
    )
    monkeypatch.setattr(search, "generate", lambda model, prompts, n, **_: [ids[:n] for ids in next(outputs)])
    [row] = search.answer_with_search(model, tokenizer, None, ["When was Ada Brannor born?"], max_new_tokens=20)
    assert row["call"] == "call" and row["tool_result"] == "error: search is off" and row["passages"] == []


def test_a_given_query_replaces_the_models_call(built, tokenizer, monkeypatch):
    from labkit.checkpoint import load_model

    model = load_model(built[0].path / "halluc" / "search" / "model.pt")
    seen = []

    def fake_greedy(model, prompts, n, **_):
        seen.append(prompts)
        assert all(len(p) + n <= model.config.block_size for p in prompts)
        return [ids[:n] for ids in _scripted(tokenizer, "In 1974.<|im_end|>")]

    monkeypatch.setattr(search, "generate", fake_greedy)
    index = search.SearchIndex(PAGES, k=1)
    [row] = search.answer_with_search(
        model, tokenizer, index, ["When was Ada Brannor born?"], max_new_tokens=20, queries=["Ada Brannor born year"]
    )
    assert len(seen) == 1  # the model only answers; the call was made for it
    assert row["call"] == "call" and row["query"] == "Ada Brannor born year" and "1974" in row["tool_result"]
    assert row["answer"] == "In 1974."
    assert seen[0][0][-1] == tokenizer.encode_special("<|im_sep|>")
    assert seen[0][0].count(tokenizer.encode_special("<|tool_call|>")) == 1
    # a call too long for the context keeps its end (the results and the answer's header), as a long question does
    [long] = search.answer_with_search(
        model, tokenizer, index, ["When was Ada born?"], max_new_tokens=20, queries=["Ada " * 60 + "Brannor born year"]
    )
    assert long["answer"] == "In 1974." and seen[1][0][-1] == tokenizer.encode_special("<|im_sep|>")
