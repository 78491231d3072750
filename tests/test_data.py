import hashlib
import json

import pytest

from labkit.cleaning import ExactDedup, MinHashDedup, PIIRedactor, QualityFilter, UrlFilter, find_pii, redact
from labkit.config import ConfigError, get_config
from labkit.data import clean, load_documents, read_corpus, read_pages, read_world, score
from labkit.pipeline import ensure
from labkit.run import Run, read_jsonl
from labkit.web import Page, crawl, label_exact_copies, near_copy
from labkit.world import bucket, make_world

OTHER = (
    "A small bakery on the corner sells bread and cakes every morning. The owner starts work before "
    "dawn, and by seven the shelves are full of warm loaves. Customers come from all over town, some of them "
    "by bus and some on foot, and the queue often reaches the end of the street. On Sundays the bakery is "
    "closed, and the owner goes fishing with her brother at the lake."
)
GOOD = (
    "The river that runs past the old mill is one of the quietest places in the whole valley, and many "
    "people like to walk there in the evening. Children play on the grass with their dogs, while older "
    "people sit on the benches and talk about the weather, the harvest and the news of the week. In the "
    "spring the water rises and covers the lower path, so walkers have to take the road that goes over "
    "the hill and back down to the bridge near the church."
)


def page(text=GOOD, url="https://example.org/a", **kw):
    return Page(url, text, "test", **kw)


def test_same_seed_gives_the_same_corpus_byte_for_byte(tmp_path):
    config = get_config("tiny")
    digests = []
    for name in ("a", "b"):
        run = Run(name, tmp_path)
        ensure("data", config, run)
        digests.append(
            [
                hashlib.sha256((run.path / "data" / f).read_bytes()).hexdigest()
                for f in ("corpus.jsonl", "pages.jsonl", "world.json")
            ]
        )
    assert digests[0] == digests[1]
    other = crawl(make_world(config.seed + 1, 30), config.seed + 1)
    assert [p.text for p in other] != [row["text"] for row in read_jsonl(tmp_path / "a" / "data" / "pages.jsonl")]


def test_world_has_a_heavy_tail_and_unseen_people():
    world = make_world(0, 200, median_pages=3.0, spread=1.2, unseen_fraction=0.1, max_pages_per_person=40)
    counts = sorted(p.n_pages for p in world.people)
    assert counts.count(0) == 20 and counts[-1] >= 17
    assert {bucket(c) for c in counts} == {"0", "1", "2-4", "5-16", "17+"}
    assert len({p.name for p in world.people}) == 200  # names are distinct


@pytest.mark.parametrize(
    "url, reason",
    [
        ("https://hotcams-xxx.com/page/1", "domain"),
        ("https://www.betnow24.net/x", "domain"),
        ("https://freehost.net/casino-games/3", "hard_blacklisted"),
        ("https://promo-site.com/free-cheap-offer/1", "soft_blacklisted"),
        ("https://essexnews.com/sussex/analysis-of-the-vote", None),  # 'sex' inside words is not a banned word
        ("https://promo-site.com/free-offer/1", None),  # one soft word is not enough
        ("https://wikiverse.org/wiki/ada", None),
    ],
)
def test_url_filter(url, reason):
    assert UrlFilter().reason(page(url=url)) == reason


@pytest.mark.parametrize(
    "text, reason",
    [
        (GOOD, None),
        ("Page not found.", "too_few_words"),
        ("buy cheap watches online " * 30, "stop_words"),
        ("buy the cheap watches and save " * 30, "top_2_gram"),
        ("\n".join(["Click here to see the latest offers from our store today"] * 12), "dup_line_frac"),
        (" ".join(["xq zt pk"] * 40), "mean_word_length"),
        (
            "\n\n".join(
                [GOOD, "A short line that repeats itself.", GOOD[:120] + ".", "A short line that repeats itself."] * 2
            ),
            "dup_para_frac",
        ),
        (" ".join(f"#{w}" for w in ["deal", "sale", "shop", "buy", "best", "free"] * 12), "hash_ratio"),
        (" ".join(["qz", "xp", "tk", "rb"] * 3 + ["and", "the", "of"]) * 6, "mean_word_length"),
        (
            GOOD.replace(" the ", " a ")
            .replace(" and ", " plus ")
            .replace(" of ", " in ")
            .replace(" to ", " for ")
            .replace("The ", "A ")
            .replace(" that ", " which ")
            .replace(" with ", " by "),
            "stop_words",
        ),
        (" ".join(["12 34 56 78 90"] * 3) + " " + GOOD[:200], "alpha_words"),
    ],
)
def test_quality_filter(text, reason):
    assert QualityFilter().reason(page(text)) == reason


