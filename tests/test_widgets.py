"""The notebooks' widgets respond to their controls, headlessly: each factory's sliders, dropdowns
and text are set and its buttons clicked from Python, and what it shows is checked."""

import ipywidgets as w
import pytest
import torch

from labkit import plots, views, widgets
from labkit.data import read_corpus, read_pages, read_world


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
    assert views.REDACTED in view.value and views.PLACEHOLDER in view.value
    reason.value = "removed: url: domain"
    assert "removed by url: domain" in view.value
    index.value = index.max
    assert view.value == views.page_html([p for p in pages if p["reason"] == "domain"][-1])


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
    shown = views.page_html(page)
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


# --- helpers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_run, tiny_config):
    from labkit.pipeline import ensure
    from labkit.tokenizer import Tokenizer

    ensure("tokenizer", tiny_config, tiny_run)
    return Tokenizer.load(tiny_run.path / "tokenizer")


def tiny_gpt(tokenizer, seed=0):
    from labkit.model import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=tokenizer.n_vocab, n_layer=1, n_head=2, n_embd=32)).eval()


def spy(monkeypatch, module, name, watched: dict) -> list:
    """Replace `module.name` (the slow call behind a button) by one that records, each time it runs,
    the state of `watched["button"]` (once the widget exists): (disabled, description)."""
    seen, real = [], getattr(module, name)

    def recording(*args, **kwargs):
        if "button" in watched:
            seen.append((watched["button"].disabled, watched["button"].description))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    return seen


def controls(widget, kind=w.DOMWidget) -> list:
    """Every widget of type `kind` inside `widget`, depth first."""
    found = [widget] if isinstance(widget, kind) else []
    for child in getattr(widget, "children", ()):
        found += controls(child, kind)
    return found


def labels_are_whole(widget) -> bool:
    """Every labelled control sizes its label to its text (the default width cuts "temperature")."""
    labelled = [c for c in controls(widget) if getattr(c, "description", "") and not isinstance(c, w.Button)]
    return bool(labelled) and all(c.style.description_width == "initial" for c in labelled)


# --- stage 1 and 2 ------------------------------------------------------------------------------------


def test_page_browser_labels_are_whole(tiny_run):
    assert labels_are_whole(widgets.page_browser(read_pages(tiny_run)))


def test_token_inspector_shows_part_characters_as_bytes_and_the_token_count_apart_from_the_vocabulary(tokenizer):
    small = tokenizer.truncate(256 + len(tokenizer.special_tokens) + 8)
    inspector = widgets.token_inspector({"a few merges": small, "every merge": tokenizer}, text="hello")
    box, (left, right) = inspector.children[0], inspector.children[1].children
    assert "<b>every merge</b>" in right.value and f"vocabulary of {tokenizer.n_vocab:,}" in right.value
    assert f"vocabulary of {small.n_vocab:,}" in left.value
    shown = right.value
    box.value = "你好 ok"
    assert right.value != shown
    n_tokens = len(tokenizer.encode("你好 ok"))
    assert f"this text: {n_tokens} tokens for 9 bytes" in right.value
    assert "\ufffd" not in right.value and "\ufffd" not in left.value  # no row of replacement marks
    assert all(f">{byte}<" in right.value for byte in ("e4", "bd", "a0"))  # 你 is e4 bd a0, three tokens
    assert ">你</span>" in right.value and ">好</span>" in right.value  # the character the bytes make
    table = widgets.token_table(tokenizer, ["你好"]).value
    assert ">e5<" in table and "\ufffd" not in table


def test_token_pieces_regroup_into_the_text(tokenizer):
    text = "naïve 你好, Привет 😀!"
    runs = views.whole_characters(tokenizer, tokenizer.encode(text))
    assert "".join(tokenizer.decode(run) for run in runs) == text
    assert [len(run) for run in runs if tokenizer.decode(run) == "😀"] == [4]


