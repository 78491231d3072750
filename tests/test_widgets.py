"""The notebooks' widgets respond to their controls, headlessly."""

import pytest

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


# --- stage 5: the ranking widget, driven through its controls --------------------------------------


def _prompts(n=3):
    return [
        dict(
            id=f"p{i:04d}-x",
            kind="qa",
            messages=[{"role": "user", "content": f"Where was Ann {i} born?"}],
            completions=[f"Ann {i} was born in Bran.", "I don't know.", "Bran Bran Bran"],
            ended=[True, True, False],
        )
        for i in range(n)
    ]


def test_typed_rankings_are_parsed_or_refused_with_what_is_allowed():
    from labkit.labeling import parse_order

    assert parse_order("bac", 3) == [1, 0, 2] and parse_order("B > C > A", 3) == [1, 2, 0]
    for text, why in [("XYZ", "X, Y, Z names no answer"), ("ABA", "A comes more than once"), ("AB", "C is missing")]:
        with pytest.raises(ValueError, match=f"{why}; type each of A, B, C once, best first, e.g. CBA"):
            parse_order(text, 3)


def test_ranking_widget_controls(tmp_path):
    from labkit.preferences import Rankings

    path = tmp_path / "rankings.jsonl"
    store = Rankings(path, _prompts())
    for pid in store.order:  # the simulated labeler ranked every prompt: a person can still rank each
        store.add(pid, [0, 1, 2], by="simulated")
    ui = widgets.ranking_widget(store)
    on_file = lambda: Rankings(path, _prompts())  # noqa: E731
    assert ui.session.pid == "p0000-x" and "3 of 3 prompts ranked, 0 by a person" in ui.counts.value
    assert "the simulated labeler ranked it A &gt; B &gt; C: a default, which yours replaces" in ui.header.value
    ui.buttons[2].click()
    assert (ui.buttons[2].description, ui.buttons[2].disabled) == ("C: #1", True)
    ui.undo_button.click()  # takes back the click
    assert (ui.buttons[2].description, ui.buttons[2].disabled) == ("C", False) and "the last click" in ui.message.value
    ui.buttons[2].click()
    ui.buttons[0].click()  # the last one ranks itself
    assert on_file().records["p0000-x"] == dict(id="p0000-x", order=[2, 0, 1], by="human")
    assert on_file().simulated["p0000-x"]["order"] == [0, 1, 2]  # the labeler's stays in the file
    assert "3 of 3 prompts ranked, 1 by a person" in ui.counts.value and ui.session.pid == "p0001-x"
    assert "stored: prompt p0000-x ranked C &gt; A &gt; B" in ui.message.value

    lines = path.read_text()
    for text, why in [("XYZ", "X, Y, Z names no answer"), ("AAB", "A comes more than once"), ("AB", "C is missing")]:
        ui.typed.value = text  # Enter
        assert why in ui.message.value and "type each of A, B, C once" in ui.message.value
        assert "#b00" in ui.message.value and ui.typed.value == text  # shown in red, left to mend
        ui.rank_button.click()
        assert why in ui.message.value
    assert path.read_text() == lines and ui.session.pid == "p0001-x"  # nothing stored
    ui.typed.value = "b, c, a"
    assert on_file().records["p0001-x"]["order"] == [1, 2, 0] and ui.typed.value == ""
    ui.rank_button.click()  # a click just after Enter finds the box emptied: nothing to say
    assert "stored: prompt p0001-x" in ui.message.value
    ui.rank_button.click()
    assert "type the letters of the answers first" in ui.message.value
    assert "3 of 3 prompts ranked, 2 by a person" in ui.counts.value and ui.session.pid == "p0002-x"
    ui.skip_button.click()  # the only prompt left
    assert "the only prompt no person has ranked" in ui.message.value and ui.session.pid == "p0002-x"

    # a kernel restart: the undo history comes from the file
    ui = widgets.ranking_widget(on_file())
    assert ui.session.pid == "p0002-x" and "2 by a person" in ui.counts.value
    ui.undo_button.click()
    assert (
        ui.session.pid == "p0001-x" and "took back your ranking of prompt p0001-x (B &gt; C &gt; A)" in ui.message.value
    )
    assert "3 of 3 prompts ranked, 1 by a person" in ui.counts.value
    assert on_file().records["p0001-x"]["by"] == "simulated"
    ui.skip_button.click()
    assert ui.session.pid == "p0002-x" and "skipped prompt p0001-x" in ui.message.value
    ui.undo_button.click()
    ui.undo_button.click()
    assert "nothing to undo" in ui.message.value and "0 by a person" in ui.counts.value

    # a long action greys the controls; afterwards the counts include what it wrote
    with ui.busy("building the stage"):
        assert ui.skip_button.disabled and ui.typed.disabled and all(b.disabled for b in ui.buttons)
        assert "busy: building the stage" in ui.message.value
        on_file().add("p0002-x", [1, 0, 2])  # written by someone else meanwhile
    assert not ui.skip_button.disabled and "done: building the stage" in ui.message.value
    assert "1 by a person" in ui.counts.value and ui.session.pid == "p0000-x"


def test_live_ppo_shows_its_run_labelled(tmp_path):
    history = [
        dict(step=s, score=0.1 * s, kl=0.01 * s, response_length=5.0, clipfrac=0.1, sample=f"answer {s}")
        for s in (1, 2)
    ]
    live = widgets.LivePPO("PPO (live): the stage's run")
    for s in (1, 2):
        live.update(dict(loop="ppo", step=s, row=history[s - 1], history=history[:s]))
    fig = live.figure
    assert fig.layout.title.text == "PPO (live): the stage's run" and len(fig.data) == 4
    assert all(trace.name for trace in fig.data) and list(fig.data[0].y) == [0.1, 0.2]
    axes = [fig.layout[a] for a in fig.layout if a.startswith(("xaxis", "yaxis"))]
    assert len(axes) == 8 and all(axis.title.text for axis in axes)
    assert "step 2, a sampled answer:</b> answer 2" in live.sample.value
    live.show([])  # a run that was not made
    assert live.figure is None and "this run was not made" in live.sample.value
