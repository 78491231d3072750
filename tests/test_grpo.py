"""GRPO: tasks, rule-based rewards, advantages and the loss (against TRL 1.16 itself), the stage."""

import collections
import copy
import dataclasses
import json
import math
import random
import types

import pytest
import torch

from labkit import groups, grpo, grpo_compare, plots, rewards, tasks
from labkit.config import ConfigError, get_config, loss_recipe
from labkit.engine import score
from labkit.groups import group_advantages
from labkit.grpo import grpo_loss
from labkit.presets import LOSS_RECIPES
from labkit.rewards import RewardError, combine, extract_answer, parse_weights
from labkit.rules import LOSS_TYPES
from labkit.run import watch

# --- TRL 1.16 as the reference -------------------------------------------------------------------------


def trl_advantages(rewards_: torch.Tensor, G: int, scale_rewards: bool) -> torch.Tensor:
    """TRL 1.16 trl/trainer/grpo_trainer.py lines 2764-2787 (multi_objective_aggregation=
    'sum_then_normalize', scale_rewards 'group' or 'none'), with TRL's own `nanstd` (Bessel-corrected):
        mean_grouped = nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G)
        advantages = rewards - mean_grouped;  if scale: advantages / (std + 1e-4)"""
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards_.view(-1, G), dim=1).repeat_interleave(G)
    std = nanstd(rewards_.view(-1, G), dim=1).repeat_interleave(G)
    advantages = rewards_ - mean
    return advantages / (std + 1e-4) if scale_rewards else advantages


class _Accelerator:  # one process: gathering and reducing change nothing
    sync_gradients, num_processes = True, 1

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(
    logps,
    old,
    ref,
    advantages,
    mask,
    *,
    epsilon,
    epsilon_high,
    beta,
    loss_type,
    max_completion_length,
    accumulation_steps=1,
    num_items_in_batch=None,
):
    """TRL 1.16's own `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py line 3020), called on a
    stand-in trainer whose model "returns" our per-token log-probabilities. For one micro-batch of a
    step accumulated over `accumulation_steps` (TRL's default steps_per_generation: one generation per
    optimizer step), `num_items_in_batch` is the whole step's completion tokens, as TRL gathers it."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    B = logps.size(0)
    trainer = types.SimpleNamespace(
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=accumulation_steps),
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon_high,
        use_vllm=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accumulation_steps,
        max_completion_length=max_completion_length,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        accelerator=_Accelerator(),
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
    )
    inputs = dict(
        prompt_ids=torch.zeros(B, 2, dtype=torch.long),
        prompt_mask=torch.ones(B, 2),
        completion_ids=torch.zeros(mask.shape, dtype=torch.long),
        completion_mask=mask,
        advantages=advantages,
        old_per_token_logps=old,
        ref_per_token_logps=ref,
        num_items_in_batch=mask.sum() if num_items_in_batch is None else num_items_in_batch,
    )
    return GRPOTrainer._compute_loss(trainer, None, inputs)


def replicated_trl_loss(
    logps, old, ref, advantages, mask, *, epsilon, epsilon_high, beta, loss_type, max_completion_length
):
    """TRL 1.16's formula written out (grpo_trainer.py lines 3095-3164), for machines without TRL."""
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon_high)
    a = advantages.unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * a, coef_2 * a)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * (torch.exp(ref - logps) - (ref - logps) - 1)
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type in ("bnpo", "dapo"):  # one batch: dapo's num_items_in_batch is this batch's tokens
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)


def synthetic(G=4, prompts=3, T=7, seed=0):
    """Per-token log-probs of a policy, its sampling policy and a reference, a ragged mask, and
    rewards with one zero-variance group (float64, so only the formula can differ)."""
    g = torch.Generator().manual_seed(seed)
    B = G * prompts
    logps = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    old = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios both sides of the clip range
    ref = logps + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    rewards_ = torch.randint(0, 3, (B,), generator=g).to(torch.float64) / 2
    rewards_[:G] = 1.0  # the first group: every sample scored the same
    return logps, old, ref, mask, rewards_


@pytest.mark.parametrize("scale_rewards", [True, False])
def test_advantages_match_trl(scale_rewards):
    *_, rewards_ = synthetic()
    ours, zero = group_advantages(rewards_, 4, scale_rewards)
    assert torch.allclose(ours, trl_advantages(rewards_, 4, scale_rewards), atol=1e-6, rtol=0)
    from trl.trainer.utils import nanstd

    assert (
        zero.tolist()
        == torch.isclose(nanstd(rewards_.view(-1, 4), dim=1), torch.zeros(3, dtype=torch.float64)).tolist()
    )
    assert zero[0].item()  # the first group: every sample scored the same
    assert torch.all(ours[:4] == 0)