# --- stage 3 and 4 ------------------------------------------------------------------------------------


def test_sampler_writes_the_page_and_is_busy_meanwhile(tokenizer, monkeypatch):
    from labkit import pretrain

    watched = {}
    seen = spy(monkeypatch, pretrain, "complete", watched)
    box = widgets.sampler(tiny_gpt(tokenizer), tokenizer)
    text, controls_row, out = box.children
    temperature, seed, button = controls_row.children
    watched["button"] = button
    assert labels_are_whole(box)
    text.value, temperature.value = "https://mathsheets.org/sheet/", 0.0
    button.click()
    assert seen == [(True, "writing...")]  # disabled and saying so while the model writes
    assert (button.disabled, button.description) == (False, "continue the page")  # back afterwards
    assert out.value.startswith("<pre") and "<b>https://mathsheets.org/sheet/</b>" in out.value
    greedy = out.value
    seed.value = 5
    button.click()
    assert out.value == greedy  # temperature 0: the same page whatever the seed


def test_side_by_side_samples_both_models_and_is_busy_meanwhile(tokenizer, monkeypatch):
    from labkit import engine

    watched = {}
    seen = spy(monkeypatch, engine, "chat", watched)
    box = widgets.side_by_side(tiny_gpt(tokenizer, 1), tiny_gpt(tokenizer, 2), tokenizer, "Who are you?", 2)
    text, (temperature, top_k, samples, button), halves = box.children[0], box.children[1].children, box.children[2]
    left, right = (half.children[0] for half in halves.children)
    watched["button"] = button
    assert labels_are_whole(box) and left.value.count("<li>") == 2
    text.value, samples.value, temperature.value, top_k.value = "Where was Ada born?", 3, 1.2, 5
    button.click()
    assert seen == [(True, "sampling...")] * 3  # one reply per sample, each while the button is busy
    assert (button.disabled, button.description) == (False, "generate")
    assert left.value.count("<li>") == 3 and right.value.count("<li>") == 3
    assert left.value.count("Where was Ada born?") == 3  # the base model continues the prompt as a document


def test_a_failing_action_still_frees_its_button():
    button = w.Button(description="ask")
    with pytest.raises(RuntimeError), widgets.busy(button):
        assert button.disabled and button.description == "sampling..."
        raise RuntimeError("the model failed")
    assert not button.disabled and button.description == "ask"


def shown_figure(output) -> dict:
    """The plotly figure an Output widget holds, as the browser receives it (one output only)."""
    (shown,) = output.outputs
    return shown["data"]["application/vnd.plotly.v1+json"]


def test_live_loss_and_live_grpo_draw_labelled_lines():
    loss = widgets.LiveLoss()
    history = [dict(step=0, val_loss=5.0), dict(step=1, loss=4.0), dict(step=2, loss=3.5, val_loss=3.6)]
    loss.update(dict(history=history, step=2, sample="<b>a page</b>"))
    loss.update(dict(history=history, step=2))  # redrawn in place: still one figure
    figure = shown_figure(loss.plot)
    assert [t["name"] for t in figure["data"]] == ["train", "validation"]
    assert "&lt;b&gt;a page&lt;/b&gt;" in loss.sample.value and figure["layout"]["xaxis"]["dtick"] == 1
    grpo = widgets.LiveGRPO()
    rows = [
        dict(
            step=s,
            reward=0.5,
            reward_correct=0.4,
            reward_format=0.5,
            response_tokens=20,
            kl=0.01 * s,
            zero_variance_fraction=0.25,
            zero_variance_groups=1,
            groups=4,
        )
        for s in (1, 2, 3)
    ]
    rows[0].update(pass_at_1=0.5, heldout_response_tokens=18)
    grpo.update(dict(history=rows, row=rows[-1], step=3))
    figure = shown_figure(grpo.plot)
    labelled = {t["name"] for t in figure["data"] if t.get("showlegend") is not False}
    assert {"reward: weighted sum", "reward: correct", "reward: format"} <= labelled
    assert [list(t["y"]) for t in figure["data"] if t["name"] == "groups that teach nothing"] == [[25.0, 25.0, 25.0]]


