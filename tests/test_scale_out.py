"""Stage 1 on datatrove (labkit.scale_out): the same steps over several processes give the same
corpus, the same decisions and the same redactions as the in-process pipeline."""

from labkit import scale_out
from labkit.cleaning import ExactDedup, MinHashDedup, PIIRedactor, QualityFilter, UrlFilter, default_steps
from labkit.config import get_config
from labkit.data import clean, funnel
from labkit.pipeline import ensure
from labkit.run import Run, read_jsonl
from labkit.web import crawl
from labkit.world import make_world


def test_steps_are_cut_into_per_page_and_comparing_runs():
    steps = default_steps()
    assert [[s.name for s in run] for run in scale_out.stages(steps)] == [
        ["url", "quality"],
        ["exact_dedup", "near_dedup"],
        ["pii"],
    ]
    assert [scale_out.is_per_page(s) for s in (UrlFilter(), QualityFilter(), PIIRedactor())] == [True] * 3
    assert not any(scale_out.is_per_page(s) for s in (ExactDedup(), MinHashDedup()))


def test_two_workers_clean_the_crawl_as_one_process_does(tmp_path):
    c = get_config("tiny").data
    world = make_world(0, c.n_people, c.median_pages, c.spread, c.unseen_fraction, c.max_pages_per_person)
    pages = crawl(world, 0, c.filler_ratio, c.noise, c.pii_rate)
    steps = default_steps(c.min_words, c.minhash_ngram, c.minhash_bands, c.minhash_rows, 0)
    expected = clean(pages, steps)
    kept, decisions, redactions = scale_out.clean(pages, steps, tmp_path / "dt", workers=2)
    assert [(p.url, p.text) for p in kept] == [(p.url, p.text) for p in expected.kept]
    assert kept == expected.kept  # every field: labels, person, planted PII
    assert decisions == expected.decisions and redactions == expected.redactions
    assert funnel(pages, steps, decisions) == expected.funnel
    # the crawl was really shared out: two shards, each task wrote its own removals
    assert len(list((tmp_path / "dt" / "stage_0" / "kept").glob("*.jsonl"))) == 2
    assert len(list((tmp_path / "dt" / "stage_1" / "removed").glob("*.jsonl"))) == 2
    assert {step for step, _ in decisions.values()} >= {"url", "quality", "exact_dedup", "near_dedup"}
    assert redactions  # PII was found and redacted on the shards


def test_stage_one_with_workers_writes_the_same_corpus(tmp_path):
    corpora = {}
    for workers in (1, 2):
        run = Run(f"w{workers}", tmp_path)
        ensure("data", get_config("tiny", data=dict(workers=workers)), run)
        corpora[workers] = list(read_jsonl(run.stage_dir("data") / "corpus.jsonl"))
    assert corpora[1] == corpora[2] and len(corpora[1]) > 50
