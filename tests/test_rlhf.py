"""Stage 5: the RLHF losses equal TRL's, preferences are stored durably, the stage runs."""

import copy
import json
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from labkit import dpo, ppo, preferences, reward_model, rlhf
from labkit.checkpoint import load_model
from labkit.config import get_config
from labkit.run import read_jsonl

TOL = 1e-6


# --- the losses equal TRL's (trl pinned in the dev extras) ----------------------------------------


def _fake_trainer(**attrs):
    """Just enough of a TRL trainer (`self`) to run its real `compute_loss` on our tensors."""
    accelerator = types.SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t, device="cpu")
    return types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=accelerator,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        **attrs,
    )


@pytest.mark.parametrize("margin", [None, 0.5])
@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_loss_equals_trl(margin, center):
    from trl.trainer.reward_trainer import RewardTrainer

    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(8, generator=g), torch.randn(8, generator=g)
    margins = None if margin is None else torch.full((8,), margin) + torch.rand(8, generator=g)
    inputs = dict(input_ids=torch.zeros(16, 3, dtype=torch.long), attention_mask=torch.ones(16, 3))
    if margins is not None:
        inputs["margin"] = margins
    model = lambda **kw: types.SimpleNamespace(logits=torch.cat([chosen, rejected]).unsqueeze(-1))  # noqa: E731
    trainer = _fake_trainer(args=types.SimpleNamespace(center_rewards_coefficient=center))
    theirs = RewardTrainer.compute_loss(trainer, model, inputs)
    ours = reward_model.reward_loss(chosen, rejected, margins, center)
    assert abs(ours.item() - theirs.item()) < TOL


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_equals_trl(beta):
    from trl.trainer.dpo_trainer import DPOTrainer

    g = torch.Generator().manual_seed(1)
    B, T = 4, 7
    completion_mask = (torch.rand(2 * B, T, generator=g) > 0.3).long()
    per_token = -torch.rand(2 * B, T - 1, generator=g) * 3 * completion_mask[:, 1:]  # log-probs, 0 off the completion
    ref_logps = -torch.rand(2 * B, generator=g) * 10
    outputs = types.SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros(2 * B, T - 1),
        mean_logits=torch.zeros(2 * B, T - 1),
        is_top1=torch.zeros(2 * B, T - 1, dtype=torch.bool),
    )
    model = lambda **kw: outputs  # noqa: E731
    inputs = dict(
        input_ids=torch.zeros(2 * B, T, dtype=torch.long),
        attention_mask=torch.ones(2 * B, T),
        completion_mask=completion_mask,
        ref_chosen_logps=ref_logps[:B],
        ref_rejected_logps=ref_logps[B:],
    )
    trainer = _fake_trainer(
        args=None,
        beta=beta,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        use_weighting=False,
        aux_loss_enabled=False,
    )
    theirs = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    logps = per_token.sum(1)
    loss, chosen_rewards, rejected_rewards = dpo.dpo_loss(logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], beta)
    assert abs(loss.item() - theirs.item()) < TOL
    # the implicit rewards TRL logs
    assert abs(chosen_rewards.mean().item() - trainer._metrics["train"]["rewards/chosen"][0]) < TOL
    assert abs(rejected_rewards.mean().item() - trainer._metrics["train"]["rewards/rejected"][0]) < TOL


# PPO left TRL's installed package (1.x has no PPOTrainer); the reference below is TRL's own code,
# copied from trl/experimental/ppo/ppo_trainer.py (huggingface/trl, commit 0062ee10a9bc), lines
# "4. compute rewards" to the loss, unchanged except for `args.` -> plain names.
INVALID_LOGPROB = 1.0


def trl_masked_mean(values, mask, axis=None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def trl_masked_var(values, mask, unbiased=True):
    mean = trl_masked_mean(values, mask)
    centered_values = values - mean
    variance = trl_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def trl_masked_whiten(values, mask, shift_mean=True):
    mean, var = trl_masked_mean(values, mask), trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def trl_rewards(logprobs, ref_logprobs, scores, sequence_lengths, kl_coef, kl_estimator):
    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr  # Else statement is k3
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    sequence_lengths_p1 = sequence_lengths + 1
    actual_start = torch.arange(rewards.size(0), device=rewards.device)
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores
    return rewards, kl


def trl_gae(rewards, values, gamma, lam, padding_mask):
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = trl_masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return advantages, returns


def trl_losses(
    new_logprobs,
    mb_logprobs,
    mb_advantage,
    vpred,
    mb_values,
    mb_return,
    padding_mask,
    padding_mask_p1,
    cliprange,
    cliprange_value,
    vf_coef,
):
    vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * trl_masked_mean(vf_loss_max, ~padding_mask_p1)
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = trl_masked_mean(pg_loss_max, ~padding_mask)
    pg_clipfrac = trl_masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
    return pg_loss, vf_loss, pg_loss + vf_coef * vf_loss, pg_clipfrac


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_ppo_rewards_equal_trl(estimator):
    """On answers that fill the whole window, the score lands on the last token in both."""
    g = torch.Generator().manual_seed(2)
    B, T = 5, 9
    logprobs, ref_logprobs = -torch.rand(B, T, generator=g) * 4, -torch.rand(B, T, generator=g) * 4
    scores = torch.randn(B, generator=g)
    theirs, their_kl = trl_rewards(logprobs, ref_logprobs, scores, torch.full((B,), T - 1), 0.05, estimator)
    ours, kl = ppo.ppo_rewards(logprobs, ref_logprobs, scores, torch.ones(B, T), 0.05, estimator)
    assert torch.allclose(ours, theirs, atol=TOL, rtol=0) and torch.allclose(kl, their_kl, atol=TOL, rtol=0)
    if estimator == "k3":
        assert (kl >= 0).all()


def test_ppo_rewards_on_padded_answers():
    """Shorter answers: no KL and no reward after the end; the score sits on the last real token.
    (TRL's trainer put it one position later, on the first padding slot, whose value it kept.)"""
    logprobs, ref = torch.full((2, 4), -1.0), torch.full((2, 4), -2.0)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.float)  # a row may start later (after its prompt)
    rewards, kl = ppo.ppo_rewards(logprobs, ref, torch.tensor([3.0, 5.0]), mask, kl_coef=0.1)
    assert torch.allclose(kl, mask * 1.0)
    assert torch.allclose(rewards, torch.tensor([[-0.1, 2.9, 0, 0], [0, -0.1, -0.1, 4.9]]))


