"""Stage 2: the BPE trainer against a plain reference, both encoders, special tokens, files, errors."""

from collections import Counter

import pytest
import regex
import tiktoken.load
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labkit.tokenizer import (
    GPT2_PATTERN,
    GPT4_PATTERN,
    SPECIAL_TOKENS,
    Tokenizer,
    TokenizerError,
    bytes_per_token,
    count_chunks,
    read_heldout,
    train_bpe,
    vocab_growth,
)

VOCAB = 450
SAMPLE = (
    "Hello world! It's 2024, and the year's 365 days aren't enough. DON'T SHOUT.\n\n"
    "Ada Lovelace was born in London in 1815. She wrote the first program.\n"
    "Chinese: 你好，世界。你好吗？ Emoji: 😀👍🏽🇫🇷 Accents: naïve café résumé Ærøskøbing.\n"
    "Code:\tdef f(x):\r\n\t\treturn x**2  # squares\n"
    "Numbers 1234567 3.14159 -42 1e10 and    spaces   everywhere   .\n"
)


# --- the plain reference trainer: minbpe's RegexTokenizer.train, recounting everything ---------


def reference_merge(ids, pair, token):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(token)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def reference_train(texts, n_tokens, pattern=GPT4_PATTERN):
    """Every chunk of every text (not distinct ones), and after each merge every pair recounted.
    Same rules as labkit's trainer: most frequent pair, ties to the smallest pair; a pair whose
    bytes are already a token becomes that token."""
    chunks = [list(chunk.encode()) for text in texts for chunk in regex.findall(pattern, text)]
    vocab = [bytes([b]) for b in range(256)]
    merges = []
    while len(vocab) < n_tokens:
        counts = Counter()
        for ids in chunks:
            counts.update(zip(ids, ids[1:]))
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        new = vocab[pair[0]] + vocab[pair[1]]
        if new in vocab:
            token = vocab.index(new)
        else:
            token = len(vocab)
            vocab.append(new)
        merges.append((pair, token, counts[pair]))
        chunks = [reference_merge(ids, pair, token) for ids in chunks]
    return vocab, merges


@pytest.fixture(scope="module")
def tok():
    """A tokenizer that learned merges in many scripts, so the encoders have work to do."""
    return Tokenizer.train([SAMPLE * 3, "abc abd abe ab ab a b " * 20], VOCAB)


# text with every kind of character, lone surrogates included (Python strings allow them)
any_char = st.one_of(
    st.characters(),
    st.characters(categories=["Cs"]),
    st.sampled_from(["😀", "👍🏽", "你", "é", "\x00", "\x1c", "\r\n", "\t", " ", "'s", "'S", "123"]),
)
any_text = st.lists(any_char, max_size=40).map("".join)
# characters that Python's own Unicode tables know: a code point assigned after them (category
# Cn here) may be a letter to the `regex` module's newer tables and not to tiktoken's
known_text = st.lists(
    st.one_of(
        st.characters(exclude_categories=["Cn"]),
        st.characters(categories=["Cs"]),
        st.sampled_from(["😀", "你好", " the", "'ll", "2024", "\r\n", "  "]),
    ),
    max_size=40,
).map("".join)


# --- training ----------------------------------------------------------------------------------


def test_merges_match_the_reference_on_corpus_pages(tiny_run):
    from labkit.data import read_corpus

    texts = [page["text"] for page in read_corpus(tiny_run)[:12]]
    fast = Tokenizer.train(texts, 400, special_tokens=[])
    vocab, merges = reference_train(texts, 400)
    assert [(m.pair, m.token, m.count) for m in fast.merges] == merges
    assert sorted(fast.ranks, key=fast.ranks.get) == vocab
    assert fast.n_vocab == 400


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.text("ab c\n1'", max_size=60), min_size=1, max_size=4), n_merges=st.integers(1, 30))
def test_merges_match_the_reference_on_random_text(texts, n_merges):
    """Small alphabets force ties, overlapping pairs ("aaa") and pairs whose bytes are already a token."""
    vocab, merges = train_bpe(count_chunks(texts, GPT4_PATTERN), 256 + n_merges)
    assert (vocab, [(m.pair, m.token, m.count) for m in merges]) == reference_train(texts, 256 + n_merges)


