"""Stage 1's cleaning on datatrove: the same steps, over many processes or a cluster.

The in-process pipeline (`data.clean`) is the lesson: each step reads every page, one step
after another, in one Python process. A real crawl does not fit in one process. FineWeb was
cleaned with datatrove, which splits a crawl into shards and runs each stage of a pipeline as
tasks, one shard each, on local processes (`LocalPipelineExecutor`) or on a Slurm cluster
(`SlurmPipelineExecutor`, same pipeline, same arguments plus the cluster's).

Here labkit's own steps run inside datatrove, so the same code decides and the corpus is the
same (tests/test_scale_out.py checks it with 2 workers). A step that judges a page alone
(`per_page = True`: URL filter, extraction, language, quality, C4's line rules, PII) runs on
every shard in parallel; a step that compares pages (site-level line dedup, the dedups) runs
where all the pages meet, in one task and in crawl order
(which copy is "the first" depends on the order). `stages` cuts the steps into such runs, and
each run becomes one datatrove stage, started when the one before it has finished. At FineWeb's
scale the comparing steps are split into stages too (datatrove's `MinhashDedupSignature` per
shard, then `MinhashDedupBuckets`, `MinhashDedupCluster`, `MinhashDedupFilter`); here one task
holds every signature, as the in-process step does.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from .cleaning import Cleaned, clean
from .web import Page


def is_per_page(step) -> bool:
    """Does the step decide each page alone, so that any shard can run it?"""
    return getattr(step, "per_page", False)


def stages(steps: list) -> list[list]:
    """The steps cut into consecutive runs that are all per-page or all comparing, in order."""
    runs: list[list] = []
    for step in steps:
        if runs and is_per_page(runs[-1][0]) == is_per_page(step):
            runs[-1].append(step)
        else:
            runs.append([step])
    return runs


def to_document(page: Page, index: int, **extra) -> Document:
    """A page as a datatrove document: its URL the id, its labels and crawl index the metadata."""
    fields = {k: v for k, v in asdict(page).items() if k != "text"}
    return Document(text=page.text, id=page.url, metadata={**fields, "index": index, **extra})


def to_page(doc: Document) -> Page:
    return Page(text=doc.text, **{k: v for k, v in doc.metadata.items() if k in Page.__dataclass_fields__})


class LabkitSteps(PipelineStep):
    """labkit cleaning steps as one datatrove pipeline step, run by `cleaning.clean` itself. Kept
    pages go on down the pipeline; what `clean` found (removals, funnel, redactions, texts before
    PII, line counts, C4's reasons) is written to `<report_dir>/<rank>.json`. Per page: each
    document alone as it streams past. Comparing: all the task's documents at once, in crawl order."""

    type = "🧹 - LABKIT"
    name = "cleaning steps"

    def __init__(self, steps: list, report_dir: str, truth: dict[str, Page] | None = None):
        super().__init__()
        self.steps, self.report_dir, self.truth = steps, report_dir, truth
        self.per_page = all(is_per_page(step) for step in steps)

    def run(self, data, rank: int = 0, world_size: int = 1):
        batches = ([doc] for doc in data) if self.per_page else [sorted(data, key=index_of)]
        reports = []
        for docs in batches:
            index = {doc.id: doc.metadata["index"] for doc in docs}
            part = clean([to_page(doc) for doc in docs], self.steps, self.truth, progress=False)
            reports.append(as_report(part, self.steps))
            for page in part.kept:
                yield to_document(page, index[page.url])
        report = merge_reports(reports, self.steps)
        Path(self.report_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.report_dir) / f"{rank:05d}.json").write_text(json.dumps(report))


def as_report(part: Cleaned, steps: list) -> dict:
    """What one `clean` call found, as JSON, with the counts of the steps that keep them (C4's
    dropped lines by rule: a step counts over one `run`)."""
    fields = ("decisions", "funnel", "redactions", "texts", "lines")
    reasons = {step.name: dict(step.reasons) for step in steps if hasattr(step, "reasons")}
    return {name: getattr(part, name) for name in fields} | {"reasons": reasons}