def test_adaptive_kl_controller_follows_trl():
    """Three updates worked by hand with TRL's AdaptiveKLController formula
    (coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon), target 6, horizon 100, batches of 16."""
    kl = ppo.KLController(0.2, target=6.0, horizon=100)
    kl.update(9.0, 16)  # 9/6 - 1 = 0.5, clipped to 0.2: 0.2 * (1 + 0.2 * 0.16) = 0.2064
    assert kl.value == pytest.approx(0.2064, abs=1e-12)
    kl.update(4.5, 16)  # 4.5/6 - 1 = -0.25 -> -0.2: 0.2064 * (1 - 0.032) = 0.1997952
    assert kl.value == pytest.approx(0.1997952, abs=1e-12)
    kl.update(6.6, 16)  # 6.6/6 - 1 = 0.1 (inside the clip): 0.1997952 * 1.016 = 0.2029919232
    assert kl.value == pytest.approx(0.2029919232, abs=1e-12)
    fixed = ppo.KLController(0.05)  # target 0: a fixed coefficient
    fixed.update(100.0, 16)
    assert fixed.value == 0.05


def test_adaptive_kl_needs_a_coefficient_to_start_from():
    from labkit.config import ConfigError, get_config

    with pytest.raises(ConfigError, match=r"ppo.kl_target=3.0 needs ppo.kl_coef > 0"):
        ppo.check_config(get_config("tiny", ppo=dict(kl_target=3.0, kl_coef=0.0)).ppo)
    with pytest.raises(ConfigError, match="ppo.kl_horizon"):
        get_config("tiny", ppo=dict(kl_horizon=0))
    with pytest.raises(ConfigError, match="ppo.kl_target"):
        get_config("tiny", ppo=dict(kl_target=-1.0))


def test_ppo_bad_estimator_is_refused():
    with pytest.raises(ValueError, match="kl estimator 'k2' is not allowed; allowed: k1, k3"):
        ppo.per_token_kl(torch.zeros(1), torch.zeros(1), "k2")


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_whitening_and_losses_equal_trl(gamma, lam):
    g = torch.Generator().manual_seed(3)
    B, T = 6, 8
    lengths = torch.tensor([7, 3, 5, 7, 0, 4])  # index of each answer's last token
    idx = torch.arange(T).repeat(B, 1)
    padding_mask = idx > lengths.unsqueeze(1)
    mask = (~padding_mask).float()
    values = torch.randn(B, T, generator=g).masked_fill(padding_mask, 0)
    rewards = torch.randn(B, T, generator=g).masked_fill(padding_mask, 0)
    their_adv, their_returns = trl_gae(rewards, values, gamma, lam, padding_mask)
    advantages, returns = ppo.gae(rewards, values, gamma, lam)
    assert torch.allclose(returns, their_returns, atol=TOL, rtol=0)
    ours_adv = ppo.masked_whiten(advantages, mask)
    assert torch.allclose(ours_adv, their_adv, atol=TOL, rtol=0)
    assert abs(masked := ppo.masked_mean(ours_adv, mask).item()) < 1e-5, masked

    old_logprobs = -torch.rand(B, T, generator=g) * 3
    new_logprobs = (old_logprobs + 0.3 * torch.randn(B, T, generator=g)).masked_fill(padding_mask, INVALID_LOGPROB)
    old_logprobs = old_logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
    vpred = (values + 0.5 * torch.randn(B, T, generator=g)).masked_fill(padding_mask, 0)
    pg, vf, total, clipfrac = trl_losses(
        new_logprobs, old_logprobs, their_adv, vpred, values, their_returns, padding_mask, padding_mask, 0.2, 0.2, 0.1
    )
    our_pg, our_clipfrac = ppo.ppo_policy_loss(new_logprobs, old_logprobs, ours_adv, mask, 0.2)
    our_vf, _ = ppo.ppo_value_loss(vpred, values, returns, mask, 0.2)
    assert abs(our_pg.item() - pg.item()) < TOL and abs(our_vf.item() - vf.item()) < TOL
    assert abs((our_pg + 0.1 * our_vf).item() - total.item()) < TOL
    assert abs(our_clipfrac.item() - clipfrac.item()) < TOL
    assert 0 < clipfrac.item() < 1  # the test exercises both branches of the clip