def test_quality_rule_thresholds_are_gophers():
    q = QualityFilter()
    assert (q.min_words, q.mean_word_length, q.min_stop_words, q.min_alpha_words) == (50, (3, 10), 2, 0.8)
    assert q.dup_ngram_char_frac[0] == (5, 0.15) and q.top_ngram_char_frac[0] == (2, 0.20)


def test_exact_dedup_keeps_the_first_copy():
    pages = [page(url="u1"), page(GOOD.upper(), url="u2"), page(GOOD + " More.", url="u3")]
    kept, removed = ExactDedup().run(pages)
    assert [p.url for p in kept] == ["u1", "u3"]
    assert removed[0][0].url == "u2" and removed[0][1] == "copy of u1"


def test_minhash_catches_near_copies_and_spares_different_pages():
    edited = GOOD.replace("quietest", "calmest") + " Share this page with your friends."
    kept, removed = MinHashDedup().run([page(url="u1"), page(edited, url="u2"), page(OTHER, url="u3")])
    assert [p.url for p in kept] == ["u1", "u3"] and removed[0][1] == "near copy of u1"


def test_minhash_signature_agreement_estimates_jaccard():
    m = MinHashDedup(bands=32, rows=8)
    words = GOOD.split()
    half = " ".join(words[: len(words) // 2] + [f"w{i}" for i in range(len(words) // 2)])
    agreement = (m.signature(GOOD) == m.signature(half)).mean()
    assert 0.15 < agreement < 0.5  # true 5-gram Jaccard is about 0.3
    assert round(MinHashDedup().threshold, 2) == 0.72


@pytest.mark.parametrize(
    "text, kind, value",
    [
        ("Write to ada.12@mailbox.com today.", "email", "ada.12@mailbox.com"),
        ("Call (555) 321-4567 now.", "phone", "(555) 321-4567"),
        ("Call 555-321-4567 now.", "phone", "555-321-4567"),
        ("Call +1 555 321 4567 now.", "phone", "+1 555 321 4567"),
        ("We are at 42 Elm Street, next door.", "address", "42 Elm Street"),
        ("Sent from 83.12.45.77 at noon.", "ip", "83.12.45.77"),
    ],
)
def test_pii_is_found(text, kind, value):
    assert [(text[s:e], k) for s, e, k in find_pii(text)] == [(value, kind)]


@pytest.mark.parametrize(
    "text",
    [
        "What is 23 plus 58? The answer is 81.",
        "In 1999 about 4500 people lived there.",
        "The local router is at 192.168.1.1 and 10.0.0.1.",  # private addresses are not personal data
        "Version 3.2 was released on 12 May.",
    ],
)
def test_pii_spares_ordinary_numbers(text):
    assert find_pii(text) == []


def test_redaction_keeps_the_page_and_uses_placeholders():
    text, spans = redact("Mail ada@x.org or call 555-321-4567.")
    assert text == "Mail <EMAIL> or call <PHONE>." and [k for *_, k in spans] == ["email", "phone"]
    kept, removed = PIIRedactor().run([page("Mail ada@x.org please.")])
    assert removed == [] and kept[0].text == "Mail <EMAIL> please."


def test_tiny_preset_cleaning_scores(tiny_run):
    m = tiny_run.metrics("data")
    for step in ("url", "exact_dedup", "pii"):
        assert m["precision"][step] >= 0.95 and m["recall"][step] >= 0.95, step
    for step in ("near_dedup", "quality"):
        assert m["precision"][step] >= 0.9 and m["recall"][step] >= 0.9, step
    assert m["pii_leaked"] == 0 and sum(m["pii_planted"].values()) > 0
    assert m["pages_in"] == sum(r["pages_in"] - r["pages_out"] for r in m["funnel"]) + m["pages_out"]


def test_cleaning_keeps_precision_and_recall_as_the_world_grows():
    """2,000 people (about 37,000 pages, between cpu and gpu): pages labelled distinct must be distinct.
    With eight story animals and ten story sentences, near dedup's precision here was 0.93 (173 of its
    199 false removals were stories about the same animal), and at the gpu preset's 5,000 people 0.87.
    The page steps on the generated text: extraction, language and line steps have tests of their own
    (tests/test_crawl.py), and extracting 37,000 pages would take minutes."""
    c = get_config("cpu", data=dict(n_people=2000, median_pages=4.0, max_pages_per_person=200)).data
    world = make_world(0, c.n_people, c.median_pages, c.spread, c.unseen_fraction, c.max_pages_per_person)
    pages = crawl(world, 0, c.filler_ratio, c.noise, c.pii_rate)
    steps = [UrlFilter(), QualityFilter(), ExactDedup(), MinHashDedup(), PIIRedactor()]
    m = score(pages, clean(pages, steps))
    assert len(pages) > 30_000
    for step in ("url", "quality", "exact_dedup", "near_dedup", "pii"):
        assert m["precision"][step] >= 0.95 and m["recall"][step] >= 0.95, (step, m["precision"], m["recall"])
    assert m["pii_leaked"] == 0


def test_two_identical_copies_are_an_exact_duplicate_whatever_made_them():
    import random

    source = page()
    copies = [near_copy(source, random.Random(seed), k) for k, seed in enumerate((0, 0))]
    assert copies[0].text == copies[1].text and copies[0].label == copies[1].label == "near_dup"
    labelled = label_exact_copies([source, *copies, page(url="https://example.org/b")])
    assert [p.label for p in labelled] == ["clean", "near_dup", "exact_dup", "exact_dup"]
    assert labelled[2].dup_of == copies[0].url and labelled[3].dup_of == source.url
    assert ExactDedup().run(labelled)[1] == [
        (labelled[2], f"copy of {copies[0].url}"),
        (labelled[3], f"copy of {source.url}"),
    ]


def test_cleaned_corpus_has_no_planted_pii_and_no_noise(tiny_run):
    pages, corpus = read_pages(tiny_run), read_corpus(tiny_run)
    text = "\n".join(p["text"] for p in corpus)
    assert all(value not in text for p in pages for _, value in p["pii"])
    kept = {p["url"] for p in corpus}
    labels = {p["url"]: p["label"] for p in pages}
    assert sum(labels[u] != "clean" for u in kept) <= 1
    assert read_world(tiny_run).people[0].name


def test_stage_is_reused_unless_forced_or_changed(tiny_run, tiny_config):
    first = tiny_run.metrics("data")
    assert ensure("data", tiny_config, tiny_run)["fingerprint"] == first["fingerprint"]
    changed = get_config("tiny", data={"noise": 0.1})
    assert ensure("data", changed, Run("other", tiny_run.runs_dir))["fingerprint"] != first["fingerprint"]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_real_data_from_a_local_file_in_the_hub_format(tmp_path, suffix):
    import datasets

    long = GOOD + " " + OTHER  # C4's line rules keep a page of 5 sentences or more
    rows = [
        {"text": long, "url": "https://a.org/1"},
        {"text": long, "url": "https://a.org/2"},
        {"text": "Write to me at jo@mail.org. " + OTHER, "url": "https://a.org/3"},
        {"text": "Too short.", "url": "u4"},
    ]
    path = tmp_path / f"docs{suffix}"
    ds = datasets.Dataset.from_list(rows)
    ds.to_json(path) if suffix == ".jsonl" else ds.to_parquet(path)
    config = get_config("tiny", data={"source": str(path)})
    run = Run("real", tmp_path)
    metrics = ensure("data", config, run)
    assert metrics["pages_in"] == 4 and metrics["removed"]["exact_dedup"] == 1 and metrics["pages_out"] == 2
    assert "extract" not in metrics["removed"]  # a dataset's text is extracted already
    assert metrics["removed"]["language"] + metrics["removed"]["quality"] == 1  # "Too short." (too short to be English)
    assert metrics["precision"] == {} and read_world(run) is None
    assert "<EMAIL>" in "".join(p["text"] for p in read_corpus(run))
    assert len(load_documents(get_config("tiny", data={"source": str(path), "max_docs": 2}).data)) == 2


def test_real_data_errors_are_clear(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(ConfigError, match="has no column 'text'; columns: content"):
        load_documents(get_config("tiny", data={"source": str(path)}).data)
    bad = tmp_path / "docs.csv"
    bad.write_text("text\nhello\n")
    with pytest.raises(ConfigError, match="must be .jsonl, .json or .parquet"):
        load_documents(get_config("tiny", data={"source": str(bad)}).data)
