"""The run folder `runs/<run>/<stage>/`, atomic writes, metrics and experiment tracking.

Also the small things every stage shares: JSON and JSON-lines files, a stable split of keys
by hash (`in_share`), and the one registry of live callbacks (`watch`) that notebooks use to
plot a training loop while it runs.

Every file labkit writes goes through `atomic_write` (or `atomic_path` for libraries that
want a path): the bytes go to a temporary file in the same folder, are flushed to disk, and
the file is renamed over the target. A run killed at any moment leaves the old file or the
new one, never half of one. A stage is complete when its `metrics.json` exists and was made
from the same configuration: that file is written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import STAGES


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary_file(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _new_temporary_file(path: Path) -> Path:
    """A new empty file next to `path`, made as `open()` makes one: mode 0o666 less the umask
    (tempfile.mkstemp's 0o600 would hide every run file from the user's group)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def write_jsonl(path: str | os.PathLike, rows) -> None:
    """One JSON object per line (rows: any iterable, streamed), written atomically. Non-ASCII
    characters are escaped, so that any text a model writes (a lone surrogate too) is valid JSON."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fingerprint(obj) -> str:
    """A short stable hash of a JSON-able object: what a stage's artifacts were made from."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def in_share(key: str, share: float) -> bool:
    """True for a stable `share` of all keys: the hash of `key` falls in the first `share` of its
    range. The same key lands on the same side whatever else changes (seed, sizes, order)."""
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
    return h / 2**64 < share


# --- live callbacks ----------------------------------------------------------------------------

_WATCHERS: list[tuple[Callable[[dict], None], tuple[str, ...]]] = []


@contextlib.contextmanager
def watch(callback: Callable[[dict], None], *loops: str):
    """Call `callback(event)` whenever a training loop reports inside the block (a notebook's
    live plot). `loops` names the loops to hear from (the `desc` they run under: "pretraining",
    "sft", "ppo", "grpo", ...; none: all). An event holds `loop`, `step`, the step's `row` and
    the loop's `history` so far."""
    entry = (callback, loops)
    _WATCHERS.append(entry)
    try:
        yield callback
    finally:
        _WATCHERS.remove(entry)


def notify(event: dict) -> None:
    """Hand `event` (with its `loop` name) to every callback watching that loop."""
    for callback, loops in list(_WATCHERS):
        if not loops or event["loop"] in loops:
            callback(event)


RUNS_DIR_VARIABLE = "LABKIT_RUNS_DIR"


def default_runs_dir() -> Path:
    """Where run folders live when none is named, the same for every entry point: the environment
    variable LABKIT_RUNS_DIR when it is set; else `runs/` at the root of the labkit checkout this
    package was imported from (so `labkit run` from the root, a notebook in JupyterLab, whose
    kernel starts in `notebooks/`, and papermill from any folder find one folder); else, for a
    labkit installed as a package, `runs/` in the working directory."""
    if os.environ.get(RUNS_DIR_VARIABLE):
        return Path(os.environ[RUNS_DIR_VARIABLE]).expanduser().resolve()
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir():
        return root / "runs"
    return Path.cwd() / "runs"


@dataclass
class Run:
    """A run folder: `runs_dir/name/`, one subfolder per stage (`runs_dir` None: `default_runs_dir()`)."""

    name: str = "default"
    runs_dir: str | os.PathLike | None = None

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"run name {self.name!r} is not allowed; use a plain folder name such as 'default'")
        self.runs_dir = default_runs_dir() if self.runs_dir is None else Path(self.runs_dir)
        self.path = self.runs_dir / self.name

    @property
    def where(self) -> str:
        """The command-line options that name this run, for messages that tell a person what to type."""
        name = "" if self.name == "default" else f" --run {self.name}"
        return name + ("" if self.runs_dir.resolve() == default_runs_dir() else f" --runs-dir {self.runs_dir}")

    def stage_dir(self, stage: str) -> Path:
        folder = self.path / stage
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def metrics_path(self, stage: str) -> Path:
        return self.path / stage / "metrics.json"

    def metrics(self, stage: str) -> dict | None:
        path = self.metrics_path(stage)
        return read_json(path) if path.exists() else None

    def is_complete(self, stage: str, made_from: str) -> bool:
        metrics = self.metrics(stage)
        return metrics is not None and metrics.get("fingerprint") == made_from

    def write_metrics(self, stage: str, metrics: dict, made_from: str) -> None:
        write_json(self.metrics_path(stage), {**metrics, "fingerprint": made_from})

    @contextlib.contextmanager
    def tracking(self, stage: str, config: dict):
        """Log this stage to wandb inside the run folder: offline unless the user set WANDB_MODE.
        While it is open, `log` sends step metrics to it."""
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self._tracker = wandb.init(
            project="labkit",
            name=f"{self.name}-{stage}",
            group=self.name,
            job_type=stage,
            dir=str(self.path),
            mode=os.environ.get("WANDB_MODE", "offline"),
            config=config,
            reinit="finish_previous",
        )
        try:
            yield self._tracker
        finally:
            self._tracker.finish()
            self._tracker = None

    def log(self, metrics: dict, step: int | None = None) -> None:
        if getattr(self, "_tracker", None) is not None:
            self._tracker.log(metrics, step=step)


@dataclass
class LoadedRun:
    """What `load_run` returns: the run, and each finished stage's folder and metrics."""

    run: Run
    metrics: dict[str, dict]

    def path(self, stage: str) -> Path:
        return self.run.path / stage

    @property
    def stages(self) -> list[str]:
        return list(self.metrics)


def load_run(name: str = "default", runs_dir: str | os.PathLike | None = None) -> LoadedRun:
    run = Run(name, runs_dir)
    if not run.path.is_dir():
        raise FileNotFoundError(f"no run folder {run.path.resolve()}; make one with `labkit run{run.where}`")
    metrics = {s: m for s in STAGES if (m := run.metrics(s)) is not None}
    return LoadedRun(run, metrics)
