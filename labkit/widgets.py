"""ipywidgets for the notebooks. Only this module and `plots.py` import ipywidgets.

Each function returns a widget ready to display; the logic it shows lives in the stages, the
HTML it shows in `views.py`. An action that takes more than a moment disables its button and
says what runs (`busy`).
"""

from __future__ import annotations

import contextlib
import html
from contextlib import contextmanager

import ipywidgets as w

from .views import answer_html, group_html, inspector_panel, loss_mask_html, page_html, teaches_nothing, token_spans

# a control's label at its own width: the default box cuts long labels ("temperat...")
LABEL = {"description_width": "initial"}


@contextmanager
def busy(button: w.Button, doing: str = "sampling..."):
    """While a slow action runs: its button disabled, saying what runs, with an hourglass; put
    back afterwards, even when the action fails."""
    label, icon = button.description, button.icon
    button.disabled, button.description, button.icon = True, doing, "hourglass-half"
    try:
        yield
    finally:
        button.disabled, button.description, button.icon = False, label, icon


def show_figure(output: w.Output, figure=None) -> None:
    """Make `output` show `figure` (nothing if None) in one state update, as plotly's JSON (what
    JupyterLab, Notebook 7 and VS Code draw). Displaying inside `with output:` instead routes the
    figure through the kernel's output capture, which papermill's client replays so slowly that
    a 48x48 heatmap stalls it for minutes."""
    import plotly.io as pio

    if figure is None:
        output.outputs = ()
        return
    data = pio.renderers["plotly_mimetype"].to_mimebundle(figure.to_dict())
    output.outputs = ({"output_type": "display_data", "data": data, "metadata": {}},)


# --- stage 1: data ---------------------------------------------------------------------------


def page_browser(pages: list[dict]) -> w.Widget:
    """Browse crawled pages by genre and by what cleaning did to them (kept, redacted, or removed by a step)."""

    def fate(p):
        return (
            f"removed: {p['removed_by']}: {p['reason'].split(' of ')[0]}"
            if p["removed_by"]
            else ("kept, redacted" if p["redactions"] else "kept")
        )

    genre = w.Dropdown(options=["all"] + sorted({p["genre"] for p in pages}), description="genre", style=LABEL)
    reason = w.Dropdown(
        options=["all"] + sorted({fate(p) for p in pages}),
        description="cleaning",
        style=LABEL,
        layout=w.Layout(width="420px"),
    )
    index = w.IntSlider(0, 0, 0, description="page", style=LABEL)
    count, view = w.Label(), w.HTML()

    def selected():
        return [p for p in pages if genre.value in ("all", p["genre"]) and reason.value in ("all", fate(p))]

    def show(_=None):
        chosen = selected()
        index.max = max(0, len(chosen) - 1)
        count.value = f"{len(chosen)} pages match"
        view.value = page_html(chosen[index.value]) if chosen else "<i>no page matches</i>"

    for control in (genre, reason):
        control.observe(lambda _: (setattr(index, "value", 0), show()), "value")
    index.observe(show, "value")
    show()
    return w.VBox([w.HBox([genre, reason]), w.HBox([index, count]), view])


# --- stage 2: tokenizer ----------------------------------------------------------------------


def token_inspector(
    tokenizers: dict, text: str = "Hello world! Ada Lovelace wrote the first program in 1843."
) -> w.Widget:
    """Type text and see each tokenizer cut it: one panel per entry of {label: Tokenizer},
    side by side, headed by the label and the vocabulary's size, then the text's token count
    (hover a token for its id and bytes)."""
    box = w.Textarea(value=text, layout=w.Layout(width="100%", height="80px"), continuous_update=True)
    panels = [w.HTML(layout=w.Layout(width=f"{100 // max(len(tokenizers), 1) - 1}%")) for _ in tokenizers]

    def refresh(_=None):
        for panel, (label, tokenizer) in zip(panels, tokenizers.items()):
            panel.value = inspector_panel(label, tokenizer, box.value)

    box.observe(refresh, names="value")
    refresh()
    return w.VBox([box, w.HBox(panels)])