def test_advantages_by_hand():
    adv, zero = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5, 0.5]), 3)
    std = math.sqrt(((1 - 1 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # Bessel-corrected
    assert adv[0].item() == pytest.approx((1 - 1 / 3) / (std + 1e-4), abs=1e-6)
    assert zero.tolist() == [False, True]
    plain, _ = group_advantages(torch.tensor([1.0, 0.0, 0.0]), 3, scale_rewards=False)
    assert plain.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3])


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("scale_rewards", [True, False])
def test_loss_matches_trl(loss_type, beta, scale_rewards):
    logps, old, ref, mask, rewards_ = synthetic()
    advantages, _ = group_advantages(rewards_, 4, scale_rewards)
    kw = dict(epsilon=0.2, epsilon_high=0.28, beta=beta, loss_type=loss_type, max_completion_length=10)
    ours, stats = grpo_loss(logps, old, ref, advantages, mask, **kw)
    assert abs(ours.item() - replicated_trl_loss(logps, old, ref, advantages, mask, **kw).item()) < 1e-6
    theirs = trl_loss(logps, old, ref, advantages, mask, **kw)
    assert abs(ours.item() - theirs.item()) < 1e-6
    assert (stats["kl"] > 0) == (beta > 0)
    assert 0 < stats["clip_fraction"] < 1


def test_dapo_is_bnpo_on_one_batch_and_trls_dapo_however_accumulated():
    """TRL 1.16: on one batch dapo and bnpo are the same number. Accumulated over micro-batches of
    unequal token counts, TRL's bnpo averages each micro-batch's token mean (a short micro-batch's
    tokens weigh more) while TRL's dapo divides every micro-batch by the whole step's tokens. labkit's
    micro-batches are divided by the whole batch's tokens: its dapo (and bnpo) is TRL's accumulated dapo,
    loss and gradient."""
    logps, old, ref, mask, rewards_ = synthetic(prompts=4)
    mask[:4] = torch.tensor([1.0] + [0.0] * 6)  # the first micro-batch: one token per sample
    advantages, _ = group_advantages(rewards_, 4, True)
    kw = dict(epsilon=0.2, epsilon_high=0.28, beta=0.04, max_completion_length=10)
    assert trl_loss(logps, old, ref, advantages, mask, loss_type="dapo", **kw).item() == pytest.approx(
        trl_loss(logps, old, ref, advantages, mask, loss_type="bnpo", **kw).item(), abs=1e-12
    )

    def accumulated(loss_type):  # TRL's gradient accumulation over 4 micro-batches of 4 samples
        logps_ = logps.clone().requires_grad_(True)
        total = sum(
            trl_loss(
                logps_[part],
                old[part],
                ref[part],
                advantages[part],
                mask[part],
                loss_type=loss_type,
                accumulation_steps=4,
                num_items_in_batch=mask.sum(),
                **kw,
            )
            for part in (slice(i, i + 4) for i in range(0, 16, 4))
        )
        total.backward()
        return total.item(), logps_.grad

    (trl_dapo, trl_grad), (trl_bnpo, _) = accumulated("dapo"), accumulated("bnpo")
    for loss_type in ("dapo", "bnpo"):
        ours_logps = logps.clone().requires_grad_(True)
        ours = sum(
            grpo_loss(
                ours_logps[part],
                old[part],
                ref[part],
                advantages[part],
                mask[part],
                loss_type=loss_type,
                n_rows=16,
                n_tokens=mask.sum(),
                **kw,
            )[0]
            for part in (slice(i, i + 4) for i in range(0, 16, 4))
        )
        ours.backward()
        assert ours.item() == pytest.approx(trl_dapo, abs=1e-12)
        torch.testing.assert_close(ours_logps.grad, trl_grad, atol=1e-12, rtol=0)
    assert abs(trl_bnpo - trl_dapo) > 1e-3  # TRL's accumulated bnpo is another number


def nanochat_loss(logps, advantages, mask):
    """nanochat's RL loss (scripts/chat_rl.py) on one device batch, written out: advantages r - mean(r),
    logp per token (0 off the reply), pg_obj = sum(logp * A) / (number of reply tokens), loss = -pg_obj."""
    pg_obj = (logps * mask * advantages.unsqueeze(-1)).sum()
    return -pg_obj / mask.sum().clamp(min=1)


def test_reinforce_is_nanochats_loss_and_the_reinforce_gradient():
    logps, old, _, mask, rewards_ = synthetic()
    advantages, _ = group_advantages(rewards_, 4, scale_rewards=False)
    assert torch.allclose(advantages, rewards_ - rewards_.view(-1, 4).mean(1).repeat_interleave(4))  # r - mean
    logps.requires_grad_(True)
    loss, stats = grpo_loss(logps, old, None, advantages, mask, loss_type="reinforce")
    assert loss.item() == pytest.approx(nanochat_loss(logps, advantages, mask).item(), abs=1e-12)
    assert stats == dict(clip_fraction=0.0, kl=0.0)
    loss.backward()
    # REINFORCE: the gradient of the loss is -sum over tokens of A * grad logp / n_tokens
    expected = -advantages.unsqueeze(1) * mask / mask.sum()
    torch.testing.assert_close(logps.grad, expected, atol=1e-12, rtol=0)
    # it takes no ratio: the sampling policy's log-probs change nothing
    assert grpo_loss(logps, old + 1.0, None, advantages, mask, loss_type="reinforce")[0].item() == loss.item()
    # on-policy (ratio 1) with beta 0, dapo's gradient is the same step
    on_policy = logps.detach().clone().requires_grad_(True)
    grpo_loss(on_policy, on_policy.detach(), None, advantages, mask, loss_type="dapo")[0].backward()
    torch.testing.assert_close(on_policy.grad, expected, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="loss_type='reinforce' has no KL penalty; beta must be 0"):
        grpo_loss(logps, old, old, advantages, mask, loss_type="reinforce", beta=0.04)


def test_loss_is_policy_gradient_at_ratio_one():
    """On-policy (ratio 1, beta 0) the gradient of the grpo loss is -A / |o| per token: REINFORCE."""
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, _ = grpo_loss(logps, logps.detach(), None, torch.tensor([1.0, -1.0]), mask, loss_type="grpo")
    loss.backward()
    assert torch.allclose(logps.grad, torch.tensor([[-0.25, -0.25, 0.0], [1 / 6, 1 / 6, 1 / 6]]))


def test_zero_variance_groups_give_no_gradient():
    logps, old, _, mask, rewards_ = synthetic()
    logps.requires_grad_(True)
    advantages, zero = group_advantages(rewards_, 4)
    loss, _ = grpo_loss(logps, old, None, advantages, mask, beta=0.0, loss_type="bnpo")
    loss.backward()
    assert zero[0] and torch.all(logps.grad[:4] == 0) and torch.any(logps.grad[4:] != 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_rewards", [True, False])
@pytest.mark.parametrize("equal", [0.2 + 1.0, 0.7, 1 / 3, 0.0])
def test_a_group_of_equal_rewards_has_advantages_of_exactly_zero(dtype, scale_rewards, equal):
    """1.2 in float32: the mean of eight of them is off by a rounding error, which divided by
    (0 + 1e-4) became advantages of about 1e-3. They must be 0, and only they."""
    rewards_ = torch.tensor([equal] * 8 + [0.0, 1.2] * 4 + [1.2] * 7 + [0.2], dtype=dtype)
    advantages, zero = group_advantages(rewards_, 8, scale_rewards)
    assert advantages.dtype == dtype and zero.tolist() == [True, False, False]
    assert advantages[:8].tolist() == [0.0] * 8
    assert torch.all(advantages[8:] != 0)
    assert advantages[8:16].float().sum().abs() < 1e-2 and advantages[16:23].float().min() > 0


def test_scored_groups_keep_exact_zeros_and_say_they_teach_nothing():
    task = dict(task="addition", prompt="1 + 0.2?", answer="1.2")
    texts = ["The answer is 1.2."] * 4 + ["The answer is 1.2.", "no", "no", "no"]
    samples = [dict(task=task, text=t, ids=[1, 2], ended=True) for t in texts]
    zero = groups.score_groups(samples, {"correct": 1.0, "format": 0.2}, 4)
    assert zero.tolist() == [True, False]
    assert [s["advantage"] for s in samples[:4]] == [0.0] * 4 and samples[4]["advantage"] > 0
    assert groups.group_view(samples, 0, 4)["zero_variance"] is True
    assert groups.group_view(samples, 1, 4)["zero_variance"] is False


def test_loss_rejects_unknown_type():
    with pytest.raises(ValueError, match="allowed: grpo, bnpo, dr_grpo, dapo, reinforce"):
        grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), None, torch.zeros(1), torch.ones(1, 1), loss_type="ppo")


