"""What the widgets show, as HTML strings: a page and what cleaning did to it, a text cut into
tokens, a conversation's loss mask, a GRPO group, an answer token by token. Plain functions of
the stages' artifacts (no ipywidgets), so that a test reads exactly what a person sees.
"""

from __future__ import annotations

import html


def _span(text: str, style: str = "", title: str = "") -> str:
    return f'<span style="{style}" title="{html.escape(title)}">{html.escape(text)}</span>'


# --- stage 1: data ----------------------------------------------------------------------------


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
    text, parts, last = page.get("extracted") or page["text"], [], 0  # redactions index the cleaned text
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


# --- stage 2: tokenizer -----------------------------------------------------------------------


TOKEN_COLOURS = ["#ffd6a5", "#caffbf", "#9bf6ff", "#bdb2ff", "#ffc6ff", "#fdffb6", "#a0c4ff", "#ffadad"]


def whole_characters(tokenizer, ids: list[int]) -> list[list[int]]:
    """`ids` cut into runs whose bytes make whole UTF-8 characters: a token that stops inside a
    character (a Chinese character is 3 bytes, often 3 tokens) runs on with the tokens that end it."""
    runs, run, pending = [], [], b""
    for token in ids:
        run, pending = run + [token], pending + tokenizer.token_bytes(token)
        try:
            pending.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            continue
        runs.append(run)
        run, pending = [], b""
    return runs + ([run] if run else [])


def _token_span(tokenizer, token: int, colour: str, part_of: str | None = None) -> str:
    """One token as a coloured span, hovering shows its id and bytes; a token that is only a piece
    of the character `part_of` shows its bytes in hex."""
    raw = tokenizer.token_bytes(token)
    style, title = (
        f"background:{colour};border-radius:3px;padding:1px 0;margin-right:1px",
        f"id {token} · bytes {raw!r}",
    )
    if part_of is None:
        return _span(tokenizer.decode([token]).replace("\n", "\u21b5\n"), style, title)  # a visible newline mark
    return _span(raw.hex(" "), style + ";font-size:75%;padding:1px 2px", f"{title} · part of {part_of!r}")


def _character_box(pieces: list[str], made: str) -> str:
    """The pieces of a character in a dashed box that ends with the character they make."""
    codes = " ".join(f"U+{ord(c):04X}" for c in made)
    return (
        '<span style="border:1px dashed #888;border-radius:3px;padding:1px;margin-right:2px">'
        f"{''.join(pieces)}={_span(made, 'font-weight:bold;margin:0 2px', f'{len(pieces)} tokens make {codes}')}</span>"
    )


def token_spans(tokenizer, text: str) -> str:
    """`text` as one coloured span per token; hovering shows the token's id and bytes. Tokens that
    are pieces of a character (not whole UTF-8) show their bytes, boxed with the character they make."""
    spans, n = [], 0
    for run in whole_characters(tokenizer, tokenizer.encode(text)):
        colours = [TOKEN_COLOURS[(n + i) % len(TOKEN_COLOURS)] for i in range(len(run))]
        n += len(run)
        if len(run) == 1:
            spans.append(_token_span(tokenizer, run[0], colours[0]))
        else:
            made = tokenizer.decode(run)
            spans.append(_character_box([_token_span(tokenizer, t, c, made) for t, c in zip(run, colours)], made))
    return f'<span style="font-family:monospace;white-space:pre-wrap;line-height:1.9">{"".join(spans)}</span>'


def inspector_panel(label: str, tokenizer, text: str) -> str:
    n_tokens, n_bytes = len(tokenizer.encode(text)), len(text.encode("utf-8", "surrogatepass"))
    stats = f"this text: {n_tokens} tokens for {n_bytes} bytes, {n_bytes / max(n_tokens, 1):.2f} bytes per token"
    return (
        f"<b>{html.escape(label)}</b> <small>(vocabulary of {tokenizer.n_vocab:,})</small>"
        f"<br><small>{stats}</small><br>{token_spans(tokenizer, text)}"
    )


# --- stage 4: sft -----------------------------------------------------------------------------


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


# --- stage 6: grpo ----------------------------------------------------------------------------


def _advantage_colour(advantage: float, scale: float) -> str:
    """Green for better than the group's mean, red for worse, white for zero (no gradient)."""
    t = max(-1.0, min(1.0, advantage / scale)) if scale > 0 else 0.0
    fade = int(255 - 120 * abs(t))
    return f"rgb({fade},255,{fade})" if t > 0 else f"rgb(255,{fade},{fade})" if t < 0 else "rgb(255,255,255)"


def teaches_nothing(group: dict) -> bool:
    """Whether every sample of the group scored the same (so every advantage is 0). Groups saved
    before the flag was written say it by their rewards."""
    return group.get("zero_variance", len({s["reward"] for s in group["samples"]}) <= 1)


NOTHING = "background:#eeeeee;color:#555"


def group_html(group: dict) -> str:
    """One prompt's G samples: each one's text, rewards and advantage, coloured by advantage; a
    group whose samples all scored the same is grey and says that it teaches nothing."""
    samples, nothing = group["samples"], teaches_nothing(group)
    scale = max([abs(s["advantage"]) for s in samples] + [1e-9])
    names = list(samples[0]["rewards"]) if samples else []
    head = (
        f"<div style='font-family:sans-serif;font-size:13px'><b>{html.escape(group['task'])}</b>"
        + (f" &middot; step {group['step']}" if "step" in group else "")
        + f"<br>{html.escape(group['prompt'])}<br>answer: <b>{html.escape(str(group['answer']))}</b></div>"
    )
    note = (
        f"<div style='{NOTHING};padding:3px 6px;margin-top:4px;font-family:sans-serif;font-size:13px'>"
        f"<b>this group teaches nothing</b>: all {len(samples)} samples scored "
        f"{samples[0]['reward']:.2f}, so every advantage is 0 and no gradient comes from it</div>"
        if nothing and samples
        else ""
    )

    def row(i: int, s: dict) -> str:
        style = NOTHING if nothing else f"background:{_advantage_colour(s['advantage'], scale)}"
        advantage = "0" if nothing or s["advantage"] == 0 else f"{s['advantage']:+.2f}"
        return (
            f"<tr style='{style}'><td>{i + 1}</td>"
            + "".join(f"<td>{s['rewards'][n]:g}</td>" for n in names)
            + f"<td>{s['reward']:.2f}</td><td><b>{advantage}</b></td><td>{s['tokens']}</td>"
            f"<td style='text-align:left;white-space:pre-wrap'>{html.escape(s['text'])}</td></tr>"
        )

    header = "".join(f"<th>{html.escape(n)}</th>" for n in ["#", *names, "reward", "advantage", "tokens", "reply"])
    rows = "".join(row(i, s) for i, s in enumerate(samples))
    return (
        f"{head}{note}<table style='border-collapse:collapse;font-size:12px;margin-top:4px' border=1>"
        f"<tr>{header}</tr>{rows}</table>"
    )


# --- stage 7: hallucinations ------------------------------------------------------------------


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
