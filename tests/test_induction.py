"""The induction-head experiment: its data, its attention read-out, its head scores, the phase
change on the toy, and the base model's loss by position."""

import math

import pytest
import torch
from torch.nn import functional as F

from labkit import induction
from labkit.model import GPT, GPTConfig

TOY = induction.ToyConfig()


@pytest.fixture(scope="module")
def toy(one_thread):
    """The toy trained its 600 steps (seeded): the jump comes at about step 300."""
    return induction.train_toy(TOY, seed=0)


def test_periodic_sequences_repeat_their_segment_and_differ_by_seed():
    small = induction.ToyConfig(length=20, shortest=3, longest=7, vocab_size=50)
    ids, periods = induction.periodic_sequences(64, small, torch.Generator().manual_seed(3))
    assert ids.shape == (64, 20) and int(ids.max()) < 50
    assert set(periods.tolist()) == set(range(3, 8))  # every length drawn
    for row, p in zip(ids.tolist(), periods.tolist()):
        assert all(row[i] == row[i - p] for i in range(p, 20))
    again, _ = induction.periodic_sequences(64, small, torch.Generator().manual_seed(3))
    other, _ = induction.periodic_sequences(64, small, torch.Generator().manual_seed(4))
    assert torch.equal(ids, again) and not torch.equal(ids, other)
    fixed, periods = induction.periodic_sequences(4, small, torch.Generator().manual_seed(0), period=9)
    assert periods.tolist() == [9] * 4 and torch.equal(fixed[:, :9], fixed[:, 9:18])
    x, y = induction.PeriodicBatches(small, seed=0).next()
    assert x.shape == (small.batch_size, 19) and torch.equal(x[:, 1:], y[:, :-1])
    probe = induction.probe_sequence(small, period=6, seed=1)
    assert len(set(probe[:6].tolist())) == 6 and torch.equal(probe[:6], probe[6:12])


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_attention_weights_are_the_models_own(arch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=4, n_embd=32, arch=arch)).eval()
    with torch.no_grad():  # larger weights than the initialisation's, so that attention is far from uniform
        for name, p in model.transformer.h.named_parameters():
            if ".attn." in name:
                p.normal_(std=0.5)
    ids = torch.randint(0, 32, (3, 12))
    patterns = induction.attention_patterns(model, ids)
    assert patterns.shape == (3, 2, 4, 12, 12)
    assert torch.allclose(patterns.sum(-1), torch.ones(3, 2, 4, 12), atol=1e-6)
    assert torch.all(patterns.triu(diagonal=1) == 0)  # nothing from the future
    assert patterns.max() > 0.5  # not uniform: the check below has something to find
    assert torch.equal(induction.attention_patterns(model, ids[0]), patterns[0])
    # the weights, applied to the layer's values, give exactly what the layer outputs
    x, rope = model.embed(ids, torch.arange(12))
    with torch.no_grad():
        for layer, block in enumerate(model.transformer.h):
            attn, h = block.attn, block.ln_1(x)
            B, T, C = h.shape
            v = attn.queries_keys_values(h, rope)[2]
            y = (patterns[:, layer] @ v).transpose(1, 2).reshape(B, T, C)
            assert torch.allclose(attn.c_proj(y), attn(h, rope=rope), atol=1e-5)
            x = block(x, rope=rope)


def test_induction_targets_are_the_tokens_after_earlier_copies():
    ids = torch.tensor([5, 7, 9, 5, 7, 3, 5])
    targets = induction.induction_targets(ids)
    assert targets[3].nonzero().flatten().tolist() == [1]  # the 5 at 3: the token after the 5 at 0
    assert targets[4].nonzero().flatten().tolist() == [2]  # the 7 at 4: after the 7 at 1
    assert targets[6].nonzero().flatten().tolist() == [1, 4]  # the 5 at 6: after both earlier 5s
    assert not targets[:3].any() and not targets[5].any()  # first appearances have none


def test_head_scores_recognise_hand_built_heads():
    T, period = 12, 6
    ids = torch.arange(period).repeat(2)
    previous = torch.zeros(T, T)
    previous[0, 0] = 1.0
    previous[torch.arange(1, T), torch.arange(T - 1)] = 1.0  # every position looks one back
    copier = torch.eye(T)
    for i in range(period, T):  # the repeat looks at the token after its earlier copy
        copier[i] = 0.0
        copier[i, i - period + 1] = 1.0
    uniform = torch.ones(T, T).tril() / torch.arange(1, T + 1)[:, None]
    assert induction.previous_token_score(previous) == 1.0 and induction.induction_score(previous, ids) == 0.0
    assert induction.induction_score(copier, ids) == 1.0 and induction.previous_token_score(copier) < 0.5
    # uniform attention at position i >= 6 puts 1 / (i + 1) on its one target
    expected = sum(1 / (i + 1) for i in range(period, T)) / (T - period)
    assert induction.induction_score(uniform, ids) == pytest.approx(expected)
    patterns = torch.stack([torch.stack([uniform, previous]), torch.stack([copier, uniform])])  # [2 layers, 2 heads]
    scores = induction.head_scores(patterns, ids)
    assert [(r["layer"], r["head"]) for r in scores] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    best = induction.best_heads(scores)
    assert (best["previous_token"]["layer"], best["previous_token"]["head"]) == (0, 1)
    assert (best["induction"]["layer"], best["induction"]["head"]) == (1, 0)
    assert scores[0]["previous_token"] == pytest.approx(sum(1 / (i + 1) for i in range(1, T)) / (T - 1), abs=1e-4)