def test_gpt2_pattern_and_determinism():
    a = Tokenizer.train(SAMPLE, 330, pattern="gpt2")
    b = Tokenizer.train(SAMPLE, 330, pattern="gpt2")
    assert a.pattern == GPT2_PATTERN and a.merges == b.merges
    assert [(m.pair, m.token, m.count) for m in a.merges] == reference_train(
        [SAMPLE], 330 - len(SPECIAL_TOKENS), GPT2_PATTERN
    )[1]
    assert Tokenizer.train(SAMPLE, 330).merges != a.merges  # the regex matters


def test_vocabulary_layout(tok):
    assert tok.n_vocab == VOCAB
    assert list(tok.special_tokens) == SPECIAL_TOKENS
    assert list(tok.special_tokens.values()) == list(range(VOCAB - len(SPECIAL_TOKENS), VOCAB))
    assert all(tok.token_bytes(b) == bytes([b]) for b in range(256))
    assert tok.token_bytes(tok.merges[0].token) == tok.token_bytes(tok.merges[0].pair[0]) + tok.token_bytes(
        tok.merges[0].pair[1]
    )
    counts = [m.count for m in tok.merges]
    assert counts == sorted(counts, reverse=True)  # each merge is the most frequent pair left


def test_smaller_vocabulary_is_the_start_of_a_larger_one():
    small, large = Tokenizer.train(SAMPLE, 300), Tokenizer.train(SAMPLE, 400)
    cut = large.truncate(300)
    assert cut.merges == small.merges and cut.ranks == small.ranks and cut.special_tokens == small.special_tokens
    assert cut.encode(SAMPLE) == small.encode(SAMPLE)


def test_more_merges_make_shorter_sequences(tok):
    rows = vocab_growth(tok, [SAMPLE])
    assert rows[0]["vocab_size"] == 256 + len(SPECIAL_TOKENS) and rows[-1]["vocab_size"] == tok.n_vocab
    assert rows[0]["bytes_per_token"] == 1.0
    assert all(a["bytes_per_token"] <= b["bytes_per_token"] for a, b in zip(rows, rows[1:]))
    assert rows[-1]["bytes_per_token"] > 2.5


# --- encoding ----------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=any_text)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_examples(tok):
    for text in [
        "",
        SAMPLE,
        "\udc80\udcff",
        "a\ud800b",
        "\ud83d\ude00 vs 😀",
        "\x00\x01\x1f\x7f",
        "🇫🇷" * 5,
        "x" * 1000,
    ]:
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode_batch([text, "a"])[0]) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=known_text)
def test_pure_python_encoder_gives_tiktoken_ids(tok, text):
    assert tok.encode_python(text) == tok.encode(text)


def test_pure_python_encoder_on_sample(tok):
    assert tok.encode_python(SAMPLE) == tok.encode(SAMPLE)
    assert len(tok.encode(SAMPLE)) < len(SAMPLE.encode()) / 2  # the merges did compress it


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    parts=st.lists(
        st.one_of(st.sampled_from(SPECIAL_TOKENS + ["<|", "|>", "<|im_", "_start|>"]), st.text(max_size=5)), max_size=10
    )
)
def test_user_text_never_forges_a_special_token(tok, parts):
    text = "".join(parts)
    ids = tok.encode(text)
    assert all(i < VOCAB - len(SPECIAL_TOKENS) for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_come_only_by_name(tok):
    start = tok.encode_special("<|im_start|>")
    assert start == tok.special_tokens["<|im_start|>"]
    assert start not in tok.encode("<|im_start|>user<|im_sep|>hi<|im_end|>")
    assert tok.decode([start]) == "<|im_start|>"
    assert len(tok.encode("<|im_start|>")) > 1


def test_decode_any_ids(tok):
    half_of_a_character = tok.encode("你")[:1]
    assert tok.decode(half_of_a_character) == "\ufffd"
    assert tok.decode([0xE4, 0xBD]) == "\ufffd"
    assert tok.decode(list(range(tok.n_vocab)))  # every id, in any order, decodes


# --- files -------------------------------------------------------------------------------------


def test_save_load_identity(tok, tmp_path):
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.ranks, loaded.pattern, loaded.special_tokens, loaded.merges) == (
        tok.ranks,
        tok.pattern,
        tok.special_tokens,
        tok.merges,
    )
    for text in [SAMPLE, "a\udc80b", "<|endoftext|>"]:
        assert loaded.encode(text) == tok.encode(text)
    # the ranks file is tiktoken's own format
    assert tiktoken.load.load_tiktoken_bpe(str(tmp_path / "tokenizer.tiktoken")) == tok.ranks