# --- tasks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_tasks_answers_are_right_and_solutions_score_full(name):
    rng = random.Random(0)
    for _ in range(30):
        task = tasks.draw(name, rng)
        assert task["prompt"].endswith(tasks.INSTRUCTION)
        assert rewards.correct(task["solution"], task) == 1.0 and rewards.format_ok(task["solution"], task) == 1.0
        if name == "addition":
            a, b = map(int, task["key"].split(":")[1].split("+"))
            assert task["answer"] == str(a + b)
        if name == "count_letter":
            letter, word = task["key"].split(":")[1].split("@")
            assert task["answer"] == str(word.count(letter))


def test_heldout_problems_never_seen_in_training():
    names = list(tasks.TASKS)
    heldout = tasks.heldout_problems(names, 20, seed=1)
    keys = {t["key"] for t in heldout}
    assert len(keys) == len(heldout) and {t["task"] for t in heldout} == set(names)
    training = tasks.TaskStream(names, seed=1).next(500)
    assert not keys & {t["key"] for t in training}
    assert all(not tasks.is_heldout(t["key"]) for t in training)
    assert heldout == tasks.heldout_problems(names, 20, seed=1)  # deterministic


def test_word_problems_use_the_world(tiny_run):
    from labkit.data import read_world

    world = read_world(tiny_run)
    task = tasks.word_problem(random.Random(3), world)
    names = {p.name for p in world.people} | {p.employer for p in world.people}
    assert any(n in task["prompt"] for n in names)


