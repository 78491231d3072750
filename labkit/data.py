"""Stage 1, data: crawl the mini-web (or read a real dataset or WARC file), clean it, score the cleaning.

The mini-web's pages are written as HTML into a WARC file and read back, as a crawl is; then
FineWeb's order: URL filter -> text extraction -> language -> Gopher quality -> C4 line rules ->
site-level line dedup -> exact dedup -> MinHash near dedup -> PII.

Real data mixed with planted facts: a dataset (FineWeb-Edu's web text) alone has no world whose
facts are known, and the later stages judge answers by one (fact recall, SFT's QA, the RLHF
labeler, stage 7's probes). With `data.mini_web_share` the mini-web's pages are mixed into the
dataset's documents, as research on knowledge in language models plants synthetic facts in real
text, and the cleaning steps run over both (`mix_in_mini_web`).

Writes to `runs/<run>/data/`:
  world.json       the world every later stage judges answers against (the mini-web, alone or mixed in)
  crawl.warc.gz    the crawl: one HTTP response record of HTML per page (mini-web only)
  pages.jsonl      every crawled page: its labels (text, language, boilerplate lines), the text
                   cleaning made of it, and which step removed it and why
  corpus.jsonl     the cleaned corpus (url, text, genre, about): what the tokenizer and model read
  metrics.json     pages in and out, removals by step and reason, precision and recall per step
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from .cleaning import Cleaned, ExactDedup, MinHashDedup, PIIRedactor, QualityFilter, UrlFilter, clean
from .config import Config, ConfigError, DataConfig
from .crawl import Extractor, dress, read_warc, write_warc
from .language import LanguageFilter, mix_in_languages
from .lines import LINE_STEPS, C4LineFilter, SiteLineDedup
from .rules import LOCAL_FORMATS, from_hub, has_world
from .run import Run, read_json, read_jsonl, write_json, write_jsonl
from .web import Page, crawl
from .world import BUCKETS, World, bucket, make_world

TARGET_LABEL = {"url": "blocked", "quality": "low_quality", "exact_dedup": "exact_dup", "near_dedup": "near_dup"}
# a near copy whose only difference was a banner that extraction or the line rules took away is
# an exact copy by the time dedup sees it: exact dedup is right to remove it
ALSO_RIGHT = {"exact_dedup": ("near_dup",)}
WARC_SUFFIXES = (".warc", ".warc.gz")


def open_dataset(source: str, setting: str, split: str = "train", name: str | None = None, streaming: bool = False):
    """A `datasets` dataset from a local .jsonl/.json/.parquet file, or from the hub by name
    (streamed when `streaming`, so only what is read is fetched). `setting` names the config
    field in error messages."""
    import datasets

    path = Path(source)
    if not from_hub(source):
        if path.suffix not in LOCAL_FORMATS:
            raise ConfigError(f"{setting}={source!r}: a local file must be .jsonl, .json or .parquet")
        if not path.exists():
            raise FileNotFoundError(f"{setting}={source!r}: no such file")
        return datasets.load_dataset(
            LOCAL_FORMATS[path.suffix], data_files=str(path), split="train", streaming=streaming
        )
    return datasets.load_dataset(source, name or None, split=split, streaming=streaming)


def load_documents(cfg: DataConfig, max_chars: int = 0) -> list[Page]:
    """Pages from a dataset with a text column (FineWeb-Edu's format), streamed: at most `max_docs`
    of them and, given `max_chars`, only until their text holds that many characters."""
    rows = open_dataset(cfg.source, "data.source", cfg.split, cfg.config, streaming=True)
    pages, chars = [], 0
    for i, row in enumerate(rows):
        if (cfg.max_docs and i >= cfg.max_docs) or (max_chars and chars >= max_chars):
            break
        if cfg.text_column not in row:
            raise ConfigError(
                f"data.source={cfg.source!r} has no column {cfg.text_column!r}; columns: {', '.join(row)}"
            )
        pages.append(Page(row.get("url") or f"{cfg.source}#{i}", row[cfg.text_column], "web", label=None))
        chars += len(row[cfg.text_column])
    if not pages:
        raise ConfigError(f"data.source={cfg.source!r} holds no documents")
    return pages


def mix_in_mini_web(web: list[Page], cfg: DataConfig, generated: list[Page] | None = None) -> list[Page]:
    """The mini-web's pages followed by as many of the dataset's documents as make the mini-web
    `cfg.mini_web_share` of the cleaned corpus's characters.

    A share of characters, not of documents: the model reads tokens (about characters / 4), and
    a FineWeb-Edu document is several times as long as a mini-web page, so a share of documents
    would hide how little of the text the world is. Cleaning keeps about the pages the generator
    labels clean (in the language kept), so the dataset is read until its characters reach (1 - share) / share times
    theirs; the share the cleaned corpus ends with is measured in `mix_metrics`. The dataset's
    documents carry no labels: the cleaning steps run over them, and are scored only on the
    mini-web's pages. `generated`: the pages' text as written, when `web` holds their HTML."""
    clean = sum(len(p.text) for p in generated or web if p.label == "clean" and p.lang == cfg.language)
    wanted = math.ceil(clean * (1 - cfg.mini_web_share) / cfg.mini_web_share)
    documents = load_documents(cfg, max_chars=wanted)
    read = sum(len(p.text) for p in documents)
    if read < wanted:  # said on a line of its own; metrics.json's `mix` has the share measured
        tqdm.write(
            f"data: data.source={cfg.source!r} gave {read:,} characters of the {wanted:,} wanted (data.max_docs="
            f"{cfg.max_docs}): the mini-web is more than data.mini_web_share={cfg.mini_web_share} of the corpus",
            file=sys.stderr,
        )
    return web + documents


def mix_metrics(pages: list[Page], kept: list[Page], share: float) -> dict:
    """How much of the cleaned corpus is the mini-web (the labelled pages), against the share asked for."""
    web = sum(len(p.text) for p in kept if p.label is not None)
    dataset = sum(len(p.text) for p in kept if p.label is None)
    return dict(
        mini_web_share=share,
        mini_web_share_measured=round(web / max(1, web + dataset), 4),
        mini_web_chars=web,
        dataset_chars=dataset,
        dataset_docs_read=sum(p.label is None for p in pages),
        dataset_docs_kept=sum(p.label is None for p in kept),
    )


def steps_for(cfg: DataConfig, seed: int, html: bool = True) -> list:
    """The cleaning steps in FineWeb's order (no extraction for a dataset's text, extracted already)."""
    return [
        UrlFilter(),
        *([Extractor()] if html else []),
        LanguageFilter(cfg.language, cfg.language_threshold),
        QualityFilter(min_words=cfg.min_words),
        C4LineFilter(terminal_punct=cfg.c4_terminal_punct, keep_title=cfg.c4_keep_title),
        SiteLineDedup(min_share=cfg.site_line_share),
        ExactDedup(),
        MinHashDedup(cfg.minhash_ngram, cfg.minhash_bands, cfg.minhash_rows, seed),
        PIIRedactor(),
    ]


def read_crawl(path, truth: dict[str, Page] | None = None, max_docs: int = 0) -> list[Page]:
    """The HTML pages of a WARC file as pages whose text is their HTML, labelled from `truth`
    (url -> generated page) when the crawl is the mini-web's, unlabelled otherwise."""
    pages = []
    for url, doc in read_warc(path, max_docs):
        page = truth[url] if truth and url in truth else Page(url, "", "web", label=None)
        pages.append(replace(page, text=doc))
    if not pages:
        raise ConfigError(f"data.source={str(path)!r} holds no HTML response records")
    return pages