def test_hugging_face_export_encodes_the_same(tok, tmp_path):
    texts = [
        SAMPLE,
        "hello world",
        "Hello  world",
        "strawberry",
        "你好，世界",
        "😀👍🏽",
        "it's IT'S 12345",
        "\x00\x1c\x7f\t\r\n",
        "  leading and trailing  ",
        "ǅungla ﬁnal ſtop K",
    ]
    hf = tok.to_huggingface()
    for text in texts:
        assert hf.encode(text).ids == tok.encode(text), text
        assert hf.decode(tok.encode(text)) == text
    forged = "say <|im_start|>system<|im_sep|> now"
    assert tok.special_tokens["<|im_start|>"] in hf.encode(forged).ids  # Hugging Face's default
    hf.encode_special_tokens = True
    assert hf.encode(forged).ids == tok.encode(forged)  # labkit's behaviour, when asked

    from transformers import AutoTokenizer

    tok.save_huggingface(tmp_path / "hf")
    fast = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert fast.eos_token == "<|endoftext|>" and fast.eos_token_id == tok.special_tokens["<|endoftext|>"]
    for text in texts:
        assert fast(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


@pytest.fixture(scope="module")
def hf_tok(tok):
    hf = tok.to_huggingface()
    hf.encode_special_tokens = True
    return hf


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(exclude_categories=["Cs"]), max_size=40))
def test_hugging_face_export_on_random_text(tok, hf_tok, text):
    assert hf_tok.encode(text).ids == tok.encode(text)


# --- bad input ---------------------------------------------------------------------------------


def test_clear_errors(tok, tmp_path):
    with pytest.raises(
        TokenizerError,
        match=r"vocab_size=260 is too small: it must be an integer >= 264 \(256 byte tokens \+ 8 special",
    ):
        Tokenizer.train(SAMPLE, 260)
    with pytest.raises(TokenizerError, match=r"vocab_size=300 is too small.*>= 306"):
        Tokenizer.train(SAMPLE, 300, special_tokens=[f"<|s{i}|>" for i in range(50)])
    with pytest.raises(TokenizerError, match="no training text: got 0 texts"):
        Tokenizer.train([], 300)
    with pytest.raises(TokenizerError, match="no training text: got 2 texts holding 0 characters"):
        Tokenizer.train(["", ""], 300)
    with pytest.raises(
        TokenizerError,
        match=r"'<\|im_begin\|>' is not a special token of this tokenizer; it has: <\|endoftext\|>, <\|im_start\|>",
    ):
        tok.encode_special("<|im_begin|>")
    with pytest.raises(TokenizerError, match="special tokens must be distinct; repeated: <|a|>"):
        Tokenizer.train(SAMPLE, 300, special_tokens=["<|a|>", "<|a|>"])
    with pytest.raises(TokenizerError, match="pattern='\\(' is neither 'gpt4' nor 'gpt2' nor a valid regex"):
        Tokenizer.train(SAMPLE, 300, pattern="(")
    with pytest.raises(TokenizerError, match="token id 450 is outside the vocabulary: ids are integers from 0 to 449"):
        tok.decode([1, VOCAB])
    with pytest.raises(TokenizerError, match="token id -1 is outside"):
        tok.decode([-1])
    with pytest.raises(TokenizerError, match="tokenizer.json is missing"):
        Tokenizer.load(tmp_path)
    with pytest.warns(UserWarning, match="ran out of pairs after 1 merges"):
        assert Tokenizer.train("ab", 300).n_vocab == 257 + len(SPECIAL_TOKENS)


