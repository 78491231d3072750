"""Line-level cleaning: what extraction leaves around the article, removed line by line.

Two steps, each a small object with a `name` and `run(pages) -> (kept, removed)` like those in
labkit/cleaning.py; they edit the text of the pages they keep, and drop a page left with nothing.

- C4's rules (Raffel et al. 2020) as datatrove's C4QualityFilter implements them: drop lines with
  a word over 1,000 characters, lines of fewer than 3 words, lines mentioning javascript, and
  cookie or terms-of-use lines; optionally lines not ending in terminal punctuation; strip
  Wikipedia-style citations; drop the page for "lorem ipsum" or a curly bracket, or when fewer
  than 5 sentences are left. FineWeb runs it with the terminal-punctuation rule off (it removed
  too much), and so does labkit by default (`data.c4_terminal_punct`). One departure, which
  `data.c4_keep_title` turns off: a page's first line, its title, is spared the length and
  punctuation rules. The mini-web's encyclopedia titles are two-word names, some of those pages
  give the full name nowhere else, and the fact probes start the way those pages start.

Lines are kept as the extractor gives them, blocks separated by a blank line.
- Site-level line dedup: a line found on many pages of one domain is the site's boilerplate
  (a newsletter box, a share bar), whatever its wording, so it goes.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace

from .crawl import domain_of
from .web import Page

LINE_STEPS = ("extract", "c4_lines", "site_lines")  # scored line by line: boilerplate removed, main text lost

CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(line: str) -> int:
    """Sentences in a line: splits after terminal punctuation (what nltk's punkt does, bar abbreviations)."""
    return len(SENTENCE_END.split(line.strip())) if line.strip() else 0


@dataclass
class C4LineFilter:
    """C4's line rules; the reason of a dropped page names the rule. `reasons` counts dropped lines by rule."""

    terminal_punct: bool = False
    keep_title: bool = True
    min_words_per_line: int = 3
    max_word_length: int = 1000
    min_sentences: int = 5
    name: str = "c4_lines"
    per_page = True
    reasons: Counter = field(default_factory=Counter)

    def line_reason(self, line: str, title: bool = False) -> str | None:
        words = line.split()
        if any(len(word) > self.max_word_length for word in words):
            return "too_long_word"
        short = not (title and self.keep_title)
        if short and self.terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
            return "no_terminal_punct"
        if short and len(words) < self.min_words_per_line:
            return "too_few_words"
        lowered = line.lower()
        if "javascript" in lowered:
            return "javascript"
        if any(p in lowered for p in POLICY_SUBSTRINGS):
            return "policy"
        return None

    def clean(self, text: str) -> tuple[str | None, str | None]:
        """(text kept, None), or (None, why the whole page goes)."""
        kept = []
        for i, line in enumerate(line for line in text.splitlines() if line.strip()):
            line = CITATION.sub("", line.strip())
            lowered = line.lower()
            if "lorem ipsum" in lowered:
                return None, "lorem_ipsum"
            if "{" in line:
                return None, "curly_bracket"
            reason = self.line_reason(line, title=i == 0)
            if reason:
                self.reasons[reason] += 1
            else:
                kept.append(line)
        if sum(map(sentences, kept)) < self.min_sentences:
            return None, "too_few_sentences"
        return "\n\n".join(kept), None

    def run(self, pages):
        self.reasons = Counter()
        kept, removed = [], []
        for page in pages:
            text, reason = self.clean(page.text)
            if reason:
                removed.append((page, reason))
            else:
                kept.append(replace(page, text=text))
        return kept, removed


@dataclass
class SiteLineDedup:
    """Drop every line found on at least `min_share` of its domain's pages and on `min_pages` or more.
    Counted once per page, so a line a page repeats is the page's business (Gopher's), not the site's."""

    min_share: float = 0.5
    min_pages: int = 3
    name: str = "site_lines"

    def run(self, pages):
        sites: dict[str, list[int]] = {}
        for i, page in enumerate(pages):
            sites.setdefault(domain_of(page.url), []).append(i)
        self.boilerplate: dict[str, set[str]] = {}
        texts: list[str] = [""] * len(pages)
        for domain, members in sites.items():
            seen = Counter(line for i in members for line in {line.strip() for line in pages[i].text.splitlines()})
            floor = max(self.min_pages, self.min_share * len(members))
            common = {line for line, n in seen.items() if line and n >= floor}
            self.boilerplate[domain] = common
            for i in members:
                texts[i] = "\n\n".join(
                    line for line in pages[i].text.splitlines() if line.strip() and line.strip() not in common
                )
        kept = [replace(page, text=text) for page, text in zip(pages, texts) if text]
        removed = [(page, "only_site_boilerplate") for page, text in zip(pages, texts) if not text]
        return kept, removed


def flat(text: str) -> str:
    return " ".join(text.split())


def count_lines(step: str, pages: list[Page], kept: list[Page], truth: dict[str, Page]) -> Counter:
    """Lines of boilerplate and of main text on the pages reaching a line step, and how many it dropped.
    Extraction: the generator's lines (its text's, and the boilerplate its HTML carried) found or not
    in the extracted text. Later steps: a line is main text when the generator's text holds it."""
    after = {page.url: page.text for page in kept}
    counts: Counter = Counter()
    for page in pages:
        gen, out = truth.get(page.url), after.get(page.url, "")
        if gen is None:
            continue
        if step == "extract":
            found = flat(out)
            labelled = [("main", line) for line in gen.text.splitlines() if line.strip()]
            labelled += [("boilerplate", line) for line in gen.boilerplate]
            for kind, line in labelled:
                counts[f"{kind}_in"] += 1
                counts[f"{kind}_dropped"] += flat(line) not in found
        else:
            main, left = flat(gen.text), Counter(line.strip() for line in out.splitlines())
            for line in (line.strip() for line in page.text.splitlines()):
                if not line:
                    continue
                kind = "main" if flat(line) in main else "boilerplate"
                counts[f"{kind}_in"] += 1
                if left[line]:
                    left[line] -= 1
                else:
                    counts[f"{kind}_dropped"] += 1
    return counts
