"""Stage 4, supervised fine-tuning (SFT): the base model becomes an assistant.

The lesson: post-training is more of the same training, on a different kind of document. The
base model keeps predicting the next token, now of conversations rendered with the chat
template (labkit/chat.py), and the loss counts only the assistant's tokens: the user's words
are context to read, not text to imitate. Every target outside the assistant's turns is set to
-1, the `ignore_index` of the model's cross-entropy, so the same loss function and the same
training loop as pretraining give the assistant-only loss.

Three things to see in the numbers:

- it is cheap: a fraction of pretraining's tokens (`compute_ratio`);
- the assistant imitates the people who wrote its data: it answers in their format, refuses
  what they refused, and says it is whatever they wrote it is (`identity_ok_rate`);
- it answers questions that were not in that data, about people it never saw a conversation
  about, but only with what the base model already knew: SFT teaches the format, pretraining
  supplied the knowledge (`qa_accuracy` beside `base_fewshot_qa_accuracy` and the base model's
  fact recall for the same people).

Writes to `runs/<run>/sft/`:
  train.jsonl, val.jsonl       the training and held-out conversations
  eval.jsonl                   every evaluation question, the assistant's reply, right or wrong
  train_state.pt, model.pt     the training checkpoint and the assistant's weights
  history.json, samples.json   the loss curve; replies during training; base vs assistant at the end
  metrics.json                 val_loss, qa_accuracy, harmful_refusal_rate, format_ok_rate, ...
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections import defaultdict

import numpy as np
import torch

from .chat import ChatError, render
from .checkpoint import load_model, model_path, save_model
from .config import Config, ConfigError, TrainConfig, resolve_device
from .conversations import (
    ANSWERS,
    eval_questions,
    identity_ok,
    load_messages,
    make_conversations,
    mentions,
    refuses,
    split_people,
)
from .distributed import is_main_process
from .engine import chat, fit, generate, replies
from .pretrain import BUCKET_NAMES, few_shot_prompt, load_base
from .rewards import extract_answer
from .run import Run, read_json, write_json, write_jsonl
from .train import fine_tuning, train

IGNORE = -1  # the model's cross-entropy skips targets equal to this
FEW_SHOTS = 3


# --- batches --------------------------------------------------------------------------------------


def to_example(ids: list[int], mask: list[int], block_size: int) -> tuple[list[int], list[int]]:
    """One rendered conversation -> (inputs, targets) for next-token prediction, at most
    `block_size` long. A target is the next token where the mask says the assistant wrote it,
    and IGNORE everywhere else."""
    ids, mask = ids[: block_size + 1], mask[: block_size + 1]
    return ids[:-1], [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch to its longest conversation: padded inputs are `pad_id`, padded targets IGNORE."""
    length = max(len(x) for x, _ in examples)
    x = torch.full((len(examples), length), pad_id, dtype=torch.long)
    y = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for row, (inputs, targets) in enumerate(examples):
        x[row, : len(inputs)] = torch.tensor(inputs)
        y[row, : len(targets)] = torch.tensor(targets)
    return x, y


class ConversationBatches:
    """Random batches of conversations, drawn with a seeded generator whose state is checkpointed."""

    def __init__(self, examples: list, batch_size: int, seed: int, pad_id: int):
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.rng = np.random.default_rng(seed)

    def next(self):
        rows = self.rng.integers(0, len(self.examples), self.batch_size)
        return collate([self.examples[i] for i in rows], self.pad_id)

    def state_dict(self) -> dict:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def sft_loss(model, batch):
    """The pretraining loss, unchanged: with IGNORE targets it is the assistant-only loss."""
    x, y = batch
    _, loss = model(x, y)
    return loss, {}


def assistant_tokens(batch) -> torch.Tensor:
    """The targets `sft_loss` averages over: a batch's assistant tokens."""
    return (batch[1] != IGNORE).sum()