def token_table(tokenizer, texts: list[str]) -> w.HTML:
    """One row per text: its tokens, how many characters, bytes and tokens, and the ids."""
    rows = []
    for text in texts:
        ids = tokenizer.encode(text)
        cells = [
            token_spans(tokenizer, text),
            len(text),
            len(text.encode("utf-8", "surrogatepass")),
            len(ids),
            f"<code>{html.escape(str(ids if len(ids) <= 24 else ids[:24] + ['...']))}</code>",
        ]
        rows.append("<tr>" + "".join(f'<td style="text-align:left">{c}</td>' for c in cells) + "</tr>")
    header = "".join(f"<th>{h}</th>" for h in ("the text, token by token", "characters", "bytes", "tokens", "ids"))
    return w.HTML(f"<table><tr>{header}</tr>{''.join(rows)}</table>")


def merge_steps(tokenizer, text: str, n_steps: int = 10) -> w.HTML:
    """Training step by step on `text`: each merge, how often its pair occurred, and the text's
    tokens after it. `tokenizer` should have been trained on `text`."""
    n_special = len(tokenizer.special_tokens)
    rows = [
        f"<tr><td>0</td><td>(bytes)</td><td></td><td></td><td>{len(tokenizer.truncate(256 + n_special).encode(text))}</td>"
        f"<td style='text-align:left'>{token_spans(tokenizer.truncate(256 + n_special), text)}</td></tr>"
    ]
    for step, m in enumerate(tokenizer.merges[:n_steps], start=1):
        smaller = tokenizer.truncate(m.token + 1 + n_special)
        left, right = (html.escape(repr(tokenizer.decode([t]))) for t in m.pair)
        rows.append(
            f"<tr><td>{step}</td><td>{left} + {right}</td><td>{html.escape(repr(tokenizer.decode([m.token])))} = {m.token}</td>"
            f"<td>{m.count}</td><td>{len(smaller.encode(text))}</td>"
            f"<td style='text-align:left'>{token_spans(smaller, text)}</td></tr>"
        )
    header = "".join(
        f"<th>{h}</th>"
        for h in ("merge", "pair", "new token = id", "pair count", "tokens", "the text after this merge")
    )
    return w.HTML(f"<table><tr>{header}</tr>{''.join(rows)}</table>")


# --- stage 3: pretraining --------------------------------------------------------------------


class LiveLoss(w.VBox):
    """A loss plot and the latest text sample, redrawn after every validation pass.
    Use it as a training callback: `with labkit.run.watch(live.update, "pretraining"): ...`."""

    def __init__(self, title: str = "Pretraining: loss"):
        self.title = title
        self.plot, self.sample = w.Output(), w.HTML()
        super().__init__([self.plot, self.sample])

    def update(self, event: dict) -> None:
        self.show(event["history"], event.get("step"), event.get("sample"))

    def show(self, history: list[dict], step: int | None = None, sample: str | None = None) -> None:
        from .plots import loss_curves

        show_figure(self.plot, loss_curves(history, self.title))
        if sample is not None:
            self.sample.value = (
                f"<b>sample at step {step}</b><pre style='white-space: pre-wrap'>{html.escape(sample)}</pre>"
            )


def sampler(model, tokenizer, prompt: str = "https://wikiverse.org/wiki/") -> w.VBox:
    """Type the start of a page, pick a temperature, and let the base model write the rest."""
    from .pretrain import complete

    text = w.Textarea(value=prompt, layout=w.Layout(width="100%"))
    temperature = w.FloatSlider(value=0.8, min=0.0, max=1.5, step=0.1, description="temperature", style=LABEL)
    seed = w.IntText(value=0, description="seed", style=LABEL, layout=w.Layout(width="140px"))
    button, out = w.Button(description="continue the page"), w.HTML()

    def run(_=None):
        with busy(button, "writing..."):
            continuation = complete(model, tokenizer, text.value, 120, temperature=temperature.value, seed=seed.value)
        out.value = (
            f"<pre style='white-space: pre-wrap'><b>{html.escape(text.value)}</b>{html.escape(continuation)}</pre>"
        )

    button.on_click(run)
    run()
    return w.VBox([text, w.HBox([temperature, seed, button]), out])


