"""ipywidgets for the notebooks. Only this module and `plots.py` import ipywidgets.

Each function returns a widget ready to display; the logic it shows lives in the stages.
"""

from __future__ import annotations

import html

import ipywidgets as w


def _span(text: str, style: str = "", title: str = "") -> str:
    return f'<span style="{style}" title="{html.escape(title)}">{html.escape(text)}</span>'


# --- stage 1: data ---------------------------------------------------------------------------

# --- stage 2: tokenizer ----------------------------------------------------------------------

# --- stage 3: pretraining --------------------------------------------------------------------
