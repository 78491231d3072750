"""ipywidgets for the notebooks. Only this module and `plots.py` import ipywidgets.

Each function returns a widget ready to display; the logic it shows lives in the stages.
"""

from __future__ import annotations

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
    head = f"<b>{html.escape(page['url'])}</b> &middot; genre <i>{page['genre']}</i> &middot; label <i>{page['label']}</i>"
    if page["removed_by"]:
        head += f' &middot; <span style="color:#b00">removed by {page["removed_by"]}: {html.escape(page["reason"])}</span>'
    text, parts, last = page["text"], [], 0
    for start, end, kind, _ in page["redactions"]:
        parts += [html.escape(text[last:start]), _span(text[start:end], REDACTED, f"{kind}: redacted"),
                  _span(f"<{kind.upper()}>", PLACEHOLDER, "placeholder in the cleaned corpus")]
        last = end
    parts.append(html.escape(text[last:]))
    style = "color:#999" if page["removed_by"] else ""
    return (f'<div style="font-family:sans-serif;font-size:13px">{head}</div>'
            f'<div style="white-space:pre-wrap;border:1px solid #ddd;padding:8px;margin-top:4px;{style}">{"".join(parts)}</div>')


def page_browser(pages: list[dict]) -> w.Widget:
    """Browse crawled pages by genre and by what cleaning did to them (kept, redacted, or removed by a step)."""
    def fate(p):
        return f"removed: {p['removed_by']}: {p['reason'].split(' of ')[0]}" if p["removed_by"] else (
            "kept, redacted" if p["redactions"] else "kept")

    genre = w.Dropdown(options=["all"] + sorted({p["genre"] for p in pages}), description="genre")
    reason = w.Dropdown(options=["all"] + sorted({fate(p) for p in pages}), description="cleaning",
                        layout=w.Layout(width="420px"))
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

# --- stage 3: pretraining --------------------------------------------------------------------

class LiveLoss(w.VBox):
    """A loss plot and the latest text sample, redrawn after every validation pass.
    Use it as a training callback: `with labkit.train.watch(live.update): ...`."""

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
            self.sample.value = (f"<b>sample at step {step}</b><pre style='white-space: pre-wrap'>"
                                 f"{html.escape(sample)}</pre>")


def sampler(model, tokenizer, prompt: str = "https://wikiverse.org/wiki/") -> w.VBox:
    """Type the start of a page, pick a temperature, and let the base model write the rest."""
    from .pretrain import complete

    text = w.Textarea(value=prompt, layout=w.Layout(width="100%"))
    temperature = w.FloatSlider(value=0.8, min=0.0, max=1.5, step=0.1, description="temperature")
    seed = w.IntText(value=0, description="seed")
    button, out = w.Button(description="continue the page"), w.HTML()

    def run(_=None):
        continuation = complete(model, tokenizer, text.value, 120, temperature=temperature.value, seed=seed.value)
        out.value = (f"<pre style='white-space: pre-wrap'><b>{html.escape(text.value)}</b>"
                     f"{html.escape(continuation)}</pre>")

    button.on_click(run)
    run()
    return w.VBox([text, w.HBox([temperature, seed, button]), out])