def test_parse_tasks_errors():
    assert tasks.parse_tasks("addition, count_letter") == ["addition", "count_letter"]
    with pytest.raises(ConfigError, match="unknown task .division.; allowed: one_digit, addition"):
        tasks.parse_tasks("addition,division")


def test_gsm8k_format_from_a_local_file(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    rows = [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "A box holds 1,000 pins. How many in 2 boxes?", "answer": "2 * 1000 = 2000\n#### 2,000"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = tasks.load_gsm8k(str(path))
    assert [t["answer"] for t in loaded] == ["7", "2000"]
    assert "<<" not in loaded[0]["solution"] and rewards.correct(loaded[1]["solution"], loaded[1]) == 1.0
    config = get_config("tiny", grpo=dict(source=str(path), n_heldout=1))
    stream, heldout = grpo.load_tasks(config, None)
    assert len(heldout) == 1 and stream.next(3)[0]["task"] == "gsm8k" and heldout[0] not in stream.pool


def test_gsm8k_bad_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    with pytest.raises(ValueError, match="row 0: a GSM8K answer ends with '#### N'"):
        tasks.load_gsm8k(str(bad))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "q", "answer": "#### 1"}) + "\n")
    with pytest.raises(ValueError, match="lacks column\\(s\\) question"):
        tasks.load_gsm8k(str(other))
    with pytest.raises(FileNotFoundError, match="no such file"):
        tasks.load_gsm8k(str(tmp_path / "missing.jsonl"))


# --- rewards -----------------------------------------------------------------------------------------


def test_answer_extraction_and_rules():
    task = {"answer": "68", "key": "k"}
    assert extract_answer("20 + 40 = 60. The answer is 68.") == "68"
    assert extract_answer("The answer is 1,234.") == "1234"
    assert extract_answer("The answer is 5. The answer is 68.") == "68"  # the last one counts
    assert extract_answer("no number here") is None
    assert rewards.correct("Add ... The answer is 68.", task) == 1.0
    assert rewards.correct("The answer is 67.", task) == 0.0
    assert rewards.format_ok("Add the tens. The answer is 68.", task) == 1.0
    assert rewards.format_ok("The answer is 68. Then more text", task) == 0.0  # not the last sentence
    assert rewards.format_ok("The answer is 6. The answer is 68.", task) == 0.0  # only one final answer
    assert rewards.shows_work("20 + 40 = 60. The answer is 68.", task) == 1.0
    assert rewards.close("The answer is 68.", task) == 1.0
    assert rewards.close("The answer is 51.", task) == pytest.approx(0.75)
    assert rewards.close("The answer is 500.", task) == 0.0 and rewards.close("no answer", task) == 0.0
    assert rewards.shows_work("The answer is 68.", task) == 0.0


def test_combine_weights():
    task = {"answer": "7", "key": "k"}
    totals, per = combine(
        ["3 + 4 = 7. The answer is 7.", "The answer is 8 because", "x"], [task] * 3, {"correct": 1.0, "format": 0.5}
    )
    assert totals == [1.5, 0.0, 0.0] and per["format"] == [1.0, 0.0, 0.0]
    assert parse_weights("correct=1.0, format=0.2") == {"correct": 1.0, "format": 0.2}
    with pytest.raises(ConfigError, match="unknown reward 'length'; allowed: correct, format"):
        parse_weights("correct=1,length=2")
    with pytest.raises(ConfigError, match="weight of 'correct' is 'high', not a number"):
        parse_weights("correct=high")


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda c, t: 1 / 0, "reward 'bad' raised ZeroDivisionError"),
        (lambda c, t: float("nan"), "reward 'bad' returned nan"),
        (lambda c, t: "1.0", "reward 'bad' returned '1.0' \\(allowed: a finite number\\)"),
        (lambda c, t: None, "reward 'bad' returned None"),
    ],
)
def test_bad_reward_is_reported_with_the_sample(bad, message):
    registry = dict(rewards.REWARDS, bad=lambda c, t: bad(c, t) if "WEIRD" in c else 1.0)
    with pytest.raises(RewardError, match=message) as info:
        combine(["fine", "a WEIRD sample"], [{"key": "addition:1+2"}] * 2, {"bad": 1.0}, registry)
    assert "a WEIRD sample" in str(info.value) and "addition:1+2" in str(info.value)


