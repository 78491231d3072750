"""Main-text extraction on the mini-web: trafilatura (FineWeb's choice) against resiliparse.

Each page of a preset's mini-web is dressed in its site's HTML (labkit/crawl.py), and each
extractor is scored against the generator's labels: the share of boilerplate lines it kept, the
share of main-text lines it lost, pages it returned nothing for, and CPU milliseconds a page.

    python benchmarks/extraction.py [--preset cpu]
"""

import argparse
import time

from labkit.config import get_config
from labkit.crawl import dress, extract_text
from labkit.data import count_lines, line_scores
from labkit.language import mix_in_languages
from labkit.web import Page, crawl
from labkit.world import make_world


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    args = parser.parse_args()
    config = get_config(args.preset)
    cfg = config.data
    world = make_world(
        config.seed, cfg.n_people, cfg.median_pages, cfg.spread, cfg.unseen_fraction, cfg.max_pages_per_person
    )
    pages = mix_in_languages(crawl(world, config.seed, cfg.filler_ratio, cfg.noise, cfg.pii_rate), cfg.foreign_share, 0)
    dressed = dress(pages, config.seed)
    truth = {page.url: page for page, _ in dressed}
    html_pages = [Page(page.url, doc, page.genre) for page, doc in dressed]
    print(f"{len(dressed)} pages of the {args.preset} preset's mini-web")
    print(f"{'extractor':<14}{'boilerplate kept':>18}{'main lost':>12}{'empty pages':>13}{'ms/page (CPU)':>15}")
    for extractor in ("trafilatura", "resiliparse"):
        start = time.process_time()
        texts = [extract_text(page.text, extractor) for page in html_pages]
        ms = 1000 * (time.process_time() - start) / len(html_pages)
        kept = [Page(p.url, text, p.genre) for p, text in zip(html_pages, texts)]
        s = line_scores(count_lines("extract", html_pages, kept, truth))
        kept_share = 1 - s["recall"]
        print(f"{extractor:<14}{kept_share:>18.4f}{s['main_lost']:>12.4f}{texts.count(''):>13}{ms:>15.2f}")


if __name__ == "__main__":
    main()
