"""Stage 1 on datatrove (labkit.scale_out): the same steps over several processes find what the
in-process pipeline finds: the same corpus, decisions, redactions, line counts and scores."""

import json

from labkit import scale_out
from labkit.cleaning import clean
from labkit.config import get_config
from labkit.data import steps_for
from labkit.pipeline import ensure
from labkit.run import Run, read_jsonl
from labkit.web import crawl
from labkit.world import make_world


def test_steps_are_cut_into_per_page_and_comparing_runs():
    steps = steps_for(get_config("tiny").data, seed=0)
    assert [[s.name for s in run] for run in scale_out.stages(steps)] == [
        ["url", "extract", "language", "quality", "c4_lines"],
        ["site_lines", "exact_dedup", "near_dedup"],
        ["pii"],
    ]


def without_seconds(funnel):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in funnel]


def test_two_workers_clean_the_pages_as_one_process_does(tmp_path):
    c = get_config("tiny").data
    world = make_world(0, c.n_people, c.median_pages, c.spread, c.unseen_fraction, c.max_pages_per_person)
    pages = crawl(world, 0, c.filler_ratio, c.noise, c.pii_rate)
    expected = clean(pages, steps_for(c, 0, html=False))
    got = scale_out.clean_on_datatrove(pages, steps_for(c, 0, html=False), tmp_path / "dt", workers=2)
    assert got.kept == expected.kept  # every field, in crawl order: text, labels, person, planted PII
    assert got.decisions == expected.decisions and got.redactions == expected.redactions
    assert got.texts == expected.texts
    assert without_seconds(got.funnel) == without_seconds(expected.funnel)
    # the pages were really shared out: two shards, and the per-page stage ran as two tasks
    assert len(list((tmp_path / "dt" / "stage_0" / "kept").glob("*.jsonl"))) == 2
    assert len(list((tmp_path / "dt" / "stage_1" / "report").glob("*.json"))) == 2
    assert len(list((tmp_path / "dt" / "stage_2" / "report").glob("*.json"))) == 1
    assert {step for step, _ in got.decisions.values()} >= {"url", "quality", "exact_dedup", "near_dedup"}
    assert got.redactions  # PII was found and redacted on the shards


def test_stage_one_with_two_workers_writes_the_same_corpus_and_scores(tmp_path):
    out = {}
    for workers in (1, 2):
        run = Run(f"w{workers}", tmp_path)
        ensure("data", get_config("tiny", data=dict(workers=workers)), run)
        metrics = json.loads((run.stage_dir("data") / "metrics.json").read_text())
        metrics["funnel"] = without_seconds(metrics["funnel"])
        metrics.pop("seconds"), metrics.pop("fingerprint")  # the settings differ: data.workers
        out[workers] = (
            list(read_jsonl(run.stage_dir("data") / "corpus.jsonl")),
            list(read_jsonl(run.stage_dir("data") / "pages.jsonl")),
            metrics,
        )
    (corpus, pages, metrics), (corpus2, pages2, metrics2) = out[1], out[2]
    assert corpus == corpus2 and len(corpus) > 50
    assert pages == pages2
    assert metrics == metrics2  # precision and recall of every step, line scores, C4's reasons
    assert metrics["lines"]["site_lines"]["recall"] > 0.9 and metrics["c4_lines_dropped"]