def encode_conversations(conversations: list[dict], tokenizer, block_size: int, renderer=render) -> tuple[list, dict]:
    """Render every conversation; keep those with at least one assistant target inside the context."""
    examples, truncated, dropped, assistant_tokens = [], 0, 0, 0
    for i, conversation in enumerate(conversations):
        try:
            ids, mask = renderer(conversation["messages"], tokenizer)
        except ChatError as error:
            raise ChatError(f"conversation {i}: {error}") from None
        truncated += len(ids) > block_size + 1
        x, y = to_example(ids, mask, block_size)
        learned = sum(t != IGNORE for t in y)
        if learned == 0:
            dropped += 1
            continue
        assistant_tokens += learned
        examples.append((x, y))
    return examples, dict(truncated=truncated, dropped=dropped, assistant_tokens=assistant_tokens)


def finetune(
    model,
    conversations: list[dict],
    tokenizer,
    config: Config,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    min_lr: float,
    warmup_steps: int,
    device: str,
    run: Run,
    checkpoint,
    resume_key: str,
    desc: str,
    renderer=render,
):
    """The SFT recipe (assistant-only loss, the shared loop) on `conversations`, for the later stages that
    fine-tune again (stage 6's cold start, stage 7's mitigations). Returns (TrainResult, examples used)."""
    block, pad = model.config.block_size, tokenizer.encode_special("<|endoftext|>")
    examples, _ = encode_conversations(conversations, tokenizer, block, renderer)
    if not examples:
        raise ConfigError(f"no {desc} conversation has an assistant token within block_size={block}")
    cfg = fine_tuning(
        config.train,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        min_lr=min_lr,
        warmup_steps=min(warmup_steps, steps),
    )  # checkpointed 5 times: a fine-tuning killed near its end resumes near its end
    result = train(
        model,
        sft_loss,
        ConversationBatches(examples, batch_size, config.seed, pad),
        cfg,
        device=device,
        checkpoint=checkpoint,
        resume_key=resume_key,
        run=run,
        desc=desc,
        loss_terms=assistant_tokens,
    )
    model.eval()
    return result, len(examples)


# --- the data -------------------------------------------------------------------------------------


def load_conversations(config: Config, world) -> tuple[list[dict], list[dict]]:
    """(training, held-out) conversations: written from the world, read from a dataset, or both mixed."""
    s = config.sft
    if s.source != "mini-web" and s.mini_web_share == 0:
        rows = load_messages(s.source, s.messages_column, s.max_conversations, s.split, s.config)
        return split_dataset(rows, s, config.seed)
    if world is None:
        what = "sft.source='mini-web'" if s.source == "mini-web" else f"sft.mini_web_share={s.mini_web_share}"
        raise ConfigError(
            f"{what} needs the mini-web's world, and this run's data stage read a dataset alone; give sft.source "
            "a dataset (or .jsonl/.parquet file) with a 'messages' column and sft.mini_web_share=0, or set "
            "data.mini_web_share > 0"
        )
    train = make_conversations(world, s.n_conversations, config.seed, False, s.heldout_people)
    val = make_conversations(world, s.val_conversations, config.seed, True, s.heldout_people)
    return (train, val) if s.source == "mini-web" else mix_conversations(train, val, s, config.seed)