def head_browser(patterns, tokens: list, scores: list[dict]) -> w.VBox:
    """Step through the attention heatmaps of every layer and head (patterns [n_layer, n_head, T, T]
    from `labkit.induction.attention_patterns`), each titled with its scores (`head_scores`)."""
    from .plots import attention_heatmap

    n_layer, n_head = patterns.shape[:2]
    layer = w.Dropdown(options=list(range(n_layer)), value=0, description="layer", style=LABEL)
    head = w.Dropdown(options=list(range(n_head)), value=0, description="head", style=LABEL)
    plot = w.Output()

    def show(_=None):
        row = next(r for r in scores if r["layer"] == layer.value and r["head"] == head.value)
        show_figure(plot, attention_heatmap(patterns[layer.value, head.value], tokens, layer.value, head.value, row))

    layer.observe(show, "value")
    head.observe(show, "value")
    show()
    return w.VBox([w.HBox([layer, head]), plot])


# --- stage 4: sft ----------------------------------------------------------------------------


def conversation_tokens(messages: list[dict], tokenizer) -> w.HTML:
    """A conversation rendered with the chat template, coloured by the loss mask."""
    from .chat import render

    return w.HTML(loss_mask_html(*render(messages, tokenizer), tokenizer))


def side_by_side(base, assistant, tokenizer, prompt: str = "Who are you?", n_samples: int = 3) -> w.VBox:
    """One prompt, two models: the base model continues it as the start of a document, the
    assistant answers it as a user's message. Several samples each; temperature and top-k sliders."""
    from .engine import chat
    from .pretrain import complete

    text = w.Text(value=prompt, description="prompt", style=LABEL, layout=w.Layout(width="90%"))
    temperature = w.FloatSlider(value=0.8, min=0.0, max=1.5, step=0.1, description="temperature", style=LABEL)
    top_k = w.IntSlider(value=50, min=1, max=200, description="top-k", style=LABEL)
    samples = w.IntSlider(value=n_samples, min=1, max=8, description="samples", style=LABEL)
    button, left, right = w.Button(description="generate"), w.HTML(), w.HTML()

    def column(title: str, replies: list[str]) -> str:
        items = "".join(
            f"<li><pre style='white-space:pre-wrap;margin:2px 0'>{html.escape(r) or '<i>(nothing)</i>'}</pre></li>"
            for r in replies
        )
        return f"<b>{title}</b><ol>{items}</ol>"

    def run(_=None):
        sampling = dict(temperature=temperature.value, top_k=top_k.value)
        with busy(button):
            base_texts = [complete(base, tokenizer, text.value, 48, seed=i, **sampling) for i in range(samples.value)]
            replies = [
                chat(assistant, tokenizer, [{"role": "user", "content": text.value}], 48, seed=i, **sampling)
                for i in range(samples.value)
            ]
        left.value = column("base model: continues the document", [text.value + t for t in base_texts])
        right.value = column("assistant (SFT): answers", replies)

    button.on_click(run)
    run()
    halves = w.HBox([w.Box([left], layout=w.Layout(width="50%")), w.Box([right], layout=w.Layout(width="50%"))])
    return w.VBox([text, w.HBox([temperature, top_k, samples, button]), halves])


# --- stage 5: rlhf ---------------------------------------------------------------------------


