"""Plotly figures for the notebooks. Only this module and `widgets.py` import plotly.

Every figure labels its axes with units and uses one tidy template.
"""

from __future__ import annotations

import plotly.graph_objects as go

TEMPLATE = "plotly_white"


def _layout(fig: go.Figure, title: str, x: str, y: str, **kw) -> go.Figure:
    fig.update_layout(
        template=TEMPLATE,
        title=title,
        xaxis_title=x,
        yaxis_title=y,
        margin=dict(l=60, r=20, t=60, b=50),
        height=kw.pop("height", 380),
        **kw,
    )
    return fig


def _whole_steps(fig: go.Figure, steps: list) -> go.Figure:
    """Steps are whole numbers: on a short run, a tick at every step rather than at 0.5, 1.5, ..."""
    if steps and max(steps) - min(steps) <= 10:
        fig.update_xaxes(tick0=0, dtick=1)
    return fig


def _legend_above(fig: go.Figure, top: int = 100) -> go.Figure:
    """The legend in a row between the title and the plot, where it covers no axis and leaves the
    plot the figure's whole width."""
    return fig.update_layout(
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0), margin=dict(t=top)
    )


def _value_labels(values: list, unit: str = "%", upright: bool = False) -> dict:
    """A bar's value written above it: 0 too, so that an empty bar still says so. `upright` for
    narrow bars (many in a group), so that neighbours' labels never run into each other."""
    return dict(
        text=[None if v is None else f"{v:.0f}{unit}" for v in values],
        textposition="outside",
        textangle=-90 if upright else 0,
        constraintext="none",
        cliponaxis=False,
        textfont_size=11,
    )


# --- stage 1: data ---------------------------------------------------------------------------


def cleaning_funnel(metrics: dict) -> go.Figure:
    """Pages left after each cleaning step."""
    steps = ["crawled"] + [r["step"] for r in metrics["funnel"]]
    counts = [metrics["pages_in"]] + [r["pages_out"] for r in metrics["funnel"]]
    # the counts in a readable size, and a row tall enough to hold them (ten steps since WARC)
    funnel = go.Funnel(y=steps, x=counts, textinfo="value+percent initial", textfont=dict(size=12))
    height = 120 + 40 * len(steps)
    return _layout(go.Figure(funnel), "Cleaning funnel: pages left after each step", "pages", "step", height=height)


def pages_per_person(world) -> go.Figure:
    """How many pages each person has, on a log scale: a few on dozens, many on one, some on none."""
    counts = [p.n_pages for p in world.people]
    fig = go.Figure(go.Histogram(x=counts, xbins=dict(start=-0.5, end=max(counts) + 0.5, size=1)))
    tallest = max(counts.count(n) for n in set(counts))
    ticks = [m * 10**k for k in range(7) for m in (1, 2, 5) if m * 10**k <= 2 * tallest]
    fig.update_yaxes(type="log", tickvals=ticks, ticktext=[f"{t:,}" for t in ticks])  # 20 reads 20, not "2"
    return _layout(fig, "Pages per person (heavy tail)", "pages about the person", "people (log scale)", bargap=0.1)


# --- stage 2: tokenizer ----------------------------------------------------------------------


def vocab_growth(
    rows: list[dict], title: str = "More merges, fewer tokens: vocabulary size against bytes per token"
) -> go.Figure:
    """Bytes per token on held-out text as the vocabulary grows (rows from `labkit.tokenizer.vocab_growth`)."""
    fig = go.Figure(
        go.Scatter(
            x=[r["vocab_size"] for r in rows],
            y=[r["bytes_per_token"] for r in rows],
            mode="lines+markers",
            hovertemplate="vocabulary of %{x}: %{y:.2f} bytes per token<extra></extra>",
        )
    )
    return _layout(fig, title, "vocabulary size (tokens, special tokens included)", "bytes per token (held-out text)")


# --- stage 3: pretraining --------------------------------------------------------------------


