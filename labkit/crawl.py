"""The crawl as a crawl: mini-web pages as HTML documents inside a WARC file, read back and extracted.

A real page is mostly not its article: a site's navigation, header, cookie banner, related-links
box and footer repeat on every page of the site. The mini-web dresses each page in its site's
chrome (a site is a domain, so the same boilerplate lines repeat across a site's pages) and
records which lines are boilerplate, so that extraction can be scored against the truth.
The pages go into a WARC file, Common Crawl's format (response records with HTTP headers), and
stage 1 reads them back with the same reader that reads a real Common Crawl file.

Extraction keeps the main text. Measured on the cpu preset's mini-web (1,496 pages, CPU time,
benchmarks/extraction.py): trafilatura (FineWeb's extractor, with its favor_precision) kept
11.5% of the labelled boilerplate lines, about all of them the two lines each site puts inside
the article, which no extractor can tell from the text, and lost no main-text line, at 4.7 ms a
page; resiliparse's main-content mode kept 34% (the site's name and tagline and more of the
chrome) and lost none, at 0.2 ms a page. labkit uses trafilatura: it is what FineWeb ran, and
what reaches the corpus matters more here than 4 s a thousand pages. The line rules
(labkit/lines.py) then remove what extraction could not.
"""

from __future__ import annotations

import html
import io
import random
import re
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from .web import Page

NAV_ITEMS = ["Home", "News", "About us", "Contact", "Archive", "Topics", "Log in", "Subscribe", "Help", "Search"]
TAGLINES = [
    "Your trusted source since 1998.",
    "Stories that matter, every day.",
    "Everything you wanted to know, in one place.",
    "Written by readers, for readers.",
    "The friendly corner of the web.",
]
COOKIE_BANNERS = [
    "We use cookies to improve your experience. By continuing to browse you accept our use of cookies.",
    "This site uses cookies to analyse traffic and remember your preferences.",
    "Cookies help us run this site. Read our cookie policy to learn more.",
]
# what sites put inside the article itself, where no extractor can tell it from the text
ARTICLE_LINES = [
    "Advertisement",
    "Share this article: Facebook | Twitter | E-mail",
    "Please enable JavaScript to view the comments.",
    "Sign up for our newsletter to get stories like this one in your inbox every week.",
    "Listen to this article",
    "Our readers also liked the pages in the box below.",
]
FOOTER_LINES = [
    "Privacy policy | Terms of use | Accessibility",
    "Please enable JavaScript to see the comments on this page.",
    "Sign up to our weekly newsletter and never miss a new story from us.",
    "Follow us on social media for the latest updates.",
    "Advertise with us | Careers | Press",
    "Report a problem with this page",
]


def domain_of(url: str) -> str:
    return urlsplit(url).netloc.lower()


@dataclass
class Site:
    """One domain's chrome: the same on every page of the site."""

    name: str
    nav: list[str]
    tagline: str
    cookie: str
    footer: list[str]
    article: list[str]  # one line before the text, one after
    semantic: bool  # <header>/<nav>/<main>/<footer>, or a soup of <div>s as many sites still are

    @classmethod
    def of(cls, domain: str) -> Site:
        rng = random.Random(domain)  # a site looks the same in every crawl
        name = domain.split(".")[0].replace("-", " ").title()
        footer = [f"© {rng.randint(2001, 2024)} {name}. All rights reserved.", *rng.sample(FOOTER_LINES, 2)]
        return cls(
            name,
            rng.sample(NAV_ITEMS, 5),
            rng.choice(TAGLINES),
            rng.choice(COOKIE_BANNERS),
            footer,
            rng.sample(ARTICLE_LINES, 2),
            rng.random() < 0.5,
        )


def title_of(page: Page) -> str:
    return page.text.strip().split("\n")[0][:80]


