"""Pretraining data: the cleaned corpus as one long stream of token ids, and random windows of it.

The lesson: a base model never sees "documents", only a stream. Every page is tokenized once,
prefixed with `<|endoftext|>` (so the model learns where a page starts), and all pages are laid
end to end in a flat file of `uint16` ids (`uint32` when the vocabulary does not fit), read back
through `numpy.memmap` so that a corpus larger than memory costs nothing to open. A training
example is any window of `block_size + 1` tokens: the first `block_size` are the input, the last
`block_size` the targets (the same tokens shifted by one).

A few pages are held out for validation, chosen by a hash of their URL: the split does not
depend on the order of the corpus or on the seed, and a page is always on the same side.
Windows for training are drawn from a seeded `numpy` generator whose state goes into every
training checkpoint, so a resumed run sees exactly the batches the uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError
from .run import Run, atomic_path, fingerprint, in_share, read_json, write_json

EOT = "<|endoftext|>"


def document_text(page: dict) -> str:
    """What the model reads of a page: its URL on the first line (when it has a real one), then the text.
    With the URL in the stream, the base model can be asked to continue a page from its address."""
    url = page.get("url") or ""
    return f"{url}\n{page['text']}" if url.startswith("http") else page["text"]


def token_dtype(n_vocab: int):
    return np.uint16 if n_vocab <= 2**16 else np.uint32


@dataclass
class TokenFiles:
    """The tokenized corpus: paths of the train and validation streams and what they hold."""

    train: Path
    val: Path
    meta: dict

    @property
    def dtype(self):
        return np.dtype(self.meta["dtype"])

    def tokens(self, split: str) -> np.memmap:
        path = self.train if split == "train" else self.val
        return np.memmap(path, dtype=self.dtype, mode="r")


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides every id a tokenizer gives: its tokens (the merges, in rank order), its
    pre-split pattern and its special tokens. Two tokenizers of one vocabulary size differ here."""
    digest = hashlib.sha256(tokenizer.pattern.encode())
    for token, rank in sorted(tokenizer.ranks.items(), key=lambda item: item[1]):
        digest.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
    digest.update(json.dumps(sorted(tokenizer.special_tokens.items())).encode())
    return digest.hexdigest()[:16]


def corpus_fingerprint(pages: list[dict]) -> str:
    """A hash of every page's URL and text: any change to the corpus gives new token files."""
    digest = hashlib.sha256()
    for page in pages:
        for part in (page["url"], document_text(page)):
            data = part.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:16]


def tokenize_corpus(pages: list[dict], tokenizer, out_dir: str | Path, val_fraction: float) -> TokenFiles:
    """Tokenize `pages` (dicts with url and text) once into `out_dir/train.bin` and `val.bin`.

    The files are reused when they were made from the same pages, tokenizer and split
    (recorded in `tokens.json`); each is written atomically, the metadata last.
    """
    out_dir = Path(out_dir)
    eot = tokenizer.special_tokens[EOT]
    made_from = fingerprint([corpus_fingerprint(pages), tokenizer_fingerprint(tokenizer), val_fraction])
    meta_path = out_dir / "tokens.json"
    if meta_path.exists() and (meta := read_json(meta_path)).get("made_from") == made_from:
        return TokenFiles(out_dir / "train.bin", out_dir / "val.bin", meta)

    splits = {"train": [], "val": []}
    for page in pages:
        splits["val" if in_share(page["url"], val_fraction) else "train"].append(page)
    if val_fraction > 0 and not splits["val"] and len(splits["train"]) > 1:
        splits["val"].append(splits["train"].pop())  # a tiny corpus still gets a validation page
    if not splits["train"]:
        raise ConfigError(f"no pages left for training: {len(pages)} pages, train.val_fraction={val_fraction}")

    dtype = token_dtype(tokenizer.n_vocab)
    meta = dict(
        made_from=made_from, dtype=np.dtype(dtype).name, n_vocab=tokenizer.n_vocab, eot=eot, val_fraction=val_fraction
    )
    for split, docs in splits.items():
        n_tokens = 0
        with atomic_path(out_dir / f"{split}.bin") as tmp, open(tmp, "wb") as f:
            for page in docs:  # page by page: memory holds one page's ids, not the corpus's
                ids = np.array([eot, *tokenizer.encode(document_text(page))], dtype=dtype)
                ids.tofile(f)
                n_tokens += len(ids)
        meta[split] = dict(
            pages=len(docs), tokens=n_tokens, bytes=sum(len(document_text(p).encode("utf-8")) for p in docs)
        )
    write_json(meta_path, meta)
    return TokenFiles(out_dir / "train.bin", out_dir / "val.bin", meta)