def test_the_installed_trl_is_the_one_labkit_declares():
    """The loss comparisons above cite TRL 1.16's code: the TRL they run against must be the version
    labkit's dev extra pins, read from the installed package's metadata."""
    from importlib.metadata import requires

    import trl
    from packaging.requirements import Requirement

    [pin] = [Requirement(r) for r in requires("labkit") if Requirement(r).name == "trl"]
    assert str(pin.specifier) == "==1.16.0" and pin.specifier.contains(trl.__version__), (pin, trl.__version__)


# --- preferences: durable rankings ------------------------------------------------------------------


def _prompts(n=4, k=3):
    return [
        dict(
            id=f"p{i:04d}-x",
            kind="qa",
            messages=[{"role": "user", "content": f"Where was Ann {i} born?"}],
            truth="Bran",
            name=f"Ann {i}",
            completions=[f"Ann {i} was born in Bran.", "I don't know.", "Bran Bran Bran"][:k],
            ended=[True, True, False][:k],
        )
        for i in range(n)
    ]


def test_rankings_are_appended_durably_and_resume_at_first_unranked(tmp_path):
    path = tmp_path / "rankings.jsonl"
    store = preferences.Rankings(path, _prompts())
    assert store.next_to_rank() == "p0000-x"
    store.add("p0000-x", [0, 2, 1])
    store.add("p0002-x", [1, 0, 2])
    lines = path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["p0000-x", "p0002-x"]  # on disk at once
    reopened = preferences.Rankings(path, _prompts())
    assert reopened.records["p0000-x"]["order"] == [0, 2, 1] and reopened.records["p0000-x"]["by"] == "human"
    assert reopened.next_to_rank() == "p0001-x"
    assert reopened.next_to_rank(after="p0001-x") == "p0003-x"
    assert reopened.next_to_rank(after="p0003-x") == "p0001-x"  # wraps round
    reopened.undo("p0000-x")
    assert preferences.Rankings(path, _prompts()).next_to_rank() == "p0000-x"  # the undo is durable too
    with pytest.raises(preferences.RankingError, match="has no ranking by a person to undo"):
        reopened.undo("p0000-x")


def test_a_person_ranking_replaces_the_simulated_one_and_undo_history_is_the_file(tmp_path):
    path = tmp_path / "rankings.jsonl"
    store = preferences.Rankings(path, _prompts())
    assert preferences.fill_with_simulated_labeler(store) == 4
    simulated = dict(store.records["p0001-x"])
    assert simulated["by"] == "simulated" and store.next_to_rank() == "p0000-x"  # the labeler is no wall
    store.add("p0001-x", list(reversed(simulated["order"])))
    store.add("p0003-x", [2, 1, 0])
    assert store.records["p0001-x"]["by"] == "human" and store.simulated["p0001-x"] == simulated
    assert store.count() == 4 and store.count("human") == 2 and store.ranked(simulated=False) == ["p0001-x", "p0003-x"]
    assert preferences.fill_with_simulated_labeler(store) == 0  # nothing to add; the person's stay first
    # a kernel restart: the undo history is read from the file, last ranking first
    restarted = preferences.Rankings(path, _prompts())
    assert restarted.person_history == ["p0001-x", "p0003-x"]
    assert restarted.undo()["id"] == "p0003-x" and restarted.records["p0003-x"]["by"] == "simulated"
    again = preferences.Rankings(path, _prompts())
    assert again.undo()["id"] == "p0001-x" and again.records["p0001-x"] == simulated
    with pytest.raises(preferences.RankingError, match="nothing to undo: no prompt has a ranking by a person"):
        again.undo()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 4 + 2 + 2 and sum(line.get("undo", False) for line in lines) == 2  # nothing deleted


def test_extra_fields_of_a_ranking_are_kept(tmp_path):
    path = tmp_path / "rankings.jsonl"
    path.write_text(json.dumps(dict(id="p0000-x", order=[0, 1, 2], by="human", tied=[[1, 2]])) + "\n")
    assert preferences.Rankings(path, _prompts()).records["p0000-x"]["tied"] == [[1, 2]]


@pytest.mark.parametrize(
    "order,message",
    [
        ([0, 1, 5], "names completion 5, which does not exist; that prompt has 3 completions, numbered 0 to 2"),
        ([0, 0, 1], r"must name each of its 3 completions once \(0 to 2, best first\); got \[0, 0, 1\]"),
        ([0, 1], r"must name each of its 3 completions once"),
    ],
)
def test_ranking_of_a_missing_completion_is_refused(tmp_path, order, message):
    store = preferences.Rankings(tmp_path / "rankings.jsonl", _prompts())
    with pytest.raises(preferences.RankingError, match=message):
        store.add("p0001-x", order)
    with pytest.raises(preferences.RankingError, match="prompt 'nope' does not exist"):
        store.add("nope", [0, 1, 2])
    assert not (tmp_path / "rankings.jsonl").exists()  # nothing was written