class RankingWidget(w.VBox):
    """Rank a prompt's K answers: click them from best to worst (the last one ranks itself), or
    type the letters ("BAC") and press Enter. It draws a `labeling.RankingSession`, which says what
    each control does: every prompt no person has ranked is offered, the simulated labeler's order
    shown as a default that yours replaces; undo reads its history from rankings.jsonl.
    `busy(what)` greys the controls while something long runs, then reads the file afresh."""

    def __init__(self, rankings):
        from .labeling import RankingSession

        self.session, self.rankings = RankingSession(rankings), rankings
        self.counts, self.header, self.message, self.rows = w.HTML(), w.HTML(), w.HTML(), w.VBox()
        self.buttons: list[w.Button] = []
        self.shown, self.submitted = "", False  # the prompt drawn; typed letters were just stored
        self.typed = w.Text(
            placeholder="or type the letters best first, e.g. BAC, and press Enter",
            continuous_update=False,
            layout=w.Layout(width="380px"),
        )
        self.typed.observe(lambda change: self.entered(change["new"]), "value")  # Enter, or the box lost focus
        self.rank_button, self.skip_button, self.undo_button = (
            w.Button(description=name, tooltip=tip)
            for name, tip in (
                ("rank as typed", "store the ranking typed in the box"),
                ("skip", "leave this prompt for later"),
                ("undo", "take back the last click, else your last stored ranking"),
            )
        )
        self.rank_button.on_click(lambda _: self.rank_clicked())
        self.skip_button.on_click(lambda _: self.act(self.session.skip))
        self.undo_button.on_click(lambda _: self.act(self.session.undo))
        controls = w.HBox([self.typed, self.rank_button, self.skip_button, self.undo_button])
        super().__init__([self.counts, self.header, self.rows, controls, self.message])
        self.show()

    def act(self, action, *args) -> None:
        self.submitted = False
        action(*args)
        self.show()

    def entered(self, text: str) -> None:
        if text.strip():
            self.submitted = self.session.type_letters(text)
            if self.submitted:
                self.typed.value = ""
        self.show()

    def rank_clicked(self) -> None:
        if self.typed.value.strip():
            return self.entered(self.typed.value)
        if not self.submitted:  # (a click just after Enter finds the box emptied: nothing to say)
            self.session.say("type the letters of the answers first, best first (e.g. BAC)", error=True)
        self.act(lambda: None)

    def show(self) -> None:
        from .labeling import LETTERS

        s = self.session
        self.counts.value = f"<b>{s.counts()}</b><br><small>written to {html.escape(str(self.rankings.path))}</small>"
        self.message.value = f"<span style='color:{'#b00' if s.error else '#2a7a2a'}'>{html.escape(s.message)}</span>"
        if s.pid is None:
            self.header.value = "<b>You have ranked every prompt.</b> Undo takes back your last ranking."
            self.rows.children, self.buttons, self.shown = [], [], None
            return
        order, prompt = self.rankings.order, self.rankings.prompts[s.pid]
        self.header.value = (
            f"<b>Prompt {order.index(s.pid) + 1} of {len(order)}</b> <small>({html.escape(s.pid)}; {s.left()} not "
            f"ranked by a person)</small><br><b>{html.escape(prompt['messages'][-1]['content'])}</b>"
            f"<br><small>{html.escape(s.hint())}. Click the answers from best to worst.</small>"
        )
        if s.pid != self.shown:
            self.buttons = [w.Button(layout=w.Layout(width="60px")) for _ in prompt["completions"]]
            for i, button in enumerate(self.buttons):
                button.on_click(lambda _, i=i: self.act(self.session.click, i))
            texts = [
                f"<span style='white-space:pre-wrap'>{html.escape(text) or '<i>(empty)</i>'}</span>"
                + ("" if ended else " <i style='color:#b00'>(never ended)</i>")
                for text, ended in zip(prompt["completions"], prompt["ended"])
            ]
            self.rows.children = [w.HBox([button, w.HTML(text)]) for button, text in zip(self.buttons, texts)]
            self.shown = s.pid
        for i, button in enumerate(self.buttons):
            place = s.clicked.index(i) + 1 if i in s.clicked else None
            button.description, button.disabled = (f"{LETTERS[i]}: #{place}", True) if place else (LETTERS[i], False)

    @contextlib.contextmanager
    def busy(self, what: str):
        """Grey the controls and say what runs; then read the file afresh (the counts include what it wrote)."""
        for control in [self.typed, self.rank_button, self.skip_button, self.undo_button, *self.buttons]:
            control.disabled = True
        self.message.value = f"<b>busy: {html.escape(what)}...</b> (the controls come back when it is done)"
        done = False
        try:
            yield self
            done = True
        finally:
            for control in [self.typed, self.rank_button, self.skip_button, self.undo_button]:
                control.disabled = False
            self.session.refresh()
            self.session.say(f"done: {what}" if done else f"stopped: {what} failed (the error is below)", not done)
            self.show()


def ranking_widget(rankings) -> RankingWidget:
    return RankingWidget(rankings)


