"""Stage 3, pretraining: a GPT learns to continue the pages of the mini-web, one token at a time.

The lesson: pretraining is next-token prediction on a lot of text, and nothing more. The model
that comes out, the *base model*, is an internet-document simulator: give it the start of a
page (or of a URL) and it writes the rest of a page like the ones it read. Along the way it
stores facts in its weights, but only the facts the text repeats: a person on twenty pages is
remembered, a person on one page is guessed. The stage measures exactly that against the world
the mini-web was made from (`fact_recall` by page-frequency bucket).

Writes to `runs/<run>/base/`:
  train.bin, val.bin, tokens.json   the tokenized corpus (held-out pages in val.bin)
  train_state.pt                    the training checkpoint (resume after a kill)
  model.pt                          the final weights and the GPTConfig to rebuild the model
  history.json                      loss per step, validation loss per evaluation
  samples.json                      text sampled at every evaluation, from gibberish to pages
  fact_recall.json                  every fact probe: prompt, truth, answer, right or wrong
  loss_by_position.json             mean validation loss at each position of the context
  metrics.json                      val_loss, val_bpb, tokens_seen, fact_recall, copy_accuracy, icl_score, ...
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .checkpoint import load_model, save_model
from .config import Config, resolve_device
from .dataloader import EOT, TokenWindows, sequential_batches, tokenize_run
from .distributed import is_main_process, main_first
from .engine import fit, generate
from .induction import icl_score, loss_by_position, text_windows
from .model import GPT, GPTConfig
from .run import Run, write_json
from .train import autocast, autocast_dtype, peak_flops, train
from .world import BUCKETS, FACTS, World, bucket, made_up_word

BUCKET_NAMES = [label for _, _, label in BUCKETS]
# Document-style prompts, phrased as the mini-web's encyclopedia pages phrase each fact (labkit/web.py)
FACT_PROMPTS = {
    "birth_city": "{name} was born in the city of",
    "birth_year": "{first} was born in the year",
    "university": "{first} studied at the",
    "field": "{first} works in the field of",
    "employer": "{first} works at",
}
SAMPLE_TOKENS = 96


def lm_loss(model, batch):
    """Next-token cross-entropy: the whole of pretraining."""
    x, y = batch
    _, loss = model(x, y)
    return loss, {}


def make_model(config: Config, vocab_size: int) -> GPT:
    torch.manual_seed(config.seed)
    return GPT(GPTConfig(vocab_size=vocab_size, **asdict(config.model)))  # the model section's fields are GPTConfig's


def build(config: Config, run: Run, made_from: str, out: Path | None = None) -> dict:
    """Pretrain a GPT on the run's cleaned corpus and measure it; return the stage's metrics.
    `made_from` is the stage's fingerprint (what a resumable checkpoint must match). `out`: where
    the model, its history and its probes go (default: the stage's folder; labkit/recipes.py trains
    other recipes into folders of their own); the token files are the stage's, whatever `out`."""
    from .tokenizer import Tokenizer

    start = time.time()
    out, device = out or run.stage_dir("base"), resolve_device(config.device)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.load(run.path / "tokenizer")
    # rank 0 writes the token files, the others read them
    files = main_first(tokenize_run, run, tokenizer, run.stage_dir("base"), config.train.val_fraction)
    train_ids, val_ids = files.tokens("train"), files.tokens("val")
    model = make_model(config, tokenizer.n_vocab)
    block, cfg = model.config.block_size, config.train

    eot = tokenizer.special_tokens[EOT]

    def sample_at_eval(event: dict) -> None:
        """What the model writes from nothing (a new document), at every evaluation."""
        ids = generate(
            event["model"],
            [eot],
            min(SAMPLE_TOKENS, block - 1),
            temperature=0.8,
            top_k=50,
            seed=config.seed,
            stop_tokens=(eot,),
        )[0]
        event["sample"] = tokenizer.decode([t for t in ids if t != eot])

    result = train(
        model,
        lm_loss,
        TokenWindows(train_ids, block, cfg.batch_size, config.seed),
        cfg,
        device=device,
        val_batches=lambda: sequential_batches(val_ids, block, cfg.batch_size, cfg.eval_batches),
        checkpoint=out / "train_state.pt",
        resume_key=made_from,
        run=run,
        on_eval=sample_at_eval,
        desc="pretraining",
    )
    model.eval()
    if not is_main_process():  # the files and the measuring are rank 0's
        return {}
    save_model(out / "model.pt", model, dict(step=result.step, tokens_seen=result.tokens_seen))
    write_json(out / "history.json", result.history)
    write_json(out / "samples.json", [dict(step=r["step"], text=r["sample"]) for r in result.history if "sample" in r])

    val_loss, val_bpb = evaluate_bpb(model, tokenizer, val_ids, cfg.batch_size, device, autocast_dtype(cfg, device))
    metrics = dict(
        val_loss=round(val_loss, 4),
        val_bpb=round(val_bpb, 4),
        tokens_seen=result.tokens_seen,
        tokens_per_second=round(result.tokens_per_second, 1),
        train_seconds=round(result.train_seconds, 2),
        steps=result.step,
        n_params=model.num_params(),
        n_layer=model.config.n_layer,
        n_embd=model.config.n_embd,
        block_size=block,
        vocab_size=tokenizer.n_vocab,
        train_tokens=files.meta["train"]["tokens"],
        val_tokens=files.meta["val"]["tokens"],
        epochs=round(result.tokens_seen / max(1, files.meta["train"]["tokens"]), 2),
        copy_accuracy=round(copy_accuracy(model, copy_probes(tokenizer, seed=config.seed)), 4),
        device=device,
    )
    # in-context learning: how much easier a token is late in the context than early (labkit/induction.py)
    by_position = loss_by_position(model, text_windows(val_ids, block), max_batch=config.max_batch)
    write_json(out / "loss_by_position.json", [round(v, 4) for v in by_position])
    metrics["icl_score"] = round(icl_score(by_position), 4)
    if (peak := peak_flops(device)) is not None:  # the share of the GPU's bf16 peak that training used
        metrics["mfu"] = round(model.estimate_mfu(result.tokens_per_second, peak), 4)
    from .data import read_world

    world = read_world(run)
    if world is not None:  # real datasets have no world to check facts against
        probes = fact_recall(model, tokenizer, world, max_batch=config.max_batch)
        write_json(out / "fact_recall.json", probes)
        metrics.update(summarize_recall(probes))
    metrics["seconds"] = round(time.time() - start, 2)
    return metrics