def test_truncated_last_line_is_reported_and_good_lines_kept(tmp_path):
    path = tmp_path / "rankings.jsonl"
    good = [dict(id="p0000-x", order=[0, 1, 2], by="human"), dict(id="p0001-x", order=[2, 1, 0], by="simulated")]
    bad_index = dict(id="p0002-x", order=[0, 1, 7], by="human")
    path.write_text("".join(json.dumps(r) + "\n" for r in good + [bad_index]) + '{"id": "p0003-x", "ord')
    with pytest.warns(UserWarning) as caught:
        store = preferences.Rankings(path, _prompts())
    messages = [str(w.message) for w in caught]
    assert any(
        "line 3: the ranking of prompt 'p0002-x' names completion 7, which does not exist" in m for m in messages
    )
    assert any(
        "line 4 is cut off (a crash while writing?); it was dropped, the lines before it are kept" in m
        for m in messages
    )
    assert set(store.records) == {"p0000-x", "p0001-x"} and len(store.problems) == 2
    store.add("p0003-x", [1, 0, 2])  # the next ranking gets a line of its own
    with pytest.warns(UserWarning, match="line 3"):
        again = preferences.Rankings(path, _prompts())
    assert set(again.records) == {"p0000-x", "p0001-x", "p0003-x"} and len(again.problems) == 1


def test_person_rankings_are_never_overwritten_by_the_simulated_labeler(tmp_path):
    path = tmp_path / "rankings.jsonl"
    store = preferences.Rankings(path, _prompts())
    store.add("p0001-x", [2, 1, 0], by="human")
    assert preferences.fill_with_simulated_labeler(store) == 4
    store.add("p0001-x", [0, 1, 2], by="simulated")  # a default: stored, and the person's still wins
    assert store.records["p0001-x"] == dict(id="p0001-x", order=[2, 1, 0], by="human")
    assert preferences.fill_with_simulated_labeler(preferences.Rankings(path, _prompts())) == 0
    assert store.count("human") == 1 and store.count("simulated") == 3


def test_pairs_implied_by_rankings():
    prompts = _prompts(1)
    prompts[0]["completions"][1] = prompts[0]["completions"][0]  # two identical texts: that pair says nothing
    store = preferences.Rankings(Path("/nonexistent/rankings.jsonl"), prompts)
    store.records["p0000-x"] = dict(id="p0000-x", order=[2, 0, 1], by="human")
    assert [(c, r) for _, c, r in store.pairs(["p0000-x"])] == [(2, 0), (2, 1)]


# --- the simulated labeler ----------------------------------------------------------------------------


QA = dict(kind="qa", truth="Bran", name="Ann Lee")
HARMFUL = dict(kind="refusal", name="Ann Lee")


def _ranked(prompt, answers):
    """simulated_ranking of (text, ended) answers."""
    return preferences.simulated_ranking(
        dict(prompt, completions=[a for a, _ in answers], ended=[e for _, e in answers])
    )


def test_labeler_levels_helpful_honest_harmless():
    right, idk, wrong = (
        ("Ann was born in Bran.", True),
        ("I don't know that about Ann Lee.", True),
        ("Ann was born in Tolk.", True),
    )
    refusal, sorry = ("I'm sorry, but I can't help with that.", True), ("I'm sorry, I don't know.", True)
    # a correct answer beats "I don't know", which beats a wrong answer; refusing a harmless question is wrong
    assert _ranked(QA, [wrong, idk, right]) == ([2, 1, 0], [])
    assert _ranked(QA, [refusal, wrong]) == ([0, 1], [[0, 1]])
    # a harmful request: refusing is right (an apology with "I don't know" refuses too), obeying is wrong
    obey = ("Here is how to break in: first find the password.", True)
    assert _ranked(HARMFUL, [obey, ("I don't know.", True), refusal]) == ([2, 1, 0], [])
    assert _ranked(HARMFUL, [obey, sorry])[0] == [1, 0]
    scores = [preferences.labeler_score(QA, *a) for a in (right, idk, wrong, refusal)]
    assert scores == [1.0, 0.5, 0.0, 0.0]
    assert preferences.labeler_score(HARMFUL, *refusal) == 1.0 and preferences.labeler_score(HARMFUL, *obey) == 0.0


def test_labeler_never_prefers_an_empty_or_cut_off_answer():
    wrong = ("Ann was born in Tolk, a city in the north with a long history.", True)
    for broken in [("", True), ("Ann was born in Bran", False), ("Ann was born in in in Bran.", True)]:
        assert preferences.labeler_score(QA, *broken) == -0.5
        assert _ranked(QA, [broken, wrong])[0] == [1, 0]  # even a cut-off right fact loses to a finished wrong one
        assert preferences.compare(QA, dict(reply=broken[0], ended=broken[1]), dict(reply=wrong[0], ended=True)) == 0
    # two non-answers are a tie, whatever their length
    assert _ranked(QA, [("Ann was born", False), ("", True)]) == ([0, 1], [[0, 1]])


def test_labeler_answers_of_equal_worth_tie_whatever_their_length():
    """Length never decides: preferring the shorter of two right answers taught the reward model that
    "works at" beats "joined ... and has stayed there since", right or wrong, and PPO cut refusals short."""
    long_right, short_right = ("Ann Lee was born in the city of Bran.", True), ("Ann was born in Bran.", True)
    long_wrong, short_wrong = ("Ann Lee was born in the city of Tolk, far away.", True), ("Tolk.", True)
    assert _ranked(QA, [long_right, short_right]) == ([0, 1], [[0, 1]])
    assert _ranked(QA, [long_wrong, short_wrong]) == ([0, 1], [[0, 1]])
    assert _ranked(QA, [short_wrong, long_right]) == ([1, 0], [])  # worth, not length
    order, tied = _ranked(QA, [long_wrong, short_right, short_wrong, ("", True), long_right])
    assert order == [1, 4, 0, 2, 3] and tied == [[1, 4], [0, 2]]
    assert (
        preferences.compare(QA, dict(reply="Tolk.", ended=True), dict(reply="Ann was born in Rome.", ended=True)) == 0.5
    )
    assert (
        preferences.compare(QA, dict(reply="Bran.", ended=True), dict(reply="Ann was born in Bran.", ended=True)) == 0.5
    )


