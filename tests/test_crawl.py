"""The crawl as a crawl: HTML in WARC files, extraction, language ID, C4 line rules, site-level line dedup."""

import gzip
import io
import random
import socket
from collections import Counter

import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from labkit import language
from labkit.config import ConfigError, get_config
from labkit.crawl import Extractor, Site, dress, extract_text, read_warc, to_html, write_warc
from labkit.data import line_scores, read_corpus, read_pages, read_world
from labkit.language import FOREIGN, LanguageFilter, foreign_page, mix_in_languages
from labkit.lines import C4LineFilter, SiteLineDedup, count_lines
from labkit.pipeline import ensure
from labkit.run import Run
from labkit.web import Page

ARTICLE = (
    "Ada Lovelace\n\n"
    "Ada Lovelace was born in the city of Vouton. She studied at the University of Bargoford, "
    "where she met the engineer who later built her machine.\n\n"
    "Ada works in the field of mathematics. Colleagues describe her as quiet but kind, and she spends "
    "most weekends on long walks by the river."
)


def page(text=ARTICLE, url="https://wikiverse.org/wiki/ada-lovelace-0", **kw):
    return Page(url, text, "encyclopedia", **kw)


def test_warc_round_trip(tmp_path):
    docs = [(f"https://site{i}.org/p/{i}", f"<html><body><p>page {i} é 中文</p></body></html>") for i in range(5)]
    for name in ("crawl.warc.gz", "crawl.warc"):
        assert write_warc(tmp_path / name, docs) == 5
        assert list(read_warc(tmp_path / name)) == docs
    with gzip.open(tmp_path / "crawl.warc.gz") as f:
        assert f.read(8) == b"WARC/1.0"  # a gzipped WARC, as Common Crawl's
    assert len(list(read_warc(tmp_path / "crawl.warc", max_records=2))) == 2


def common_crawl_like(path):
    """A WARC file as Common Crawl writes one: warcinfo, request/response pairs, a redirect, an error,
    an image, a page in another charset, and metadata records."""
    html = (
        "<html><head><title>A page</title></head><body><article><h1>A real page</h1><p>{}</p></article></body></html>"
    )
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        writer.write_record(writer.create_warcinfo_record("crawl.warc.gz", {"software": "test"}))

        def response(url, status, content_type, body):
            headers = StatusAndHeaders(status, [("Content-Type", content_type)], protocol="HTTP/1.1")
            request = StatusAndHeaders("GET / HTTP/1.1", [("Host", url.split("/")[2])], is_http_request=True)
            writer.write_record(writer.create_warc_record(url, "request", http_headers=request))
            writer.write_record(
                writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers)
            )

        text = " ".join(ARTICLE.split("\n\n")[1:]) + " " + " ".join(FOREIGN_FREE_SENTENCES)
        response("https://a.org/1", "200 OK", "text/html; charset=utf-8", html.format(text).encode())
        response("https://a.org/moved", "301 Moved Permanently", "text/html", b"<html>moved</html>")
        response("https://a.org/missing", "404 Not Found", "text/html", b"<html>not found</html>")
        response("https://a.org/logo.png", "200 OK", "image/png", b"\x89PNG\r\n\x1a\n")
        latin = html.format("Un café à Vouton. " + ARTICLE.split("\n\n")[2]).encode("latin-1")
        response("https://b.org/2", "200 OK", "text/html; charset=ISO-8859-1", latin)
        writer.write_record(
            writer.create_warc_record("https://a.org/1", "metadata", payload=io.BytesIO(b"fetchTimeMs: 12"))
        )


def test_the_reader_reads_a_common_crawl_file_and_skips_what_is_not_an_html_page(tmp_path):
    path = tmp_path / "CC-MAIN-test.warc.gz"
    common_crawl_like(path)
    records = list(read_warc(path))
    assert [url for url, _ in records] == ["https://a.org/1", "https://b.org/2"]
    assert "Un café à Vouton." in records[1][1]  # decoded with the charset its headers name


def test_a_real_warc_file_as_data_source_runs_stage_one(tmp_path):
    path = tmp_path / "CC-MAIN-test.warc.gz"
    common_crawl_like(path)
    run = Run("cc", tmp_path)
    m = ensure("data", get_config("tiny", data={"source": str(path)}), run)
    assert m["pages_in"] == 2 and m["removed"]["extract"] == 0 and m["precision"] == {}
    corpus = read_corpus(run)
    assert [p["url"] for p in corpus] == ["https://a.org/1"]  # the short French-English page is not kept
    assert corpus[0]["text"].startswith("A real page\n\nAda Lovelace was born") and "<" not in corpus[0]["text"]
    assert read_world(run) is None and not (run.path / "data" / "crawl.warc.gz").exists()