def encode_stream(tokenizer, pieces: Iterable[str]) -> Iterator[int]:
    r"""The ids of the text that `pieces` make when joined (a file read block by block), equal to
    `tokenizer.encode` of the whole, holding one piece at a time (plus a line) in memory.

    The text is cut only after a lone newline (no whitespace before it) followed by a letter or
    digit: both split patterns end a chunk there, in the whole text as at the end of a piece (a
    longer run of whitespace is split differently at the end of a text, where GPT-2's `\s+(?!\S)`
    sees nothing after it), and BPE never merges across chunks. A text with no such place is held
    whole."""
    rest = ""
    for piece in pieces:
        rest += piece
        cut = rest.rfind("\n", 1, len(rest) - 1)
        while cut >= 1 and (rest[cut - 1].isspace() or not rest[cut + 1].isalnum()):
            cut = rest.rfind("\n", 1, cut)
        if cut >= 0:
            yield from tokenizer.encode(rest[: cut + 1])
            rest = rest[cut + 1 :]
    if rest:
        yield from tokenizer.encode(rest)


def encode_file(tokenizer, path: str | Path, block_chars: int = 1 << 20) -> Iterator[int]:
    """The ids of a UTF-8 text file too large for memory, as a stream (`encode_stream` over blocks
    of `block_chars` characters)."""
    with open(path, encoding="utf-8", newline="") as f:  # the text as written: "\r\n" stays
        yield from encode_stream(tokenizer, iter(lambda: f.read(block_chars), ""))


def tokenize_run(run: Run, tokenizer, out_dir: str | Path, val_fraction: float) -> TokenFiles:
    """The cleaned corpus of `run` (stage 1: the mini-web or a dataset) as token files."""
    from .data import read_corpus

    return tokenize_corpus(read_corpus(run), tokenizer, out_dir, val_fraction)


class TokenWindows:
    """Random windows of `block_size + 1` tokens from a token file, `batch_size` at a time.

    `next()` gives `(x, y)` int64 tensors [batch_size, block_size]; the generator's state is
    in `state_dict()`, which the training loop checkpoints.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int):
        if len(tokens) < block_size + 1:
            raise ConfigError(
                f"the token stream holds {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1} "
                f"(one window); use more data or a smaller model.block_size"
            )
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.rng = np.random.default_rng(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        # a window is tokens[i : i + block_size + 1], so i runs from 0 to len - block_size - 1 inclusive
        starts = self.rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        return windows(self.tokens, starts, self.block_size)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


def windows(tokens: np.ndarray, starts, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = torch.from_numpy(np.stack([tokens[s : s + block_size + 1].astype(np.int64) for s in starts]))
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def sequential_batches(tokens: np.ndarray, block_size: int, batch_size: int, max_batches: int | None = None):
    """Consecutive windows that cover the stream once (each token is a target exactly once,
    the last window may be shorter): for validation, the same batches every time."""
    n = len(tokens) - 1
    starts = list(range(0, n, block_size))
    if max_batches is not None:
        starts = starts[: max_batches * batch_size]
    for i in range(0, len(starts), batch_size):
        group = starts[i : i + batch_size]
        full = [s for s in group if s + block_size <= n]
        if full:
            yield windows(tokens, full, block_size)
        for s in group:
            if s + block_size > n:  # the short tail, alone
                chunk = torch.from_numpy(tokens[s : n + 1].astype(np.int64))[None]
                yield chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