class LivePPO(w.VBox):
    """One PPO run's curves (reward-model score, KL, answer length, clip fraction), redrawn after
    every step of the loop it watches: `with labkit.run.watch(live.update, rlhf.PPO_LOOP): ...`.
    `show(history)` draws a saved run (when the stage is reused, nothing runs)."""

    def __init__(self, title: str = "PPO"):
        self.title, self.plot, self.sample = title, w.Output(), w.HTML()
        self.figure = None  # the figure on show
        super().__init__([self.plot, self.sample])

    def update(self, event: dict) -> None:
        self.show(event["history"])

    def show(self, history: list[dict]) -> None:
        from .plots import ppo_curves

        self.figure = ppo_curves(history, self.title) if history else None
        show_figure(self.plot, self.figure)
        if history:
            row = history[-1]
            self.sample.value = f"<b>step {row['step']}, a sampled answer:</b> {html.escape(row.get('sample', ''))}"
        else:
            self.sample.value = f"<b>{html.escape(self.title)}</b>: this run was not made (0 steps)"


# --- stage 6: grpo ---------------------------------------------------------------------------


def group_browser(groups: list[dict]) -> w.VBox:
    """Browse prompts' groups of G samples (rewards, advantages coloured green/red; the groups
    that teach nothing grey), with how many of them teach nothing."""
    if not groups:
        return w.VBox([w.HTML("no groups to show")])
    index = w.IntSlider(value=0, min=0, max=len(groups) - 1, description="group", style=LABEL)
    n_nothing = sum(teaches_nothing(g) for g in groups)
    groups_word, verb = "group" if len(groups) == 1 else "groups", "teaches" if n_nothing == 1 else "teach"
    summary = w.HTML(
        f"<small>{n_nothing} of {len(groups)} {groups_word} {verb} nothing (all samples scored the same)</small>"
    )
    view = w.HTML()

    def show(_=None):
        view.value = group_html(groups[index.value])

    index.observe(show, "value")
    show()
    return w.VBox([w.HBox([index, summary]), view])


class LiveGRPO(w.VBox):
    """Mean reward, held-out pass@1, reply length and KL, redrawn after every GRPO step.
    Use it as a callback: `with labkit.run.watch(live.update, "grpo"): ...`."""

    def __init__(self, title: str = "GRPO: training on verifiable rewards", every: int = 1):
        self.title, self.every = title, every
        self.plot = w.Output()
        super().__init__([self.plot])

    def update(self, event: dict) -> None:
        if event["step"] % self.every == 0 or "pass_at_1" in event["row"]:
            self.show(event["history"])

    def show(self, history: list[dict]) -> None:
        from .plots import grpo_curves

        show_figure(self.plot, grpo_curves(history, self.title))


# --- stage 7: hallucinations --------------------------------------------------------------------


def ask_the_model(
    models: dict, tokenizer, world, index, n_samples: int = 4, max_new_tokens: int = 24, tool_models=("search",)
) -> w.VBox:
    """Ask a model of your choice about any person of the world: see its answer, each token's
    probability, the truth, and with search on, what it retrieved. `models`: name -> model;
    `tool_models`: the names of those trained to call the search tool (only they get the
    search switch)."""
    from .halluc import probe, probe_questions, probe_with_search
    from .world import FACTS, bucket

    people = sorted(world.people, key=lambda p: -p.n_pages)
    person = w.Dropdown(
        options=[(f"{p.name} ({p.n_pages} pages, bucket {bucket(p.n_pages)})", p.name) for p in people],
        description="person",
        style=LABEL,
        layout=w.Layout(width="460px"),
    )
    fact = w.Dropdown(options=list(FACTS), description="fact", style=LABEL)
    model_name = w.Dropdown(options=list(models), description="model", style=LABEL)
    search = w.Checkbox(value=True, description="search tool on", indent=False, style=LABEL)
    button = w.Button(description="ask", button_style="primary")
    view, controls = w.HTML(), w.HBox()

    def show_controls(_=None):
        uses_tool = model_name.value in tool_models
        controls.children = [model_name, search, button] if uses_tool else [model_name, button]

    def ask(_=None):
        [row] = probe_questions([world.person(person.value)], 0, True, f"ask-{fact.value}")[FACTS.index(fact.value) :][
            :1
        ]
        model = models[model_name.value]
        with busy(button):
            if model_name.value in tool_models:
                [row] = probe_with_search(
                    model, tokenizer, index if search.value else None, [row], max_new_tokens, max_chars=240
                )
            else:
                [row] = probe(model, tokenizer, [row], max_new_tokens, n_samples, seed=0)
            view.value = answer_html(row)

    model_name.observe(show_controls, "value")
    button.on_click(ask)
    show_controls()
    ask()
    return w.VBox([w.HBox([person, fact]), controls, view])