# --- the model side: log-probs, one training step, the stage --------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_run, tiny_config):
    from labkit.pipeline import ensure
    from labkit.tokenizer import Tokenizer

    ensure("tokenizer", tiny_config, tiny_run)
    return Tokenizer.load(tiny_run.path / "tokenizer")


def tiny_gpt(vocab_size, block_size=64, seed=0):
    from labkit.model import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()


def test_grpo_step_moves_probability_towards_better_samples(tiny_tokenizer):
    """One step on hand-made groups: the rewarded reply gains log-probability, the other loses it."""
    cfg = get_config("tiny", grpo=dict(learning_rate=3e-3, beta=0.04)).grpo
    cfg.num_generations = 2
    model = tiny_gpt(tiny_tokenizer.n_vocab, block_size=128)
    ref = tiny_gpt(tiny_tokenizer.n_vocab, block_size=128)
    task = tasks.draw("addition", random.Random(0))
    prompt = grpo.prompt_ids(task, tiny_tokenizer)
    good, bad = tiny_tokenizer.encode(task["solution"])[:10], tiny_tokenizer.encode("I am not sure.")
    samples = [dict(prompt=prompt, ids=good, advantage=0.7071), dict(prompt=prompt, ids=bad, advantage=-0.7071)]
    before, _ = score(model, [prompt] * 2, [good, bad])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    for _ in range(3):
        stats = grpo.grpo_step(model, ref, optimizer, samples, cfg)
    after, _ = score(model, [prompt] * 2, [good, bad])
    assert after[0].sum() > before[0].sum() and after[1].sum() < before[1].sum()
    assert math.isfinite(stats["loss"]) and stats["kl"] > 0


def test_sampling_scoring_and_a_training_loop_on_a_random_model(tiny_tokenizer):
    cfg = get_config("tiny").grpo
    model = tiny_gpt(tiny_tokenizer.n_vocab)
    heldout = tasks.heldout_problems(["addition", "count_letter"], 2, seed=0)
    stream = tasks.TaskStream(["addition", "count_letter"], seed=0)
    weights = parse_weights(cfg.rewards)
    events = []
    with watch(events.append, "grpo"):
        result = grpo.train_grpo(model, tiny_tokenizer, stream, heldout, cfg, weights, seed=0)
    history = result["history"]
    assert [r["step"] for r in history] == [1, 2, 3] and len(events) == 3
    assert all(math.isfinite(r["loss"]) and 0 <= r["zero_variance_fraction"] <= 1 for r in history)
    assert "pass_at_1" in history[0] and "pass_at_1" in history[-1]
    group = result["groups"][0]
    assert len(group["samples"]) == cfg.num_generations
    assert all(set(s) >= {"text", "reward", "advantage", "rewards"} for s in group["samples"])


def test_grpo_trains_with_pretrainings_optimizer(tiny_tokenizer, monkeypatch):
    from labkit.config import TrainConfig
    from labkit.train import Muon

    stepped = []
    monkeypatch.setattr(Muon, "step", lambda self, closure=None: stepped.append(self.param_groups[0]["lr"]))
    cfg = get_config("tiny").grpo
    model = tiny_gpt(tiny_tokenizer.n_vocab)
    stream = tasks.TaskStream(["addition"], seed=0)
    train = TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=0.02)
    grpo.train_grpo(model, tiny_tokenizer, stream, [], cfg, parse_weights(cfg.rewards), seed=0, train=train)
    # Muon steps every GRPO step, at pretraining's ratio of Muon's rate to AdamW's (warmup included)
    ratio = 0.02 / 1e-3
    expected = [cfg.learning_rate * min(1.0, (s + 1) / cfg.warmup_steps) * ratio for s in range(cfg.max_steps)]
    assert stepped == pytest.approx(expected)


def test_a_failing_reward_stops_training(tiny_tokenizer, monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "broken", lambda c, t: float("nan"))
    cfg = get_config("tiny").grpo
    model = tiny_gpt(tiny_tokenizer.n_vocab)
    stream = tasks.TaskStream(["addition"], seed=0)
    with pytest.raises(RewardError, match="reward 'broken' returned nan .* on the sample"):
        grpo.train_grpo(model, tiny_tokenizer, stream, [], cfg, {"correct": 1.0, "broken": 1.0}, seed=0)


