import json
import math
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from labkit import conversations as conv
from labkit.chat import ChatError, render
from labkit.config import ConfigError, get_config
from labkit.model import GPT, GPTConfig
from labkit.sft import (
    IGNORE,
    arithmetic_ok,
    collate,
    encode_conversations,
    knowledge_metrics,
    load_conversations,
    sft_loss,
    to_example,
)
from labkit.tokenizer import Tokenizer
from labkit.world import FACTS, make_world

METRIC_KEYS = (
    "val_loss",
    "qa_accuracy",
    "qa_accuracy_by_bucket",
    "harmful_refusal_rate",
    "format_ok_rate",
    "identity_ok_rate",
    "base_fewshot_qa_accuracy",
    "n_qa_questions",
    "steps",
    "tokens_seen",
    "pretrain_tokens_seen",
    "compute_ratio",
)


@pytest.fixture(scope="module")
def world():
    return make_world(7, 60)


@pytest.fixture(scope="module")
def tok():
    text = " ".join(
        m["content"] for c in conv.make_conversations(make_world(7, 60), 200, 0, False) for m in c["messages"]
    )
    return Tokenizer.train(text, vocab_size=400)


def test_generators_are_deterministic_from_the_seed(world):
    a = conv.make_conversations(world, 120, seed=3, heldout=False)
    assert a == conv.make_conversations(world, 120, seed=3, heldout=False)
    assert a != conv.make_conversations(world, 120, seed=4, heldout=False)
    assert len(a) == 120 and {c["kind"] for c in a} == set(conv.KINDS)
    assert all(c["messages"][-1]["role"] == "assistant" for c in a)


def _formatted(templates, world):
    return {t.format(**conv._slots(p)) for t in templates for p in world.people}


def test_no_heldout_person_or_phrasing_in_training(world):
    train_people, heldout_people = conv.split_people(world, 0.25)
    assert heldout_people and train_people and not {p.name for p in train_people} & {p.name for p in heldout_people}
    assert all(p.n_pages > 0 for p in train_people + heldout_people)  # people with no page get no QA
    train = conv.make_conversations(world, 600, seed=1, heldout=False)
    text = json.dumps(train)
    assert not any(p.name in text for p in heldout_people)
    assert not any(p.name in text for p in world.people if p.n_pages == 0)  # nothing is taught about them
    user_turns = {m["content"] for c in train for m in c["messages"] if m["role"] == "user"}
    heldout_phrasings = _formatted(
        [q for f in FACTS for q in conv.QUESTIONS[f][1]] + conv.HARMFUL[1] + conv.IDENTITY_QUESTIONS[1], world
    )
    assert not user_turns & heldout_phrasings

    evaluation = conv.eval_questions(world, seed=1, heldout_fraction=0.25)
    qa = [r for r in evaluation if r["kind"] == "qa"]
    assert len(qa) == len(heldout_people) * len(FACTS)
    assert all(r["messages"][0]["content"] in heldout_phrasings for r in evaluation if r["kind"] != "arithmetic")
    assert {r["kind"] for r in evaluation} == {"qa", "identity", "refusal", "arithmetic"}


def test_answers_state_the_truth_and_identity_is_one_string(world):
    for c in conv.make_conversations(world, 200, seed=2, heldout=False):
        reply = c["messages"][-1]["content"]
        if c["kind"] in ("qa", "multi_turn"):
            assert conv.mentions(reply, c["truth"])
        elif c["kind"] == "identity":
            assert reply == conv.IDENTITY and conv.identity_ok(reply)
        elif c["kind"] == "refusal":
            assert conv.refuses(reply)
        else:
            assert f"The answer is {c['truth']}." in reply
    assert not conv.mentions("born in Brannor.", "Bran") and conv.mentions("born in Bran.", "Bran")