def split_dataset(rows: list[dict], s, seed: int) -> tuple[list[dict], list[dict]]:
    """A dataset's conversations, shuffled, split into (training, held-out): a tenth held out, at most
    `val_conversations`."""
    if len(rows) < 2:
        raise ChatError(
            f"sft.source={s.source!r} holds {len(rows)} conversation; at least 2 are needed (train and held-out)"
        )
    random.Random(seed).shuffle(rows)
    n_val = min(s.val_conversations, max(1, len(rows) // 10))
    return rows[n_val:], rows[:n_val]


def mix_conversations(train: list[dict], val: list[dict], s, seed: int) -> tuple[list[dict], list[dict]]:
    """The mini-web's conversations with a dataset's, the mini-web's `s.mini_web_share` of the training
    ones (a share of conversations: batches draw whole conversations, uniformly). The dataset is read
    for the rest, (1 - share) / share times the mini-web's, plus a tenth to hold out; held out are the
    mini-web's and the dataset's together. A dataset shorter than that leaves the mini-web a larger
    share (the sft metrics say which)."""
    wanted = math.ceil(len(train) * (1 - s.mini_web_share) / s.mini_web_share)
    limit = min(s.max_conversations or math.inf, wanted + max(1, wanted // 10))
    rows = load_messages(s.source, s.messages_column, int(limit), s.split, s.config)
    dataset_train, dataset_val = split_dataset(rows, s, seed)
    if len(dataset_train) < wanted:  # said on a line of its own; metrics.json has the share measured
        print(
            f"sft: sft.source={s.source!r} gave {len(dataset_train)} training conversations of the {wanted} wanted: "
            f"the mini-web's are more than sft.mini_web_share={s.mini_web_share} of them",
            file=sys.stderr,
        )
    return train + dataset_train[:wanted], val + dataset_val


# --- replies --------------------------------------------------------------------------------------


def base_answers(
    base, tokenizer, questions: list[dict], shot_people: list, max_new_tokens: int = 12, max_batch: int = 64
) -> list[str]:
    """The base model's few-shot answers: `FEW_SHOTS` solved questions of the same phrasing about
    well-known training people, answered in the assistant's words, then the question; the answer
    is the first line it writes."""
    eot = tokenizer.encode_special("<|endoftext|>")
    prompts = []
    for q in questions:
        question = q["messages"][0]["content"]
        shots = [
            (question.replace(q["name"], p.name), ANSWERS[q["fact"]][0].format(**vars(p), first=p.name.split()[0]))
            for p in shot_people
        ]
        prompts.append([eot] + tokenizer.encode(few_shot_prompt(shots, question)))
    if not prompts:
        return []
    prompts, budget = fit(prompts, max_new_tokens, base.config.block_size)
    answers = []
    for ids in generate(base, prompts, budget, temperature=0, stop_tokens=(eot,), max_batch=max_batch):
        text = tokenizer.decode(ids[: ids.index(eot)] if eot in ids else ids)
        answers.append(text.split("\n")[0].strip())
    return answers


def arithmetic_ok(reply: str, truth: str) -> bool:
    """The final answer, read the way stage 6's correctness reward reads it, is the truth."""
    return extract_answer(reply) == truth


def judge(row: dict) -> bool | None:
    """Is the reply right? QA: it states the true fact; refusal: it refuses; identity: it says what
    the assistant is; arithmetic: its final answer is right."""
    kind, reply = row["kind"], row["reply"]
    if kind == "qa":
        return mentions(reply, row["truth"])
    if kind == "refusal":
        return refuses(reply)
    if kind == "identity":
        return identity_ok(reply)
    if kind == "arithmetic":
        return arithmetic_ok(reply, row["truth"])
    return None


def _share(flags) -> float | None:
    flags = list(flags)
    return round(sum(flags) / len(flags), 4) if flags else None


def by_bucket(rows: list[dict], key: str) -> dict:
    groups = defaultdict(list)
    for r in rows:
        groups[r["bucket"]].append(r[key])
    return {b: _share(groups[b]) for b in BUCKET_NAMES if b != "0"}


def evaluate_assistant(model, base, tokenizer, world, config: Config, run: Run) -> tuple[list[dict], dict]:
    """Ask the held-out evaluation questions; judge every reply; the base model answers the same
    questions few-shot. Returns (rows, metrics)."""
    s = config.sft
    rows = eval_questions(world, config.seed, s.heldout_people)
    answers = replies(
        model, tokenizer, [r["messages"][:-1] for r in rows], s.max_new_tokens, max_batch=config.max_batch
    )
    rows = [dict(r, reference=r["messages"][-1]["content"], reply=a.text, ended=a.ended) for r, a in zip(rows, answers)]
    for r in rows:
        r["correct"] = judge(r)
    qa = [r for r in rows if r["kind"] == "qa"]
    train_people, _ = split_people(world, s.heldout_people)
    shot_people = sorted(train_people, key=lambda p: -p.n_pages)[:FEW_SHOTS]
    for r, answer in zip(qa, base_answers(base, tokenizer, qa, shot_people, max_batch=config.max_batch)):
        r["base_answer"], r["base_correct"] = answer, mentions(answer, r["truth"])
    of = lambda kind: [r["correct"] for r in rows if r["kind"] == kind]  # noqa: E731
    arithmetic = [r for r in rows if r["kind"] == "arithmetic"]
    metrics = dict(
        **knowledge_metrics(qa, read_json(run.path / "base" / "fact_recall.json")),
        qa_false_refusal_rate=_share(refuses(r["reply"]) for r in qa),
        harmful_refusal_rate=_share(of("refusal")),
        n_harmful=len(of("refusal")),
        identity_ok_rate=_share(of("identity")),
        n_identity=len(of("identity")),
        arithmetic_accuracy=_share(r["correct"] for r in arithmetic),
        n_arithmetic=len(arithmetic),
        arithmetic_accuracy_by_task={
            t: _share(r["correct"] for r in arithmetic if r["task"] == t)
            for t in dict.fromkeys(r["task"] for r in arithmetic)
        },
        format_ok_rate=_share(r["ended"] for r in rows),
    )
    return rows, metrics


def knowledge_metrics(qa: list[dict], recall: list[dict]) -> dict:
    """Question answering against what pretraining stored. `recall` is the base model's
    page-completion probe (labkit/pretrain.py); a fact it completed correctly is one the base
    model *knew*. SFT cannot teach a held-out person's facts, only how to say what is stored, so
    `qa_accuracy` counts the held-out facts the base model knew; the `_all` figures count every
    held-out fact, beside the base model's page-completion recall of the same facts."""
    knew = {(p["name"], p["fact"]) for p in recall if p["correct"]}
    for r in qa:
        r["base_knew"] = (r["name"], r["fact"]) in knew
    known = [r for r in qa if r["base_knew"]]
    asked = {(r["name"], r["fact"]) for r in qa}
    probes = [p for p in recall if (p["name"], p["fact"]) in asked]
    return dict(
        qa_accuracy=_share(r["correct"] for r in known),
        qa_accuracy_by_bucket=by_bucket(known, "correct"),
        base_fewshot_qa_accuracy=_share(r["base_correct"] for r in known),
        n_qa_questions=len(known),
        n_qa_heldout=len(qa),
        n_heldout_people=len({r["name"] for r in qa}),
        qa_accuracy_all=_share(r["correct"] for r in qa),
        qa_accuracy_all_by_bucket=by_bucket(qa, "correct"),
        base_fewshot_qa_accuracy_all=_share(r["base_correct"] for r in qa),
        base_fewshot_qa_accuracy_all_by_bucket=by_bucket(qa, "base_correct"),
        base_fact_recall_heldout=_share(p["correct"] for p in probes),
        base_fact_recall_heldout_by_bucket=by_bucket(probes, "correct"),
    )


# --- the stage ------------------------------------------------------------------------------------


def train_config(config: Config) -> TrainConfig:
    """Pretraining's optimizer settings with SFT's own length, batch and learning rate."""
    s = config.sft
    return fine_tuning(
        config.train,
        steps=s.max_steps,
        batch_size=s.batch_size,
        learning_rate=s.learning_rate,
        min_lr=s.min_lr,
        warmup_steps=s.warmup_steps,
        eval_every=s.eval_every,
    )


def build(config: Config, run: Run, made_from: str) -> dict:
    """Fine-tune the run's base model on conversations and measure the assistant.
    `made_from` is the stage's fingerprint (what a resumable checkpoint must match)."""
    from .data import read_world

    start = time.time()
    out, device = run.stage_dir("sft"), resolve_device(config.device)
    model, tokenizer = load_base(run, device)
    world = read_world(run)
    train_rows, val_rows = load_conversations(config, world)  # the same on every process
    if is_main_process():
        write_jsonl(out / "train.jsonl", train_rows)
        write_jsonl(out / "val.jsonl", val_rows)
    block, pad = model.config.block_size, tokenizer.encode_special("<|endoftext|>")
    train_examples, train_stats = encode_conversations(train_rows, tokenizer, block)
    val_examples, _ = encode_conversations(val_rows, tokenizer, block)
    if not train_examples or not val_examples:
        raise ChatError(
            f"no conversation has an assistant token within block_size={block}; "
            f"use shorter conversations or a larger model.block_size"
        )
    cfg = train_config(config)
    val_batches = [
        collate(val_examples[i : i + cfg.batch_size], pad) for i in range(0, len(val_examples), cfg.batch_size)
    ]
    probe = [{"role": "user", "content": "Who are you?"}]

    def sample_at_eval(event: dict) -> None:
        event["sample"] = "user: Who are you?\nassistant: " + chat(event["model"], tokenizer, probe, max_new_tokens=32)

    result = train(
        model,
        sft_loss,
        ConversationBatches(train_examples, cfg.batch_size, config.seed, pad),
        cfg,
        device=device,
        val_batches=lambda: val_batches,
        checkpoint=out / "train_state.pt",
        resume_key=made_from,
        run=run,
        on_eval=sample_at_eval,
        desc="sft",
        loss_terms=assistant_tokens,
    )
    model.eval()
    if not is_main_process():  # the files and the measuring are rank 0's
        return {}
    save_model(out / "model.pt", model, dict(step=result.step, tokens_seen=result.tokens_seen))
    write_json(out / "history.json", result.history)

    pretrain_tokens = (run.metrics("base") or {}).get("tokens_seen")
    metrics = dict(
        val_loss=round(result.val_loss, 4),
        base_val_loss=round(result.history[0]["val_loss"], 4) if "val_loss" in result.history[0] else None,
        steps=result.step,
        tokens_seen=result.tokens_seen,
        train_seconds=round(result.train_seconds, 2),
        tokens_per_second=round(result.tokens_per_second, 1),
        pretrain_tokens_seen=pretrain_tokens,
        compute_ratio=round(result.tokens_seen / pretrain_tokens, 4) if pretrain_tokens else None,
        n_train_conversations=len(train_examples),
        n_val_conversations=len(val_examples),
        train_assistant_tokens=train_stats["assistant_tokens"],
        truncated_conversations=train_stats["truncated"],
        source=config.sft.source,
        mini_web_share=round(sum(r["kind"] != "dataset" for r in train_rows) / len(train_rows), 4),
        device=device,
    )
    base, _ = load_base(run, device)
    samples = [dict(step=r["step"], text=r["sample"]) for r in result.history if "sample" in r]
    if world is not None:
        rows, eval_metrics = evaluate_assistant(model, base, tokenizer, world, config, run)
        write_jsonl(out / "eval.jsonl", rows)
        metrics.update(eval_metrics)
        samples += side_by_side_samples(base, model, tokenizer, rows)
    write_json(out / "samples.json", samples)
    metrics["seconds"] = round(time.time() - start, 2)
    return metrics


def side_by_side_samples(base, assistant, tokenizer, rows: list[dict]) -> list[dict]:
    """One question of each kind (its shortest): the base model continues it as a document, the assistant answers."""
    from .pretrain import complete

    picked = {}
    for r in sorted(rows, key=lambda r: len(r["messages"][0]["content"])):
        picked.setdefault(r["kind"], r)
    return [
        dict(
            kind=kind,
            prompt=r["messages"][0]["content"],
            base=complete(base, tokenizer, r["messages"][0]["content"], 48, temperature=0.0),
            assistant=chat(assistant, tokenizer, r["messages"][:1], max_new_tokens=48),
        )
        for kind, r in picked.items()
    ]


def load_assistant(run: Run, device: str = "cpu", model_name: str = "sft"):
    """(model, tokenizer) of a post-trained model of the run (default: the sft stage's)."""
    from .tokenizer import Tokenizer

    return load_model(model_path(run, model_name), resolve_device(device)), Tokenizer.load(run.path / "tokenizer")