def test_cold_start_teaches_the_worked_solutions(tiny_tokenizer, tmp_path):
    from labkit.chat import render_prompt
    from labkit.run import Run

    config = get_config("tiny", grpo=dict(cold_start_steps=12, cold_start_learning_rate=1e-2))
    model = tiny_gpt(tiny_tokenizer.n_vocab, block_size=128)
    stream = tasks.TaskStream(["one_digit"], seed=0)
    problem = tasks.draw("one_digit", random.Random(3))
    prompt = render_prompt([dict(role="user", content=problem["prompt"])], tiny_tokenizer)
    solution = tiny_tokenizer.encode(problem["solution"])

    def solution_logp():
        with torch.no_grad():
            return score(model, [prompt], [solution])[0].sum().item()

    run = Run("cold", tmp_path)
    untouched = solution_logp()
    off = grpo.cold_start(
        model,
        tiny_tokenizer,
        stream,
        get_config("tiny", grpo=dict(cold_start_steps=0)),
        "cpu",
        run,
        tmp_path / "off.pt",
        "off",
    )
    assert off == dict(steps=0, problems=0, seconds=0.0) and solution_logp() == untouched
    warm = grpo.cold_start(model, tiny_tokenizer, stream, config, "cpu", run, tmp_path / "cold.pt", "cold")
    assert warm["steps"] == 12 and 1 <= warm["problems"] <= 81  # one-digit sums: 81 problems, a fifth held out
    assert solution_logp() > untouched + 1.0
    # its own stream: GRPO's order is unchanged
    assert stream.next(1) == tasks.TaskStream(["one_digit"], seed=0).next(1)


def test_config_checks():
    with pytest.raises(
        ConfigError, match="grpo.loss_type='ppo' is not allowed; allowed: grpo, bnpo, dr_grpo, dapo, reinforce"
    ):
        get_config("tiny", grpo=dict(loss_type="ppo"))
    with pytest.raises(ConfigError, match="grpo.num_generations=1 is out of range"):
        get_config("tiny", grpo=dict(num_generations=1))
    with pytest.raises(ConfigError, match="unknown task 'sudoku'"):
        get_config("tiny", grpo=dict(tasks="addition,sudoku"))


def test_a_loss_type_changes_no_other_field_and_a_recipe_sets_its_papers_settings():
    assert get_config("tiny", grpo=dict(loss_type="dapo")).grpo.epsilon_high == 0.2  # not silently raised
    dapo = get_config("tiny", grpo=loss_recipe("dapo")).grpo
    assert (dapo.loss_type, dapo.epsilon, dapo.epsilon_high, dapo.beta) == ("dapo", 0.2, 0.28, 0.04)
    reinforce = get_config("tiny", grpo=loss_recipe("reinforce")).grpo
    assert (reinforce.loss_type, reinforce.beta, reinforce.scale_rewards) == ("reinforce", 0.0, False)
    assert set(LOSS_RECIPES) == set(LOSS_TYPES)
    with pytest.raises(ConfigError, match="unknown GRPO loss recipe 'ppo'; allowed: grpo, bnpo, dr_grpo, dapo"):
        loss_recipe("ppo")


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(loss_type="reinforce"), "takes the advantage r - mean\\(group\\), and grpo.scale_rewards=True"),
        (dict(loss_type="reinforce", scale_rewards=False), "has no KL penalty, and grpo.beta=0.04; allowed: beta=0"),
        (dict(loss_recipe("reinforce"), num_iterations=2), "is on-policy .*; allowed: num_iterations=1"),
        (dict(loss_recipe("reinforce"), epsilon_high=0.28), "has no ratio to clip, and grpo.epsilon_high=0.28"),
        (
            dict(loss_recipe("reinforce"), epsilon=0.1),
            "has no ratio to clip, and grpo.epsilon=0.1; allowed: epsilon left",
        ),
    ],
)
def test_reinforce_refuses_the_settings_it_has_no_place_for(fields, message):
    with pytest.raises(ConfigError, match=f"grpo.loss_type='reinforce' {message}"):
        get_config("tiny", grpo=fields)


def test_stage_on_tiny(tiny_run, tiny_config):
    from labkit.pipeline import ensure

    metrics = ensure("grpo", tiny_config, tiny_run)
    n = tiny_config.grpo.n_heldout * len(tasks.parse_tasks(tiny_config.grpo.tasks))
    assert metrics["n_heldout"] == n and sum(metrics["n_heldout_by_task"].values()) == n
    assert metrics["cold_start_steps"] == tiny_config.grpo.cold_start_steps and metrics["cold_start_problems"] >= 1
    for key in (
        "pass_at_1_sft",
        "pass_at_1_before",
        "pass_at_1_after",
        "mean_response_tokens",
        "zero_variance_group_fraction",
        "immediate_pass_at_1_before",
    ):
        assert 0 <= metrics[key] <= (1 if "pass" in key or "fraction" in key else 10_000)
    g = tiny_config.grpo
    assert metrics["samples"] == g.max_steps * g.prompts_per_step * g.num_generations  # every sample was trained on
    assert set(metrics["pass_at_1_after_by_task"]) == set(tasks.parse_tasks(tiny_config.grpo.tasks))
    folder = tiny_run.path / "grpo"
    history = json.loads((folder / "history.json").read_text())
    assert len(history) == tiny_config.grpo.max_steps and all("kl" in r and "reward" in r for r in history)
    assert (folder / "model.pt").exists() and (folder / "groups.json").exists()
    assert len((folder / "heldout.jsonl").read_text().splitlines()) == n
    from labkit.checkpoint import load_model

    load_model(folder / "model.pt")