def loss_curves(history: list[dict], title: str = "Pretraining: loss") -> go.Figure:
    """Training loss at every step and validation loss at every evaluation, in nats per token."""
    train = [r for r in history if "loss" in r]
    val = [r for r in history if "val_loss" in r]
    fig = go.Figure()
    fig.add_scatter(
        x=[r["step"] for r in train], y=[r["loss"] for r in train], mode="lines", name="train", line=dict(width=1)
    )
    fig.add_scatter(x=[r["step"] for r in val], y=[r["val_loss"] for r in val], mode="lines+markers", name="validation")
    _whole_steps(fig, [r["step"] for r in history])
    return _layout(fig, title, "optimizer step", "cross-entropy (nats per token)")


def fact_recall_bars(
    metrics: dict, title: str = "What the base model remembers: facts recalled by page frequency"
) -> go.Figure:
    """Share of facts recalled per bucket of pages about a person, with the number of people in each.
    `metrics` is a stage's metrics, or {legend name: metrics} for models side by side."""
    models = {"": metrics} if "fact_recall" in metrics else metrics
    first = next(iter(models.values()))
    buckets, people = list(first["fact_recall"]), first["fact_recall_people"]
    fig = go.Figure()
    for name, m in models.items():
        values = [100 * (m["fact_recall"][b] or 0.0) for b in buckets]
        x = [f"{b} ({people.get(b, 0)} people)" for b in buckets]
        fig.add_bar(x=x, y=values, name=name, showlegend=bool(name), **_value_labels(values))
    fig.update_yaxes(range=[0, 112])
    _layout(fig, title, "pages about the person on the mini-web", "facts recalled (%)", barmode="group")
    return _legend_above(fig) if len(models) > 1 else fig


def phase_change(history: list[dict], title: str = "Induction heads form: the phase change") -> go.Figure:
    """The toy's measurements against step: loss on the first (unpredictable) copy of the segment
    and on its repeats, copy accuracy (also for a segment length never trained on), and the ICL
    score (the repeats' loss minus the first copy's)."""
    from plotly.subplots import make_subplots

    rows = [r for r in history if "copy_accuracy" in r]
    steps = [r["step"] for r in rows]
    titles = ("loss: first copy vs repeats", "copy accuracy on the repeats", "ICL score: repeats minus first copy")
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08, subplot_titles=titles)
    fig.add_scatter(x=steps, y=[r["first_copy_loss"] for r in rows], name="first copy (random tokens)", row=1, col=1)
    fig.add_scatter(x=steps, y=[r["repeat_loss"] for r in rows], name="repeats", row=1, col=1)
    fig.add_scatter(x=steps, y=[100 * r["copy_accuracy"] for r in rows], name="copy: segments of 8-24", row=1, col=2)
    if rows and "unseen_period_copy_accuracy" in rows[0]:
        unseen = [100 * r["unseen_period_copy_accuracy"] for r in rows]
        fig.add_scatter(x=steps, y=unseen, name="copy: a segment length never trained on", row=1, col=2)
    fig.add_scatter(x=steps, y=[r["icl_score"] for r in rows], name="ICL score", showlegend=False, row=1, col=3)
    labels = ("cross-entropy (nats per token)", "next token right (%)", "loss difference (nats)")
    for col, label in enumerate(labels, start=1):
        fig.update_yaxes(title_text=label, row=1, col=col)
        fig.update_xaxes(title_text="optimizer step", row=1, col=col)
    fig.update_yaxes(range=[0, 105], row=1, col=2)
    # the legend under the panels: above them it would sit on the panels' titles
    legend = dict(orientation="h", yanchor="top", y=-0.3, xanchor="left", x=0)
    fig.update_layout(template=TEMPLATE, title=title, height=460, margin=dict(l=60, r=20, t=80, b=130), legend=legend)
    return fig