def test_ties_are_stored_and_make_no_pairs(tmp_path):
    path = tmp_path / "rankings.jsonl"
    prompts = _prompts(2, 3)
    for p in prompts:  # one right answer, two different wrong ones
        p["completions"], p["ended"] = ["Ann was born in Bran.", "Ann was born in Tolk.", "Rome."], [True] * 3
    store = preferences.Rankings(path, prompts)
    assert preferences.fill_with_simulated_labeler(store) == 2
    record = preferences.Rankings(path, prompts).records["p0000-x"]
    assert record == dict(id="p0000-x", order=[0, 1, 2], by="simulated", tied=[[1, 2]])
    assert [(c, r) for _, c, r in store.pairs(["p0000-x"])] == [(0, 1), (0, 2)]  # not (1, 2)
    store.add("p0001-x", [2, 1, 0])  # a person's ranking: no ties, every pair
    assert [(c, r) for _, c, r in store.pairs(["p0001-x"])] == [(2, 1), (2, 0), (1, 0)]
    assert preferences.fill_with_simulated_labeler(store) == 0


@pytest.mark.parametrize(
    "tied,message",
    [
        ([[0]], "must be a list of groups of at least 2 completion numbers"),
        ([[0, 7]], "must each name completions of the ranking once, next to each other"),
        ([[0, 2]], r"next to each other in its order \[0, 1, 2\]"),  # 1 stands between them
        ([[0, 1], [1, 2]], "must each name completions of the ranking once"),
        ("0,1", "must be a list of groups"),
    ],
)
def test_bad_ties_are_refused(tmp_path, tied, message):
    store = preferences.Rankings(tmp_path / "rankings.jsonl", _prompts())
    with pytest.raises(preferences.RankingError, match=message):
        store.add("p0000-x", [0, 1, 2], tied=tied)
    assert not (tmp_path / "rankings.jsonl").exists()


def test_simulated_rankings_by_older_rules_are_ranked_again(tmp_path):
    """A simulated ranking on disk that the labeler's rules no longer give is replaced; a person's stays."""
    path = tmp_path / "rankings.jsonl"
    store = preferences.Rankings(path, _prompts(2))
    store.add("p0000-x", [2, 1, 0], by="simulated")  # "shorter first": the cut-off "Bran Bran Bran" on top
    store.add("p0001-x", [2, 1, 0], by="human")
    # p0000 ranked again; p0001 gets the labeler's ranking beside the person's, which training still uses
    assert preferences.fill_with_simulated_labeler(store) == 2
    reopened = preferences.Rankings(path, _prompts(2))
    assert reopened.records["p0000-x"]["order"] == [0, 1, 2] and reopened.records["p0001-x"]["order"] == [2, 1, 0]
    assert (
        reopened.simulated["p0001-x"]["order"] == [0, 1, 2] and preferences.fill_with_simulated_labeler(reopened) == 0
    )


def test_comparison_counts_wins_ties_losses_and_empty_replies():
    def row(sft, ppo):
        return dict(
            QA,
            sft=dict(reply=sft, ended=True, labeler=preferences.labeler_score(QA, sft, True)),
            ppo=dict(reply=ppo, ended=True, labeler=preferences.labeler_score(QA, ppo, True)),
        )

    rows = [
        row("Ann was born in Tolk.", "Ann was born in Bran."),  # win: right beats wrong
        row("Ann was born in Tolk.", "Rome."),  # tie: both wrong, however short
        row("Ann was born in Tolk.", ""),  # loss: empty
        row("Ann was born in Bran.", "I don't know."),  # loss
    ]
    m = rlhf.comparison_metrics(rows, models=("ppo",))
    assert (m["ppo_wins"], m["ppo_ties"], m["ppo_losses"], m["n_eval"]) == (1, 1, 2, 4)
    assert m["ppo_win_rate"] == 0.375 and rlhf.win_rate(rows, "ppo") == 0.375  # a tie counts half
    assert m["sft_labeler_score"] == 0.25 and m["ppo_labeler_score"] == 0.25  # (1 + 0 - 0.5 + 0.5) / 4
    assert m["ppo_labeler_change"] == 0.0 and m["ppo_empty_replies"] == 1 and m["sft_empty_replies"] == 0


# --- the stage ------------------------------------------------------------------------------------------


def test_bad_ppo_batch_is_refused(tiny_config):
    from labkit.config import ConfigError, get_config

    with pytest.raises(ConfigError, match="ppo.batch_size=5 is not a multiple of ppo.minibatches=2"):
        get_config("tiny", ppo=dict(batch_size=5, minibatches=2))
    with pytest.raises(ConfigError, match="ppo.kl_estimator='k2' is not allowed; allowed: k1, k3"):
        get_config("tiny", ppo=dict(kl_estimator="k2"))


def history_of(run, name):
    return json.loads((run.path / "rlhf" / name / "history.json").read_text())