def test_qa_is_scored_on_the_facts_the_base_model_knew():
    recall = [  # Zed Out is not asked: not held out
        dict(name="Ann Bo", fact="field", bucket="1", correct=True),
        dict(name="Ann Bo", fact="employer", bucket="1", correct=False),
        dict(name="Cy Dee", fact="field", bucket="5-16", correct=True),
        dict(name="Zed Out", fact="field", bucket="1", correct=True),
    ]
    qa = [
        dict(name="Ann Bo", fact="field", bucket="1", correct=False, base_correct=True),
        dict(name="Ann Bo", fact="employer", bucket="1", correct=True, base_correct=False),
        dict(name="Cy Dee", fact="field", bucket="5-16", correct=True, base_correct=False),
    ]
    metrics = knowledge_metrics(qa, recall)
    assert metrics["n_qa_questions"] == 2 and metrics["n_qa_heldout"] == 3 and metrics["n_heldout_people"] == 2
    assert metrics["qa_accuracy"] == 0.5 and metrics["base_fewshot_qa_accuracy"] == 0.5
    assert metrics["qa_accuracy_by_bucket"] == {"1": 0.0, "2-4": None, "5-16": 1.0, "17+": None}
    assert metrics["qa_accuracy_all"] == round(2 / 3, 4) and metrics["base_fewshot_qa_accuracy_all"] == round(1 / 3, 4)
    assert metrics["base_fact_recall_heldout"] == round(2 / 3, 4)
    assert [r["base_knew"] for r in qa] == [True, False, True]


def test_arithmetic_is_read_like_the_correctness_reward():
    assert arithmetic_ok("Add the tens: 20 + 30 = 50. The answer is 57.", "57")
    assert not arithmetic_ok("The answer is 57. The answer is 58.", "57")  # the last one counts
    assert not arithmetic_ok("57", "57") and not arithmetic_ok("The answer is 570.", "57")


def _model(tok):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16))


CONVERSATION = [
    {"role": "user", "content": "What is 12 plus 30?"},
    {"role": "assistant", "content": "Add the tens. The answer is 42."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": conv.IDENTITY},
]


def test_loss_is_the_hand_computed_cross_entropy_over_assistant_tokens(tok):
    model = _model(tok)
    rendered = [render(CONVERSATION, tok), render(CONVERSATION[:2], tok)]
    x, y = collate([to_example(ids, mask, 64) for ids, mask in rendered], pad_id=0)
    loss, _ = sft_loss(model, (x, y))
    logits, _ = model(x)
    log_probs = F.log_softmax(logits, dim=-1)
    terms = []
    for row, (ids, mask) in enumerate(rendered):
        for i in range(1, min(len(ids), 65)):
            if mask[i]:  # position i - 1 predicts token i, which the assistant wrote
                terms.append(-log_probs[row, i - 1, ids[i]])
    assert len(terms) == int((y != IGNORE).sum())
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_changing_a_user_token_target_does_not_change_the_loss(tok):
    model = _model(tok)
    ids, mask = render(CONVERSATION, tok)
    x, _ = to_example(ids, mask, 64)
    first_user_token = ids.index(tok.encode_special("<|im_sep|>")) + 1
    assert mask[first_user_token] == 0
    changed = list(ids)  # the inputs stay the same; only the target of one position changes
    changed[first_user_token] = (changed[first_user_token] + 1) % 256
    losses = []
    for target_ids in (ids, changed):
        _, y = to_example(target_ids, mask, 64)
        losses.append(sft_loss(model, collate([(x, y)], 0))[0].item())
    assert losses[0] == losses[1]
    unmasked = [sft_loss(model, collate([(x, t[1:65])], 0))[0].item() for t in (ids, changed)]
    assert unmasked[0] != unmasked[1]  # without the mask the user's token would count


def test_bad_conversations_are_refused_clearly(tok, world):
    good = {"messages": CONVERSATION}
    with pytest.raises(
        ChatError, match="conversation 1: message 0 has unknown role 'robot'; allowed: system, user, assistant, tool"
    ):
        encode_conversations([good, {"messages": [{"role": "robot", "content": "hi"}]}], tok, 64)
    with pytest.raises(ChatError, match="conversation 0: a training conversation must end with an assistant turn"):
        encode_conversations([{"messages": CONVERSATION[:1]}], tok, 64)
    with pytest.raises(ConfigError, match="sft.source='mini-web' needs the mini-web's world"):
        load_conversations(get_config("tiny"), None)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_messages_dataset_from_a_local_file(tmp_path, tok):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Say {i}."},
                {"role": "assistant", "content": f"{i}.", "name": "x"},
            ],
            "source": "test",
        }
        for i in range(30)
    ]
    path = tmp_path / "chats.jsonl"
    _write_jsonl(path, rows)
    config = get_config("tiny", sft=dict(source=str(path), val_conversations=10))
    train, val = load_conversations(config, None)
    assert len(train) + len(val) == 30 and len(val) == 3
    assert train[0]["messages"][1].keys() == {"role", "content"}  # extra keys are dropped
    examples, stats = encode_conversations(train, tok, 64)
    assert len(examples) == 27 and stats["assistant_tokens"] > 0

    import pandas as pd

    parquet = tmp_path / "chats.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    assert len(conv.load_messages(str(parquet), max_conversations=5)) == 5

    _write_jsonl(path, rows[:2] + [{"messages": [{"role": "wizard", "content": "hi"}]}])
    with pytest.raises(ChatError, match=r"row 2: message 0 has unknown role 'wizard'"):
        conv.load_messages(str(path))
    _write_jsonl(path, [{"text": "hello"}])
    with pytest.raises(ChatError, match="has no 'messages' column; its columns: text"):
        conv.load_messages(str(path))
    with pytest.raises(FileNotFoundError, match="no such file"):
        conv.load_messages(str(tmp_path / "missing.jsonl"))