def attention_heatmap(pattern, tokens: list, layer: int, head: int, scores: dict | None = None) -> go.Figure:
    """One head's attention weights on a sequence: row i is how position i (the query) spreads
    its attention over positions 0 .. i (the keys). Titled with the head's scores when given."""
    T = len(tokens)
    hover = [[f"query {i} (token {tokens[i]}) to key {j} (token {tokens[j]})" for j in range(T)] for i in range(T)]
    fig = go.Figure(
        go.Heatmap(
            z=[[float(v) for v in row] for row in pattern],
            x=list(range(T)),
            y=list(range(T)),
            zmin=0,
            zmax=1,
            colorscale="Blues",
            colorbar=dict(title="weight"),
            text=hover,
            hovertemplate="%{text}<br>weight %{z:.2f}<extra></extra>",
        )
    )
    title = f"Attention of layer {layer}, head {head}"
    if scores is not None:
        title += f": previous-token {scores['previous_token']:.2f}, induction {scores['induction']:.2f}"
    fig.update_xaxes(range=[-0.5, T - 0.5], constrain="domain")  # the axis ends where the sequence does
    fig.update_yaxes(autorange="reversed", scaleanchor="x")  # position 0 at the top, square cells
    return _layout(fig, title, "key position (attended to)", "query position (attending)", height=560)


def loss_by_position(
    losses: list[float], icl_score: float | None = None, copy_accuracy: float | None = None, title: str | None = None
) -> go.Figure:
    """The base model's mean validation loss at each position of its context: later positions
    have more text before them to read. The title gives the ICL score and copy accuracy."""
    if title is None:
        title = "Base model: loss by position in the context"
        if icl_score is not None:
            title += f"<br><sup>ICL score {icl_score:+.2f} nats (last eighth minus second sixteenth)"
            title += "" if copy_accuracy is None else f", copy accuracy {copy_accuracy:.2f}"
            title += "</sup>"
    fig = go.Figure(go.Scatter(x=list(range(len(losses))), y=losses, mode="lines", name="validation loss"))
    return _layout(fig, title, "position in the context (tokens before it)", "cross-entropy (nats per token)")


def recipe_val_curves(
    histories: dict[str, list[dict]], title: str = "Two recipes, the same data: validation loss"
) -> go.Figure:
    """Validation loss against optimizer step, one line per recipe (its legend name: the key)."""
    fig = go.Figure()
    for name, history in histories.items():
        val = [r for r in history if "val_loss" in r]
        fig.add_scatter(x=[r["step"] for r in val], y=[r["val_loss"] for r in val], name=name, mode="lines+markers")
    _whole_steps(fig, [r["step"] for h in histories.values() for r in h])
    _layout(fig, title, "optimizer step", "validation cross-entropy (nats per token)")
    return _legend_above(fig)


# --- stage 4: sft ----------------------------------------------------------------------------


def compute_bars(metrics: dict) -> go.Figure:
    """Tokens processed by pretraining and by SFT: post-training is a small fraction."""
    tokens = [metrics["pretrain_tokens_seen"] or 0, metrics["tokens_seen"]]
    fig = go.Figure(
        go.Bar(
            x=["pretraining", "SFT"],
            y=tokens,
            text=[f"{t:,}" for t in tokens],
            textposition="outside",
            marker_color=["#4c78a8", "#54a24b"],
        )
    )
    ratio = metrics.get("compute_ratio")
    title = "Compute: tokens processed" + (f" (SFT = {100 * ratio:.0f}% of pretraining)" if ratio is not None else "")
    fig.update_yaxes(range=[0, 1.15 * max(tokens)])
    return _layout(fig, title, "stage", "tokens processed")


def qa_by_bucket(
    metrics: dict, title: str = "Held-out people: what the assistant answers, what the base model knew"
) -> go.Figure:
    """Share of all held-out questions answered right, by pages about the person: the assistant,
    the base model asked few-shot, and the base model completing a page (fact recall)."""
    series = [
        ("assistant (SFT)", "qa_accuracy_all_by_bucket", "#54a24b"),
        ("base model, few-shot", "base_fewshot_qa_accuracy_all_by_bucket", "#4c78a8"),
        ("base model, page completion", "base_fact_recall_heldout_by_bucket", "#bab0ac"),
    ]
    fig = go.Figure()
    for name, key, colour in series:
        if metrics.get(key):
            values = [100 * (v or 0.0) for v in metrics[key].values()]
            fig.add_bar(x=list(metrics[key]), y=values, name=name, marker_color=colour, **_value_labels(values))
    fig.update_yaxes(range=[0, 112])
    _layout(fig, title, "pages about the person on the mini-web", "questions answered right (%)", barmode="group")
    return _legend_above(fig)