def to_html(page: Page, related: list[str]) -> tuple[str, list[str]]:
    """A page as an HTML document in its site's chrome, and the boilerplate lines it carries.
    Each non-empty line of the page's text becomes one block (the first an <h1> when the text
    has a title paragraph); `related` are titles of other pages of the site, linked in a box."""
    site, e = Site.of(domain_of(page.url)), html.escape
    lines = [line.strip() for line in page.text.split("\n") if line.strip()]
    titled = "\n\n" in page.text.strip()
    body = [f"<h1>{e(lines[0])}</h1>" if titled else f"<p>{e(lines[0])}</p>"] if lines else []
    body += [f"<p>{e(line)}</p>" for line in lines[1:]]
    body[1:1] = [f"<p>{e(site.article[0])}</p>"]
    body.append(f"<p>{e(site.article[1])}</p>")
    nav = "".join(f'<li><a href="/{i}">{e(item)}</a></li>' for i, item in enumerate(site.nav))
    links = "".join(f'<li><a href="/related/{i}">{e(t)}</a></li>' for i, t in enumerate(related))
    box = f"<h3>Related pages</h3><ul>{links}</ul>" if related else ""
    cookie = f"<p>{e(site.cookie)}</p><button>Accept all</button>"
    footer = "".join(f"<p>{e(line)}</p>" for line in site.footer)
    brand = f'<div class="brand"><a href="/">{e(site.name)}</a><p>{e(site.tagline)}</p></div>'
    lang = getattr(page, "lang", "en")
    if site.semantic:
        parts = [
            f'<div id="cookie-banner" class="cookie-consent">{cookie}</div>',
            f"<header>{brand}<nav><ul>{nav}</ul></nav></header>",
            f'<main><article>{"".join(body)}</article><aside class="related">{box}</aside></main>',
            f"<footer>{footer}</footer>",
        ]
    else:
        parts = [
            f'<div class="top">{brand}<div class="menu"><ul>{nav}</ul></div></div>',
            f'<div class="wrapper"><div class="content">{"".join(body)}</div>',
            f'<div class="sidebar">{box}</div></div>',
            f'<div class="bottom">{footer}</div><div class="consent">{cookie}</div>',
        ]
    doc = (
        f'<!DOCTYPE html><html lang="{lang}"><head><meta charset="utf-8"><title>{e(lines[0][:80] if lines else "")}'
        f" - {e(site.name)}</title></head><body>{''.join(parts)}</body></html>"
    )
    boilerplate = [site.name, site.tagline, *site.nav, site.cookie, "Accept all", *site.footer, *site.article]
    boilerplate += ["Related pages", *related] if related else []
    return doc, boilerplate


def dress(pages: list[Page], seed: int, n_related: int = 3) -> list[tuple[Page, str]]:
    """Every page with its HTML; its `boilerplate` field lists the boilerplate lines the HTML carries.
    The related-links box shows titles of other pages of the same site."""
    rng = random.Random(seed + 2)
    titles: dict[str, list[str]] = {}
    for page in pages:
        if "\n\n" in page.text.strip():  # a page with a title paragraph
            titles.setdefault(domain_of(page.url), []).append(title_of(page))
    out = []
    for page in pages:
        others = [t for t in titles.get(domain_of(page.url), []) if t not in page.text]
        related = rng.sample(others, min(n_related, len(others)))
        doc, boilerplate = to_html(page, related)
        out.append((replace(page, boilerplate=boilerplate), doc))
    return out


def write_warc(path, documents) -> int:
    """Write (url, html) pairs as a gzipped WARC file of HTTP response records, as Common Crawl
    publishes them. Returns the number of records."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    n = 0
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=str(path).endswith(".gz"))
        for url, doc in documents:
            body = doc.encode("utf-8")
            headers = StatusAndHeaders(
                "200 OK",
                [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body)))],
                protocol="HTTP/1.1",
            )
            writer.write_record(
                writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers)
            )
            n += 1
    return n


CHARSET = re.compile(r"charset=([\w-]+)", re.I)


def read_warc(path, max_records: int = 0):
    """(url, html) for each HTML page a WARC file (.warc or .warc.gz) holds: response records with
    status 200 and an HTML content type. Request, metadata and warcinfo records, redirects, errors
    and non-HTML payloads are skipped, as a Common Crawl reader must."""
    from warcio.archiveiterator import ArchiveIterator

    n = 0
    with open(path, "rb") as f:
        for record in ArchiveIterator(f):
            if record.rec_type != "response" or record.http_headers is None:
                continue
            if record.http_headers.get_statuscode() != "200":
                continue
            content_type = record.http_headers.get_header("Content-Type") or ""
            if "html" not in content_type.lower():
                continue
            charset = CHARSET.search(content_type)
            body = record.content_stream().read()
            try:
                doc = body.decode(charset.group(1) if charset else "utf-8", errors="replace")
            except LookupError:  # a charset Python does not know
                doc = body.decode("utf-8", errors="replace")
            yield record.rec_headers.get_header("WARC-Target-URI"), doc
            n += 1
            if max_records and n >= max_records:
                return


def extract_text(doc: str, extractor: str = "trafilatura") -> str:
    """The main text of an HTML document, its blocks separated by a blank line as the mini-web
    writes paragraphs ("" when none is found).
    trafilatura as FineWeb runs it (favor_precision); resiliparse's main-content mode to compare."""
    if extractor == "resiliparse":
        from resiliparse.extract.html2text import extract_plain_text

        text = extract_plain_text(doc, main_content=True)
    else:
        import trafilatura

        text = trafilatura.extract(doc, favor_precision=True, include_comments=False)
    return "\n\n".join(line.strip() for line in (text or "").splitlines() if line.strip())


@dataclass
class Extractor:
    """Turn each page's HTML into its main text; a page with no text found is removed. A page
    that is not HTML (a dataset's document mixed in, its text extracted already) passes as it is."""

    extractor: str = "trafilatura"
    name: str = "extract"
    per_page = True  # decides each page alone (labkit.scale_out runs it on every shard)

    def run(self, pages):
        kept, removed = [], []
        for page in pages:
            if not page.text.lstrip().startswith("<"):
                kept.append(page)
                continue
            text = extract_text(page.text, self.extractor)
            if text:
                kept.append(replace(page, text=text))
            else:
                removed.append((page, "no_text"))
        return kept, removed
