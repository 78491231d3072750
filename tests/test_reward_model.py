"""The reward model learns the order of the pairs it is shown (the tiny preset's 6 steps are too few
to show it: their loss stays at ln 2, so the stage's own test does not ask for it)."""

import math
import shutil

from labkit import rlhf
from labkit.preferences import fill_with_simulated_labeler, is_heldout
from labkit.reward_model import train_reward_model
from labkit.run import Run, read_json
from labkit.sft import load_assistant


def test_the_reward_model_learns_the_order_of_its_pairs(tiny_run, tiny_config, tmp_path):
    from labkit.config import get_config
    from labkit.pipeline import ensure

    ensure("sft", tiny_config, tiny_run)
    shutil.copytree(tiny_run.path, tmp_path / "tiny", ignore=shutil.ignore_patterns("wandb", "rlhf"))
    run = Run("tiny", tmp_path)
    config = get_config("tiny", reward_model=dict(steps=40, learning_rate=1e-3))
    rankings = rlhf.open_rankings(run, config)
    fill_with_simulated_labeler(rankings)
    train = [pid for pid in rankings.order if not is_heldout(pid, config.rlhf.heldout_prompts)]
    sft, tokenizer = load_assistant(run)
    _, metrics = train_reward_model(
        sft, tokenizer, rankings.pairs(train), [], config, None, tmp_path / "rm", "cpu", "rm-learns"
    )
    losses = [row["loss"] for row in read_json(tmp_path / "rm" / "history.json")]
    assert metrics["rm_train_pairs"] >= 10  # ties make no pair: a dozen prompts give fewer than K(K-1)/2 each
    assert losses[0] > math.log(2) - 0.05  # it starts knowing nothing: no better than a coin (random scores do worse)
    assert sum(losses[-5:]) / 5 < 0.5  # and ends knowing most of the order
    assert metrics["rm_train_pair_accuracy"] >= 0.8
