"""The induction-head experiment: its data, its attention read-out, its head scores, the phase
change on the toy, and the base model's loss by position."""

import math

import pytest
import torch
from torch.nn import functional as F

from labkit import induction
from labkit.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def toy(one_thread):
    """The toy trained 120 steps (seeded): the jump comes at about step 70-80."""
    return induction.train_toy(120, seed=0)


def test_repeated_sequences_repeat_exactly_and_differ_by_seed():
    ids = induction.repeated_sequences(8, half=5, vocab_size=50, seed=3)
    assert ids.shape == (8, 10) and int(ids.max()) < 50
    assert torch.equal(ids[:, :5], ids[:, 5:])
    assert torch.equal(ids, induction.repeated_sequences(8, half=5, vocab_size=50, seed=3))
    assert not torch.equal(ids, induction.repeated_sequences(8, half=5, vocab_size=50, seed=4))
    x, y = induction.RepeatedBatches(4, half=6, vocab_size=40, seed=0).next()
    whole = torch.cat([x, y[:, -1:]], dim=1)
    assert x.shape == (4, 11) and torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(whole[:, :6], whole[:, 6:])


def test_varied_repeats_hold_one_repeat_of_varying_length_and_place():
    x, y = induction.RepeatedBatches(64, half=12, vocab_size=1000, seed=0, shortest=4).next()
    whole = torch.cat([x, y[:, -1:]], dim=1)
    found = set()
    for row in whole.tolist():  # the longest run of positions equal to those `d` back, for each distance d
        repeats = [
            (d, s) for d in range(4, 13) for s in range(24 - 2 * d + 1) if row[s : s + d] == row[s + d : s + 2 * d]
        ]
        assert repeats, row
        found.add(max(repeats))
    assert len({d for d, _ in found}) > 4 and len({s for _, s in found}) > 4  # lengths and places vary


def test_shifted_repeats_sit_where_asked():
    ids = induction.shifted_repeats(5, half=4, length=20, start=7, vocab_size=30, seed=0)
    assert ids.shape == (5, 20) and torch.equal(ids[:, 7:11], ids[:, 11:15])
    assert not torch.equal(ids[:, 3:7], ids[:, 7:11])  # the tokens before the first copy are not a copy


def test_attention_weights_are_the_models_own():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=4, n_embd=32)).eval()
    with torch.no_grad():  # larger weights than the initialisation's, so that attention is far from uniform
        for block in model.transformer.h:
            block.attn.c_attn.weight.normal_(std=0.5)
    ids = torch.randint(0, 32, (3, 12))
    patterns = induction.attention_patterns(model, ids)
    assert patterns.shape == (3, 2, 4, 12, 12)
    assert torch.allclose(patterns.sum(-1), torch.ones(3, 2, 4, 12), atol=1e-6)
    assert torch.all(patterns.triu(diagonal=1) == 0)  # nothing from the future
    assert patterns.max() > 0.5  # not uniform: the check below has something to find
    assert torch.equal(induction.attention_patterns(model, ids[0]), patterns[0])
    # the weights, applied to the layer's values, give exactly what the layer outputs
    t = model.transformer
    x = t.wte(ids) + t.wpe(torch.arange(12))
    with torch.no_grad():
        for layer, block in enumerate(t.h):
            attn, h = block.attn, block.ln_1(x)
            B, T, C = h.shape
            v = attn.c_attn(h).split(C, dim=2)[2].view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)
            y = (patterns[:, layer] @ v).transpose(1, 2).reshape(B, T, C)
            assert torch.allclose(attn.c_proj(y), attn(h), atol=1e-5)
            x = block(x)


def test_head_scores_recognise_hand_built_heads():
    T, half = 12, 6
    previous = torch.zeros(T, T)
    previous[0, 0] = 1.0
    previous[torch.arange(1, T), torch.arange(T - 1)] = 1.0  # every position looks one back
    copier = torch.eye(T)
    for i in range(half, T):  # the repeat looks at the token after its earlier copy
        copier[i] = 0.0
        copier[i, i - half + 1] = 1.0
    uniform = torch.ones(T, T).tril() / torch.arange(1, T + 1)[:, None]
    assert induction.previous_token_score(previous) == 1.0 and induction.induction_score(previous, half) == 0.0
    assert induction.induction_score(copier, half) == 1.0 and induction.previous_token_score(copier) < 0.5
    patterns = torch.stack([torch.stack([uniform, previous]), torch.stack([copier, uniform])])  # [2 layers, 2 heads]
    scores = induction.head_scores(patterns, half)
    assert [(r["layer"], r["head"]) for r in scores] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    best = induction.best_heads(scores)
    assert (best["previous_token"]["layer"], best["previous_token"]["head"]) == (0, 1)
    assert (best["induction"]["layer"], best["induction"]["head"]) == (1, 0)
    assert scores[0]["previous_token"] == pytest.approx(sum(1 / (i + 1) for i in range(1, T)) / (T - 1), abs=1e-4)


