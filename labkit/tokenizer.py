"""Stage 2, tokenizer: byte-level BPE, trained from scratch, encoded through tiktoken's engine.

A model reads integers, not text. Byte-level BPE turns text into integers in three steps:

1. Bytes. Text is UTF-8 bytes, so 256 tokens can spell anything: English, Chinese, emoji.
   Nothing is ever "unknown", but a sequence of raw bytes is long.
2. Pre-split. A regex cuts the text into chunks (words with their leading space, runs of
   digits, punctuation, whitespace) and merges never cross a chunk boundary, so "dog", " dog"
   and "dog." stay separate tokens instead of one token per frequent phrase.
3. Merges. Training repeats one step: find the most frequent adjacent pair of tokens in the
   training text and mint a new token for it. `vocab_size - 256 - specials` merges later the
   common words are single tokens and the text is several times shorter.

Encoding applies the learned merges in the order they were learned: within a chunk, merge
the adjacent pair whose merged bytes were learned earliest, until no pair is a token. The
pure-Python `encode_python` does exactly that, readably; `encode` hands the same merges to
`tiktoken`, which does the same thing in Rust, tens of times faster.

Special tokens (`<|im_start|>` ...) mark structure, such as a conversation's turns. They are
not text: `encode` never produces them, whatever the text says, so a user who types
`<|im_start|>` gets ordinary tokens and cannot forge a turn. A chat template asks for them
by name with `encode_special`.

Writes to `runs/<run>/tokenizer/`:
  tokenizer.tiktoken  one line per token: base64 of its bytes, a space, its id (tiktoken's own
                      format: `tiktoken.load.load_tiktoken_bpe` reads it)
  tokenizer.json      {"format": "labkit-bpe/1", "pattern": regex, "special_tokens": {name: id},
                       "merges": [[left, right, token, count], ...] in training order}
  heldout.json        the URLs of the pages held out of training (bytes per token is measured there)
  metrics.json        vocab_size, bytes_per_token on held-out pages, train_seconds, ...
"""

from __future__ import annotations

import base64
import codecs
import heapq
import operator
import random
import re
import sys
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import regex
import tiktoken
from tqdm.auto import tqdm

from .config import Config
from .errors import LabkitError
from .run import Run, atomic_write, read_json, write_json