def digit_share(reply, task):
    """A reward every reply earns some of: the tiny models never finish an answer within their 16 tokens
    (every real reward is 0, every advantage 0), and this gives the losses something to work on."""
    return sum(c.isdigit() for c in reply) / max(1, len(reply))


@pytest.fixture
def lively(monkeypatch, tiny_run, tiny_config, tmp_path):
    """(config, run): the tiny preset rewarded by `digit_share` (in place of `close`), in a run of its own
    that shares the tiny run's earlier stages, so that only GRPO is built there."""
    from labkit.pipeline import ensure
    from labkit.run import Run

    monkeypatch.setitem(rewards.REWARDS, "close", digit_share)
    ensure("sft", tiny_config, tiny_run)
    run = Run("lively", tmp_path)
    run.path.mkdir()
    for stage in ("data", "tokenizer", "base", "sft"):
        (run.path / stage).symlink_to(tiny_run.path / stage)
    return get_config("tiny", grpo=dict(rewards="close=1")), run


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_the_stage_runs_with_each_loss_type(loss_type, lively):
    """The whole stage through the pipeline with each loss's recipe: it trains (advantages that are not
    all 0 give gradients), and only the ratio-based losses clip and keep a KL to the reference."""
    from labkit.pipeline import ensure, plan

    config, run = lively
    config = get_config("tiny", grpo=dict(loss_recipe(loss_type), rewards=config.grpo.rewards))
    assert plan("grpo", config, run) == ["grpo"]
    metrics = ensure("grpo", config, run)
    history = json.loads((run.path / "grpo" / "history.json").read_text())
    assert metrics["steps"] == len(history) == config.grpo.max_steps and (run.path / "grpo" / "start.pt").exists()
    assert metrics["zero_variance_group_fraction"] < 1 and all(r["grad_norm"] > 0 for r in history)
    assert all(math.isfinite(r["loss"]) for r in history) and 0 <= metrics["pass_at_1_after"] <= 1
    if loss_type == "reinforce":
        assert all(r["kl"] == 0 and r["clip_fraction"] == 0 for r in history)
    else:  # the first step is on the reference itself; after it the policy has moved
        assert history[0]["kl"] == pytest.approx(0, abs=1e-6) and all(r["kl"] > 0 for r in history[1:])


def test_a_comparison_starts_where_the_stage_started_and_is_reused(lively, monkeypatch):
    """With the stage's own loss the comparison retrains the stage's policy step for step (same start, same
    problems, same seeds); with another it writes its history under grpo/compare_<recipe>/, which a rerun
    reads back instead of training."""
    from labkit.pipeline import ensure

    config, run = lively
    ensure("grpo", config, run)
    stage = json.loads((run.path / "grpo" / "history.json").read_text())
    same = grpo_compare.compare(config, run, "grpo")
    keys = ("step", "reward", "response_tokens", "zero_variance_groups", "pass_at_1")
    assert [[r.get(k) for k in keys] for r in same] == [[r.get(k) for k in keys] for r in stage]
    for key in ("loss", "kl", "grad_norm"):
        assert [r[key] for r in same] == pytest.approx([r[key] for r in stage], abs=1e-6)

    history = grpo_compare.compare(config, run, "reinforce")
    folder = run.path / "grpo" / "compare_reinforce"
    assert json.loads((folder / "history.json").read_text()) == history and not (folder / "train_state.pt").exists()
    assert len(history) == config.grpo.max_steps and all(r["kl"] == 0 for r in history)
    summary = json.loads((folder / "metrics.json").read_text())
    assert summary["changed"] == dict(loss_type="reinforce", beta=0.0, scale_rewards=False)
    assert history[0]["reward"] == stage[0]["reward"]  # the first samples: the same policy, problems and seed
    for key in ("loss", "grad_norm"):  # another loss: another step from the same samples
        assert history[0][key] != pytest.approx(stage[0][key], abs=1e-6)

    monkeypatch.setattr(grpo_compare, "train_from_start", lambda *a, **k: pytest.fail("retrained"))
    assert grpo_compare.compare(config, run, "reinforce") == history  # reused
    with pytest.raises(pytest.fail.Exception, match="retrained"):  # other settings: another comparison
        grpo_compare.compare(get_config("tiny", grpo=dict(rewards="close=1", learning_rate=1e-3)), run, "reinforce")

    name = grpo_compare.loss_label(config.grpo)
    figure = plots.pass_at_1_by_loss({name: stage, "reinforce": history}, start=0.5, n=6)
    assert [t.name for t in figure.data] == [name, "reinforce"] and name.startswith("grpo: A = (r - mean) / std")
    assert figure.data[1].x[0] == 0 and figure.data[1].y[0] == 50  # the shared start, at step 0
    assert list(figure.data[1].x[1:]) == [r["step"] for r in history if "pass_at_1" in r]
    assert figure.layout.xaxis.title.text and "of 6" in figure.layout.yaxis.title.text


