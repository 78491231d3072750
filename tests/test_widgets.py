"""The notebooks' widgets respond to their controls, headlessly."""

from labkit import plots, widgets
from labkit.data import read_pages, read_world


def test_page_browser_filters_and_highlights(tiny_run):
    pages = read_pages(tiny_run)
    browser = widgets.page_browser(pages)
    (genre, reason), (index, count), view = (
        browser.children[0].children,
        browser.children[1].children,
        browser.children[2],
    )
    genre.value = "worksheet"
    assert count.value == f"{sum(p['genre'] == 'worksheet' for p in pages)} pages match"
    assert "/sheet/" in view.value
    genre.value, reason.value = "all", "kept, redacted"
    assert widgets.REDACTED in view.value and widgets.PLACEHOLDER in view.value
    reason.value = "removed: url: domain"
    assert "removed by url: domain" in view.value
    index.value = index.max
    assert view.value == widgets.page_html([p for p in pages if p["reason"] == "domain"][-1])


def test_page_html_escapes_text_and_shows_the_redaction():
    page = {
        "url": "u",
        "genre": "news",
        "label": "clean",
        "removed_by": None,
        "reason": None,
        "text": "<b>hi</b> mail ada@x.org",
        "redactions": [[15, 25, "email", "ada@x.org"]],
    }
    shown = widgets.page_html(page)
    assert "&lt;b&gt;hi&lt;/b&gt;" in shown and "ada@x.org" in shown and "&lt;EMAIL&gt;" in shown


def test_data_figures_are_labelled(tiny_run):
    metrics = tiny_run.metrics("data")
    funnel = plots.cleaning_funnel(metrics)
    assert list(funnel.data[0].x) == [metrics["pages_in"]] + [r["pages_out"] for r in metrics["funnel"]]
    hist = plots.pages_per_person(read_world(tiny_run))
    assert hist.layout.yaxis.type == "log" and hist.layout.xaxis.title.text and hist.layout.yaxis.title.text