def line_scores(counts: Counter) -> dict:
    """A line step's precision (share of dropped lines that were boilerplate) and recall (share of
    boilerplate lines dropped), with the share of main-text lines it lost."""
    dropped = counts["boilerplate_dropped"] + counts["main_dropped"]
    return dict(
        precision=counts["boilerplate_dropped"] / dropped if dropped else 1.0,
        recall=counts["boilerplate_dropped"] / counts["boilerplate_in"] if counts["boilerplate_in"] else 1.0,
        main_lost=counts["main_dropped"] / counts["main_in"] if counts["main_in"] else 0.0,
        **{k: counts[k] for k in ("boilerplate_in", "boilerplate_dropped", "main_in", "main_dropped")},
    )


def score(pages: list[Page], cleaned: Cleaned, language: str = "en") -> dict:
    """Precision and recall of each step against the generator's labels, and PII that leaked.

    For a page filter, precision is the share of pages it removed that carry its target label, and
    recall the share of labelled pages reaching it that it removed (for the language step: pages
    written in another language than `language`). Line steps are scored by lines (`line_scores`).
    For PII, precision is the share of redacted strings that were planted, recall the share of
    planted strings (on pages reaching the step) that were redacted.
    """
    pages = [p for p in pages if p.label is not None]  # a dataset's documents mixed in carry no labels
    precision, recall, lines = {}, {}, {}
    targets = {step: (lambda p, label=label: p.label == label) for step, label in TARGET_LABEL.items()}
    targets["language"] = lambda p: p.lang != language
    reached = list(pages)
    for row in cleaned.funnel[:-1]:
        step = row["step"]
        removed = [p for p in reached if cleaned.decisions.get(p.url, ("",))[0] == step]
        if step in LINE_STEPS:
            lines[step] = line_scores(cleaned.lines[step])
            precision[step], recall[step] = lines[step]["precision"], lines[step]["recall"]
        else:
            target = targets[step]
            positives = sum(map(target, reached))
            hits = sum(target(p) or p.label in ALSO_RIGHT.get(step, ()) for p in removed)
            precision[step] = hits / len(removed) if removed else 1.0
            recall[step] = sum(map(target, removed)) / positives if positives else 1.0
        reached = [p for p in reached if cleaned.decisions.get(p.url, ("",))[0] != step]
    planted = {(p.url, value) for p in reached for _, value in p.pii}
    labelled = {p.url for p in pages}
    found = {(url, value) for url, spans in cleaned.redactions.items() if url in labelled for *_, value in spans}
    precision["pii"] = len(planted & found) / len(found) if found else 1.0
    recall["pii"] = len(planted & found) / len(planted) if planted else 1.0
    # a planted string lives only in its page and that page's copies, which carry the same `pii` list
    leaked = Counter(kind for p in cleaned.kept for kind, value in p.pii if value in p.text)
    return dict(
        precision=precision,
        recall=recall,
        lines=lines,
        pii_leaked=sum(leaked.values()),
        pii_leaked_by_kind=dict(leaked),
        pii_planted=dict(Counter(kind for p in pages for kind, _ in p.pii)),
    )