@pytest.fixture(scope="module")
def sft_run(tiny_run, tiny_config):
    from labkit.pipeline import ensure

    return tiny_run, ensure("sft", tiny_config, tiny_run)


def test_stage_end_to_end_on_tiny(sft_run):
    run, metrics = sft_run
    for key in METRIC_KEYS:
        assert key in metrics, key
    for key in (
        "qa_accuracy_all",
        "harmful_refusal_rate",
        "format_ok_rate",
        "identity_ok_rate",
        "arithmetic_accuracy",
        "base_fewshot_qa_accuracy_all",
        "base_fact_recall_heldout",
    ):
        assert 0.0 <= metrics[key] <= 1.0
    if metrics["n_qa_questions"] == 0:  # the tiny base model may know none of the held-out facts: nothing to score
        assert metrics["qa_accuracy"] is None
    else:
        assert 0.0 <= metrics["qa_accuracy"] <= 1.0
    assert math.isfinite(metrics["val_loss"]) and metrics["steps"] == get_config("tiny").sft.max_steps
    assert metrics["val_loss"] < metrics["base_val_loss"]  # fine-tuning lowered the held-out assistant-token loss
    assert (
        0
        < metrics["compute_ratio"]
        == pytest.approx(metrics["tokens_seen"] / metrics["pretrain_tokens_seen"], abs=1e-3)
    )
    out = run.path / "sft"
    for name in ("model.pt", "train.jsonl", "val.jsonl", "eval.jsonl", "history.json", "samples.json"):
        assert (out / name).exists(), name
    evaluation = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    qa = [r for r in evaluation if r["kind"] == "qa"]
    assert len(qa) == metrics["n_qa_heldout"] and sum(r["base_knew"] for r in qa) == metrics["n_qa_questions"]
    heldout = {r["name"] for r in evaluation if r["kind"] == "qa"}
    assert not any(r.get("name") in heldout for r in map(json.loads, (out / "train.jsonl").read_text().splitlines()))


def test_chat_generation_stops_and_keeps_several_turns(sft_run):
    from labkit.engine import chat
    from labkit.sft import load_assistant

    run, _ = sft_run
    model, tokenizer = load_assistant(run)
    messages = [{"role": "user", "content": "Who are you?"}]
    reply = chat(model, tokenizer, messages, max_new_tokens=8)
    assert isinstance(reply, str) and "<|im_end|>" not in reply
    for _ in range(6):  # more turns than the context holds: the oldest are left out
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
        reply = chat(model, tokenizer, messages, max_new_tokens=8, temperature=1.0, seed=0)
    assert isinstance(reply, str)


def test_chat_cli_answers_piped_lines(sft_run):
    run, _ = sft_run
    args = [sys.executable, "-m", "labkit", "chat", "--run", run.name, "--runs-dir", str(run.runs_dir)]
    done = subprocess.run(
        args, input="Who are you?\nWhat is 12 plus 30?\nexit\nignored\n", capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2

    missing = subprocess.run(
        args[:5] + ["nobody", "--runs-dir", str(run.runs_dir)],
        input="hi\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2
    assert "no sft model at" in missing.stderr and "labkit run --run nobody --runs-dir" in missing.stderr
    assert "--stages sft" in missing.stderr
