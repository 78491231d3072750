"""Random windows of the token stream: every valid start can be drawn, and no window runs past the end."""

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
