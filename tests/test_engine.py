"""The engine: generation (KV cache equals recomputation, batches of prompts of different lengths
equal one prompt at a time, sampling filters, seeds, stop tokens, streaming, errors), scoring
(micro-batched equals whole-batch, temperature), and reading replies."""

import pytest
import torch

from labkit.engine import decode_reply, generate, logprobs, pack, sample_next, sample_text, score
from labkit.model import GPT, GPTConfig

VOCAB, BLOCK = 300, 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["gpt2", "modern"])
def model(request):
    """A tiny GPT of each architecture with weights shaken up so that its greedy output varies from
    step to step (and the modern one's zero-initialised projections do something)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, arch=request.param))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def random_prompt(length, seed=0):
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("prompt_length, max_new_tokens, num_samples", [(5, 30, 1), (12, 20, 3), (56, 8, 2)])
def test_greedy_with_cache_equals_greedy_without(model, prompt_length, max_new_tokens, num_samples):
    prompt = random_prompt(prompt_length)
    cached = generate(model, prompt, max_new_tokens, temperature=0, num_samples=num_samples)
    recomputed = generate(model, prompt, max_new_tokens, temperature=0, num_samples=num_samples, use_cache=False)
    assert cached == recomputed
    assert len(cached) == num_samples and all(len(row) == max_new_tokens for row in cached)
    assert len(set(cached[0])) > 1  # not a constant stream: the comparison means something


def test_sampling_with_cache_equals_sampling_without(model):
    prompt = random_prompt(10)
    kwargs = dict(temperature=0.8, top_k=50, num_samples=4, seed=7)
    assert generate(model, prompt, 20, **kwargs) == generate(model, prompt, 20, use_cache=False, **kwargs)


def test_prompts_of_different_lengths_come_back_in_order(model):
    short, long = random_prompt(3, seed=1), random_prompt(17, seed=2)
    together = generate(model, [short, long], 10, temperature=0, num_samples=2)
    assert together == generate(model, short, 10, temperature=0, num_samples=2) + generate(
        model, long, 10, temperature=0, num_samples=2
    )


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    prompt = random_prompt(8)
    greedy = generate(model, prompt, 25, temperature=0, num_samples=2)
    assert generate(model, prompt, 25, top_k=1, num_samples=2, seed=3) == greedy
    assert generate(model, prompt, 25, top_p=1e-6, num_samples=2, seed=3) == greedy


def test_sampled_tokens_stay_in_the_top_k():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, VOCAB, generator=g).repeat(50, 1)  # each row drawn 50 times
    chosen = sample_next(logits, temperature=1.5, top_k=5, generator=g)[:, 0]
    allowed = torch.topk(logits, 5).indices
    assert (allowed == chosen[:, None]).any(dim=1).all()
    assert len(set(chosen.tolist())) > 64  # it does sample, not just pick the best


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log().repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    counts = sample_next(logits, top_p=0.8, generator=g)[:, 0].bincount(minlength=4)
    assert counts[0] == 0 and counts[2] == 0  # 0.5 + 0.3 reach 0.8: the rest is cut
    assert counts[1] / 4000 == pytest.approx(0.5 / 0.8, abs=0.03)  # renormalised over the kept tokens
    counts = sample_next(logits, top_p=0.81, generator=g)[:, 0].bincount(minlength=4)
    assert counts[0] == 0 and counts[2] > 0  # 0.8 < 0.81: the next token (0.15) joins


def test_temperature_zero_is_argmax():
    logits = torch.randn(10, VOCAB, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_next(logits, temperature=0)[:, 0], logits.argmax(dim=-1))


def test_seed_makes_sampling_reproducible(model):
    prompt = random_prompt(6)
    first = generate(model, prompt, 20, num_samples=4, seed=123)
    assert generate(model, prompt, 20, num_samples=4, seed=123) == first
    assert generate(model, prompt, 20, num_samples=4, seed=124) != first
    assert len({tuple(row) for row in first}) > 1  # the samples of one prompt differ from each other


def test_a_row_stops_at_its_stop_token_which_is_included(model):
    prompt = random_prompt(8)
    greedy = generate(model, prompt, 30, temperature=0)[0]
    stop = greedy[5]
    first = greedy.index(stop)
    assert generate(model, prompt, 30, temperature=0, stop_tokens=[stop]) == [greedy[: first + 1]]
    rows = generate(model, prompt, 30, num_samples=8, seed=0, stop_tokens={stop, greedy[2]})
    for row in rows:
        stops = [i for i, t in enumerate(row) if t in (stop, greedy[2])]
        assert stops in ([], [len(row) - 1])  # only ever the last token
        assert stops or len(row) == 30


def test_tokens_stream_to_the_callback_in_order(model):
    calls = []
    prompts = [random_prompt(4, seed=1), random_prompt(9, seed=2)]
    rows = generate(model, prompts, 6, num_samples=2, seed=5, on_token=lambda row, token: calls.append((row, token)))
    assert [row for row, _ in calls] == [0, 1, 2, 3] * 6  # step by step, every row of the batch in turn
    for r in range(4):
        assert [t for row, t in calls if row == r] == rows[r]


def test_generate_leaves_the_model_in_training_mode_if_it_was():
    model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=1, n_embd=8, dropout=0.5)).train()
    assert generate(model, [1], 4, temperature=0) == generate(model, [1], 4, temperature=0)  # no dropout inside
    assert model.training


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.5), r"temperature=-0.5 .*allowed: >= 0"),
        (dict(top_p=0.0), r"top_p=0.0 .*allowed: 0 < top_p <= 1"),
        (dict(top_p=1.5), r"top_p=1.5 .*allowed: 0 < top_p <= 1"),
        (dict(top_k=0), r"top_k=0 .*allowed: an integer >= 1"),
        (dict(max_new_tokens=0), r"max_new_tokens=0 .*allowed: an integer >= 1"),
        (dict(num_samples=0), r"num_samples=0 .*allowed: an integer >= 1"),
        (dict(max_new_tokens=60), r"prompt of 10 tokens \+ max_new_tokens=60 = 70 exceeds .*block_size=64"),
        (dict(max_new_tokens=60, use_cache=False), r"prompt of 10 tokens \+ max_new_tokens=60 = 70 exceeds"),
        (dict(prompt=[]), r"prompt is empty"),
        (dict(prompt=[1, 300]), r"token id 300 is out of range; allowed: 0 to 299"),
    ],
)
def test_bad_parameters_are_refused_with_the_allowed_range(model, kwargs, message):
    kwargs = dict(dict(prompt=random_prompt(10), max_new_tokens=5), **kwargs)
    with pytest.raises(ValueError, match=message):
        generate(model, kwargs.pop("prompt"), kwargs.pop("max_new_tokens"), **kwargs)


class ByteTokenizer:
    """Bytes as tokens, other ids as <tok N>: enough of the tokenizer API for sample_text."""

    def __init__(self, endoftext):
        self.special_tokens = {"<|endoftext|>": endoftext}

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return "".join(chr(i) if i < 128 else f"<tok {i}>" for i in ids)


def test_sample_text_decodes_and_stops_before_endoftext(model):
    greedy = generate(model, list(b"hi"), 20, temperature=0)[0]
    eot = greedy[4]
    tokenizer = ByteTokenizer(endoftext=eot)
    [text] = sample_text(model, tokenizer, "hi", max_new_tokens=20, temperature=0)
    assert text == tokenizer.decode(greedy[: greedy.index(eot)])  # stopped there, <|endoftext|> left out
    texts = sample_text(model, tokenizer, ["", "a longer prompt"], max_new_tokens=5, num_samples=2, seed=0)
    rows = generate(model, [[eot], list(b"a longer prompt")], 5, num_samples=2, seed=0, stop_tokens=[eot])
    assert texts == [tokenizer.decode([t for t in row if t != eot]) for row in rows]  # "" starts a new document


# --- batches of prompts of different lengths ---------------------------------------------------------


@pytest.mark.parametrize("max_batch", [64, 3])
def test_batched_greedy_equals_one_prompt_at_a_time(model, max_batch, rows_seen):
    """Prompts of many lengths, padded on the left into shared batches (and split into batches of
    at most `max_batch` rows), give exactly the tokens each prompt gives alone, stops included."""
    prompts = [random_prompt(n, seed=n) for n in (1, 7, 3, 15, 7, 30, 2, 11)]
    alone = [generate(model, p, 20, temperature=0)[0] for p in prompts]
    stop = alone[3][4]  # a token some rows emit: those rows stop early, the others go on
    expected = [generate(model, p, 20, temperature=0, stop_tokens=[stop])[0] for p in prompts]
    assert any(len(row) < 20 for row in expected) and any(len(row) == 20 for row in expected)
    seen = rows_seen(model)
    together = generate(model, prompts, 20, temperature=0, stop_tokens=[stop], max_batch=max_batch)
    assert together == expected
    assert max(seen) <= max_batch
    assert generate(model, prompts, 20, temperature=0, use_cache=False, max_batch=max_batch) == alone


def test_a_stopped_row_leaves_the_batch(model, rows_seen):
    prompt = random_prompt(8)
    greedy = generate(model, prompt, 30, temperature=0)[0]
    other = random_prompt(8, seed=5)
    stop = next(t for t in greedy[2:] if t not in generate(model, other, 30, temperature=0)[0])  # only row 0 stops
    seen = rows_seen(model)
    rows = generate(model, [prompt, other], 30, temperature=0, stop_tokens=[stop])
    assert len(rows[0]) == greedy.index(stop) + 1 and len(rows[1]) == 30
    assert seen[: len(rows[0])] == [2] * len(rows[0]) and set(seen[len(rows[0]) :]) == {1}  # no compute for it after


# --- scoring -----------------------------------------------------------------------------------------


def test_score_equals_the_models_log_softmax_row_by_row(model):
    prompts, completions = [[1, 2, 3], [4, 5], [6]], [[7, 8], [9, 10, 11, 12], [13]]
    logps, mask = score(model, prompts, completions)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    for row, (p, c) in enumerate(zip(prompts, completions)):
        logits, _ = model(torch.tensor([p + c]))
        expected = torch.log_softmax(logits[0, len(p) - 1 : -1], -1)[torch.arange(len(c)), torch.tensor(c)]
        torch.testing.assert_close(logps[row, : len(c)], expected, atol=1e-5, rtol=0)
        assert (logps[row, len(c) :] == 0).all()


def test_micro_batched_scores_equal_the_whole_batch(model, rows_seen):
    g = torch.Generator().manual_seed(3)
    prompts = [
        torch.randint(0, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(1, 20, (13,), generator=g)
    ]
    completions = [
        torch.randint(0, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(1, 15, (13,), generator=g)
    ]
    whole, mask = score(model, prompts, completions, max_batch=64)
    seen = rows_seen(model)
    micro, micro_mask = score(model, prompts, completions, max_batch=4)
    assert seen == [4, 4, 4, 1]
    torch.testing.assert_close(micro, whole, atol=1e-5, rtol=0)
    assert torch.equal(mask, micro_mask)


@pytest.mark.parametrize("temperature", [0.5, 0.7, 2.0])
def test_scores_at_a_temperature_divide_the_logits(model, temperature):
    """TRL's convention: the log-probability of a token sampled at temperature T is taken from logits / T."""
    prompt, completion = random_prompt(6), random_prompt(5, seed=9)
    logps, _ = score(model, [prompt], [completion], temperature=temperature)
    logits, _ = model(torch.tensor([prompt + completion]))
    expected = torch.log_softmax(logits[0, 5:-1] / temperature, -1)[torch.arange(5), torch.tensor(completion)]
    torch.testing.assert_close(logps[0], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(logps, score(model, [prompt], [completion])[0], atol=1e-3)


def test_logprobs_keep_gradients(model):
    batch = pack([[1, 2]], [[3, 4]])
    logprobs(model, batch).sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


# --- reading replies -----------------------------------------------------------------------------------


class ChatTokenizer(ByteTokenizer):
    """Bytes as tokens plus the chat template's special tokens."""

    SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|tool_call|>"]

    def __init__(self):
        self.special_tokens = {name: 256 + i for i, name in enumerate(self.SPECIAL)}

    def encode_special(self, name):
        return self.special_tokens[name]

    def decode(self, ids):
        names = {v: k for k, v in self.special_tokens.items()}
        return "".join(names.get(i, chr(i) if i < 256 else "?") for i in ids)


def test_decode_reply_cuts_at_the_end_of_the_turn_and_hides_special_tokens():
    tok = ChatTokenizer()
    end, eot, start, sep, call = (
        tok.encode_special(n) for n in ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|tool_call|>")
    )
    hi = list(b" Hi there. ")
    assert decode_reply(hi + [end] + list(b"junk"), tok) == ("Hi there.", True, hi, len(hi) + 1)
    assert decode_reply(hi, tok) == ("Hi there.", False, hi, len(hi))  # cut off: never ended
    assert decode_reply(hi + [eot], tok).ended is False  # a document boundary is not the end of a turn
    # a reply that opens a new turn is cut there: the forged turn never reaches the text
    opened = decode_reply(hi + [start] + list(b"user") + [sep] + list(b"more") + [end], tok)
    assert opened.text == "Hi there." and not opened.ended
    inside = decode_reply(list(b"a") + [call] + list(b"b") + [end], tok)
    assert inside.text == "ab" and not inside.ended  # no special token's name leaks into the text