def test_html_carries_the_sites_boilerplate_and_extraction_keeps_the_article():
    site = Site.of("wikiverse.org")
    doc, boilerplate = to_html(page(), related=["Alan Turing", "Grace Hopper"])
    assert Site.of("wikiverse.org") == site and site.nav[0] in boilerplate and "Grace Hopper" in boilerplate
    assert all(line in doc for line in ("<h1>Ada Lovelace</h1>", site.cookie, site.footer[0]))
    text = extract_text(doc)
    assert "\n\n".join(line for line in text.split("\n\n") if line not in site.article) == ARTICLE
    assert not any(b in text for b in boilerplate if b not in site.article)  # chrome gone; in-article lines stay
    truth = page(boilerplate=boilerplate)
    scores = line_scores(count_lines("extract", [page(doc)], [page(text)], {truth.url: truth}))
    assert scores["main_lost"] == 0 and scores["main_in"] == 3 and scores["boilerplate_in"] == len(boilerplate)
    assert scores["precision"] == 1.0 and scores["recall"] == (len(boilerplate) - 2) / len(boilerplate)


def test_extractor_removes_a_page_with_no_text():
    kept, removed = Extractor().run([page("<html><head><title>Empty</title></head><body></body></html>")])
    assert kept == [] and removed[0][1] == "no_text"


def test_a_site_looks_the_same_on_every_page_and_related_links_are_its_own_titles():
    pages = [page(f"Title {k} of the site\n\nBody number {k}.", f"https://news.org/{k}") for k in range(6)]
    pages.append(page("Elsewhere\n\nOther body.", "https://other.org/1"))
    dressed = dress(pages, seed=0)
    assert all(p.boilerplate[:8] == dressed[0][0].boilerplate[:8] for p, _ in dressed[:6])
    related = dressed[0][0].boilerplate[dressed[0][0].boilerplate.index("Related pages") + 1 :]
    assert len(related) == 3 and all(t.startswith("Title") and t != "Title 0 of the site" for t in related)
    assert "Related pages" not in dressed[6][0].boilerplate  # no other page on its site to link to


@pytest.mark.parametrize(
    "line, reason",
    [
        ("This is a fine sentence with words.", None),
        ("Two words", "too_few_words"),
        ("Please enable JavaScript to view the comments.", "javascript"),
        ("By using this site you accept our use of cookies.", "policy"),
        ("Read our Privacy Policy before you sign up.", "policy"),
        ("See the terms of use for details.", "policy"),
        ("A line whose word is " + "x" * 1001 + " too long.", "too_long_word"),
        ("Share this article: Facebook | Twitter", None),  # no terminal punctuation: FineWeb keeps it
    ],
)
def test_c4_line_rules(line, reason):
    assert C4LineFilter().line_reason(line) == reason


def test_c4_terminal_punctuation_rule_as_c4_defines_it():
    c4 = C4LineFilter(terminal_punct=True)
    for line in ("It ends well.", "Does it end?", "It ends loudly!", 'He said "it ends."', "It ends with 'this'"):
        assert c4.line_reason(line) is None, line
    for line in ("Share this article: Facebook | Twitter", "It trails off..."):
        assert c4.line_reason(line) == "no_terminal_punct", line


def test_c4_page_rules_and_citations():
    body = "The first sentence is here. The second one follows. A third one too. Then a fourth. And a fifth."
    c4 = C4LineFilter()
    assert c4.clean(f"Title\n\n{body}[1]\n\nAdvertisement") == (f"Title\n\n{body}", None)
    assert c4.reasons == Counter({"too_few_words": 1})
    assert c4.clean(body + "\nLorem ipsum dolor sit amet.") == (None, "lorem_ipsum")
    assert c4.clean(body + "\nvar x = {a: 1};") == (None, "curly_bracket")
    assert c4.clean("Only two sentences here. And this one.") == (None, "too_few_sentences")
    assert C4LineFilter(keep_title=False).clean(f"Title\n\n{body}")[0] == body  # C4 proper drops the heading
    kept, removed = C4LineFilter().run([page(body + "\n{")])
    assert kept == [] and removed[0][1] == "curly_bracket"


def test_site_line_dedup_drops_lines_repeated_across_a_site():
    banner = "Sign up for our newsletter to get stories like this one every week."
    pages = [page(f"Story {k} is here.\n\n{banner}", f"https://news.org/{k}") for k in range(4)]
    pages += [page(f"Other {k}.\n\n{banner}", f"https://blog.org/{k}") for k in range(2)]  # 2 pages: too few
    pages.append(page(banner, "https://news.org/banner-only"))
    kept, removed = SiteLineDedup(min_share=0.5, min_pages=3).run(pages)
    assert [p.text for p in kept[:4]] == [f"Story {k} is here." for k in range(4)]
    assert [p.text for p in kept[4:]] == [p.text for p in pages[4:6]]
    assert removed == [(pages[6], "only_site_boilerplate")]


