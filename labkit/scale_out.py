"""Stage 1's cleaning on datatrove: the same steps, over many processes or a cluster.

The in-process pipeline (`data.clean`) is the lesson: each step reads every page, one step
after another, in one Python process. A real crawl does not fit in one process. FineWeb was
cleaned with datatrove, which splits a crawl into shards and runs each stage of a pipeline as
tasks, one shard each, on local processes (`LocalPipelineExecutor`) or on a Slurm cluster
(`SlurmPipelineExecutor`, same pipeline, same arguments plus the cluster's).

Here labkit's own steps run inside datatrove, so the same code decides and the corpus is the
same (tests/test_scale_out.py checks it with 2 workers). A step that judges a page alone
(`per_page = True`: URL filter, quality, PII) runs on every shard in parallel; a step that
compares pages (the dedups) runs where all the pages meet, in one task and in crawl order
(which copy is "the first" depends on the order). `stages` cuts the steps into such runs, and
each run becomes one datatrove stage, started when the one before it has finished. At FineWeb's
scale the comparing steps are split into stages too (datatrove's `MinhashDedupSignature` per
shard, then `MinhashDedupBuckets`, `MinhashDedupCluster`, `MinhashDedupFilter`); here one task
holds every signature, as the in-process step does.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

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
    """labkit cleaning steps as one datatrove pipeline step. Kept pages go on down the pipeline
    (with their PII redactions in the metadata); removed ones are written to
    `<removed_dir>/<rank>.jsonl` with the step and the reason. Per page: each document alone as
    it streams past. Comparing: all the task's documents at once, back in crawl order."""

    type = "🧹 - LABKIT"

    def __init__(self, steps: list, removed_dir: str):
        super().__init__()
        self.steps, self.removed_dir = steps, removed_dir
        self.per_page = all(is_per_page(step) for step in steps)
        self.name = " + ".join(step.name for step in steps)

    def run(self, data, rank: int = 0, world_size: int = 1):
        path = Path(self.removed_dir) / f"{rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        batches = ([doc] for doc in data) if self.per_page else [sorted(data, key=index_of)]
        with path.open("w") as removed_file:
            for docs in batches:
                index = {doc.id: doc.metadata["index"] for doc in docs}
                pages, redactions = [to_page(doc) for doc in docs], {}
                for step in self.steps:
                    pages, removed = step.run(pages)
                    redactions.update(getattr(step, "redactions", {}))
                    for page, reason in removed:
                        self.stat_update(f"removed_by_{step.name}")
                        removed_file.write(json.dumps(dict(url=page.url, step=step.name, reason=reason)) + "\n")
                for page in pages:
                    yield to_document(page, index[page.url], redactions=redactions.get(page.url, []))


def pipelines(steps: list, workdir: Path) -> list[tuple[list, bool]]:
    """The datatrove pipelines, one per run of `stages`: (pipeline, per_page). Stage n reads
    `workdir/stage_<n-1>/kept` and writes `workdir/stage_<n>/kept` and `.../removed`. Hand them
    to `LocalPipelineExecutor` (as `clean` does) or to `SlurmPipelineExecutor` for a cluster."""
    runs = []
    for n, run in enumerate(stages(steps), start=1):
        out = workdir / f"stage_{n}"
        pipeline = [
            JsonlReader(str(workdir / f"stage_{n - 1}" / "kept"), compression=None),
            LabkitSteps(run, str(out / "removed")),
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


def clean(pages: list[Page], steps: list, workdir: str | Path, workers: int = 2) -> tuple[list, dict, dict]:
    """The steps on datatrove's local executor: per-page runs as `workers` tasks over as many
    shards, comparing runs as one task. Returns what `data.clean` finds: (kept pages in crawl
    order, {url: (step, reason)} for every removed page, {url: redactions})."""
    workdir = Path(workdir)
    shutil.rmtree(workdir, ignore_errors=True)  # datatrove skips tasks it finds completed
    write_shards(pages, workdir / "stage_0" / "kept", workers)
    executor, runs = None, pipelines(steps, workdir)
    for n, (pipeline, per_page) in enumerate(runs, start=1):
        tasks = workers if per_page else 1
        logs = str(workdir / f"stage_{n}" / "logs")
        executor = LocalPipelineExecutor(pipeline, tasks=tasks, workers=tasks, logging_dir=logs, depends=executor)
    executor.run()  # runs the stages it depends on first
    decisions = {}
    for path in sorted(workdir.glob("stage_*/removed/*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            decisions[row["url"]] = (row["step"], row["reason"])
    docs = sorted(JsonlReader(str(workdir / f"stage_{len(runs)}" / "kept"), compression=None)(), key=index_of)
    redactions = {doc.id: [tuple(span) for span in doc.metadata["redactions"]] for doc in docs}
    return [to_page(doc) for doc in docs], decisions, {url: spans for url, spans in redactions.items() if spans}


def index_of(doc: Document) -> int:
    return doc.metadata["index"]
