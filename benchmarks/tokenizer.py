"""Benchmark stage 2: labkit's BPE trainer and encoder against the plain reference trainer,
Hugging Face `tokenizers` and raw tiktoken, all measured in this run on the same corpus.

    python benchmarks/tokenizer.py [--preset cpu] [--runs-dir runs] [--run bench]

The corpus is the preset's cleaned corpus (stage 1, built if missing) minus the held-out pages,
exactly what the pipeline's tokenizer stage trains on; bytes per token is measured on the
held-out pages. Targets: >= 20x faster than the reference, within 5x of Hugging Face's
trainer, bytes per token within 3% of it, encoding within 1.2x of raw tiktoken.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import tiktoken

from labkit.config import get_config
from labkit.data import read_corpus
from labkit.pipeline import ensure
from labkit.run import Run
from labkit.tokenizer import PATTERNS, SPECIAL_TOKENS, Tokenizer, bytes_per_token, split_heldout

ROOT = Path(__file__).resolve().parents[1]


def reference_train():
    """The plain minbpe-style trainer lives with the tests that check labkit's against it."""
    spec = importlib.util.spec_from_file_location("test_tokenizer", ROOT / "tests" / "test_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_train


def timed(fn, repeat=1):
    """(result, best wall time in seconds over `repeat` runs)"""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def hf_train(texts, vocab_size, pattern):
    from tokenizers import Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    hf = HFTokenizer(BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(texts, trainer)
    return hf


def throughput(encoders, texts, rounds=8):
    """MB/s of each encoder over `texts`: best pass of each, passes interleaved so that a
    busy machine slows all of them alike."""
    n_bytes, best = sum(len(t.encode()) for t in texts), [float("inf")] * len(encoders)
    for _ in range(rounds):
        for i, encode in enumerate(encoders):
            start = time.perf_counter()
            for text in texts:
                encode(text)
            best[i] = min(best[i], time.perf_counter() - start)
    return [n_bytes / seconds / 1e6 for seconds in best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--run", default="bench")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--skip-reference", action="store_true", help="skip the plain trainer (minutes)")
    args = parser.parse_args()

    config = get_config(args.preset, tokenizer=dict(vocab_size=args.vocab_size))
    run = Run(args.run, args.runs_dir)
    ensure("data", config, run)
    cfg = config.tokenizer
    train_pages, heldout_pages = split_heldout(read_corpus(run), cfg.heldout_fraction, config.seed)
    texts, heldout = [p["text"] for p in train_pages], [p["text"] for p in heldout_pages]
    pattern, n_bytes = PATTERNS[cfg.pattern], sum(len(t.encode()) for t in texts)
    print(
        f"preset {config.preset}: {len(texts)} training pages ({n_bytes / 1e6:.2f} MB), {len(heldout)} held-out pages, "
        f"vocab_size {cfg.vocab_size}, pattern {cfg.pattern}"
    )

    tok, t_labkit = timed(lambda: Tokenizer.train(texts, cfg.vocab_size, pattern=cfg.pattern), repeat=3)
    hf, t_hf = timed(lambda: hf_train(texts, cfg.vocab_size, pattern), repeat=3)
    print(f"training labkit          {t_labkit:8.3f} s")
    print(f"training huggingface     {t_hf:8.3f} s   labkit / huggingface = {t_labkit / t_hf:.2f}x (target <= 5x)")
    if not args.skip_reference:
        reference = reference_train()
        (_, merges), t_ref = timed(lambda: reference(texts, cfg.vocab_size - len(SPECIAL_TOKENS), pattern))
        same = [(m.pair, m.token, m.count) for m in tok.merges] == merges
        print(
            f"training reference       {t_ref:8.3f} s   reference / labkit = {t_ref / t_labkit:.1f}x (target >= 20x); "
            f"same merges: {same}"
        )

    bpt_labkit = bytes_per_token(tok, heldout)
    n_hf_tokens = sum(len(e.ids) for e in hf.encode_batch(heldout))
    bpt_hf = sum(len(t.encode()) for t in heldout) / n_hf_tokens
    print(
        f"bytes per token (held-out) labkit {bpt_labkit:.4f}, huggingface {bpt_hf:.4f}: "
        f"{100 * (bpt_labkit / bpt_hf - 1):+.2f}% (target within 3%); vocab sizes {tok.n_vocab} and {hf.get_vocab_size()}"
    )

    raw = tiktoken.Encoding("raw", pat_str=tok.pattern, mergeable_ranks=tok.ranks, special_tokens=tok.special_tokens)
    assert all(tok.encode(t) == raw.encode_ordinary(t) for t in texts)
    # the corpus is English; appending a few other scripts exercises the non-ASCII path too
    corpus = [texts, ["\n\n".join(texts)], [t + " Café, 你好, привет, 😀." for t in texts]]
    for label, batch in zip(("page by page", "one string", "non-ASCII"), corpus):
        ours, theirs = throughput([tok.encode, raw.encode_ordinary], batch)
        print(
            f"encoding {label:12s}   Tokenizer.encode {ours:6.2f} MB/s, tiktoken {theirs:6.2f} MB/s: "
            f"tiktoken / labkit = {theirs / ours:.3f}x (target <= 1.2x)"
        )
    (python_speed,) = throughput([tok.encode_python], texts[:100], rounds=3)
    print(f"encoding pure Python     Tokenizer.encode_python {python_speed:6.2f} MB/s (the readable lesson)")


if __name__ == "__main__":
    main()