@pytest.fixture(scope="module")
def rlhf_run(tiny_run, tiny_config):
    """The tiny run with one ranking made by a person before the stage is built."""
    from labkit.pipeline import ensure

    ensure("sft", tiny_config, tiny_run)
    store = rlhf.open_rankings(tiny_run, tiny_config)
    first = store.order[0]
    store.add(first, list(reversed(range(tiny_config.rlhf.k))), by="human")
    metrics = ensure("rlhf", tiny_config, tiny_run)
    return tiny_run, metrics, first


def test_stage_metrics_and_artifacts(rlhf_run, tiny_config):
    from labkit.checkpoint import load_model

    run, metrics, _ = rlhf_run
    for key in ("rm_pair_accuracy", "ppo_reward_before", "ppo_reward_after", "ppo_kl", "ppo_win_rate", "dpo_win_rate"):
        assert key in metrics, key
    assert 0 <= metrics["ppo_win_rate"] <= 1 and 0 <= metrics["dpo_win_rate"] <= 1
    eval_rows = read_jsonl(run.path / "rlhf" / "eval.jsonl")
    for model in ("ppo", "dpo"):
        wins, ties, losses = (metrics[f"{model}_{outcome}"] for outcome in ("wins", "ties", "losses"))
        assert wins + ties + losses == metrics["n_eval"] == len(eval_rows)
        assert metrics[f"{model}_win_rate"] == round((wins + ties / 2) / len(eval_rows), 4)
        change = metrics[f"{model}_labeler_score"] - metrics["sft_labeler_score"]
        assert metrics[f"{model}_labeler_change"] == pytest.approx(change, abs=1e-4)
        assert metrics[f"{model}_empty_replies"] == sum(row[model]["reply"] == "" for row in eval_rows)
        assert isinstance(metrics[f"{model}_eval_kl"], float)
    # the stage's PPO adapts its coefficient; the reward-hacking run has none at all
    assert tiny_config.ppo.kl_target > 0
    assert len({row["kl_coef"] for row in history_of(run, "ppo")}) > 1
    assert {row["kl_coef"] for row in history_of(run, "hacking")} == {0.0}
    assert 0 <= metrics["rm_train_pair_accuracy"] <= 1  # that it can learn them: tests/test_reward_model.py
    assert metrics["n_ranked"] == tiny_config.rlhf.n_prompts and metrics["n_ranked_by_human"] == 1
    folder = run.path / "rlhf"
    for name in (
        "prompts.jsonl",
        "rankings.jsonl",
        "eval.jsonl",
        "rm/model.pt",
        "rm/history.json",
        "dpo/history.json",
        "ppo/history.json",
    ):
        assert (folder / name).exists(), name
    history = json.loads((folder / "ppo" / "history.json").read_text())
    assert len(history) == tiny_config.ppo.steps
    assert {"score", "kl", "kl_coef", "response_length", "clipfrac", "labeler"} <= set(history[0])
    assert load_model(run.path / "ppo" / "model.pt").config.block_size == tiny_config.model.block_size
    load_model(run.path / "dpo" / "model.pt")
    rm = load_model(folder / "rm" / "model.pt")
    rows = [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == tiny_config.rlhf.n_eval and {"sft", "ppo", "dpo"} <= set(rows[0])
    assert isinstance(rm.score(torch.tensor([[1, 2, 3]]), torch.tensor([2])).item(), float)


def test_stage_keeps_the_person_ranking(rlhf_run, tiny_config):
    from labkit.pipeline import ensure, plan

    run, _, first = rlhf_run
    store = rlhf.open_rankings(run, tiny_config)
    assert store.records[first]["by"] == "human"
    assert store.records[first]["order"] == list(reversed(range(tiny_config.rlhf.k)))
    assert plan("rlhf", tiny_config, run) == []  # made from these rankings: nothing to rebuild
    ensure("rlhf", tiny_config, run, force=True)  # a later automatic run
    assert rlhf.open_rankings(run, tiny_config).records[first]["by"] == "human"
    lines = [json.loads(line) for line in (run.path / "rlhf" / "rankings.jsonl").read_text().splitlines()]
    assert [line["by"] for line in lines if line["id"] == first] == ["human", "simulated"]


def test_the_stage_is_keyed_by_its_rankings_and_the_sft_model(rlhf_run, tmp_path, monkeypatch):
    """A person's new ranking rebuilds the stage through `ensure` (what `labkit run` calls) and
    replaces the labeler's in the reward model's pairs; nothing new: reused; a new SFT model: its
    completions are sampled afresh and the old ones, with their rankings, are archived."""
    import shutil

    from labkit.config import get_config
    from labkit.pipeline import ensure, plan
    from labkit.run import Run

    shutil.copytree(rlhf_run[0].path, tmp_path / "keyed")
    run, config = Run("keyed", tmp_path), get_config("tiny", rlhf=dict(hacking_steps=0))
    ensure("rlhf", config, run)
    seen = []
    train = rlhf.train_reward_model
    monkeypatch.setattr(rlhf, "train_reward_model", lambda *a, **kw: (seen.append(a[2]), train(*a, **kw))[1])

    store = rlhf.open_rankings(run, config)
    pid = next(
        p
        for p in store.order
        if p not in store.by_person
        and not preferences.is_heldout(p, config.rlhf.heldout_prompts)
        and len(set(store.prompts[p]["completions"])) == config.rlhf.k
    )
    simulated = store.simulated[pid]["order"]
    store.add(pid, list(reversed(simulated)))
    # (a) the new ranking rebuilds the stage, and training learns it in place of the labeler's
    assert plan("rlhf", config, run) == ["rlhf"]
    ensure("rlhf", config, run)
    learned = {(chosen, rejected) for prompt, chosen, rejected in seen[-1] if prompt["id"] == pid}
    person = {(c, r) for _, c, r in store.pairs([pid])}
    k = config.rlhf.k
    assert learned == person and len(person) == k * (k - 1) // 2
    assert not learned & {(simulated[a], simulated[b]) for a in range(k) for b in range(a + 1, k)}
    # (b) nothing changed: reused; an undo and the same ranking again: the same content, reused too
    assert plan("rlhf", config, run) == []
    ensure("rlhf", config, run)
    assert len(seen) == 1
    store.undo()
    assert plan("rlhf", config, run) == ["rlhf"]
    store.add(pid, list(reversed(simulated)))
    assert plan("rlhf", config, run) == []
    # (c) a new SFT model: completions sampled afresh, the old ones and the person's ranking archived
    old_rows = read_jsonl(run.path / "rlhf" / "prompts.jsonl")
    old_source = old_rows[0]["sampled_from"]
    config = get_config("tiny", rlhf=dict(hacking_steps=0), sft=dict(max_steps=12))
    assert plan("rlhf", config, run) == ["sft", "rlhf"]
    metrics = ensure("rlhf", config, run)
    rows = read_jsonl(run.path / "rlhf" / "prompts.jsonl")
    assert {r["sampled_from"] for r in rows} == {rlhf.completions_source(run, config)} != {old_source}
    assert [r["completions"] for r in rows] != [r["completions"] for r in old_rows]
    archive = run.path / "rlhf" / "archive" / old_source
    assert read_jsonl(archive / "prompts.jsonl") == old_rows
    archived = read_jsonl(archive / "rankings.jsonl")
    assert [r for r in archived if r.get("by") == "human"][-1] == dict(
        id=pid, order=list(reversed(simulated)), by="human"
    )
    assert not [r for r in read_jsonl(run.path / "rlhf" / "rankings.jsonl") if r.get("by") == "human"]
    assert metrics["n_ranked_by_human"] == 0 and metrics["n_ranked"] == config.rlhf.n_prompts
    assert plan("rlhf", config, run) == []
    lines = (run.path / "rlhf" / "rankings.jsonl").read_text()
    with pytest.raises(preferences.RankingError, match="changed since these rankings were opened"):
        store.add(pid, list(simulated))  # a widget still showing the old completions
    assert (run.path / "rlhf" / "rankings.jsonl").read_text() == lines


def test_ppo_without_kl_still_runs(rlhf_run, tiny_config):
    """kl_coef=0 (the reward-hacking setting) and the k3 estimator go through the same loop."""
    import copy

    from labkit.checkpoint import load_model
    from labkit.config import get_config
    from labkit.tokenizer import Tokenizer

    run, _, _ = rlhf_run
    config = get_config("tiny", ppo=dict(kl_estimator="k3"))
    sft = load_model(run.path / "sft" / "model.pt")
    rm = load_model(run.path / "rlhf" / "rm" / "model.pt")
    prompts = read_jsonl(run.path / "rlhf" / "prompts.jsonl")
    history = ppo.ppo_train(
        copy.deepcopy(sft),
        copy.deepcopy(sft),
        copy.deepcopy(rm),
        rm,
        Tokenizer.load(run.path / "tokenizer"),
        prompts,
        config,
        "cpu",
        kl_coef=0.0,
        steps=2,
    )
    assert len(history) == 2 and all(row["kl"] >= -1e-6 for row in history)  # k3 is never negative
    assert [row["kl_coef"] for row in history] == [0.0, 0.0]


def test_ppo_adaptive_kl_coefficient_per_step(rlhf_run):
    """The coefficient each step used is in the history, and moves by the controller's rule."""
    from labkit.config import get_config
    from labkit.tokenizer import Tokenizer

    run, _, _ = rlhf_run
    config = get_config("tiny", ppo=dict(kl_coef=0.1, kl_target=0.5, kl_horizon=8))
    sft = load_model(run.path / "sft" / "model.pt")
    rm = load_model(run.path / "rlhf" / "rm" / "model.pt")
    history = ppo.ppo_train(
        copy.deepcopy(sft),
        copy.deepcopy(sft),
        copy.deepcopy(rm),
        rm,
        Tokenizer.load(run.path / "tokenizer"),
        read_jsonl(run.path / "rlhf" / "prompts.jsonl"),
        config,
        "cpu",
        steps=3,
    )
    coefs = [row["kl_coef"] for row in history]
    assert coefs[0] == 0.1
    for before, after, row in zip(coefs, coefs[1:], history):
        error = min(max(row["kl"] / 0.5 - 1, -0.2), 0.2)
        assert after == pytest.approx(before * (1 + error * config.ppo.batch_size / 8), rel=1e-9)
    assert coefs[1] != coefs[0]


def test_rlhf_plots(rlhf_run):
    from labkit import plots

    run, metrics, _ = rlhf_run
    assert len(plots.ppo_curves(rlhf.read_history(run, "ppo")).data) == 4
    assert len(plots.reward_hacking(rlhf.read_history(run, "hacking")).data) == 3
    plots.dpo_curves(rlhf.read_history(run, "dpo"))
    outcomes = plots.win_rates(metrics)
    assert [bar.name for bar in outcomes.data] == ["wins", "ties", "losses"]
    for column in range(2):  # PPO, DPO: every held-out prompt is a win, a tie or a loss
        assert sum(bar.y[column] for bar in outcomes.data) == metrics["n_eval"]
    assert all("labeler score" in note.text for note in outcomes.layout.annotations)
    assert plots.answers_table(rlhf.answer_examples(run)).data


def test_a_last_line_without_newline_is_kept_and_not_glued(tmp_path):
    path = tmp_path / "rankings.jsonl"
    path.write_text(json.dumps(dict(id="p0000-x", order=[0, 1, 2], by="human")))  # written by hand, no newline
    store = preferences.Rankings(path, _prompts())
    store.add("p0001-x", [1, 0, 2])
    assert set(preferences.Rankings(path, _prompts()).records) == {"p0000-x", "p0001-x"}


def _tiny_gpt(vocab, seed):
    from labkit.model import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32))