# --- loading ------------------------------------------------------------------------------------


def load_base(run: Run, device: str = "cpu"):
    """(model, tokenizer) of the run's base stage, for later stages and notebooks."""
    from .tokenizer import Tokenizer

    path = run.path / "base" / "model.pt"
    if not path.exists():
        raise FileNotFoundError(
            f"no base model at {path}; make it with `labkit run{run.where} --stages base` "
            f"(or run notebooks/03_pretraining.ipynb)"
        )
    return load_model(path, resolve_device(device)), Tokenizer.load(run.path / "tokenizer")


def position_losses(run: Run, model) -> list[float]:
    """The base stage's validation loss at each position of the context (computed here for a run
    built before the stage saved it)."""
    from .dataloader import TokenFiles
    from .run import read_json

    folder = run.path / "base"
    if (folder / "loss_by_position.json").exists():
        return read_json(folder / "loss_by_position.json")
    val = TokenFiles(folder / "train.bin", folder / "val.bin", read_json(folder / "tokens.json")).tokens("val")
    return loss_by_position(model, text_windows(val, model.config.block_size))


# --- measuring ------------------------------------------------------------------------------------


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for; special tokens count 0 (they are not text)."""
    special = set(tokenizer.special_tokens.values())
    as_bytes = getattr(tokenizer, "token_bytes", None) or (lambda i: tokenizer.decode([i]).encode("utf-8"))
    return torch.tensor([0 if i in special else len(as_bytes(i)) for i in range(tokenizer.n_vocab)])


@torch.no_grad()
def evaluate_bpb(
    model, tokenizer, tokens: np.ndarray, batch_size: int, device: str, dtype=None, max_tokens: int = 2**20
) -> tuple[float, float]:
    """(mean loss per token in nats, bits per byte) over the stream (at most `max_tokens` of it).

    Bits per byte divide the total loss by the number of UTF-8 bytes the targets stand for,
    so that models with different tokenizers compare: a tokenizer with longer tokens has a
    higher loss per token but as many bytes to predict. Targets that are special tokens
    (document boundaries) count in the loss per token but not in bits per byte.
    """
    model.eval()
    byte_lengths = token_byte_lengths(tokenizer).to(device)
    block = model.config.block_size
    max_batches = max(1, max_tokens // (block * batch_size))
    total_nats, total_tokens, text_nats, text_bytes = 0.0, 0, 0.0, 0
    for x, y in sequential_batches(tokens, block, batch_size, max_batches):
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            logits, _ = model(x)
        losses = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="none")
        nbytes = byte_lengths[y.view(-1)]
        total_nats += losses.sum().item()
        total_tokens += y.numel()
        text_nats += losses[nbytes > 0].sum().item()
        text_bytes += nbytes.sum().item()
    return total_nats / max(1, total_tokens), text_nats / math.log(2) / max(1, text_bytes)


COPY_TEXT = "One day a stranger named {name} came to town. Everyone liked {name}. The next day {name}"


def copy_probes(tokenizer, n: int = 60, seed: int = 0) -> list[tuple[list[int], int]]:
    """(ids, start) pairs: a short text that names a made-up stranger three times, and where the
    last mention's tokens begin. The name is new, so only the text itself can tell how it goes on."""
    rng = random.Random(f"{seed}-copy")
    probes = []
    for _ in range(n):
        name = made_up_word(rng, rng.randint(2, 3))
        ids = tokenizer.encode(COPY_TEXT.format(name=name))
        probes.append((ids, len(ids) - len(tokenizer.encode(" " + name))))
    return probes


