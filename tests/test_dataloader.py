"""Random windows of the token stream: every valid start can be drawn, and no window runs past the end.
A text too large for memory encodes as a stream, to the same ids as the whole."""

import numpy as np
import pytest
import torch

from labkit.config import ConfigError
from labkit.dataloader import TokenWindows


def test_the_last_valid_start_is_drawn_and_no_window_runs_past_the_end():
    block = 8
    tokens = np.arange(block + 2, dtype=np.uint16)  # two windows fit: starts 0 and 1
    windows = TokenWindows(tokens, block, batch_size=16, seed=0)
    starts = []
    for _ in range(20):
        x, y = windows.next()
        assert x.shape == y.shape == (16, block)
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y, x + 1)  # y is x shifted by one, in the stream
        starts += x[:, 0].tolist()
    assert sorted(set(starts)) == [0, 1]  # 320 draws: both starts seen, none past n - T - 1
    assert 100 < starts.count(1) < 220  # and about as often as each other


def test_a_stream_of_exactly_one_window_is_enough():
    tokens = np.arange(9, dtype=np.uint16)
    x, y = TokenWindows(tokens, 8, batch_size=4, seed=0).next()
    assert x.tolist() == [list(range(8))] * 4 and y.tolist() == [list(range(1, 9))] * 4
    with pytest.raises(ConfigError, match="holds 8 tokens, fewer than block_size \\+ 1 = 9"):
        TokenWindows(tokens[:8], 8, batch_size=4, seed=0)


# --- encoding a text too large for memory -----------------------------------------------------------

TRICKY = (
    "Line one.\nLine two:\n\n  indented\n 's and 'll\r\nWindows line\n.\n42 apples\n\t\ttabbed\n"
    "日本語の文\nZoë's café\n\n\n3.14159\n...\n   \nend"
)


@pytest.fixture(scope="module", params=["gpt4", "gpt2"])
def tokenizer(request):
    from labkit.tokenizer import Tokenizer

    return Tokenizer.train([TRICKY * 5, "the cat sat on the mat\n" * 30], 400, pattern=request.param)


def test_a_stream_encodes_as_the_whole_text_wherever_the_pieces_are_cut(tokenizer):
    import random

    from labkit.dataloader import encode_stream

    text = TRICKY * 7
    whole = tokenizer.encode(text)
    rng = random.Random(0)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 40)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert list(encode_stream(tokenizer, pieces)) == whole
    assert list(encode_stream(tokenizer, list(text))) == whole  # one character at a time
    assert list(encode_stream(tokenizer, [])) == []


def test_a_file_larger_than_the_memory_it_may_use_is_encoded_as_a_stream(tokenizer, tmp_path):
    import tracemalloc

    from labkit.dataloader import encode_file

    path = tmp_path / "big.txt"
    with open(path, "w", encoding="utf-8", newline="") as f:
        for i in range(30_000):  # 2.7 MB
            f.write(f"Page {i}: the cat sat on the mat, {i * 7} times.\r\n{TRICKY[: i % 97]}\n")
    expected = tokenizer.encode(path.read_bytes().decode("utf-8"))  # "\r\n" kept
    tracemalloc.start()
    n = 0
    for n, token in enumerate(encode_file(tokenizer, path, block_chars=1 << 16), 1):
        assert token == expected[n - 1]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == len(expected) > 500_000
    assert peak < 2 << 20  # a few blocks' worth: the file's text is 2.7 MB, its ids as a list over 15 MB
