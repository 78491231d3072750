"""Plotly figures for the notebooks. Only this module and `widgets.py` import plotly.

Every figure labels its axes with units and uses one tidy template.
"""

from __future__ import annotations

import plotly.graph_objects as go

TEMPLATE = "plotly_white"


def _layout(fig: go.Figure, title: str, x: str, y: str, **kw) -> go.Figure:
    fig.update_layout(template=TEMPLATE, title=title, xaxis_title=x, yaxis_title=y,
                      margin=dict(l=60, r=20, t=60, b=50), height=kw.pop("height", 380), **kw)
    return fig


# --- stage 1: data ---------------------------------------------------------------------------


def cleaning_funnel(metrics: dict) -> go.Figure:
    """Pages left after each cleaning step."""
    steps = ["crawled"] + [r["step"] for r in metrics["funnel"]]
    counts = [metrics["pages_in"]] + [r["pages_out"] for r in metrics["funnel"]]
    fig = go.Figure(go.Funnel(y=steps, x=counts, textinfo="value+percent initial"))
    return _layout(fig, "Cleaning funnel: pages left after each step", "pages", "step")


def pages_per_person(world) -> go.Figure:
    """How many pages each person has, on a log scale: a few on dozens, many on one, some on none."""
    counts = [p.n_pages for p in world.people]
    fig = go.Figure(go.Histogram(x=counts, xbins=dict(start=-0.5, end=max(counts) + 0.5, size=1)))
    fig.update_yaxes(type="log")
    return _layout(fig, "Pages per person (heavy tail)", "pages about the person", "people (log scale)", bargap=0.1)

# --- stage 2: tokenizer ----------------------------------------------------------------------

# --- stage 3: pretraining --------------------------------------------------------------------

def loss_curves(history: list[dict], title: str = "Pretraining: loss") -> go.Figure:
    """Training loss at every step and validation loss at every evaluation, in nats per token."""
    train = [r for r in history if "loss" in r]
    val = [r for r in history if "val_loss" in r]
    fig = go.Figure()
    fig.add_scatter(x=[r["step"] for r in train], y=[r["loss"] for r in train], mode="lines", name="train",
                    line=dict(width=1))
    fig.add_scatter(x=[r["step"] for r in val], y=[r["val_loss"] for r in val], mode="lines+markers", name="validation")
    return _layout(fig, title, "optimizer step", "cross-entropy (nats per token)")


def fact_recall_bars(metrics: dict, title: str = "What the base model remembers: facts recalled by page frequency") -> go.Figure:
    """Share of facts recalled per bucket of pages about a person, with the number of people."""
    buckets = list(metrics["fact_recall"])
    shares = [metrics["fact_recall"][b] or 0.0 for b in buckets]
    people = [metrics["fact_recall_people"].get(b, 0) for b in buckets]
    fig = go.Figure(go.Bar(x=buckets, y=[100 * s for s in shares], text=[f"{100 * s:.0f}% of {n} people" for s, n in zip(shares, people)],
                           textposition="outside", marker_color="#4c78a8"))
    fig.update_yaxes(range=[0, 110])
    return _layout(fig, title, "pages about the person on the mini-web", "facts recalled (%)")
