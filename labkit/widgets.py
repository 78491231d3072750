"""ipywidgets for the notebooks. Only this module and `plots.py` import ipywidgets.

Each function returns a widget ready to display; the logic it shows lives in the stages.
"""

from __future__ import annotations

import contextlib
import html

import ipywidgets as w


def _span(text: str, style: str = "", title: str = "") -> str:
    return f'<span style="{style}" title="{html.escape(title)}">{html.escape(text)}</span>'


# --- stage 1: data ---------------------------------------------------------------------------

REDACTED = "background:#ffd6d6;text-decoration:line-through"
PLACEHOLDER = "background:#d6e4ff;font-weight:bold"


def page_html(page: dict) -> str:
    """A crawled page as HTML: removed pages greyed with the step and reason; each redacted
    span struck through in red, followed by its placeholder in blue."""
    head = (
        f"<b>{html.escape(page['url'])}</b> &middot; genre <i>{page['genre']}</i> &middot; label <i>{page['label']}</i>"
    )
    if page["removed_by"]:
        head += (
            f' &middot; <span style="color:#b00">removed by {page["removed_by"]}: {html.escape(page["reason"])}</span>'
        )
    text, parts, last = page["text"], [], 0
    for start, end, kind, _ in page["redactions"]:
        parts += [
            html.escape(text[last:start]),
            _span(text[start:end], REDACTED, f"{kind}: redacted"),
            _span(f"<{kind.upper()}>", PLACEHOLDER, "placeholder in the cleaned corpus"),
        ]
        last = end
    parts.append(html.escape(text[last:]))
    style = "color:#999" if page["removed_by"] else ""
    return (
        f'<div style="font-family:sans-serif;font-size:13px">{head}</div>'
        f'<div style="white-space:pre-wrap;border:1px solid #ddd;padding:8px;margin-top:4px;{style}">{"".join(parts)}</div>'
    )


def page_browser(pages: list[dict]) -> w.Widget:
    """Browse crawled pages by genre and by what cleaning did to them (kept, redacted, or removed by a step)."""

    def fate(p):
        return (
            f"removed: {p['removed_by']}: {p['reason'].split(' of ')[0]}"
            if p["removed_by"]
            else ("kept, redacted" if p["redactions"] else "kept")
        )

    genre = w.Dropdown(options=["all"] + sorted({p["genre"] for p in pages}), description="genre")
    reason = w.Dropdown(
        options=["all"] + sorted({fate(p) for p in pages}), description="cleaning", layout=w.Layout(width="420px")
    )
    index = w.IntSlider(0, 0, 0, description="page")
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

TOKEN_COLOURS = ["#ffd6a5", "#caffbf", "#9bf6ff", "#bdb2ff", "#ffc6ff", "#fdffb6", "#a0c4ff", "#ffadad"]


def token_spans(tokenizer, text: str) -> str:
    """`text` as one coloured span per token; hovering shows the token's id and bytes."""
    spans = []
    for i, token in enumerate(tokenizer.encode(text)):
        piece = tokenizer.decode([token]).replace("\n", "\u21b5\n")  # a visible newline mark
        style = f"background:{TOKEN_COLOURS[i % len(TOKEN_COLOURS)]};border-radius:3px;padding:1px 0;margin-right:1px"
        spans.append(_span(piece, style, f"id {token} · bytes {tokenizer.token_bytes(token)!r}"))
    return f'<span style="font-family:monospace;white-space:pre-wrap;line-height:1.9">{"".join(spans)}</span>'


def _inspector_panel(label: str, tokenizer, text: str) -> str:
    n_tokens, n_bytes = len(tokenizer.encode(text)), len(text.encode("utf-8", "surrogatepass"))
    stats = f"{n_tokens} tokens · {n_bytes} bytes · {n_bytes / max(n_tokens, 1):.2f} bytes/token"
    return f"<b>{html.escape(label)}</b> <small>({stats})</small><br>{token_spans(tokenizer, text)}"