def build(config: Config, run: Run, made_from: str = "") -> dict:
    """Run stage 1 into `run`, returning its metrics."""
    cfg, out, start = config.data, run.stage_dir("data"), time.time()
    world, truth = None, None
    (out / "world.json").unlink(missing_ok=True)
    (out / "crawl.warc.gz").unlink(missing_ok=True)
    if has_world(config):  # the mini-web alone, or mixed into a dataset
        world = make_world(
            config.seed, cfg.n_people, cfg.median_pages, cfg.spread, cfg.unseen_fraction, cfg.max_pages_per_person
        )
        generated = crawl(world, config.seed, cfg.filler_ratio, cfg.noise, cfg.pii_rate)
        dressed = dress(mix_in_languages(generated, cfg.foreign_share, config.seed), config.seed)
        write_warc(out / "crawl.warc.gz", ((page.url, doc) for page, doc in tqdm(dressed, desc="crawl", leave=False)))
        truth = {page.url: page for page, _ in dressed}
        pages = read_crawl(out / "crawl.warc.gz", truth)
        if cfg.source != "mini-web":
            pages = mix_in_mini_web(pages, cfg, [truth[p.url] for p in pages])
        write_json(out / "world.json", world.to_dict())
    elif cfg.source.endswith(WARC_SUFFIXES):
        if not Path(cfg.source).exists():
            raise FileNotFoundError(f"data.source={cfg.source!r}: no such file")
        pages = read_crawl(cfg.source, max_docs=cfg.max_docs)
    else:
        pages = load_documents(cfg)
    steps = steps_for(cfg, config.seed, html=world is not None or cfg.source.endswith(WARC_SUFFIXES))
    if cfg.workers > 1:
        from . import scale_out  # datatrove takes seconds to import: only when asked for

        cleaned = scale_out.clean_on_datatrove(pages, steps, out / "datatrove", cfg.workers, truth)
    else:
        cleaned = clean(pages, steps, truth)
    originals = [truth.get(p.url, p) if truth else p for p in pages]
    if cfg.source.endswith(WARC_SUFFIXES):  # no generated text to show: the text cleaning made, if any
        originals = [replace(p, text=cleaned.texts.get(p.url, "")) for p in pages]

    write_jsonl(
        out / "pages.jsonl",
        (
            {
                **p.to_dict(),
                "extracted": cleaned.texts.get(p.url),
                "removed_by": cleaned.decisions.get(p.url, (None, None))[0],
                "reason": cleaned.decisions.get(p.url, (None, None))[1],
                "redactions": cleaned.redactions.get(p.url, []),
            }
            for p in originals
        ),
    )
    write_jsonl(
        out / "corpus.jsonl", ({"url": p.url, "text": p.text, "genre": p.genre, "about": p.about} for p in cleaned.kept)
    )

    minhash = next(s for s in steps if isinstance(s, MinHashDedup))
    metrics = dict(
        source=cfg.source,
        pages_in=len(pages),
        pages_out=len(cleaned.kept),
        chars_in=sum(len(p.text) for p in originals),
        chars_out=sum(len(p.text) for p in cleaned.kept),
        removed={row["step"]: row["pages_in"] - row["pages_out"] for row in cleaned.funnel},
        removed_by_reason=dict(
            Counter(f"{step}:{reason.split(' of ')[0]}" for step, reason in cleaned.decisions.values())
        ),
        funnel=[{**row, "seconds": round(row["seconds"], 2)} for row in cleaned.funnel],
        redactions=dict(Counter(k for spans in cleaned.redactions.values() for _, _, k, _ in spans)),
        minhash=dict(
            ngram=cfg.minhash_ngram,
            bands=cfg.minhash_bands,
            rows=cfg.minhash_rows,
            threshold=round(minhash.threshold, 3),
        ),
        language=dict(language=cfg.language, threshold=cfg.language_threshold),
        c4_lines_dropped=dict(next(s for s in steps if isinstance(s, C4LineFilter)).reasons),
    )
    if world is not None:
        metrics.update(score(originals, cleaned, cfg.language))
        metrics["people_by_bucket"] = dict(Counter(bucket(p.n_pages) for p in world.people))
        metrics["labels"] = dict(Counter(p.label for p in originals if p.label is not None))
        metrics["languages"] = dict(Counter(p.lang for p in originals if p.label is not None))
        if cfg.source != "mini-web":
            metrics["mix"] = mix_metrics(originals, cleaned.kept, cfg.mini_web_share)
    else:  # real data has no labels to score against
        metrics.update(precision={}, recall={}, lines={}, pii_leaked=None)
    metrics["seconds"] = round(time.time() - start, 2)
    return metrics