# The pre-split regexes of OpenAI's GPT-2 (r50k) and GPT-4 (cl100k) tokenizers, from tiktoken.
# GPT-4's: case-insensitive contractions, at most 3 digits per chunk, newlines kept apart.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
PATTERNS = {"gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN}

# Every special token of every stage, in id order. Each stage uses a few; reserving them all
# now keeps the ids stable, so a model pretrained in stage 3 needs no new rows in stage 7.
CHAT_TOKENS = [
    "<|endoftext|>",  # separates documents in pretraining
    "<|im_start|>",  # a turn begins: <|im_start|>user<|im_sep|>...<|im_end|>
    "<|im_sep|>",  # between a turn's role and its content
    "<|im_end|>",  # a turn ends; the assistant's last token
]
TOOL_TOKENS = [
    "<|tool_call|>",  # the assistant calls a tool: <|tool_call|>search: Ada Lovelace<|tool_call_end|>
    "<|tool_call_end|>",
    "<|tool_result|>",  # what the tool answered (written by code, never learned: no loss on it)
    "<|tool_result_end|>",
]
SPECIAL_TOKENS = CHAT_TOKENS + TOOL_TOKENS

FORMAT = "labkit-bpe/1"
_LONE_SURROGATES = re.compile("[\ud800-\udfff]+")


class TokenizerError(LabkitError):
    """A bad vocabulary size, training text, special token or tokenizer file."""


def _surrogatepass_or_replace(error: UnicodeDecodeError):
    """Decode the bytes of a lone surrogate back to it (so such text round-trips); replace any
    other invalid UTF-8 with U+FFFD (so decoding never fails)."""
    try:
        return codecs.lookup_error("surrogatepass")(error)
    except UnicodeDecodeError:
        return codecs.lookup_error("replace")(error)


codecs.register_error("labkit.surrogatepass_or_replace", _surrogatepass_or_replace)


def _no_surrogates(text: str) -> bool:
    """True for valid Unicode. isascii() is a flag lookup; UTF-8 encoding (GB/s, faster than any
    regex search) fails exactly on surrogates."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text_runs(text: str) -> list[tuple[str, bool]]:
    """Cut `text` into runs of ordinary text and runs of lone surrogates: [(run, is_surrogates)].

    A Python string may hold lone surrogates (`"\\udc80"`, as `os.fsdecode` makes for bad
    bytes). They are not valid Unicode, so they are never pre-split or merged: each becomes
    the raw byte tokens of its `surrogatepass` encoding, and `decode` turns those back.
    """
    runs, start = [], 0
    for match in _LONE_SURROGATES.finditer(text):
        if match.start() > start:
            runs.append((text[start : match.start()], False))
        runs.append((match.group(), True))
        start = match.end()
    if start < len(text):
        runs.append((text[start:], False))
    return runs


# --- training ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Merge:
    """One training step: `pair` of token ids became `token`; `count` is how often the pair
    occurred (weighted by chunk frequency) when it was merged."""

    pair: tuple[int, int]
    token: int
    count: int


def count_chunks(texts: Iterable[str], pattern: str) -> Counter:
    """Pre-split every text and count the distinct chunks, as UTF-8 bytes.

    A corpus has far fewer distinct chunks than chunks (" the" appears thousands of times),
    so training works on distinct chunks weighted by their counts.
    """
    compiled = regex.compile(pattern)
    counts: Counter = Counter()
    for text in texts:
        for run, is_surrogates in text_runs(text):
            if not is_surrogates:
                counts.update(chunk.encode("utf-8") for chunk in compiled.findall(run))
    return counts


def merge(ids: list[int], pair: tuple[int, int], token: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids`, left to right, by `token`."""
    out, i, a, b = [], 0, pair[0], pair[1]
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
            out.append(token)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe(chunk_counts: dict[bytes, int], n_tokens: int) -> tuple[list[bytes], list[Merge]]:
    """Learn merges until the vocabulary holds `n_tokens` tokens (256 bytes included).

    Returns the vocabulary (token id -> bytes) and the merges in order. Each step merges the
    most frequent adjacent pair; ties go to the smallest pair (ids compared left, then right),
    so training is deterministic. Pairs are counted in every window ("aaa" holds "aa" twice),
    as minbpe and Hugging Face do. If a pair's bytes are already a token (reached before by
    another pair), the pair becomes that token and the vocabulary does not grow.

    Why it is fast: the naive trainer recounts every pair of the whole text after each merge.
    Here each distinct chunk is stored once with its count, pair counts are kept in a dict,
    `where` maps each pair to the chunks that hold it, and a merge rebuilds only those chunks,
    applying the change in pair counts. The most frequent pair comes from a heap whose
    entries may be stale: a popped entry whose count is out of date is pushed back with the
    current count (counts of old pairs only fall; a pair whose count rises is pushed anew).
    On the `cpu` preset's corpus the heap makes the merge loop about 15x faster than taking
    max() over all pair counts at every merge.
    """
    vocab = [bytes([b]) for b in range(256)]
    token_of = {token: i for i, token in enumerate(vocab)}
    chunks = [list(chunk) for chunk in chunk_counts]
    weights = list(chunk_counts.values())

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for i, ids in enumerate(chunks):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += weights[i]
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[Merge] = []
    while len(vocab) < n_tokens and heap:
        negative_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -negative_count:  # stale entry
            if 0 < count < -negative_count:
                heapq.heappush(heap, (-count, pair))
            continue
        new_bytes = vocab[pair[0]] + vocab[pair[1]]
        token = token_of.get(new_bytes)
        if token is None:
            token = token_of[new_bytes] = len(vocab)
            vocab.append(new_bytes)
        merges.append(Merge(pair, token, count))

        delta: dict[tuple[int, int], int] = defaultdict(int)
        for i in where.pop(pair):
            ids = chunks[i]
            merged = merge(ids, pair, token)
            if len(merged) == len(ids):  # `where` may list chunks that lost the pair already
                continue
            weight = weights[i]
            for p in zip(ids, ids[1:]):
                delta[p] -= weight
            for p in zip(merged, merged[1:]):
                delta[p] += weight
                if token in p:  # only pairs with the new token are new to this chunk
                    where[p].add(i)
            chunks[i] = merged
        for p, change in delta.items():
            if change == 0:
                continue
            new_count = pair_counts.get(p, 0) + change
            if new_count > 0:
                pair_counts[p] = new_count
            else:
                pair_counts.pop(p, None)
            if change > 0:
                heapq.heappush(heap, (-new_count, p))
    return vocab, merges


# --- encoding in pure Python: the lesson ------------------------------------------------------


def bpe_chunk(chunk: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Encode one pre-split chunk: start from its bytes and keep merging the adjacent pair whose
    merged bytes rank lowest (were learned earliest; the leftmost such pair on a tie) until no
    adjacent pair forms a token. This is tiktoken's algorithm, step for step."""
    if chunk in ranks:  # a whole chunk that is a token (" the") is that token: tiktoken's shortcut
        return [ranks[chunk]]
    parts = [bytes([b]) for b in chunk]
    while len(parts) > 1:
        rank, i = min((ranks.get(parts[i] + parts[i + 1], float("inf")), i) for i in range(len(parts) - 1))
        if rank == float("inf"):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[part] for part in parts]


# --- the tokenizer ----------------------------------------------------------------------------


class Tokenizer:
    """A byte-level BPE tokenizer: mergeable tokens (id -> bytes), a pre-split regex and special
    tokens whose ids follow the mergeable ones (`n_vocab` counts both)."""

    def __init__(
        self, ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int], merges: list[Merge] | None = None
    ):
        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)) or any(ranks.get(bytes([b])) != b for b in range(256)):
            raise TokenizerError("ranks must give ids 0..n-1, with id b for the single byte b (b < 256)")
        if sorted(special_tokens.values()) != list(range(n, n + len(special_tokens))):
            raise TokenizerError(
                f"special token ids must follow the {n} mergeable tokens: {n}..{n + len(special_tokens) - 1}; "
                f"got {special_tokens}"
            )
        self.ranks, self.pattern, self.merges = dict(ranks), pattern, list(merges or [])
        self.special_tokens = dict(special_tokens)
        self._compiled = regex.compile(pattern)
        tables = dict(pat_str=pattern, mergeable_ranks=self.ranks, special_tokens=self.special_tokens)
        self._enc = tiktoken.Encoding("labkit", **tables, explicit_n_vocab=n + len(special_tokens))
        # The Rust regex behind tiktoken keeps a fast path for the first thread that uses it; if
        # that were a worker of `encode_batch`, every later `encode` here would run ~1.3x slower.
        self._enc.encode_ordinary("warm up")

    @classmethod
    def train(
        cls, texts: str | Iterable[str], vocab_size: int, special_tokens: list[str] | None = None, pattern: str = "gpt4"
    ) -> Tokenizer:
        """Learn merges on `texts` so that the vocabulary holds `vocab_size` tokens: 256 bytes,
        the merges, then `special_tokens` (default `SPECIAL_TOKENS`). `pattern` is "gpt4",
        "gpt2" or a regex of your own."""
        special_tokens = SPECIAL_TOKENS if special_tokens is None else list(special_tokens)
        _check_special_names(special_tokens)
        pattern = _pattern(pattern)
        smallest = 256 + len(special_tokens)
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < smallest:
            raise TokenizerError(
                f"vocab_size={vocab_size!r} is too small: it must be an integer >= {smallest} "
                f"(256 byte tokens + {len(special_tokens)} special tokens)"
            )
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not any(texts):
            raise TokenizerError(f"no training text: got {len(texts)} texts holding 0 characters")
        vocab, merges = train_bpe(count_chunks(texts, pattern), vocab_size - len(special_tokens))
        if len(vocab) + len(special_tokens) < vocab_size:
            warnings.warn(
                f"the training text ran out of pairs after {len(merges)} merges (every chunk is one token): the "
                f"vocabulary holds {len(vocab) + len(special_tokens)} tokens, not vocab_size={vocab_size}; give "
                f"more text or ask for fewer tokens",
                stacklevel=2,
            )
        ranks = {token: i for i, token in enumerate(vocab)}
        return cls(ranks, pattern, {name: len(vocab) + i for i, name in enumerate(special_tokens)}, merges)

    @property
    def n_vocab(self) -> int:
        return len(self.ranks) + len(self.special_tokens)

    # encoding and decoding

    def encode(self, text: str) -> list[int]:
        """User text -> ids, through tiktoken. Never yields a special token: the characters
        `<|im_start|>` are encoded as the text they are."""
        if _no_surrogates(text):  # the usual case: all of it in Rust
            return self._enc.encode_ordinary(text)
        ids: list[int] = []
        for run, is_surrogates in text_runs(text):
            ids += list(run.encode("utf-8", "surrogatepass")) if is_surrogates else self._enc.encode_ordinary(run)
        return ids

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        """Many texts at once; tiktoken encodes them on several threads."""
        if not all(_no_surrogates(text) for text in texts):
            return [self.encode(text) for text in texts]
        return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def encode_special(self, name: str) -> int:
        """The id of a special token, by name: the one way to put structure into a sequence
        (chat templates call it; text never turns into special tokens)."""
        if name not in self.special_tokens:
            raise TokenizerError(
                f"{name!r} is not a special token of this tokenizer; it has: {', '.join(self.special_tokens)}"
            )
        return self.special_tokens[name]

    def encode_python(self, text: str) -> list[int]:
        """The same ids as `encode`, in pure Python: pre-split with the regex, then `bpe_chunk`."""
        ids: list[int] = []
        for run, is_surrogates in text_runs(text):
            if is_surrogates:
                ids += list(run.encode("utf-8", "surrogatepass"))
            else:
                for chunk in self._compiled.findall(run):
                    ids += bpe_chunk(chunk.encode("utf-8"), self.ranks)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError):  # find the culprit and say so
            for i in ids:
                try:
                    valid = 0 <= operator.index(i) < self.n_vocab
                except TypeError:
                    valid = False
                if not valid:
                    raise TokenizerError(
                        f"token id {i!r} is outside the vocabulary: ids are integers from 0 to {self.n_vocab - 1}"
                    ) from None
            return self._enc.decode_bytes([operator.index(i) for i in ids])  # e.g. numpy or torch integers

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Any sequence of the vocabulary's ids decodes, in any order: bytes that
        are not valid UTF-8 (half of a character, say) become U+FFFD, the bytes of a lone
        surrogate give it back, special tokens decode to their names. An id outside the
        vocabulary is a bug upstream and raises `TokenizerError` naming it."""
        return self.decode_bytes(ids).decode("utf-8", errors="labkit.surrogatepass_or_replace")

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for."""
        return self.decode_bytes([token])

    # a smaller vocabulary is the start of a larger one

    def truncate(self, vocab_size: int) -> Tokenizer:
        """This tokenizer as if training had stopped at `vocab_size` tokens (specials included).
        Training is greedy, so that is exactly the start of this one's merges."""
        n_special = len(self.special_tokens)
        if not 256 + n_special <= vocab_size <= self.n_vocab:
            raise TokenizerError(f"vocab_size={vocab_size} must be between {256 + n_special} and {self.n_vocab}")
        n = vocab_size - n_special
        ranks = {token: i for token, i in self.ranks.items() if i < n}
        merges = []
        for m in self.merges:
            if m.token >= n:
                break
            merges.append(m)
        return Tokenizer(ranks, self.pattern, {name: n + i for i, name in enumerate(self.special_tokens)}, merges)

    # files

    def save(self, folder: str | Path) -> None:
        """Write `tokenizer.tiktoken` (ranks) and `tokenizer.json` (pattern, specials, merges)."""
        folder = Path(folder)
        lines = [f"{base64.b64encode(token).decode()} {self.ranks[token]}" for token in self.ordered_tokens()]
        atomic_write(folder / "tokenizer.tiktoken", "\n".join(lines) + "\n")
        merges = [[*m.pair, m.token, m.count] for m in self.merges]
        meta = dict(format=FORMAT, pattern=self.pattern, special_tokens=self.special_tokens, merges=merges)
        write_json(folder / "tokenizer.json", meta)

    @classmethod
    def load(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        meta_path, ranks_path = folder / "tokenizer.json", folder / "tokenizer.tiktoken"
        for path in (meta_path, ranks_path):
            if not path.exists():
                raise TokenizerError(f"no tokenizer in {folder}: {path.name} is missing (Tokenizer.save writes it)")
        meta = read_json(meta_path)
        if meta.get("format") != FORMAT:
            raise TokenizerError(f"{meta_path} has format {meta.get('format')!r}; expected {FORMAT!r}")
        ranks = {}
        for line in ranks_path.read_text().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        merges = [Merge((a, b), token, count) for a, b, token, count in meta.get("merges", [])]
        return cls(ranks, meta["pattern"], meta["special_tokens"], merges)

    def to_huggingface(self):
        """The same tokenizer as a Hugging Face `tokenizers.Tokenizer`, to take elsewhere
        (`transformers.PreTrainedTokenizerFast(tokenizer_object=...)` wraps it).

        Ids match `encode` on ordinary text, with two documented differences:
        - Hugging Face finds special tokens in text (`"<|im_start|>"` becomes the special
          token) unless told not to: set `encode_special_tokens = True` for labkit's behaviour.
        - Its BPE ranks merges by pair, tiktoken by the merged bytes. The export lists, for each
          token in rank order, every split of it into two tokens (as transformers converts
          tiktoken files), which gives the same ids except in a rare overlap (three parts
          x y z where x+y and y+z are the same token), and its regex engine (Oniguruma) may
          classify a few characters (rare control or newly assigned code points) differently.
        Lone surrogates cannot reach it at all (Rust strings are valid Unicode).
        """
        from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import BPE

        to_char = _bytes_to_unicode()
        as_text = lambda token: "".join(to_char[b] for b in token)  # noqa: E731
        merges = []
        for token in self.ordered_tokens():
            splits = [(token[:k], token[k:]) for k in range(1, len(token))]
            splits = sorted(
                (pair for pair in splits if pair[0] in self.ranks and pair[1] in self.ranks),
                key=lambda pair: (self.ranks[pair[0]], self.ranks[pair[1]]),
            )
            merges += [(as_text(left), as_text(right)) for left, right in splits]
        vocab = {as_text(token): i for token, i in self.ranks.items()}
        hf = HFTokenizer(BPE(vocab, merges, ignore_merges=True))
        split = pre_tokenizers.Split(Regex(self.pattern), behavior="isolated")
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        hf.decoder = decoders.ByteLevel()
        names = sorted(self.special_tokens, key=self.special_tokens.get)
        hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in names])
        return hf

    def save_huggingface(self, folder: str | Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` in Hugging Face's format:
        `transformers.AutoTokenizer.from_pretrained(folder)` loads it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "tokenizer.json", self.to_huggingface().to_str())
        config = dict(tokenizer_class="PreTrainedTokenizerFast", model_max_length=1_000_000_000)
        config["additional_special_tokens"] = list(self.special_tokens)
        if "<|endoftext|>" in self.special_tokens:
            config.update(bos_token="<|endoftext|>", eos_token="<|endoftext|>")
        write_json(folder / "tokenizer_config.json", config)

    def ordered_tokens(self) -> list[bytes]:
        """The mergeable tokens by rank: the 256 bytes, then every merge in the order it was learned."""
        return sorted(self.ranks, key=self.ranks.get)

    def __repr__(self) -> str:
        return f"Tokenizer(n_vocab={self.n_vocab}, merges={len(self.merges)}, specials={len(self.special_tokens)})"


def _pattern(pattern: str) -> str:
    if pattern in PATTERNS:
        return PATTERNS[pattern]
    try:
        regex.compile(pattern)
    except regex.error as error:
        raise TokenizerError(
            f"pattern={pattern!r} is neither {' nor '.join(map(repr, PATTERNS))} nor a valid regex: {error}"
        ) from None
    return pattern


def _check_special_names(names: list[str]) -> None:
    for name in names:
        if not isinstance(name, str) or not name:
            raise TokenizerError(f"special token {name!r} must be a non-empty string such as '<|endoftext|>'")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise TokenizerError(f"special tokens must be distinct; repeated: {', '.join(duplicates)}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (Hugging Face's ByteLevel alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    others = [b for b in range(256) if b not in printable]  # mapped past 255, in order
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


# --- measuring --------------------------------------------------------------------------------


def bytes_per_token(tokenizer: Tokenizer, texts: list[str]) -> float:
    """UTF-8 bytes per token over `texts`: how much text one token carries (higher: shorter sequences)."""
    n_bytes = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    return n_bytes / max(n_tokens, 1)


def vocab_growth(tokenizer: Tokenizer, texts: list[str], sizes: list[int] | None = None) -> list[dict]:
    """Bytes per token on `texts` for vocabularies of increasing size (each the start of this one)."""
    smallest = 256 + len(tokenizer.special_tokens)
    if sizes is None:
        sizes = sorted({smallest + round((tokenizer.n_vocab - smallest) * k / 12) for k in range(13)})
    return [dict(vocab_size=size, bytes_per_token=bytes_per_token(tokenizer.truncate(size), texts)) for size in sizes]


# --- the stage --------------------------------------------------------------------------------


def split_heldout(pages: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(training pages, held-out pages): a seeded random `fraction` of the pages is held out."""
    n_heldout = round(len(pages) * fraction)
    if fraction > 0 and len(pages) > 1:
        n_heldout = min(max(n_heldout, 1), len(pages) - 1)
    heldout = set(random.Random(seed).sample(range(len(pages)), n_heldout))
    return [p for i, p in enumerate(pages) if i not in heldout], [p for i, p in enumerate(pages) if i in heldout]


def read_heldout(run: Run) -> list[str]:
    """The texts of the pages held out of the run's tokenizer training."""
    from .data import read_corpus

    urls = set(read_json(run.path / "tokenizer" / "heldout.json"))
    return [page["text"] for page in read_corpus(run) if page["url"] in urls]


def build(config: Config, run: Run, made_from: str = "") -> dict:
    """Train the tokenizer on the cleaned corpus (minus the held-out pages) and measure it."""
    from .data import read_corpus

    cfg, out = config.tokenizer, run.stage_dir("tokenizer")
    train_pages, heldout_pages = split_heldout(read_corpus(run), cfg.heldout_fraction, config.seed)
    train_texts = [page["text"] for page in train_pages]
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # a vocabulary it could not reach is said on a line
        warnings.simplefilter("always")  # of its own (not inside the progress bar) and in metrics.json
        tokenizer = Tokenizer.train(train_texts, cfg.vocab_size, pattern=cfg.pattern)
    train_seconds = time.perf_counter() - start
    for warning in caught:
        tqdm.write(f"tokenizer: {warning.message}", file=sys.stderr)
    tokenizer.save(out)
    write_json(out / "heldout.json", [page["url"] for page in heldout_pages])
    for i, m in enumerate(tokenizer.merges):  # the merged pair's count falls as training goes on
        if i % 8 == 0 or i == len(tokenizer.merges) - 1:
            run.log({"tokenizer/merge_count": m.count}, step=i)

    measured_on = [page["text"] for page in heldout_pages] or train_texts
    return dict(
        vocab_size=tokenizer.n_vocab,
        vocab_size_asked=cfg.vocab_size,
        vocab_reached=tokenizer.n_vocab == cfg.vocab_size,
        last_merge_count=tokenizer.merges[-1].count if tokenizer.merges else 0,  # how often its pair occurred
        bytes_per_token=round(bytes_per_token(tokenizer, measured_on), 4),
        bytes_per_token_on="heldout" if heldout_pages else "train",
        train_seconds=round(train_seconds, 3),
        n_merges=len(tokenizer.merges),
        n_special=len(tokenizer.special_tokens),
        pattern=cfg.pattern,
        train_pages=len(train_pages),
        heldout_pages=len(heldout_pages),
        train_bytes=sum(len(text.encode("utf-8")) for text in train_texts),
        bytes_per_token_train=round(bytes_per_token(tokenizer, train_texts), 4),
    )