def token_inspector(
    tokenizers: dict, text: str = "Hello world! Ada Lovelace wrote the first program in 1843."
) -> w.Widget:
    """Type text and see each tokenizer cut it: one panel per entry of {label: Tokenizer},
    side by side (hover a token for its id and bytes)."""
    box = w.Textarea(value=text, layout=w.Layout(width="100%", height="80px"), continuous_update=True)
    panels = [w.HTML(layout=w.Layout(width=f"{100 // max(len(tokenizers), 1) - 1}%")) for _ in tokenizers]

    def refresh(_=None):
        for panel, (label, tokenizer) in zip(panels, tokenizers.items()):
            panel.value = _inspector_panel(label, tokenizer, box.value)

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
    header = "".join(f"<th>{h}</th>" for h in ("tokens", "characters", "bytes", "tokens", "ids"))
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
        from IPython.display import display

        from .plots import loss_curves

        with self.plot:
            self.plot.clear_output(wait=True)
            display(loss_curves(history, self.title))
        if sample is not None:
            self.sample.value = (
                f"<b>sample at step {step}</b><pre style='white-space: pre-wrap'>{html.escape(sample)}</pre>"
            )


def sampler(model, tokenizer, prompt: str = "https://wikiverse.org/wiki/") -> w.VBox:
    """Type the start of a page, pick a temperature, and let the base model write the rest."""
    from .pretrain import complete

    text = w.Textarea(value=prompt, layout=w.Layout(width="100%"))
    temperature = w.FloatSlider(value=0.8, min=0.0, max=1.5, step=0.1, description="temperature")
    seed = w.IntText(value=0, description="seed")
    button, out = w.Button(description="continue the page"), w.HTML()

    def run(_=None):
        continuation = complete(model, tokenizer, text.value, 120, temperature=temperature.value, seed=seed.value)
        out.value = (
            f"<pre style='white-space: pre-wrap'><b>{html.escape(text.value)}</b>{html.escape(continuation)}</pre>"
        )

    button.on_click(run)
    run()
    return w.VBox([text, w.HBox([temperature, seed, button]), out])


# --- stage 4: sft ----------------------------------------------------------------------------

LEARNED = "background:#c8f0c8"  # the assistant's tokens: in the loss
READ = "background:#eeeeee;color:#666"  # everything else: context only


def loss_mask_html(ids: list[int], mask: list[int], tokenizer) -> str:
    """Every token of a rendered conversation as a box: green where the loss counts (the assistant
    writes it), grey where the model only reads it; special tokens in bold."""
    special = set(tokenizer.special_tokens.values())
    boxes = []
    for token, learned in zip(ids, mask):
        text = tokenizer.decode([token])
        style = (LEARNED if learned else READ) + ";border:1px solid #fff;padding:1px 0;white-space:pre"
        style += ";font-weight:bold" if token in special else ""
        boxes.append(
            _span(text.replace("\n", "\\n"), style, f"id {token}, {'in the loss' if learned else 'not in the loss'}")
        )
        if token == tokenizer.special_tokens.get("<|im_end|>"):
            boxes.append("<br>")
    legend = (
        f"{_span('assistant tokens: in the loss', LEARNED)} &nbsp; {_span('read only: no loss', READ)} "
        f"&nbsp; {sum(mask)} of {len(ids)} tokens are learned"
    )
    return (
        f'<div style="font-family:monospace;font-size:13px;line-height:1.9">{"".join(boxes)}</div>'
        f'<div style="font-family:sans-serif;font-size:12px;margin-top:6px">{legend}</div>'
    )


def conversation_tokens(messages: list[dict], tokenizer) -> w.HTML:
    """A conversation rendered with the chat template, coloured by the loss mask."""
    from .chat import render

    return w.HTML(loss_mask_html(*render(messages, tokenizer), tokenizer))