def test_copy_measures_of_a_perfect_copier():
    """A model that knows the answer: losses of the repeat near 0, of the first copy at chance."""

    class Oracle(torch.nn.Module):
        def __init__(self, ids, half):
            super().__init__()
            self.ids, self.half, self.anchor = ids, half, torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            logits = torch.zeros(*x.shape, 20)
            targets = self.ids[:, 1 : x.size(1) + 1]
            logits[:, self.half :] = 50.0 * F.one_hot(targets[:, self.half :], 20)
            return logits, None

    ids = induction.repeated_sequences(6, half=5, vocab_size=20, seed=1)
    m = induction.copy_measures(Oracle(ids, 5), ids, half=5)
    assert m["first_half_loss"] == pytest.approx(math.log(20), abs=1e-5)
    assert m["repeated_half_loss"] < 1e-6 and m["copy_accuracy"] == 1.0
    assert m["icl_score"] == pytest.approx(-math.log(20), abs=1e-5)


def test_the_toy_jumps_from_guessing_to_copying(toy):
    _, history = toy
    rows = induction.measurements(history)
    assert [r["step"] for r in rows] == list(range(0, 121, 10))
    early, last = rows[2], rows[-1]  # step 20, step 120
    assert early["copy_accuracy"] < 0.05 and abs(early["icl_score"]) < 0.2  # before: the context does not help
    assert last["copy_accuracy"] > 0.8
    assert last["repeated_half_loss"] < 0.5 * last["first_half_loss"]
    assert last["first_half_loss"] > math.log(256) - 0.1  # random tokens stay unpredictable
    assert last["icl_score"] < -2.0
    assert 40 <= induction.jump_step(history) <= 100  # a jump, not a slow climb from the start


def test_the_toy_copies_by_position_not_by_content(toy):
    """Every training repeat starts 24 tokens back, and the model takes that shortcut: the head
    that copies is in layer 0 (a true induction head needs a previous-token head before it), and
    a repeat at another distance is not copied. This test documents that: data where the distance
    varies would make it fail (and need far more steps than the toy has)."""
    model, history = toy
    assert induction.measurements(history)[-1]["other_distance_copy_accuracy"] < 0.05
    patterns = induction.attention_patterns(model, induction.repeated_sequences(16, seed=99)).mean(0)
    scores = induction.head_scores(patterns)
    best = induction.best_heads(scores)
    assert best["induction"]["layer"] == 0 and best["induction"]["induction"] > 0.5
    assert best["previous_token"]["previous_token"] < 0.3  # no previous-token head formed


def test_loss_by_position_is_the_models_per_token_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=30, n_layer=1, n_head=2, n_embd=16)).eval()
    windows = torch.randint(0, 30, (5, 9))
    losses = induction.loss_by_position(model, windows, max_batch=2)
    with torch.no_grad():
        logits, _ = model(windows[:, :-1])
    expected = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(0)
    assert losses == pytest.approx(expected.tolist(), abs=1e-5)


def test_icl_score_is_late_minus_early():
    losses = [5.0] * 8 + [4.0] * 8 + [3.0] * 16  # 32 positions: early = 2..3, late = 28..31
    assert induction.icl_score(losses) == pytest.approx(3.0 - 5.0)
    assert induction.icl_score([2.0] * 64) == 0.0


def test_text_windows_are_consecutive_slices():
    import numpy as np

    tokens = np.arange(100, dtype=np.uint16)
    windows = induction.text_windows(tokens, 10, n=4)
    assert windows.shape == (4, 11) and windows[1].tolist() == list(range(10, 21))


def test_toy_figures_and_head_browser_are_labelled(toy):
    from labkit import plots, widgets

    model, history = toy
    fig = plots.phase_change(history)
    names = {t.name for t in fig.data}
    assert {"first half (random)", "repeated half", "copy: as trained", "copy: a repeat at another distance"} <= names
    assert all(fig.layout[f"xaxis{i}"].title.text == "optimizer step" for i in ("", 2, 3))
    assert fig.layout.yaxis.title.text.startswith("cross-entropy")
    ids = induction.repeated_sequences(1, seed=5)[0]
    patterns = induction.attention_patterns(model, ids)
    scores = induction.head_scores(patterns)
    browser = widgets.head_browser(patterns, ids.tolist(), scores)
    (layer, head), output = browser.children[0].children, browser.children[1]

    def shown_title() -> str:
        (shown,) = output.outputs  # replaced, never stacked
        return shown["data"]["application/vnd.plotly.v1+json"]["layout"]["title"]["text"]

    assert list(layer.options) == [0, 1] and list(head.options) == [0, 1, 2, 3]
    heatmap = plots.attention_heatmap(patterns[1, 2], ids.tolist(), 1, 2, scores[6])
    assert "layer 1, head 2: previous-token" in heatmap.layout.title.text
    assert heatmap.layout.xaxis.title.text.startswith("key position") and list(heatmap.data[0].x) == list(range(48))
    assert len(heatmap.data[0].z) == 48
    assert shown_title().startswith("Attention of layer 0, head 0")
    layer.value, head.value = 1, 3
    assert shown_title().startswith("Attention of layer 1, head 3: previous-token")
    curve = plots.loss_by_position([3.0, 2.5, 2.0], icl_score=-1.0, copy_accuracy=0.25)
    assert "ICL score -1.00" in curve.layout.title.text and "copy accuracy 0.25" in curve.layout.title.text
    assert curve.layout.xaxis.title.text.startswith("position in the context")
