"""The page steps of cleaning (URL filter, quality, exact dedup, near dedup, PII), and `clean`,
which runs a list of steps in order (`data.steps_for` gives FineWeb's order, with extraction,
language and line steps from crawl.py, language.py and lines.py).

Each step is a small object with a `name` and `run(pages) -> (kept, removed)`, where
`removed` holds `(page, reason)` pairs, so every decision can be explained and scored. The
thresholds are Gopher's (Rae et al. 2021, table A1) as datatrove implements them; MinHash
uses FineWeb's 5-gram shingles, 14 bands x 8 rows.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from itertools import accumulate

import numpy as np
from tqdm.auto import tqdm

from .lines import LINE_STEPS, count_lines
from .web import BLOCKED_DOMAINS, BLOCKED_URL_WORDS, SOFT_URL_WORDS, Page

WORD = re.compile(r"\w+")
ALPHA_WORD = re.compile(r"\w*[^\W\d_]\w*")  # a word holding a letter (matched whole: \w* is greedy)
STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}


def words(text: str) -> list[str]:
    return WORD.findall(text)


@dataclass
class UrlFilter:
    """Drop pages whose domain is block-listed, whose URL holds a banned word, or two soft-banned words.
    URL words are split on non-letters, so `essexnews.com` is not `sex`."""

    blocked_domains: frozenset = frozenset(d for ds in BLOCKED_DOMAINS.values() for d in ds)
    banned_words: frozenset = frozenset(BLOCKED_URL_WORDS)
    soft_words: frozenset = frozenset(SOFT_URL_WORDS)
    name: str = "url"
    per_page = True  # decides each page alone (labkit.scale_out runs it on every shard)

    def reason(self, page: Page) -> str | None:
        host = re.sub(r"^\w+://", "", page.url).split("/")[0].lower()
        domain = ".".join(host.split(".")[-2:])
        if domain in self.blocked_domains:
            return "domain"
        if host != domain and host in self.blocked_domains:
            return "subdomain"
        url_words = set(re.split(r"[^a-z0-9]+", page.url.lower()))
        if url_words & self.banned_words:
            return "hard_blacklisted"
        if len(url_words & self.soft_words) >= 2:
            return "soft_blacklisted"
        return None

    def run(self, pages):
        return split_pages(pages, self.reason)


@dataclass
class QualityFilter:
    """Gopher quality rules, then Gopher repetition rules. A reason names the rule that fired.
    (Length first, so that a three-word page is called too short rather than repetitive.)"""

    min_words: int = 50
    max_words: int = 100_000
    mean_word_length: tuple = (3, 10)
    max_symbol_ratio: float = 0.1  # '#' or ellipses per word
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    min_alpha_words: float = 0.8
    min_stop_words: int = 2
    dup_line_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_frac: float = 0.3
    dup_para_char_frac: float = 0.2
    top_ngram_char_frac: tuple = ((2, 0.20), (3, 0.18), (4, 0.16))
    dup_ngram_char_frac: tuple = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    name: str = "quality"
    per_page = True

    def reason(self, page: Page) -> str | None:
        return self.quality(page.text) or self.repetition(page.text)

    def repetition(self, text: str) -> str | None:
        n_chars = max(1, len(text))
        for unit, parts, frac, char_frac in (
            ("para", re.split(r"\n{2,}", text.strip()), self.dup_para_frac, self.dup_para_char_frac),
            (
                "line",
                [line for line in text.splitlines() if line.strip()] or [""],
                self.dup_line_frac,
                self.dup_line_char_frac,
            ),
        ):
            dups, dup_chars = _duplicates(parts)
            if dups / len(parts) > frac:
                return f"dup_{unit}_frac"
            if dup_chars / n_chars > char_frac:
                return f"dup_{unit}_char_frac"
        tokens = words(text)
        for n, limit in self.top_ngram_char_frac:
            grams = _gram_tuples(tokens, n)
            if grams:
                gram, count = Counter(grams).most_common(1)[0]
                if len(" ".join(gram)) * count / n_chars > limit:
                    return f"top_{n}_gram"
        for n, limit in self.dup_ngram_char_frac:
            if _duplicated_ngram_chars(tokens, n) / n_chars > limit:
                return f"duplicated_{n}_grams"
        return None

    def quality(self, text: str) -> str | None:
        tokens = words(text)
        n = len(tokens)
        if n < self.min_words:
            return "too_few_words"
        if n > self.max_words:
            return "too_many_words"
        mean_length = sum(map(len, tokens)) / n
        if not self.mean_word_length[0] <= mean_length <= self.mean_word_length[1]:
            return "mean_word_length"
        if text.count("#") / n > self.max_symbol_ratio:
            return "hash_ratio"
        if (text.count("...") + text.count("…")) / n > self.max_symbol_ratio:
            return "ellipsis_ratio"
        lines = text.splitlines() or [""]
        if sum(line.lstrip().startswith(("•", "-", "*")) for line in lines) / len(lines) > self.max_bullet_lines:
            return "bullet_lines"
        if sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines) > self.max_ellipsis_lines:
            return "ellipsis_lines"
        if len(ALPHA_WORD.findall(text)) / n < self.min_alpha_words:
            return "alpha_words"
        if sum(t.lower() in STOP_WORDS for t in tokens) < self.min_stop_words:
            return "stop_words"
        return None

    def run(self, pages):
        return split_pages(pages, self.reason)


def _duplicates(parts: list[str]) -> tuple[int, int]:
    seen, dups, dup_chars = set(), 0, 0
    for part in parts:
        if part in seen:
            dups, dup_chars = dups + 1, dup_chars + len(part)
        seen.add(part)
    return dups, dup_chars


def _ngrams(tokens: list[str], n: int) -> list[str]:
    return [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _gram_tuples(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    """The n-grams as tuples: hashed as they are, never joined into strings (the filter's hot loop)."""
    return list(zip(*(tokens[k:] for k in range(n))))


def _duplicated_ngram_chars(tokens: list[str], n: int) -> int:
    """Characters in n-grams seen before, skipping past each repeat (as datatrove counts them);
    an n-gram's characters are its words' and the n - 1 spaces between them."""
    grams = _gram_tuples(tokens, n)
    if len(set(grams)) == len(grams):  # most pages repeat no n-gram: no need to walk them
        return 0
    ends, seen, chars, i = list(accumulate(map(len, tokens), initial=0)), set(), 0, 0
    while i < len(grams):
        if grams[i] in seen:
            chars += ends[i + n] - ends[i] + n - 1
            i += n
        else:
            seen.add(grams[i])
            i += 1
    return chars


def normalise(text: str) -> str:
    """Lower case, words only: what dedup compares."""
    return " ".join(words(text.lower()))


@dataclass
class ExactDedup:
    """Keep the first page of each group with the same normalised text (a 64-bit hash)."""

    name: str = "exact_dedup"

    def run(self, pages):
        first: dict[bytes, str] = {}
        kept, removed = [], []
        for page in pages:
            key = hashlib.blake2b(normalise(page.text).encode(), digest_size=8).digest()
            if key in first:
                removed.append((page, f"copy of {first[key]}"))
            else:
                first[key] = page.url
                kept.append(page)
        return kept, removed


MERSENNE = (1 << 61) - 1


@dataclass
class MinHashDedup:
    """Near-duplicate removal with MinHash and locality-sensitive hashing.

    A page's signature is the minimum of `bands * rows` hash functions over its word n-grams;
    two pages agree on one hash with probability equal to their Jaccard similarity s, and
    share a band (all `rows` hashes) with probability 1 - (1 - s^rows)^bands. With 14 x 8 the
    curve turns at s = (1/14)^(1/8) = 0.72; pages at s = 0.8 are caught 92% of the time.
    Pages are streamed in crawl order: a page that shares a band with any earlier one is removed.
    """

    ngram: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 0
    name: str = "near_dedup"

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        n = self.bands * self.rows
        self._a = rng.integers(1, MERSENNE, size=n, dtype=np.uint64)
        self._b = rng.integers(0, MERSENNE, size=n, dtype=np.uint64)

    @property
    def threshold(self) -> float:
        return (1 / self.bands) ** (1 / self.rows)

    def signature(self, text: str) -> np.ndarray:
        tokens = normalise(text).split()
        grams = _ngrams(tokens, self.ngram) or [" ".join(tokens)]
        hashes = np.array(
            sorted({int.from_bytes(hashlib.sha1(g.encode()).digest()[:4], "little") for g in grams}), dtype=np.uint64
        )
        # (a*x + b) mod p, keeping the low 32 bits, as datasketch and datatrove do (the product
        # wraps modulo 2^64, which mixes the bits further)
        with np.errstate(over="ignore"):
            return (((hashes[:, None] * self._a + self._b) % MERSENNE) & np.uint64(0xFFFFFFFF)).min(axis=0)

    def run(self, pages):
        buckets: list[dict[bytes, str]] = [{} for _ in range(self.bands)]
        kept, removed = [], []
        for page in pages:
            sig = self.signature(page.text).reshape(self.bands, self.rows)
            keys = [band.tobytes() for band in sig]
            match = next((b[k] for b, k in zip(buckets, keys) if k in b), None)
            if match is None:
                kept.append(page)
            else:
                removed.append((page, f"near copy of {match}"))
            for b, k in zip(buckets, keys):
                b.setdefault(k, page.url)
        return kept, removed


PII_PATTERNS = {
    "email": re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"),
    "phone": re.compile(r"(?:\+1[ .-]?)?(?:\(\d{3}\)[ .-]?|\b\d{3}[ .-])\d{3}[ .-]\d{4}\b"),
    "address": re.compile(
        r"\b\d{1,5} (?:[A-Z][a-z]+ ){1,2}(?:Street|Avenue|Road|Lane|Boulevard|Drive|St|Ave|Rd|Blvd)\b\.?"
    ),
    "ip": re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b"),
}
PLACEHOLDERS = {kind: f"<{kind.upper()}>" for kind in PII_PATTERNS}


def _is_public_ip(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).is_global
    except ValueError:
        return False


def find_pii(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every e-mail, phone number, street address and public IPv4 address."""
    spans = []
    for kind, pattern in PII_PATTERNS.items():
        for m in pattern.finditer(text):
            if kind != "ip" or _is_public_ip(m.group()):
                spans.append((m.start(), m.end(), kind))
    spans.sort()
    merged: list[tuple[int, int, str]] = []
    for span in spans:  # an address number can sit inside a phone match, say: keep the first
        if not merged or span[0] >= merged[-1][1]:
            merged.append(span)
    return merged


def redact(text: str) -> tuple[str, list[tuple[int, int, str]]]:
    """The text with each PII span replaced by its placeholder (`<EMAIL>`...), and the spans found."""
    spans = find_pii(text)
    out, last = [], 0
    for start, end, kind in spans:
        out += [text[last:start], PLACEHOLDERS[kind]]
        last = end
    return "".join(out) + text[last:], spans


@dataclass
class PIIRedactor:
    """Replace personal data with placeholders; pages are kept. `redactions` maps URL -> spans found."""

    name: str = "pii"
    per_page = True

    def run(self, pages):
        self.redactions: dict[str, list[tuple[int, int, str, str]]] = {}
        kept = []
        for page in pages:
            text, spans = redact(page.text)
            if spans:
                self.redactions[page.url] = [(s, e, k, page.text[s:e]) for s, e, k in spans]
                page = replace(page, text=text)
            kept.append(page)
        return kept, []


def split_pages(pages, reason_of):
    """(kept, removed) for a step that judges each page alone: `reason_of(page)` is None to keep it."""
    kept, removed = [], []
    for page in pages:
        reason = reason_of(page)
        if reason:
            removed.append((page, reason))
        else:
            kept.append(page)
    return kept, removed


@dataclass
class Cleaned:
    kept: list[Page]
    decisions: dict[str, tuple[str, str]]  # url -> (step, reason) for every removed page
    funnel: list[dict]  # one row per step: pages in, pages out
    redactions: dict[str, list] = field(default_factory=dict)  # url -> [(start, end, kind, string)]
    texts: dict[str, str] = field(default_factory=dict)  # url -> text as cleaning left it, before PII
    lines: dict[str, Counter] = field(default_factory=dict)  # line step -> boilerplate/main lines in and dropped


def clean(pages: list[Page], steps: list, truth: dict[str, Page] | None = None, progress: bool = True) -> Cleaned:
    """Run `steps` in order. With `truth` (url -> generated page), count for each line step the
    boilerplate and main-text lines it kept and dropped."""
    decisions, funnel, redactions, texts, lines = {}, [], {}, {}, {}
    for step in tqdm(steps, desc="cleaning", leave=False, disable=not progress):
        if isinstance(step, PIIRedactor):
            texts = {page.url: page.text for page in pages}
        started = time.time()
        kept, removed = step.run(pages)
        seconds = time.time() - started
        decisions.update({page.url: (step.name, reason) for page, reason in removed})
        funnel.append({"step": step.name, "pages_in": len(pages), "pages_out": len(kept), "seconds": seconds})
        if isinstance(step, PIIRedactor):
            redactions = step.redactions
        if truth and step.name in LINE_STEPS:
            lines[step.name] = count_lines(step.name, pages, kept, truth)
        pages = kept
    return Cleaned(pages, decisions, funnel, redactions, texts, lines)
