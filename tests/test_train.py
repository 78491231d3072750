"""The training loop and the pretraining data: schedule, accumulation, exact resume, DDP, token files."""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from labkit.checkpoint import load_checkpoint, save_checkpoint
from labkit.config import ConfigError, TrainConfig, get_config
from labkit.dataloader import EOT, TokenWindows, document_text, sequential_batches, tokenize_corpus
from labkit.model import GPT, GPTConfig
from labkit.run import in_share
from labkit.train import lr_at, make_optimizer, set_lr, train


def tiny_gpt(seed=0, dropout=0.0, arch="gpt2"):
    torch.manual_seed(seed)
    return GPT(
        GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16, dropout=dropout, bias=False, arch=arch)
    )


# today's recipe and the modern one (labkit/model.py arch, train.optimizer)
RECIPES = pytest.mark.parametrize("arch, optimizer", [("gpt2", "adamw"), ("modern", "muon"), ("modern", "adamw")])


def lm_loss(model, batch):
    x, y = batch
    _, loss = model(x, y)
    return loss, {}


class ListBatches:
    """A fixed list of batches, served in order; its position is its state."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next(self):
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def random_batches(n, rows, seed=0, T=8, V=32):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        chunk = torch.randint(0, V, (rows, T + 1), generator=g)
        out.append((chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()))
    return out


def config(**kw):
    return TrainConfig(
        **{
            **dict(
                max_steps=6,
                batch_size=4,
                learning_rate=1e-2,
                min_lr=1e-3,
                warmup_steps=2,
                eval_every=3,
                eval_batches=1,
                checkpoint_every=3,
                val_fraction=0.1,
            ),
            **kw,
        }
    )


class ByteTokenizer:
    """A stand-in tokenizer: one token per byte, plus <|endoftext|>."""

    n_vocab = 257
    special_tokens = {EOT: 256}
    pattern = ""  # no pre-split
    ranks = {bytes([b]): b for b in range(256)}

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


# --- schedule and config ---------------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = config(max_steps=100, warmup_steps=10, learning_rate=1.0, min_lr=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup reaches the peak
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then it only decays
    assert lrs[55] == pytest.approx(0.55)  # halfway through the cosine: the midpoint of peak and min
    assert lr_at(100, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)


def test_train_config_checks():  # the rules that tie two fields together: tests/test_config.py
    with pytest.raises(ConfigError, match=r"train.batch_size=0 is out of range; allowed: between 1 and 65536"):
        get_config("tiny", train=dict(batch_size=0))
    with pytest.raises(ConfigError, match=r"train.dtype='fp8' is not allowed; allowed: auto, float32, bfloat16"):
        get_config("tiny", train=dict(dtype="fp8"))
    with pytest.raises(ConfigError, match=r"train.dtype='bfloat16' needs a CUDA device"):
        train(tiny_gpt(), lm_loss, ListBatches(random_batches(1, 4)), config(dtype="bfloat16"), device="cpu")


# --- the loop --------------------------------------------------------------------------------------


@RECIPES
def test_loss_goes_down_and_history_is_complete(arch, optimizer):
    batches = random_batches(2, 4)
    result = train(
        tiny_gpt(arch=arch),
        lm_loss,
        ListBatches(batches),
        config(max_steps=30, eval_every=10, warmup_steps=3, optimizer=optimizer),
        val_batches=lambda: batches[:1],
    )
    steps = [r for r in result.history if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5  # it memorises two batches
    assert [r["step"] for r in result.history if "val_loss" in r] == [0, 10, 20, 30]
    assert result.tokens_seen == 30 * 4 * 8 and result.step == 30


def test_grad_accumulation_equals_one_big_batch():
    small = random_batches(4, 4, seed=1)
    big = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(small[::2], small[1::2])]
    accumulated, whole = tiny_gpt(), tiny_gpt()
    train(accumulated, lm_loss, ListBatches(small), config(max_steps=2, grad_accum=2, batch_size=4))
    train(whole, lm_loss, ListBatches(big), config(max_steps=2, grad_accum=1, batch_size=8))
    for (name, a), b in zip(accumulated.state_dict().items(), whole.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@RECIPES
def test_resume_after_a_kill_is_bit_identical(tmp_path, arch, optimizer):
    tokens = np.random.default_rng(0).integers(0, 32, 500).astype(np.uint16)
    cfg = config(max_steps=8, checkpoint_every=4, eval_every=2, optimizer=optimizer)
    val = lambda: [(b[0][:2], b[1][:2]) for b in random_batches(1, 2, seed=9)]  # noqa: E731

    model_once = tiny_gpt(dropout=0.2, arch=arch)  # dropout: the torch generator's state matters too
    once = train(
        model_once,
        lm_loss,
        TokenWindows(tokens, 8, 4, seed=5),
        cfg,
        val_batches=val,
        checkpoint=tmp_path / "a.pt",
        resume_key="k",
    )

    killed = tmp_path / "b.pt"
    first = train(
        tiny_gpt(dropout=0.2, arch=arch),
        lm_loss,
        TokenWindows(tokens, 8, 4, seed=5),
        cfg,
        val_batches=val,
        checkpoint=killed,
        resume_key="k",
        stop_at_step=4,
    )
    assert first.step == 4 and load_checkpoint(killed)["step"] == 4
    torch.manual_seed(999)  # the resumed run must not depend on the generator states it starts with
    resumed_model = tiny_gpt(seed=7, dropout=0.2, arch=arch)  # fresh weights: everything must come from the checkpoint
    resumed = train(
        resumed_model,
        lm_loss,
        TokenWindows(tokens, 8, 4, seed=5),
        cfg,
        val_batches=val,
        checkpoint=killed,
        resume_key="k",
    )
    assert resumed.step == 8
    assert [r.get("loss") for r in resumed.history] == [r.get("loss") for r in once.history]
    assert [r.get("val_loss") for r in resumed.history] == [r.get("val_loss") for r in once.history]
    for (name, a), b in zip(model_once.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_schedule_scales_muon_and_adamw_alike(tmp_path):
    cfg = config(optimizer="muon", learning_rate=1e-2, min_lr=1e-3, muon_lr=0.05, max_steps=6, warmup_steps=2)
    optimizer = make_optimizer(tiny_gpt(arch="modern"), cfg, "cpu")
    set_lr(optimizer, 4e-3)
    muon, adamw = optimizer.optimizers
    assert {g["lr"] for g in adamw.param_groups} == {4e-3}
    assert [g["lr"] for g in muon.param_groups] == pytest.approx([4e-3 * 0.05 / 1e-2])
    # in the loop: the last step's rates, as the checkpoint keeps them
    train(tiny_gpt(arch="modern"), lm_loss, ListBatches(random_batches(2, 4)), cfg, checkpoint=tmp_path / "m.pt")
    muon_state, adamw_state = load_checkpoint(tmp_path / "m.pt")["optimizer"]["optimizers"]
    last = lr_at(5, cfg)
    assert [g["lr"] for g in adamw_state["param_groups"]] == pytest.approx(
        [last]
    )  # modern has no 1-D weights: one AdamW group
    assert [g["lr"] for g in muon_state["param_groups"]] == pytest.approx([last * 0.05 / 1e-2])
    assert len(muon_state["state"]) == 6  # c_q, c_k, c_v, attn c_proj, c_fc, mlp c_proj: momentum kept


def test_checkpoint_with_another_key_is_not_resumed(tmp_path):
    path = tmp_path / "c.pt"
    train(tiny_gpt(), lm_loss, ListBatches(random_batches(2, 4)), config(), checkpoint=path, resume_key="old")
    result = train(tiny_gpt(), lm_loss, ListBatches(random_batches(2, 4)), config(), checkpoint=path, resume_key="new")
    assert result.step == 6 and len([r for r in result.history if "loss" in r]) == 6
    assert load_checkpoint(path)["resume_key"] == "new"


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_checkpoint(path, {"step": 3, "weights": torch.arange(5)})

    def crash(obj, f, *a, **kw):
        with open(f, "wb") as out:
            out.write(b"half a checkpo")  # the process dies in the middle of writing
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 4, "weights": torch.zeros(5)})
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 3 and torch.equal(state["weights"], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary file left behind


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")


# --- DDP: two processes on gloo --------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, out_dir):
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    model = tiny_gpt()
    batches = random_batches(6, 4, seed=3)
    result = train(
        model,
        lm_loss,
        ListBatches(batches),
        config(max_steps=6, grad_accum=2),
        val_batches=lambda: batches[:2],
        checkpoint=os.path.join(out_dir, "ddp.pt"),
        resume_key="ddp",
    )
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump([r.get("val_loss") for r in result.history], f)
    dist.destroy_process_group()


def test_ddp_two_processes_match_single_process_training(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # gradients were averaged: same weights everywhere
    val0, val1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert val0 == val1

    single = tiny_gpt()
    batches = random_batches(6, 4, seed=3)
    result = train(
        single,
        lm_loss,
        ListBatches(batches),
        config(max_steps=6, grad_accum=2),  # the same global batches
        val_batches=lambda: batches[:2],
    )
    for name, value in single.state_dict().items():
        torch.testing.assert_close(rank0[name], value, rtol=1e-4, atol=1e-5, msg=name)
    single_val = [r["val_loss"] for r in result.history if "val_loss" in r]
    assert [v for v in val0 if v is not None] == pytest.approx(single_val, rel=1e-4) and len(single_val) == 3
    assert load_checkpoint(tmp_path / "ddp.pt")["step"] == 6  # rank 0 wrote the checkpoint


# --- data ------------------------------------------------------------------------------------------


def pages(n):
    return [{"url": f"https://example.org/page/{i}", "text": f"Page number {i} says hello. " * 3} for i in range(n)]


def test_token_files_memmap_and_heldout_split(tmp_path):
    corpus = pages(60)
    files = tokenize_corpus(corpus, ByteTokenizer(), tmp_path, val_fraction=0.2)
    train_ids, val_ids = files.tokens("train"), files.tokens("val")
    assert isinstance(train_ids, np.memmap) and train_ids.dtype == np.uint16
    held = [p for p in corpus if in_share(p["url"], 0.2)]
    assert 0 < len(held) < 60 and files.meta["val"]["pages"] == len(held)
    assert files.meta["train"]["pages"] + files.meta["val"]["pages"] == 60
    assert int((np.asarray(val_ids) == 256).sum()) == len(held)  # one <|endoftext|> before each page
    assert val_ids[0] == 256 and ByteTokenizer().decode(val_ids[1:]).startswith(document_text(held[0]))
    assert files.meta["val"]["bytes"] == sum(len(document_text(p).encode()) for p in held)
    # the split depends on the URL only: shuffling the corpus changes nothing held out
    assert {p["url"] for p in corpus[::-1] if in_share(p["url"], 0.2)} == {p["url"] for p in held}
    # tokenized once: a second call reuses the files
    mtime = files.train.stat().st_mtime_ns
    assert tokenize_corpus(corpus, ByteTokenizer(), tmp_path, 0.2).train.stat().st_mtime_ns == mtime


def test_token_files_are_remade_for_another_tokenizer_or_corpus_of_the_same_size(tmp_path):
    """Token files are keyed by the tokenizer itself (merges, pattern, special tokens) and by every
    page's text: a tokenizer of the same vocabulary size, or a page changed at the same length, remakes them."""
    from labkit.tokenizer import Tokenizer

    corpus = [dict(p, text=p["text"] + f" It's item {i}'s 2nd line.") for i, p in enumerate(pages(40))]
    texts = [document_text(p) for p in corpus]
    gpt4, gpt2 = (Tokenizer.train(texts, 300, pattern=name) for name in ("gpt4", "gpt2"))
    assert gpt4.n_vocab == gpt2.n_vocab and gpt4.encode(texts[0]) != gpt2.encode(texts[0])

    def first_train_page(files, tokenizer):
        ids = np.asarray(files.tokens("train"))
        end = np.flatnonzero(ids == tokenizer.special_tokens[EOT])[1]
        return ids[1:end].tolist()

    first = next(p for p in corpus if not in_share(p["url"], 0.2))
    files = tokenize_corpus(corpus, gpt4, tmp_path, 0.2)
    assert first_train_page(files, gpt4) == gpt4.encode(document_text(first))
    files = tokenize_corpus(corpus, gpt2, tmp_path, 0.2)
    assert first_train_page(files, gpt2) == gpt2.encode(document_text(first))
    edited = [dict(p, text=p["text"].replace("hello", "howdy")) for p in corpus]
    files = tokenize_corpus(edited, gpt2, tmp_path, 0.2)
    assert first_train_page(files, gpt2) == gpt2.encode(document_text(first).replace("hello", "howdy"))


