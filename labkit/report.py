"""The report card: one Markdown section per finished stage, built from its metrics.json."""

from __future__ import annotations

from .config import STAGES
from .run import LoadedRun, atomic_write

TITLES = {
    "data": "1. Data: crawl and clean",
    "tokenizer": "2. Tokenizer: byte-level BPE",
    "base": "3. Pretraining: the base model",
    "sft": "4. SFT: the assistant",
    "rlhf": "5. RLHF: reward model, PPO, DPO",
    "grpo": "6. GRPO: reasoning with verifiable rewards",
    "halluc": "7. Hallucinations",
}
SKIP = {"fingerprint", "funnel", "precision", "recall", "removed"}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def _data_section(m: dict) -> list[str]:
    rows = [
        [
            r["step"],
            r["pages_in"],
            r["pages_out"],
            r["pages_in"] - r["pages_out"],
            m["precision"].get(r["step"]),
            m["recall"].get(r["step"]),
        ]
        for r in m["funnel"]
    ]
    lines = _table(["step", "pages in", "pages out", "removed", "precision", "recall"], rows)
    reasons = _table(["removed because", "pages"], sorted(m["removed_by_reason"].items(), key=lambda kv: -kv[1]))
    totals = _table(
        ["metric", "value"],
        [[k, m.get(k)] for k in ("pages_in", "pages_out", "chars_in", "chars_out", "seconds")]
        + [["minhash threshold (1/bands)^(1/rows)", m["minhash"]["threshold"]]],
    )
    pii = (
        f"PII strings leaked into the cleaned corpus: **{_fmt(m.get('pii_leaked'))}** "
        f"(planted: {_fmt(m.get('pii_planted'))}; redacted: {_fmt(m.get('redactions'))})"
    )
    mix = m.get("mix")
    if mix:  # a dataset with the mini-web mixed in (labkit/data.py, mix_in_mini_web)
        pii += (
            f"\n\nMini-web share of the cleaned corpus's characters: **{mix['mini_web_share_measured']}** "
            f"(asked: {mix['mini_web_share']}; dataset documents read: {mix['dataset_docs_read']}, "
            f"kept: {mix['dataset_docs_kept']})"
        )
    return [*lines, "", pii, "", *reasons, "", *totals]


def _scalars(m: dict) -> list[str]:
    rows = [[key, value] for key, value in m.items() if key not in SKIP and not isinstance(value, (dict, list))]
    rows += [
        [f"{key}.{k}", v]
        for key, value in m.items()
        if key not in SKIP and isinstance(value, dict)
        for k, v in value.items()
        if not isinstance(v, (dict, list))
    ]
    return _table(["metric", "value"], rows)


def _short_vocabulary(m: dict) -> str:
    return (
        f"**The vocabulary holds {m['vocab_size']} tokens, not the {m['vocab_size_asked']} asked for**: the corpus "
        "ran out of pairs to merge (every chunk became one token). Give more text or ask for fewer tokens."
    )


def render(loaded: LoadedRun) -> str:
    lines = [f"# labkit report card: run `{loaded.run.name}`", ""]
    if not loaded.metrics:
        lines.append("No stage has finished yet: run `labkit run` first.")
    for stage in STAGES:
        if stage in loaded.metrics:
            m = loaded.metrics[stage]
            body = _data_section(m) if stage == "data" and m.get("funnel") else _scalars(m)
            if stage == "tokenizer" and m.get("vocab_reached") is False:
                body = [_short_vocabulary(m), "", *body]
            lines += [f"## {TITLES[stage]}", "", *body, ""]
    return "\n".join(lines)


def write_report(loaded: LoadedRun) -> str:
    """Render the report card and write it to `<run>/report.md`; return the Markdown."""
    text = render(loaded)
    atomic_write(loaded.run.path / "report.md", text)
    return text