def test_a_comparison_needs_the_stage_and_settings_that_go_with_its_recipe(tmp_path, tiny_config):
    from labkit.errors import LabkitError
    from labkit.run import Run

    with pytest.raises(LabkitError, match="no finished GRPO stage .*--stages grpo"):
        grpo_compare.compare(tiny_config, Run("empty", tmp_path), "dapo")
    with pytest.raises(ConfigError, match="unknown GRPO loss recipe 'ppo'"):
        grpo_compare.compare(tiny_config, Run("empty", tmp_path), "ppo")
    with pytest.raises(ConfigError, match="'reinforce' is on-policy"):
        grpo_compare.compared_config(get_config("tiny", grpo=dict(num_iterations=2)), "reinforce")
    assert grpo_compare.compared_config(tiny_config, "dapo").epsilon_high == 0.28


def random_rows(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(0, vocab, (int(k),), generator=g).tolist() for k in torch.randint(1, 12, (n,), generator=g)
    ]
    completions = [
        torch.randint(0, vocab, (int(k),), generator=g).tolist() for k in torch.randint(1, 10, (n,), generator=g)
    ]
    return prompts, completions


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_give_the_loss_and_gradients_of_one_batch(loss_type, rows_seen):
    """A step's batch 4x the micro-batch: no forward pass sees more rows than the micro-batch, and
    loss and gradients equal those of the whole batch at once."""
    from labkit.engine import pack

    beta = 0.0 if loss_type == "reinforce" else 0.04
    fields = dict(loss_recipe(loss_type), beta=beta, temperature=0.7, max_new_tokens=10)
    cfg = get_config("tiny", grpo=fields).grpo
    model = tiny_gpt(50)
    prompts, completions = random_rows(12, 50, seed=0)
    batch = pack(prompts, completions)
    advantages = torch.randn(12, generator=torch.Generator().manual_seed(1))
    ref, _ = score(tiny_gpt(50, seed=1), prompts, completions, temperature=0.7)
    old, _ = score(model, prompts, completions, temperature=0.7)
    old = old + 0.2 * torch.randn(old.shape, generator=torch.Generator().manual_seed(2)) * batch.mask  # ratios != 1

    def backward(micro_batch_size):
        model.zero_grad(set_to_none=True)
        seen = rows_seen(model)
        stats = grpo.grpo_backward(
            model, batch, advantages, old, ref, dataclasses.replace(cfg, micro_batch_size=micro_batch_size)
        )
        return stats, [p.grad.clone() for p in model.parameters()], seen

    whole, whole_grads, whole_seen = backward(64)
    micro, micro_grads, micro_seen = backward(3)
    assert whole_seen == [12] and micro_seen == [3, 3, 3, 3]
    for key in ("loss", "kl", "clip_fraction"):
        assert micro[key] == pytest.approx(whole[key], abs=1e-5)
    assert (whole["clip_fraction"] > 0) == (loss_type != "reinforce")  # reinforce has no ratio to clip
    assert whole["loss"] != 0
    for a, b in zip(micro_grads, whole_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_grpo_scores_its_samples_at_the_temperature_it_sampled_at(tiny_tokenizer, monkeypatch):
    """The new, old and reference log-probabilities (and so the ratio and the KL) all divide the logits
    by the sampling temperature."""
    from labkit import engine

    temperatures = []
    for name in ("score", "logprobs"):
        real = getattr(engine, name)
        monkeypatch.setattr(
            grpo, name, lambda *a, real=real, **k: temperatures.append(k["temperature"]) or real(*a, **k)
        )
    real_generate = engine.generate
    monkeypatch.setattr(
        grpo, "generate", lambda *a, **k: temperatures.append(k["temperature"]) or real_generate(*a, **k)
    )
    cfg = get_config("tiny", grpo=dict(temperature=0.7, num_iterations=2, beta=0.04)).grpo
    model = tiny_gpt(tiny_tokenizer.n_vocab)
    stream = tasks.TaskStream(["addition"], seed=0)
    tasks_ = stream.next(cfg.prompts_per_step)
    samples = grpo.sample_groups(model, tiny_tokenizer, tasks_, cfg, seed=0)
    grpo.score_groups(samples, parse_weights(cfg.rewards), cfg.num_generations)
    grpo.grpo_step(model, copy.deepcopy(model), torch.optim.AdamW(model.parameters()), samples, cfg)
    assert temperatures.count(0.7) == len(temperatures) == 1 + 2 + 2  # sampling, old + reference, 2 updates