# --- stage 5: rlhf ---------------------------------------------------------------------------


def ppo_curves(history: list[dict], title: str = "PPO") -> go.Figure:
    """Four panels per PPO step: reward-model score, KL to the reference, answer length, clip fraction."""
    from plotly.subplots import make_subplots

    panels = [
        ("score", "reward-model score", "score"),
        ("kl", "KL to reference (nats per answer)", "nats"),
        ("response_length", "answer length (tokens)", "tokens"),
        ("clipfrac", "clipped tokens (fraction)", "fraction of tokens"),
    ]
    fig = make_subplots(
        rows=2, cols=2, subplot_titles=[label for _, label, _ in panels], vertical_spacing=0.22, horizontal_spacing=0.12
    )
    steps = [row["step"] for row in history]
    for i, (key, label, unit) in enumerate(panels):
        at = dict(row=i // 2 + 1, col=i % 2 + 1)
        fig.add_scatter(x=steps, y=[row[key] for row in history], mode="lines+markers", name=label, **at)
        fig.update_xaxes(title_text="PPO step (batches of rollouts)", dtick=1 if len(steps) <= 10 else None, **at)
        fig.update_yaxes(title_text=unit, **at)
    return _layout(fig, title, "PPO step (batches of rollouts)", "score", showlegend=False, height=560)


def reward_hacking(history: list[dict], title: str = "Reward hacking: PPO with no KL penalty") -> go.Figure:
    """The reward model's score of the sampled answers beside the simulated labeler's judgement of them."""
    steps = [row["step"] for row in history]
    fig = go.Figure()
    fig.add_scatter(x=steps, y=[row["score"] for row in history], name="reward-model score (left axis)")
    fig.add_scatter(
        x=steps, y=[row["labeler"] for row in history], name="labeler's judgement, 0 to 1 (right axis)", yaxis="y2"
    )
    fig.add_scatter(
        x=steps, y=[row["kl"] for row in history], name="KL to reference, nats (left axis)", line=dict(dash="dot")
    )
    fig.update_layout(
        yaxis2=dict(
            title="labeler: 0 wrong, 1 right and well formed",
            overlaying="y",
            side="right",
            range=[0, 1.05],
            tickmode="linear",  # its own round ticks, not ones lined up with the left axis's grid
            tick0=0,
            dtick=0.25,
            showgrid=False,
        )
    )
    _whole_steps(fig, steps)
    _layout(fig, title, "PPO step (batches of rollouts)", "reward-model score / KL (nats)", height=420)
    return _legend_above(fig).update_layout(margin=dict(r=80))


def dpo_curves(history: list[dict], title: str = "DPO: loss and implicit rewards") -> go.Figure:
    """DPO's loss and the implicit rewards beta * (log pi - log ref) of chosen and rejected answers."""
    rows = [row for row in history if "loss" in row]
    steps = [row["step"] for row in rows]
    fig = go.Figure()
    fig.add_scatter(x=steps, y=[row["loss"] for row in rows], name="loss (nats)")
    fig.add_scatter(x=steps, y=[row["rewards/chosen"] for row in rows], name="implicit reward, chosen")
    fig.add_scatter(x=steps, y=[row["rewards/rejected"] for row in rows], name="implicit reward, rejected")
    return _layout(fig, title, "optimizer step", "nats")


def win_rates(
    metrics: dict, title: str = "PPO and DPO against SFT on held-out prompts (simulated labeler)"
) -> go.Figure:
    """Wins, ties and losses against SFT's reply to the same prompt, and the change in the labeler's
    mean score: a win rate alone hides the ties, and a score that falls is no win."""
    names, models, n = ["PPO", "DPO"], ["ppo", "dpo"], metrics["n_eval"]
    fig = go.Figure()
    for outcome, colour in (("wins", "#2ca02c"), ("ties", "#c7c7c7"), ("losses", "#d62728")):
        counts = [metrics[f"{m}_{outcome}"] for m in models]
        fig.add_bar(x=names, y=counts, name=outcome, marker_color=colour)
    for name, m in zip(names, models):
        change = metrics[f"{m}_labeler_score"] - metrics["sft_labeler_score"]
        fig.add_annotation(
            x=name,
            y=n,
            yshift=24,
            showarrow=False,
            # the counts as text above the bar: a segment of 2 in 60 is too thin to hold its number
            text=f"{metrics[f'{m}_wins']} wins, {metrics[f'{m}_ties']} ties, {metrics[f'{m}_losses']} losses<br>"
            f"labeler score {metrics[f'{m}_labeler_score']:.2f} ({change:+.2f})",
        )
    fig.update_yaxes(range=[0, 1.25 * n])
    title += f"<br><sup>SFT's labeler score {metrics['sft_labeler_score']:.2f} (1 right, 0.5 don't know, 0 wrong, -0.5 no answer)</sup>"
    _layout(fig, title, "model", f"held-out prompts (of {n})", barmode="stack")
    return fig.update_layout(margin=dict(l=60, r=20, t=80, b=50))  # room for the subtitle


def answers_table(
    rows: list[dict], title: str = "Answers, the reward model's score and the labeler's judgement"
) -> go.Figure:
    columns = ["prompt", "answer", "reward-model score", "labeler (-0.5 to 1)"]
    cells = [
        [r["prompt"] for r in rows],
        [r["answer"] for r in rows],
        [f"{r['rm_score']:.2f}" for r in rows],
        [f"{r['labeler']:.1f}" for r in rows],
    ]
    fig = go.Figure(go.Table(header=dict(values=columns), cells=dict(values=cells, align="left")))
    return fig.update_layout(
        template=TEMPLATE, title=title, height=120 + 40 * len(rows), margin=dict(l=10, r=10, t=50, b=10)
    )


# --- stage 6: grpo ---------------------------------------------------------------------------


def grpo_curves(history: list[dict], title: str = "GRPO: training on verifiable rewards") -> go.Figure:
    """Five panels over optimizer steps: the samples' mean reward (the weighted sum and each reward),
    pass@1 on held-out problems (greedy), the share of groups that teach nothing (all G rewards
    equal), the replies' length, and KL to the SFT model. The legend sits in the sixth place."""
    from plotly.subplots import make_subplots

    steps = [r["step"] for r in history]
    evals = [r for r in history if "pass_at_1" in r]
    rewards = [k for k in (history[0] if history else {}) if k.startswith("reward_")]
    fig = make_subplots(
        rows=2,
        cols=3,
        specs=[[{}, {}, {}], [{}, {}, None]],
        horizontal_spacing=0.09,
        vertical_spacing=0.2,
        subplot_titles=(
            "mean reward of the G samples",
            "pass@1, held-out (greedy)",
            "groups that teach nothing",
            "reply length",
            "KL to the SFT model (k3)",
        ),
    )

    def line(row, col, ys, name, xs=steps, legend=True, **kw):
        fig.add_scatter(x=xs, y=ys, name=name, showlegend=legend, row=row, col=col, **kw)

    line(1, 1, [r["reward"] for r in history], "reward: weighted sum", mode="lines", line=dict(width=2.5))
    for key in rewards:
        line(
            1, 1, [r[key] for r in history], f"reward: {key.removeprefix('reward_')}", mode="lines", line=dict(width=1)
        )
    evals_x = [r["step"] for r in evals]
    line(1, 2, [100 * r["pass_at_1"] for r in evals], "pass@1", evals_x, False, mode="lines+markers")
    line(
        1,
        3,
        [100 * r["zero_variance_fraction"] for r in history],
        "groups that teach nothing",
        legend=False,
        mode="lines",
    )
    line(2, 1, [r["response_tokens"] for r in history], "reply length: the samples", mode="lines")
    if evals and "heldout_response_tokens" in evals[0]:
        heldout = [r["heldout_response_tokens"] for r in evals]
        line(2, 1, heldout, "reply length: held-out, greedy", evals_x, mode="lines+markers")
    line(2, 2, [r["kl"] for r in history], "KL", legend=False, mode="lines")
    for row, col, label, percent in (
        (1, 1, "reward", False),
        (1, 2, "held-out problems solved (%)", True),
        (1, 3, "groups, all G rewards equal (%)", True),
        (2, 1, "tokens", False),
        (2, 2, "nats per token", False),
    ):
        fig.update_yaxes(title_text=label, rangemode="tozero", row=row, col=col)
        fig.update_yaxes(range=[0, 105] if percent else None, row=row, col=col)
        fig.update_xaxes(title_text="optimizer step", row=row, col=col)
    fig.update_xaxes(matches="x")  # one step range in every panel
    _whole_steps(fig, steps)
    fig.update_layout(
        template=TEMPLATE,
        title=title,
        height=620,
        margin=dict(l=60, r=20, t=80, b=50),
        legend=dict(x=0.73, xanchor="left", y=0.38, yanchor="top", title_text="lines"),
    )
    return fig


def pass_at_1_by_loss(
    histories: dict[str, list[dict]],
    start: float | None = None,
    n: int | None = None,
    title: str = "GRPO's losses side by side: held-out pass@1 from the same start",
) -> go.Figure:
    """pass@1 (greedy, held-out) against optimizer step, one line per loss (its legend name: the key), with
    the shared starting policy's pass@1 at step 0 when given, and the number of problems in the axis title."""
    fig = go.Figure()
    for name, history in histories.items():
        evals = [r for r in history if "pass_at_1" in r]
        steps, values = [r["step"] for r in evals], [100 * r["pass_at_1"] for r in evals]
        if start is not None:
            steps, values = [0, *steps], [100 * start, *values]
        fig.add_scatter(x=steps, y=values, name=name, mode="lines+markers")
    fig.update_yaxes(range=[-3, 105])  # a curve at 0 stays in sight, above the axis
    _whole_steps(fig, [r["step"] for h in histories.values() for r in h] + ([0] if start is not None else []))
    problems = f" of {n}" if n is not None else ""
    _layout(fig, title, "optimizer step (0: the starting policy)", f"held-out problems{problems} solved (%)")
    # the names are long (each loss with its settings): one row each, between the title and the plot
    legend = dict(orientation="v", yanchor="bottom", y=1.02, xanchor="left", x=0)
    return fig.update_layout(legend=legend, margin=dict(t=70 + 22 * len(histories)))


def pass_at_1_bars(
    metrics: dict, title: str = "Held-out problems solved: SFT model, after the cold start, after GRPO"
) -> go.Figure:
    """pass@1 (greedy) per task of the SFT model, of GRPO's starting policy (after the cold start)
    and after GRPO, with the number of held-out problems."""
    tasks = list(metrics["pass_at_1_before_by_task"])
    n = metrics["n_heldout_by_task"]
    bars = [("pass_at_1_before_by_task", "before GRPO"), ("pass_at_1_after_by_task", "after GRPO")]
    if metrics.get("cold_start_steps"):
        bars = [
            ("pass_at_1_sft_by_task", "SFT model"),
            ("pass_at_1_before_by_task", "after the cold start (GRPO's start)"),
            ("pass_at_1_after_by_task", "after GRPO"),
        ]
    fig = go.Figure()
    for key, name in bars:
        values = [100 * metrics[key][t] for t in tasks]
        fig.add_bar(x=[f"{t} (n={n[t]})" for t in tasks], y=values, name=name, **_value_labels(values))
    fig.update_yaxes(range=[0, 112])
    _layout(fig, title, "task (held-out problems)", "solved at the first greedy try (%)", barmode="group")
    return _legend_above(fig)


def thinking_bars(
    metrics: dict, when: str = "before", title: str = "Tokens to think: worked steps against an immediate answer"
) -> go.Figure:
    """pass@1 per task when the model writes its steps, against when its reply is forced to start
    with 'The answer is' (no room to work)."""
    tasks = list(metrics[f"pass_at_1_{when}_by_task"])
    fig = go.Figure()
    for key, name in (
        (f"pass_at_1_{when}_by_task", "steps first, then the answer"),
        (f"immediate_pass_at_1_{when}_by_task", "answer at once ('The answer is' forced)"),
    ):
        values = [100 * metrics[key][t] for t in tasks]
        fig.add_bar(x=tasks, y=values, name=name, **_value_labels(values))
    fig.update_yaxes(range=[0, 112])
    _layout(fig, title, "task", "held-out problems solved (%)", barmode="group")
    return _legend_above(fig)


# --- stage 7: hallucinations --------------------------------------------------------------------

HALLUC_BUCKETS = ("0", "1", "2-4", "5-16", "17+")


def _bucket_labels(metrics: dict) -> list[str]:
    n = metrics["n_questions"]
    return [f"{b} {'page' if b == '1' else 'pages'} (n={n[b]})" for b in HALLUC_BUCKETS if n.get(b)]


def _bucket_values(per_bucket: dict, metrics: dict) -> list[float | None]:
    return [
        None if per_bucket.get(b) is None else 100 * per_bucket[b]
        for b in HALLUC_BUCKETS
        if metrics["n_questions"].get(b)
    ]


def hallucination_bars(
    metrics: dict, title: str = "Hallucinations by page frequency, before and after each mitigation"
) -> go.Figure:
    """Share of held-out questions answered with a falsehood, per page-frequency bucket: the SFT
    assistant, after "I don't know" training, and with the search tool."""
    fig = go.Figure()
    for key, name in (
        ("hallucination_rate_before", "SFT assistant (before)"),
        ("hallucination_rate_after", 'after "I don\'t know" training'),
        ("hallucination_rate_search", "with the search tool"),
    ):
        values = _bucket_values(metrics[key], metrics)
        fig.add_bar(x=_bucket_labels(metrics), y=values, name=name, **_value_labels(values, upright=True))
    fig.update_yaxes(range=[0, 118])
    _layout(
        fig,
        title,
        "pages about the person in the corpus (questions asked)",
        "answers that are false (%)",
        barmode="group",
        bargroupgap=0.08,
    )
    return _legend_above(fig)


def accuracy_bars(metrics: dict, title: str = "Right answers by page frequency: recall against lookup") -> go.Figure:
    """Share of right answers per bucket (the truth; "I don't know" for people with no page):
    the SFT assistant, after "I don't know" training, the search model with search off, on, and
    with the right search call made for it (what it reads, apart from the query it writes)."""
    fig = go.Figure()
    for key, name in (
        ("accuracy_before", "SFT assistant (from memory)"),
        ("accuracy_after", 'after "I don\'t know" training'),
        ("search_off_accuracy", "search model, search off"),
        ("search_accuracy", "search model, search on"),
        ("search_accuracy_given_query", "search model, the right search made for it"),
    ):
        if key not in metrics:
            continue
        values = _bucket_values(metrics[key], metrics)
        fig.add_bar(x=_bucket_labels(metrics), y=values, name=name, **_value_labels(values, upright=True))
    fig.update_yaxes(range=[0, 118])
    _layout(
        fig,
        title,
        "pages about the person in the corpus (questions asked)",
        "right answers (%)",
        barmode="group",
        bargroupgap=0.08,
    )
    return _legend_above(fig)


def verdict_signals(
    rows: list[dict], title: str = "Are hallucinations less sure? Confidence and consistency by verdict"
) -> go.Figure:
    """Each probe question as a point: the geometric-mean probability of the greedy answer's tokens
    against how often sampled answers made the same claim, coloured by verdict."""
    fig = go.Figure()
    colours = dict(correct="#2a9d3f", idk="#888888", wrong="#d62728")
    for verdict, colour in colours.items():
        picked = [r for r in rows if r["verdict"] == verdict and r.get("consistency") is not None]
        fig.add_scatter(
            x=[r["confidence"] for r in picked],
            y=[100 * r["consistency"] for r in picked],
            mode="markers",
            name=f"{verdict} ({len(picked)})",
            marker=dict(color=colour, opacity=0.6),
            text=[f"{r['question']}<br>{r['answer']}" for r in picked],
            hoverinfo="text",
        )
    fig.update_xaxes(range=[0, 1.02])
    fig.update_yaxes(range=[0, 105])
    return _layout(
        fig,
        title,
        "confidence: mean token probability of the answer (0-1)",
        "samples making the same claim (%)",
        showlegend=True,  # which colour is which verdict, even when only one has points
    )