def merge_reports(reports: list[dict], steps: list) -> dict:
    """Reports of `clean` calls over parts of the pages as one: funnel rows and line and reason
    counts summed, per-page findings gathered."""
    merged = dict(decisions={}, redactions={}, texts={}, lines={}, reasons={})
    funnel = {step.name: Counter() for step in steps}
    for report in reports:
        for row in report["funnel"]:
            funnel[row["step"]].update({k: v for k, v in row.items() if k != "step"})
        for key in ("decisions", "redactions", "texts"):
            merged[key].update(report[key])
        for key in ("lines", "reasons"):
            for step, counts in report[key].items():
                merged[key].setdefault(step, Counter()).update(counts)
    merged["funnel"] = [{"step": name, **counts} for name, counts in funnel.items()]
    return merged


def pipelines(steps: list, workdir: Path, truth: dict[str, Page] | None = None) -> list[tuple[list, bool]]:
    """The datatrove pipelines, one per run of `stages`: (pipeline, per_page). Stage n reads
    `workdir/stage_<n-1>/kept` and writes `workdir/stage_<n>/kept` and `.../report`. Hand them
    to `LocalPipelineExecutor` (as `clean_on_datatrove` does) or to `SlurmPipelineExecutor`."""
    runs = []
    for n, run in enumerate(stages(steps), start=1):
        out = workdir / f"stage_{n}"
        pipeline = [
            JsonlReader(str(workdir / f"stage_{n - 1}" / "kept"), compression=None),
            LabkitSteps(run, str(out / "report"), truth),
            JsonlWriter(str(out / "kept"), output_filename="${rank}.jsonl", compression=None),
        ]
        runs.append((pipeline, is_per_page(run[0])))
    return runs


def write_shards(pages: list[Page], folder: Path, shards: int) -> None:
    """The crawl as `shards` JSONL files of documents, dealt round robin (each holds pages from
    the whole crawl, as a crawl's WARC files do)."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with (folder / f"{shard:05d}.jsonl").open("w") as f:
            for i in range(shard, len(pages), shards):
                doc = to_document(pages[i], i)
                f.write(json.dumps(dict(text=doc.text, id=doc.id, metadata=doc.metadata)) + "\n")


def clean_on_datatrove(
    pages: list[Page], steps: list, workdir: str | Path, workers: int = 2, truth: dict[str, Page] | None = None
) -> Cleaned:
    """`cleaning.clean` on datatrove's local executor: per-page runs as `workers` tasks over as
    many shards, comparing runs as one task. Returns the same `Cleaned` (its funnel's seconds are
    summed over the tasks: processor time, not wall time)."""
    workdir = Path(workdir)
    shutil.rmtree(workdir, ignore_errors=True)  # datatrove skips tasks it finds completed
    write_shards(pages, workdir / "stage_0" / "kept", workers)
    executor, runs = None, pipelines(steps, workdir, truth)
    for n, (pipeline, per_page) in enumerate(runs, start=1):
        tasks = workers if per_page else 1
        logs = str(workdir / f"stage_{n}" / "logs")
        executor = LocalPipelineExecutor(pipeline, tasks=tasks, workers=tasks, logging_dir=logs, depends=executor)
    executor.run()  # runs the stages it depends on first
    reports = [json.loads(path.read_text()) for path in sorted(workdir.glob("stage_*/report/*.json"))]
    report = merge_reports(reports, steps)  # the stages' reports hold disjoint steps
    for step in steps:  # dropped lines by rule, counted in the workers, into this process's steps
        if hasattr(step, "reasons"):
            step.reasons.update(report["reasons"].get(step.name, {}))
    docs = sorted(JsonlReader(str(workdir / f"stage_{len(runs)}" / "kept"), compression=None)(), key=index_of)
    return Cleaned(
        kept=[to_page(doc) for doc in docs],
        decisions={url: tuple(d) for url, d in report["decisions"].items()},
        funnel=report["funnel"],
        redactions={url: [tuple(span) for span in spans] for url, spans in report["redactions"].items()},
        texts=report["texts"],
        lines=report["lines"],
    )


def index_of(doc: Document) -> int:
    return doc.metadata["index"]
