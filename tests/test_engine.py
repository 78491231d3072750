"""Generation: KV cache equals recomputation, sampling filters, seeds, stop tokens, streaming, errors."""

import pytest
import torch

from labkit.engine import generate, sample_next, sample_text
from labkit.model import GPT, GPTConfig

VOCAB, BLOCK = 300, 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    """A tiny GPT with weights shaken up so that its greedy output varies from step to step."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32))
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
    assert together == generate(model, short, 10, temperature=0, num_samples=2) + \
        generate(model, long, 10, temperature=0, num_samples=2)


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
    assert generate(model, prompt, 30, temperature=0, stop_tokens=[stop]) == [greedy[:first + 1]]
    rows = generate(model, prompt, 30, num_samples=8, seed=0, stop_tokens={stop, greedy[2]})
    for row in rows:
        stops = [i for i, t in enumerate(row) if t in (stop, greedy[2])]
        assert stops in ([], [len(row) - 1])  # only ever the last token
        assert stops or len(row) == 30


def test_tokens_stream_to_the_callback_in_order(model):
    calls = []
    prompts = [random_prompt(4, seed=1), random_prompt(9, seed=2)]
    rows = generate(model, prompts, 6, num_samples=2, seed=5, on_token=lambda row, token: calls.append((row, token)))
    assert [row for row, _ in calls] == [0, 1] * 6 + [2, 3] * 6  # step by step, prompt by prompt
    for r in range(4):
        assert [t for row, t in calls if row == r] == rows[r]


def test_generate_leaves_the_model_in_training_mode_if_it_was():
    model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=1, n_embd=8, dropout=0.5)).train()
    assert generate(model, [1], 4, temperature=0) == generate(model, [1], 4, temperature=0)  # no dropout inside
    assert model.training


@pytest.mark.parametrize("kwargs, message", [
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
])
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
    assert text == tokenizer.decode(greedy[:greedy.index(eot)])  # stopped there, <|endoftext|> left out
    texts = sample_text(model, tokenizer, ["", "a longer prompt"], max_new_tokens=5, num_samples=2, seed=0)
    rows = generate(model, [[eot], list(b"a longer prompt")], 5, num_samples=2, seed=0, stop_tokens=[eot])
    assert texts == [tokenizer.decode([t for t in row if t != eot]) for row in rows]  # "" starts a new document