@torch.no_grad()
def copy_accuracy(model, probes: list[tuple[list[int], int]]) -> float:
    """In-context copying (what induction heads do): the share of the last mention's tokens after
    its first that greedy prediction gets right. The first token is a guess; the rest can be read
    from the earlier mentions. A model without this skill cannot repeat a new name or number."""
    model.eval()
    device = next(model.parameters()).device
    hits = total = 0
    for ids, start in probes:
        cut = max(0, len(ids) - model.config.block_size)
        ids, start = ids[cut:], start - cut
        logits, _ = model(torch.tensor([ids], device=device))
        predicted = logits[0, start:-1].argmax(-1).tolist()  # position t predicts token t + 1
        hits += sum(p == t for p, t in zip(predicted, ids[start + 1 :]))
        total += len(ids) - start - 1
    return hits / max(1, total)


def fact_prompt(person, fact: str) -> str:
    """The start of an encyclopedia page about `person`, cut just before the fact."""
    first = person.name.split()[0]
    slug = "-".join(person.name.lower().split())
    return f"https://wikiverse.org/wiki/{slug}-0\n{person.name}\n\n" + FACT_PROMPTS[fact].format(
        name=person.name, first=first
    )


def complete(model, tokenizer, text: str, max_new_tokens: int = 64, new_document: bool = True, **sampling) -> str:
    """Continue `text` (greedy unless sampling says otherwise), as the start of a new document
    (after <|endoftext|>) or as text from the middle of one. A prompt too long for the context
    keeps its last tokens (at least half the context); the continuation gets the rest."""
    eot = tokenizer.special_tokens[EOT]
    block = model.config.block_size
    prompt = ([eot] if new_document else []) + tokenizer.encode(text)
    prompt = prompt[-max(block // 2, block - max_new_tokens) :] or [eot]
    max_new_tokens = max(1, min(max_new_tokens, block - len(prompt)))
    sampling.setdefault("temperature", 0.0)
    ids = generate(model, prompt, max_new_tokens, stop_tokens=(eot,), **sampling)[0]
    return tokenizer.decode([t for t in ids if t != eot])


def is_correct(answer: str, truth: str) -> bool:
    """The answer starts with the truth, as a whole word ("Bran" is not "Brannor")."""
    return re.match(re.escape(truth) + r"(?![\w])", answer.strip()) is not None


def fact_recall(model, tokenizer, world: World, max_new_tokens: int = 12, max_batch: int = 64) -> list[dict]:
    """Ask the base model every fact of every person (greedy completion of a page-style prompt)."""
    eot = tokenizer.special_tokens[EOT]
    probes = [(person, fact, fact_prompt(person, fact)) for person in world.people for fact in FACTS]
    # a prompt too long for the context keeps its end
    prompts, budget = fit([[eot] + tokenizer.encode(p) for *_, p in probes], max_new_tokens, model.config.block_size)
    answers = generate(model, prompts, budget, temperature=0, stop_tokens=(eot,), max_batch=max_batch) if probes else []
    rows = []
    for (person, fact, prompt), ids in zip(probes, answers):
        answer = tokenizer.decode(ids[: ids.index(eot)] if eot in ids else ids)
        truth = person.fact(fact)
        rows.append(
            dict(
                name=person.name,
                n_pages=person.n_pages,
                bucket=bucket(person.n_pages),
                fact=fact,
                prompt=prompt,
                truth=truth,
                answer=answer.split("\n")[0].strip(),
                correct=is_correct(answer, truth),
            )
        )
    return rows


def summarize_recall(rows: list[dict]) -> dict:
    """Share of facts recalled per page-frequency bucket (and per fact), with people per bucket."""

    def share(selected):
        return round(sum(r["correct"] for r in selected) / len(selected), 4) if selected else None

    by_bucket = defaultdict(list)
    for r in rows:
        by_bucket[r["bucket"]].append(r)
    people = Counter(r["bucket"] for r in rows if r["fact"] == FACTS[0])
    return dict(
        fact_recall={b: share(by_bucket[b]) for b in BUCKET_NAMES},
        fact_recall_people={b: people.get(b, 0) for b in BUCKET_NAMES},
        fact_recall_by_fact={
            f: {b: share([r for r in by_bucket[b] if r["fact"] == f]) for b in BUCKET_NAMES} for f in FACTS
        },
    )


# --- for the notebook: what a base model does -----------------------------------------------------


def parameter_table(model: GPT) -> list[dict]:
    """One row per parameter tensor: name, shape, count (the tied head appears once, as wte)."""
    return [dict(name=name, shape=tuple(p.shape), params=p.numel()) for name, p in model.named_parameters()]


def repeated_sentences(pages: list[dict], top: int = 5, min_words: int = 6) -> list[tuple[str, int]]:
    """Sentences found on the most pages (boilerplate), with the number of pages."""
    counts = Counter()
    for page in pages:
        counts.update({s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", page["text"]) if len(s.split()) >= min_words})
    return counts.most_common(top)


def regurgitation(model, tokenizer, pages: list[dict], top: int = 5, prefix_words: int = 4) -> list[dict]:
    """Give the model the first words of the most repeated sentences and of sentences seen once:
    does it continue them word for word?"""
    counts = Counter()
    for page in pages:
        counts.update({s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", page["text"]) if len(s.split()) >= 8})
    frequent = counts.most_common(top)
    rare = [(s, c) for s, c in sorted(counts.items()) if c == 1][:: max(1, len(counts) // (top * 3))][:top]
    rows = []
    for sentence, copies in frequent + rare:
        words = sentence.split()
        prefix, rest = " ".join(words[:prefix_words]), " ".join(words[prefix_words:])
        answer = complete(model, tokenizer, prefix, len(tokenizer.encode(" " + rest)) + 2, new_document=False)
        rows.append(
            dict(
                copies=copies,
                prefix=prefix,
                expected=rest,
                completion=answer.split("\n")[0].strip(),
                verbatim=answer.strip().startswith(rest),
            )
        )
    return rows


def few_shot_prompt(examples: list[tuple[str, str]], question: str) -> str:
    """A prompt of solved question/answer pairs followed by a new question: in-context learning."""
    shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in examples)
    return f"{shots}Q: {question}\nA:"


def in_context_learning(model, tokenizer, world: World, shots: int = 3, n_people: int = 10) -> list[dict]:
    """Ask where the most-paged people were born, with 0 and with `shots` solved examples in the prompt.
    A base model was never taught to answer questions, but a few examples show it the format."""
    people = sorted(world.people, key=lambda p: -p.n_pages)
    examples = [(f"Where was {p.name} born?", p.birth_city) for p in people[:shots]]
    cities = set(world.cities)
    rows = []
    for person in people[shots : shots + n_people]:
        question = f"Where was {person.name} born?"
        for k in (0, shots):
            answer = complete(model, tokenizer, few_shot_prompt(examples[:k], question), 8, new_document=False)
            first_line = answer.split("\n")[0].strip()
            rows.append(
                dict(
                    name=person.name,
                    shots=k,
                    answer=first_line,
                    truth=person.birth_city,
                    names_a_city=first_line.rstrip(".") in cities,
                    correct=is_correct(first_line, person.birth_city),
                )
            )
    return rows
