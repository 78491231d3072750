"""Presets and parameters: one dataclass per stage, bundled in `Config`.

A preset is a named `Config`. Any field can be overridden, by keyword in Python
(`get_config("cpu", seed=1, data={"n_people": 50})`), by `--set data.n_people=50` on the
command line, or by a notebook's papermill parameters. Every override is checked at once:
an unknown preset, field or stage, a value of the wrong type or out of range raises
`ConfigError` with one message naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

STAGES = ("data", "tokenizer", "base", "sft", "rlhf", "grpo", "halluc")


class ConfigError(ValueError):
    """A bad preset, field, value or stage name."""


def param(default, *, low=None, high=None, choices=None, help=""):
    """A dataclass field with its allowed range (inclusive) or choices, checked on every override."""
    return field(default=default, metadata=dict(low=low, high=high, choices=choices, help=help))


@dataclass
class DataConfig:
    source: str = param("mini-web", help="'mini-web', a Hugging Face dataset name, or a local .jsonl/.parquet path with a 'text' column")
    text_column: str = param("text", help="column holding the text when source is a dataset")
    max_docs: int = param(0, low=0, help="read at most this many documents from a dataset (0: all)")
    n_people: int = param(100, low=5, high=1_000_000, help="people in the mini-web's world")
    median_pages: float = param(3.0, low=0.5, high=1000.0, help="median number of pages about a person")
    spread: float = param(1.2, low=0.0, high=5.0, help="log-normal spread of pages per person (heavy tail)")
    unseen_fraction: float = param(0.1, low=0.0, high=0.9, help="share of people with no page at all")
    max_pages_per_person: int = param(40, low=1, help="cap on pages about one person")
    filler_ratio: float = param(1.0, low=0.0, high=10.0, help="pages not about people (worksheets, stories, news) per person page")
    noise: float = param(0.3, low=0.0, high=2.0, help="noisy pages (blocked, spam, duplicates) per clean page")
    pii_rate: float = param(0.15, low=0.0, high=1.0, help="share of clean pages that get personal data inserted")
    minhash_ngram: int = param(5, low=1, high=20, help="word n-gram size of MinHash shingles")
    minhash_bands: int = param(14, low=1, high=64, help="LSH bands")
    minhash_rows: int = param(8, low=1, high=64, help="LSH rows per band")
    min_words: int = param(50, low=1, help="Gopher: fewest words a page may have")


@dataclass
class TokenizerConfig:
    vocab_size: int = param(2048, low=260, high=1_000_000, help="vocabulary size, special tokens included")
    pattern: str = param("gpt4", choices=("gpt4", "gpt2"), help="regex that pre-splits text before BPE")
    heldout_fraction: float = param(0.05, low=0.0, high=0.5, help="share of pages held out to measure bytes per token")


@dataclass
class Config:
    preset: str = param("cpu", choices=("tiny", "cpu", "gpu"), help="the preset these values started from")
    seed: int = param(1337, low=0, help="drives data, initialisation and sampling")
    device: str = param("auto", choices=("auto", "cpu", "cuda", "mps"), help="'auto' picks cuda, then mps, then cpu")
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    "tiny": dict(
        data=dict(n_people=30, median_pages=2.0, max_pages_per_person=12, filler_ratio=0.5),
        tokenizer=dict(vocab_size=300),
    ),
    "cpu": dict(),
    "gpu": dict(
        data=dict(n_people=5000, median_pages=4.0, max_pages_per_person=200),
        tokenizer=dict(vocab_size=32768),
    ),
}


def get_config(preset: str | None = None, **overrides) -> Config:
    """The preset's `Config` with `overrides` applied (nested dicts for sections; None keeps a value).

    `preset=None` reads the environment variable LABKIT_PRESET, else "cpu"; when
    LABKIT_PRESET is set it wins over the argument, so CI can run every notebook on `tiny`.
    """
    preset = os.environ.get("LABKIT_PRESET") or preset or "cpu"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    config = Config(preset=preset)
    _apply(config, PRESETS[preset], "")
    _apply(config, overrides, "")
    return config


def parse_assignments(assignments: list[str]) -> dict:
    """['data.n_people=50', 'seed=3'] -> {'data': {'n_people': '50'}, 'seed': '3'} (values parsed later)."""
    nested: dict = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects FIELD=VALUE, got {assignment!r}")
        *sections, name = key.strip().split(".")
        target = nested
        for section in sections:
            target = target.setdefault(section, {})
        target[name] = value.strip()
    return nested


def parse_stages(text: str | list[str] | None) -> list[str]:
    """'data,tokenizer' -> ['data', 'tokenizer'] in pipeline order; None -> all stages."""
    if text is None:
        return list(STAGES)
    names = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    for name in names:
        if name not in STAGES:
            raise ConfigError(f"unknown stage {name!r}; allowed: {', '.join(STAGES)}")
    return [s for s in STAGES if s in names]


def describe(config_class=Config, prefix="") -> list[str]:
    """One line per field: dotted name and help (for --help and notebooks)."""
    lines, hints = [], _hints(config_class)
    for f in dataclasses.fields(config_class):
        if dataclasses.is_dataclass(hints[f.name]):
            lines += describe(hints[f.name], f"{prefix}{f.name}.")
        else:
            lines.append(f"{prefix}{f.name}: {f.metadata.get('help', '')}")
    return lines


def resolve_device(device: str = "auto") -> str:
    """'auto' -> cuda, then mps, then cpu; an explicit device must be available."""
    import torch

    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if device == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if available[d])
    if device not in available:
        raise ConfigError(f"device={device!r} is not allowed; allowed: auto, cpu, cuda, mps")
    if not available[device]:
        raise ConfigError(f"device={device!r} is not available on this machine; use 'auto' or 'cpu'")
    return device


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _apply(obj, overrides: dict, prefix: str) -> None:
    hints = _hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in overrides.items():
        if value is None:  # a notebook knob left at None keeps the preset's value
            continue
        path = prefix + name
        if name not in fields:
            raise ConfigError(f"unknown field {path!r}; allowed: {', '.join(prefix + f for f in fields)}")
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}={value!r}: {path} is a section; give a dict of its fields")
            _apply(getattr(obj, name), value, path + ".")
        else:
            setattr(obj, name, _check(path, _convert(path, value, kind), fields[name].metadata))


def _convert(path: str, value: Any, kind) -> Any:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{path}={value!r} has the wrong type; expected {kind.__name__}")


def _check(path: str, value: Any, meta) -> Any:
    low, high, choices = meta.get("low"), meta.get("high"), meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{path}={value!r} is not allowed; allowed: {', '.join(map(str, choices))}")
    if (low is not None and value < low) or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"<= {high}" if low is None else f"between {low} and {high}"
        raise ConfigError(f"{path}={value!r} is out of range; allowed: {allowed}")
    return value