def test_copy_measures_of_a_perfect_copier():
    """A model that knows the answer on the repeats and nothing on the first copy: losses of the
    repeats near 0, of the first copy at chance, whatever each row's period."""
    V = 20

    class Oracle(torch.nn.Module):
        def __init__(self, ids, periods):
            super().__init__()
            self.ids, self.periods, self.anchor = ids, periods, torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            logits = torch.zeros(*x.shape, V)
            targets = self.ids[:, 1 : x.size(1) + 1]
            known = torch.arange(1, x.size(1) + 1)[None] >= self.periods[:, None]
            logits[known] = 50.0 * F.one_hot(targets[known], V).float()
            return logits, None

    small = induction.ToyConfig(length=16, shortest=3, longest=6, vocab_size=V)
    ids, periods = induction.periodic_sequences(8, small, torch.Generator().manual_seed(1))
    m = induction.copy_measures(Oracle(ids, periods), ids, periods)
    assert m["first_copy_loss"] == pytest.approx(math.log(V), abs=1e-5)
    assert m["repeat_loss"] < 1e-6 and m["copy_accuracy"] == 1.0
    assert m["icl_score"] == pytest.approx(-math.log(V), abs=1e-5)


def test_the_toy_jumps_from_guessing_to_copying(toy):
    _, history = toy
    rows = induction.measurements(history)
    assert [r["step"] for r in rows] == list(range(0, TOY.steps + 1, TOY.record_every))
    early, last = rows[4], rows[-1]  # step 100, step 600
    assert early["copy_accuracy"] < 0.15 and early["icl_score"] > -0.5  # before: the context barely helps
    assert last["copy_accuracy"] > 0.85
    assert last["repeat_loss"] < 0.2 * last["first_copy_loss"]
    assert last["first_copy_loss"] > math.log(TOY.vocab_size) - 0.1  # random tokens stay unpredictable
    assert last["icl_score"] < -3.0
    jump = induction.jump_step(history)
    assert 200 <= jump <= 450  # late and sudden: from below 0.3 to above 0.5 within 50 steps
    before = next(r for r in rows if r["step"] == jump - 50)
    assert before["copy_accuracy"] < 0.3, before


def test_the_toy_copies_by_content_with_two_heads_in_two_layers(toy):
    """What formed is the induction pair, not a positional shortcut: a previous-token head in
    layer 0, induction heads in layer 1, and segments shorter than any trained on are copied."""
    model, history = toy
    assert induction.measurements(history)[-1]["unseen_period_copy_accuracy"] > 0.85
    assert induction.measurements(history)[0]["unseen_period_copy_accuracy"] < 0.1
    probe = induction.probe_sequence(TOY, period=16, seed=3)
    best = induction.best_heads(induction.head_scores(induction.attention_patterns(model, probe), probe))
    assert best["previous_token"]["layer"] == 0 and best["previous_token"]["previous_token"] > 0.4
    assert best["induction"]["layer"] == 1 and best["induction"]["induction"] > 0.4
    assert best["previous_token"]["induction"] < 0.1 and best["induction"]["previous_token"] < 0.1


def test_with_learned_positions_the_toy_has_not_jumped_yet(one_thread):
    """The knob the notebook names: the same toy with GPT-2's learned positions has no
    previous-token head to build on, and after as many steps as the modern model needs to jump
    (350) it still copies little."""
    _, history = induction.train_toy(induction.ToyConfig(arch="gpt2", steps=350, record_every=350), seed=0)
    assert induction.measurements(history)[-1]["copy_accuracy"] < 0.3


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
    assert {
        "first copy (random tokens)",
        "repeats",
        "copy: segments of 8-24",
        "copy: a segment length never trained on",
    } <= names
    assert all(fig.layout[f"xaxis{i}"].title.text == "optimizer step" for i in ("", 2, 3))
    assert fig.layout.yaxis.title.text.startswith("cross-entropy")
    ids = induction.probe_sequence(TOY, seed=5)
    patterns = induction.attention_patterns(model, ids)
    scores = induction.head_scores(patterns, ids)
    browser = widgets.head_browser(patterns, ids.tolist(), scores)
    (layer, head), output = browser.children[0].children, browser.children[1]

    def shown_title() -> str:
        (shown,) = output.outputs  # replaced, never stacked
        return shown["data"]["application/vnd.plotly.v1+json"]["layout"]["title"]["text"]

    assert list(layer.options) == [0, 1] and list(head.options) == [0, 1]
    heatmap = plots.attention_heatmap(patterns[1, 1], ids.tolist(), 1, 1, scores[3])
    assert "layer 1, head 1: previous-token" in heatmap.layout.title.text
    assert heatmap.layout.xaxis.title.text.startswith("key position") and list(heatmap.data[0].x) == list(range(48))
    assert len(heatmap.data[0].z) == 48
    assert shown_title().startswith("Attention of layer 0, head 0")
    layer.value, head.value = 1, 1
    assert shown_title().startswith("Attention of layer 1, head 1: previous-token")
    curve = plots.loss_by_position([3.0, 2.5, 2.0], icl_score=-1.0, copy_accuracy=0.25)
    assert "ICL score -1.00" in curve.layout.title.text and "copy accuracy 0.25" in curve.layout.title.text
    assert curve.layout.xaxis.title.text.startswith("position in the context")