def test_foreign_pages_are_labelled_and_inserted_without_disturbing_the_english_ones():
    english = [page(url=f"https://wikiverse.org/{k}") for k in range(200)]
    mixed = mix_in_languages(english, 0.1, seed=0)
    assert [p for p in mixed if p.lang == "en"] == english and len(mixed) == 220
    assert {p.lang for p in mixed} == {"en", "zh", "fr", "de", "es"}
    zh = foreign_page("zh", random.Random(0), 0)
    assert zh.lang == "zh" and any("\u4e00" <= ch <= "\u9fff" for ch in zh.text)


def test_language_id_precision_and_recall_on_labelled_pages():
    rng = random.Random(0)
    foreign = [foreign_page(lang, rng, k) for lang in FOREIGN for k in range(25)]
    english = [page(ARTICLE.replace("Vouton", city), f"https://e.org/{city}") for city in language.CITIES]
    english += [
        page(" ".join(FOREIGN_FREE_SENTENCES[k:] + FOREIGN_FREE_SENTENCES[:k]), f"https://e.org/{k}") for k in range(6)
    ]
    kept, removed = LanguageFilter("en", 0.65).run(foreign + english)
    assert kept == english and [p for p, _ in removed] == foreign  # precision and recall 1 on these 112
    assert {reason for p, reason in removed if p.lang == "zh"} == {"lang_zh"}
    assert LanguageFilter("fr", 0.65).run(foreign)[0] == [p for p in foreign if p.lang == "fr"]
    assert LanguageFilter("en", 1.0).run(english)[0] == []  # nothing is English with certainty


FOREIGN_FREE_SENTENCES = [
    "The event on Monday drew about forty students.",
    "Organisers said that the hall had been full since noon.",
    "A second session is planned for March.",
    "Several teachers said afterwards that they had learned something new.",
    "Tickets for the next event go on sale in May.",
    "The first results are expected after ten days of work.",
]


def test_language_id_and_extraction_need_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    language.identifier.cache_clear()  # load the model afresh, with the network blocked
    assert LanguageFilter().reason(page()) is None
    assert LanguageFilter().reason(foreign_page("zh", random.Random(1), 0)) == "lang_zh"
    assert "Ada Lovelace was born" in extract_text(to_html(page(), [])[0])


def test_tiny_run_reads_the_crawl_from_warc_and_scores_every_step(tiny_run):
    m = tiny_run.metrics("data")
    steps = [r["step"] for r in m["funnel"]]
    assert steps == [
        "url",
        "extract",
        "language",
        "quality",
        "c4_lines",
        "site_lines",
        "exact_dedup",
        "near_dedup",
        "pii",
    ]
    assert set(m["precision"]) == set(m["recall"]) == set(steps)
    assert m["precision"]["language"] >= 0.95 and m["recall"]["language"] >= 0.95
    assert m["languages"]["zh"] > 0 and m["removed_by_reason"]["language:lang_zh"] == m["languages"]["zh"]
    assert m["lines"]["extract"]["main_lost"] == 0 and m["lines"]["extract"]["recall"] >= 0.85
    assert m["lines"]["c4_lines"]["precision"] >= 0.9 and m["lines"]["c4_lines"]["main_lost"] <= 0.02
    assert m["lines"]["site_lines"]["recall"] >= 0.95 and m["lines"]["site_lines"]["main_lost"] <= 0.02
    urls = [url for url, _ in read_warc(tiny_run.path / "data" / "crawl.warc.gz")]
    assert urls == [p["url"] for p in read_pages(tiny_run)] and len(urls) == m["pages_in"]


def test_the_corpus_holds_no_boilerplate_and_every_fact_line_survives(tiny_run):
    pages = {p["url"]: p for p in read_pages(tiny_run)}
    corpus = read_corpus(tiny_run)
    for row in corpus:
        generated = pages[row["url"]]
        assert not set(row["text"].split("\n\n")) & set(generated["boilerplate"])
        # a kept page says only what the generator wrote (PII aside), and a page about a person all of it
        if not generated["pii"]:
            assert set(row["text"].split("\n\n")) <= set(generated["text"].split("\n\n")), row["url"]
            assert row["text"] == generated["text"] or not generated["about"], row["url"]
    assert all(p["lang"] == "en" for p in corpus for p in [pages[p["url"]]])


def test_an_unknown_language_fails_at_get_config():
    assert get_config("tiny", data={"language": "fr"}).data.language == "fr"
    with pytest.raises(
        ConfigError, match="data.language='english' is not a language py3langid knows; allowed: ace, af, am,"
    ):
        get_config("tiny", data={"language": "english"})