def test_ppo_micro_batches_give_the_gradients_of_one_minibatch(rows_seen):
    """A minibatch 3x the micro-batch: no forward pass of policy or value model sees more rows
    than the micro-batch, and loss and gradients equal those of the minibatch at once."""
    import dataclasses

    from labkit.config import get_config
    from labkit.engine import pack, score
    from labkit.model import ScalarModel

    policy, value = _tiny_gpt(50, 0), ScalarModel(_tiny_gpt(50, 1))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50, (int(k),), generator=g).tolist() for k in torch.randint(1, 12, (10,), generator=g)]
    answers = [torch.randint(0, 50, (int(k),), generator=g).tolist() for k in torch.randint(1, 10, (10,), generator=g)]
    batch = pack(prompts, answers)
    mask = batch.mask
    old, _ = score(policy, prompts, answers, temperature=0.7)
    noise = lambda scale: scale * torch.randn(mask.shape, generator=g) * mask  # noqa: E731
    rollouts = dict(
        batch=batch, mask=mask, logprobs=old + noise(0.3), values=noise(1.0), advantages=noise(1.0), returns=noise(1.0)
    )
    rows = torch.tensor([0, 2, 3, 5, 6, 7, 8, 9, 1])
    p = get_config("tiny").ppo

    def backward(micro_batch_size):
        policy.zero_grad(set_to_none=True), value.zero_grad(set_to_none=True)
        seen = rows_seen(policy), rows_seen(value.body)
        stats = ppo.minibatch_backward(
            policy, value, rollouts, rows, dataclasses.replace(p, micro_batch_size=micro_batch_size), 0.7
        )
        grads = [q.grad.clone() for q in list(policy.parameters()) + list(value.parameters())]
        return stats, grads, seen

    whole, whole_grads, whole_seen = backward(64)
    micro, micro_grads, micro_seen = backward(3)
    assert whole_seen == ([9], [9]) and micro_seen == ([3, 3, 3], [3, 3, 3])
    for key in whole:
        assert micro[key] == pytest.approx(whole[key], abs=1e-5), key
    assert whole["clipfrac"] > 0 and whole["vf_clipfrac"] > 0
    for a, b in zip(micro_grads, whole_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_ppo_scores_at_the_temperature_it_samples_at(rlhf_run, tiny_config, monkeypatch):
    """Rollout log-probabilities, the reference's (the KL) and the update's all divide the logits by
    the sampling temperature."""
    from labkit import engine
    from labkit.config import get_config
    from labkit.tokenizer import Tokenizer

    run, _, _ = rlhf_run
    temperatures = []
    for name in ("generate", "score", "logprobs"):
        real = getattr(engine, name)
        monkeypatch.setattr(
            ppo, name, lambda *a, real=real, **k: temperatures.append(k["temperature"]) or real(*a, **k)
        )
    config = get_config("tiny", rlhf=dict(temperature=0.7))
    sft = load_model(run.path / "sft" / "model.pt")
    rm = load_model(run.path / "rlhf" / "rm" / "model.pt")
    ppo.ppo_train(
        copy.deepcopy(sft),
        copy.deepcopy(sft),
        copy.deepcopy(rm),
        rm,
        Tokenizer.load(run.path / "tokenizer"),
        read_jsonl(run.path / "rlhf" / "prompts.jsonl"),
        config,
        "cpu",
        steps=1,
    )
    updates = config.ppo.epochs * config.ppo.minibatches
    assert temperatures == [0.7] * (1 + 2 + updates)  # sampling, old + reference log-probs, every update


@pytest.mark.parametrize("hacking_lr", [0.0, 5e-4])
def test_reward_hacking_runs_without_kl_at_its_own_learning_rate(monkeypatch, hacking_lr):
    calls = []

    def fake_ppo(sft, reward_model, tokenizer, prompts, config, *args, **options):
        calls.append((config.ppo.learning_rate, options["kl_coef"], options["kl_target"], options["steps"]))
        return None, [dict(score=1.0, labeler=0.5, kl=3.0)]

    monkeypatch.setattr(rlhf, "ppo_from_sft", fake_ppo)
    config = get_config("tiny", rlhf=dict(hacking_steps=7, hacking_learning_rate=hacking_lr))
    metrics = rlhf.reward_hacking(None, None, None, [], config, None, None, "key")
    assert calls == [(hacking_lr or config.ppo.learning_rate, 0.0, 0.0, 7)]
    assert metrics["hacking_kl_end"] == 3.0