def test_config_rejects_tiny_vocab():
    from labkit.config import ConfigError, get_config

    with pytest.raises(ConfigError, match=r"tokenizer.vocab_size=100 is out of range; allowed: between 264"):
        get_config("tiny", tokenizer=dict(vocab_size=100))


# --- the stage ---------------------------------------------------------------------------------


def test_stage(tiny_run, tiny_config):
    from labkit.pipeline import ensure

    metrics = ensure("tokenizer", tiny_config, tiny_run)
    assert metrics["vocab_size"] == tiny_config.tokenizer.vocab_size
    assert metrics["n_merges"] == tiny_config.tokenizer.vocab_size - 256 - len(SPECIAL_TOKENS)
    assert metrics["heldout_pages"] >= 1 and metrics["bytes_per_token_on"] == "heldout"
    assert 1.0 < metrics["bytes_per_token"] < 3 and metrics["train_seconds"] >= 0
    tok = Tokenizer.load(tiny_run.path / "tokenizer")
    heldout = read_heldout(tiny_run)
    assert len(heldout) == metrics["heldout_pages"]
    assert round(bytes_per_token(tok, heldout), 4) == metrics["bytes_per_token"]
    assert ensure("tokenizer", tiny_config, tiny_run) == metrics  # complete: reused, not rebuilt


def test_stage_says_when_the_corpus_cannot_fill_the_vocabulary(tiny_run, capsys):
    from labkit.config import get_config
    from labkit.pipeline import ensure
    from labkit.report import render
    from labkit.run import Run, load_run

    config = get_config("tiny", tokenizer=dict(vocab_size=100_000))
    run = Run("big-vocab", tiny_run.runs_dir)
    ensure("data", config, run)
    metrics = ensure("tokenizer", config, run)
    got = metrics["vocab_size"]
    assert metrics["vocab_size_asked"] == 100_000 and got < 100_000 and metrics["vocab_reached"] is False
    assert metrics["last_merge_count"] >= 1 and Tokenizer.load(run.path / "tokenizer").n_vocab == got
    assert (
        f"tokenizer: the training text ran out of pairs after {metrics['n_merges']} merges" in capsys.readouterr().err
    )
    assert f"The vocabulary holds {got} tokens, not the 100000 asked for" in render(load_run(run.name, run.runs_dir))


def test_compresses_held_out_english_as_hugging_faces_byte_level_bpe():
    """Real English prose that ships with Python (its documentation's help topics), split 3:1: with
    GPT-2's split pattern, labkit's BPE and `tokenizers`' byte-level BPE learn the same compression;
    the GPT-4 pattern (labkit's default) compresses it no more than 1% worse (here 1.2% better)."""
    from pydoc_data.topics import topics

    from tokenizers import ByteLevelBPETokenizer

    docs = [topics[name] for name in sorted(topics)]
    train, heldout = [d for i, d in enumerate(docs) if i % 4], [d for i, d in enumerate(docs) if not i % 4]
    theirs = ByteLevelBPETokenizer(add_prefix_space=False)
    theirs.train_from_iterator(train, vocab_size=1024, min_frequency=2, special_tokens=[], show_progress=False)
    n_bytes = sum(len(d.encode("utf-8")) for d in heldout)
    hf = n_bytes / sum(len(theirs.encode(d).ids) for d in heldout)
    gpt2 = bytes_per_token(Tokenizer.train(train, 1024, pattern="gpt2", special_tokens=[]), heldout)
    gpt4 = bytes_per_token(Tokenizer.train(train, 1024), heldout)  # the default: gpt4, special tokens included
    assert hf > 2.3  # real compression, not a degenerate vocabulary
    assert gpt2 == pytest.approx(hf, rel=1e-3)
    assert gpt4 >= 0.99 * hf