def cleaning_table(metrics: dict) -> list[dict]:
    """One row per cleaning step: pages in and out, removed, precision and recall (None without labels)."""
    return [
        {
            "step": r["step"],
            "pages in": r["pages_in"],
            "pages out": r["pages_out"],
            "removed": r["pages_in"] - r["pages_out"],
            "precision": metrics["precision"].get(r["step"]),
            "recall": metrics["recall"].get(r["step"]),
        }
        for r in metrics["funnel"]
    ]


def world_summary(world: World) -> dict:
    """The world in numbers."""
    return {
        "people": len(world.people),
        "countries": len(world.countries),
        "cities": len(world.cities),
        "companies": len(world.companies),
        "universities": len(world.universities),
        "pages about people": sum(p.n_pages for p in world.people),
        "people with no page": sum(p.n_pages == 0 for p in world.people),
        "people by page bucket": {
            label: sum(bucket(p.n_pages) == label for p in world.people) for *_, label in BUCKETS
        },
    }


def one_per_genre(pages: list[dict]) -> dict[str, dict]:
    """The first clean English page of each genre, in crawl order."""
    samples: dict[str, dict] = {}
    for page in pages:
        if page["label"] in ("clean", None) and page.get("lang", "en") == "en":
            samples.setdefault(page["genre"], page)
    return samples


def read_corpus(run: Run) -> list[dict]:
    """The cleaned pages of a run: dicts with url, text, genre, about."""
    return read_jsonl(run.path / "data" / "corpus.jsonl")


def read_pages(run: Run) -> list[dict]:
    """Every crawled page with its labels and the cleaning decision (for browsing)."""
    return read_jsonl(run.path / "data" / "pages.jsonl")


def read_world(run: Run) -> World | None:
    path = run.path / "data" / "world.json"
    return World.from_dict(read_json(path)) if path.exists() else None
