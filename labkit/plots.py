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

# --- stage 2: tokenizer ----------------------------------------------------------------------

# --- stage 3: pretraining --------------------------------------------------------------------