def side_by_side(base, assistant, tokenizer, prompt: str = "Who are you?", n_samples: int = 3) -> w.VBox:
    """One prompt, two models: the base model continues it as the start of a document, the
    assistant answers it as a user's message. Several samples each; temperature and top-k sliders."""
    from .engine import chat
    from .pretrain import complete

    text = w.Text(value=prompt, description="prompt", layout=w.Layout(width="90%"))
    temperature = w.FloatSlider(value=0.8, min=0.0, max=1.5, step=0.1, description="temperature")
    top_k = w.IntSlider(value=50, min=1, max=200, description="top-k")
    samples = w.IntSlider(value=n_samples, min=1, max=8, description="samples")
    button, left, right = w.Button(description="generate"), w.HTML(), w.HTML()

    def column(title: str, replies: list[str]) -> str:
        items = "".join(
            f"<li><pre style='white-space:pre-wrap;margin:2px 0'>{html.escape(r) or '<i>(nothing)</i>'}</pre></li>"
            for r in replies
        )
        return f"<b>{title}</b><ol>{items}</ol>"

    def run(_=None):
        sampling = dict(temperature=temperature.value, top_k=top_k.value)
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
        from IPython.display import display

        from .plots import ppo_curves

        with self.plot:
            self.plot.clear_output(wait=True)
            if history:
                self.figure = ppo_curves(history, self.title)
                display(self.figure)
        if history:
            row = history[-1]
            self.sample.value = f"<b>step {row['step']}, a sampled answer:</b> {html.escape(row.get('sample', ''))}"
        else:
            self.figure = None
            self.sample.value = f"<b>{html.escape(self.title)}</b>: this run was not made (0 steps)"


# --- stage 6: grpo ---------------------------------------------------------------------------


def _advantage_colour(advantage: float, scale: float) -> str:
    """Green for better than the group's mean, red for worse, white for zero (no gradient)."""
    t = max(-1.0, min(1.0, advantage / scale)) if scale > 0 else 0.0
    fade = int(255 - 120 * abs(t))
    return f"rgb({fade},255,{fade})" if t > 0 else f"rgb(255,{fade},{fade})" if t < 0 else "rgb(255,255,255)"


def group_html(group: dict) -> str:
    """One prompt's G samples: each one's text, rewards and advantage, coloured by advantage."""
    samples = group["samples"]
    scale = max([abs(s["advantage"]) for s in samples] + [1e-9])
    names = list(samples[0]["rewards"]) if samples else []
    head = (
        f"<div style='font-family:sans-serif;font-size:13px'><b>{html.escape(group['task'])}</b>"
        + (f" &middot; step {group['step']}" if "step" in group else "")
        + f"<br>{html.escape(group['prompt'])}<br>answer: <b>{html.escape(str(group['answer']))}</b></div>"
    )
    rows = "".join(
        f"<tr style='background:{_advantage_colour(s['advantage'], scale)}'><td>{i + 1}</td>"
        + "".join(f"<td>{s['rewards'][n]:g}</td>" for n in names)
        + f"<td>{s['reward']:.2f}</td><td><b>{s['advantage']:+.2f}</b></td><td>{s['tokens']}</td>"
        f"<td style='text-align:left;white-space:pre-wrap'>{html.escape(s['text'])}</td></tr>"
        for i, s in enumerate(samples)
    )
    header = "".join(f"<th>{html.escape(n)}</th>" for n in ["#", *names, "reward", "advantage", "tokens", "reply"])
    zero = all(abs(s["advantage"]) < 1e-9 for s in samples)
    note = (
        "<div style='color:#b00'>every sample scored the same: all advantages are 0, this group teaches nothing</div>"
        if zero
        else ""
    )
    return (
        f"{head}<table style='border-collapse:collapse;font-size:12px;margin-top:4px' border=1>"
        f"<tr>{header}</tr>{rows}</table>{note}"
    )


def group_browser(groups: list[dict]) -> w.VBox:
    """Browse prompts' groups of G samples (rewards, advantages coloured green/red)."""
    if not groups:
        return w.VBox([w.HTML("no groups to show")])
    index = w.IntSlider(value=0, min=0, max=len(groups) - 1, description="group")
    view = w.HTML()

    def show(_=None):
        view.value = group_html(groups[index.value])

    index.observe(show, "value")
    show()
    return w.VBox([index, view])


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
        from IPython.display import display

        from .plots import grpo_curves

        with self.plot:
            self.plot.clear_output(wait=True)
            display(grpo_curves(history, self.title))