# --- stage 6 ------------------------------------------------------------------------------------------


def scored_group(texts: list[str]) -> dict:
    from labkit.groups import group_view, score_groups

    task = dict(task="addition", prompt="What is 1 + 0?", answer="1")
    samples = [dict(task=task, text=t, ids=[1, 2, 3], ended=True) for t in texts]
    score_groups(samples, {"correct": 1.0, "format": 0.2}, len(texts))  # 1.2 for a right answer: not exact in float32
    return group_view(samples, 0, len(texts))


def test_group_browser_marks_every_group_that_teaches_nothing():
    right, mixed = "The answer is 1.", ["The answer is 1.", "no idea"]
    groups = [scored_group([right] * 4), scored_group(mixed * 2), scored_group(["no"] * 4)]
    old = dict(scored_group([right] * 4), step=3)  # saved before the flag, with the rounding's advantages
    del old["zero_variance"]
    for s in old["samples"]:
        s["advantage"] = 0.0012
    browser = widgets.group_browser(groups + [old])
    (index, summary), view = browser.children[0].children, browser.children[1]
    assert "3 of 4 groups teach nothing" in summary.value and labels_are_whole(browser)
    for i, nothing in enumerate([True, False, True, True]):
        index.value = i
        assert ("this group teaches nothing" in view.value) == nothing
        assert ("+0.00" in view.value or "-0.00" in view.value) is False
        assert (views.NOTHING in view.value) == nothing
    index.value = 1
    assert view.value.count("rgb(135,255,135)") == 2 and view.value.count("rgb(255,135,135)") == 2
    assert "<b>+1.00</b>" not in view.value and "<b>+0.87</b>" in view.value  # (1.2 - 0.6) / std, Bessel's


def test_group_browser_with_one_group_or_none():
    assert "no groups" in widgets.group_browser([]).children[0].value
    [summary] = controls(widgets.group_browser([scored_group(["no"] * 3)]), w.HTML)[:1]
    assert "1 of 1 group teaches nothing" in summary.value


# --- stage 7 ------------------------------------------------------------------------------------------


def test_ask_the_model_offers_search_only_to_the_tool_model_and_is_busy_meanwhile(tiny_run, tokenizer, monkeypatch):
    from labkit import halluc
    from labkit.search import SearchIndex

    world = read_world(tiny_run)
    index = SearchIndex(read_corpus(tiny_run), 2)
    watched = {}
    seen_probe = spy(monkeypatch, halluc, "probe", watched)
    seen_search = spy(monkeypatch, halluc, "probe_with_search", watched)
    models = {"sft": tiny_gpt(tokenizer, 1), "search": tiny_gpt(tokenizer, 2)}
    box = widgets.ask_the_model(models, tokenizer, world, index, n_samples=2, max_new_tokens=6)
    (person, fact), row, view = box.children[0].children, box.children[1], box.children[2]
    model, button = row.children[0], row.children[-1]
    watched["button"] = button
    assert labels_are_whole(box)
    assert model.value == "sft" and controls(box.children[1], w.Checkbox) == []  # no tool, no search switch
    someone = sorted(world.people, key=lambda p: p.n_pages)[0]
    person.value, fact.value = someone.name, "birth_city"
    button.click()
    assert seen_probe == [(True, "sampling...")] and (button.disabled, button.description) == (False, "ask")
    assert someone.name in view.value and "search call" not in view.value
    model.value = "search"
    [search] = controls(box.children[1], w.Checkbox)
    assert search.description == "search tool on" and search.value
    button.click()
    assert seen_search == [(True, "sampling...")] and not button.disabled
    search.value = False
    model.value = "sft"
    assert controls(box.children[1], w.Checkbox) == []