def test_windows_are_shifted_by_one_and_seeded():
    tokens = np.arange(100, dtype=np.uint16)
    a, b = TokenWindows(tokens, 8, 4, seed=1), TokenWindows(tokens, 8, 4, seed=1)
    x, y = a.next()
    assert x.shape == (4, 8) and x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, b.next()[0])
    state = a.state_dict()
    nxt = a.next()[0]
    a.load_state_dict(state)
    assert torch.equal(a.next()[0], nxt)
    covered = torch.cat([y.flatten() for _, y in sequential_batches(tokens, 8, 3)])
    assert torch.equal(covered, torch.arange(1, 100))  # validation sees every target once
    with pytest.raises(ValueError, match="fewer than block_size"):
        TokenWindows(tokens[:5], 8, 4, seed=0)


def test_local_jsonl_source_goes_through_the_same_path(tmp_path):
    from labkit.data import read_corpus
    from labkit.pipeline import ensure
    from labkit.run import Run

    source = tmp_path / "docs.jsonl"
    rng = np.random.default_rng(0)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "and",
        "then",
        "it",
        "runs",
        "to",
        "that",
        "river",
        "with",
        "some",
        "friends",
    ]
    rows = [
        {
            "text": f"Document {i}: the quick brown fox. "
            + " ".join(" ".join(rng.choice(words, 12)).capitalize() + "." for _ in range(8))
        }
        for i in range(30)
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = Run("jsonl", tmp_path / "runs")
    ensure("data", get_config("tiny", data=dict(source=str(source))), run)
    corpus = read_corpus(run)
    files = tokenize_corpus(corpus, ByteTokenizer(), tmp_path / "tok", val_fraction=0.1)
    assert files.meta["train"]["pages"] + files.meta["val"]["pages"] == len(corpus) > 0
    assert files.meta["val"]["pages"] >= 1
    text = ByteTokenizer().decode(files.tokens("train"))
    assert "quick brown fox" in text and "docs.jsonl#" not in text  # no fake URL line for dataset rows