# --- stage 7: hallucinations --------------------------------------------------------------------


def _prob_colour(p: float) -> str:
    """Red for an unlikely token, green for a sure one."""
    p = max(0.0, min(1.0, p))
    return f"rgb({int(255 - 120 * p)},{int(135 + 120 * p)},135)"


def answer_html(row: dict) -> str:
    """An answer token by token (coloured by the probability the model gave it), its verdict, the
    world's truth and, if the model searched, its call and the passages it read."""
    tokens = "".join(
        _span(t, f"background:{_prob_colour(p)};border-right:1px solid #fff", f"p = {p:.3f}")
        for t, p in zip(row["tokens"], row["token_probs"])
    )
    colour = dict(correct="#2a9d3f", idk="#666", wrong="#d62728")[row["verdict"]]
    verdict = dict(correct="correct", idk='"I don\'t know"', wrong="wrong: a hallucination")[row["verdict"]]
    out = (
        f"<div style='font-family:sans-serif;font-size:13px'><b>Q:</b> {html.escape(row['question'])}<br>"
        f"<b>A:</b> <span style='font-family:monospace'>{tokens or '(empty)'}</span><br>"
        f"<b style='color:{colour}'>{verdict}</b> &middot; confidence {row['confidence'] if row['confidence'] is not None else '-'}"
        f" &middot; the world says: <b>{html.escape(str(row['truth']))}</b> ({row['n_pages']} pages about {html.escape(row['name'])})"
    )
    if row.get("consistency") is not None:
        out += (
            f"<br>{len(row['samples'])} samples, {100 * row['consistency']:.0f}% make the same claim: "
            + html.escape(" | ".join(row["samples"]))
        )
    if row.get("call") and row["call"] != "answer":
        out += f"<br><b>search call</b> ({row['call']}): {html.escape(str(row.get('query')))}<br><b>tool result:</b> {html.escape(str(row['tool_result']))}"
        for p in row.get("passages", []):
            out += (
                f"<br>&nbsp;&nbsp;{p['score']:.2f} <a href='{html.escape(p['url'])}'>{html.escape(p['title'])}</a>: "
                f"{html.escape(p['text'])}"
            )
    return out + "</div>"


def ask_the_model(models: dict, tokenizer, world, index, n_samples: int = 4, max_new_tokens: int = 24) -> w.VBox:
    """Ask a model of your choice about any person of the world: see its answer, each token's
    probability, the truth, and with search on, what it retrieved. `models`: name -> model
    (a model called 'search' is the one trained to call the tool)."""
    from .halluc import probe, probe_questions, probe_with_search
    from .world import FACTS, bucket

    people = sorted(world.people, key=lambda p: -p.n_pages)
    person = w.Dropdown(
        options=[(f"{p.name} ({p.n_pages} pages, bucket {bucket(p.n_pages)})", p.name) for p in people],
        description="person",
    )
    fact = w.Dropdown(options=list(FACTS), description="fact")
    model_name = w.Dropdown(options=list(models), description="model")
    search = w.Checkbox(value=True, description="search tool on (search model)")
    button = w.Button(description="ask", button_style="primary")
    view = w.HTML()

    def ask(_=None):
        [row] = probe_questions([world.person(person.value)], 0, True, f"ask-{fact.value}")[FACTS.index(fact.value) :][
            :1
        ]
        model = models[model_name.value]
        if model_name.value == "search":
            [row] = probe_with_search(
                model, tokenizer, index if search.value else None, [row], max_new_tokens, max_chars=240
            )
        else:
            [row] = probe(model, tokenizer, [row], max_new_tokens, n_samples, seed=0)
        view.value = answer_html(row)

    button.on_click(ask)
    ask()
    return w.VBox([w.HBox([person, fact]), w.HBox([model_name, search, button]), view])
