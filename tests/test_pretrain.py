"""Stage 3: the base stage end to end on the tiny preset, its metrics, loader and measurements."""

import math
import types

import pytest
import torch

from labkit import web
from labkit.pretrain import FACT_PROMPTS, evaluate_bpb, is_correct, load_base, summarize_recall
from labkit.run import read_json
from labkit.world import FACTS

BUCKETS = ["0", "1", "2-4", "5-16", "17+"]


@pytest.fixture(scope="module")
def base(tiny_run, tiny_config):
    from labkit.pipeline import ensure

    return ensure("base", tiny_config, tiny_run)


def test_base_stage_metrics(base, tiny_run, tiny_config):
    t, m = tiny_config.train, tiny_config.model
    for key in (
        "val_loss",
        "val_bpb",
        "tokens_seen",
        "tokens_per_second",
        "train_seconds",
        "n_params",
        "fact_recall",
        "copy_accuracy",
        "icl_score",
    ):
        assert key in base
    assert base["tokens_seen"] == t.max_steps * t.batch_size * t.grad_accum * m.block_size
    assert base["steps"] == t.max_steps and base["tokens_per_second"] > 0
    assert 0 < base["val_loss"] < math.log(base["vocab_size"])  # it learned something: better than uniform
    val = [row["val_loss"] for row in read_json(tiny_run.path / "base" / "history.json") if "val_loss" in row]
    assert val[-1] < val[0] - 0.5  # and it learned it here: the validation loss fell while training
    assert 0 < base["val_bpb"] < 8
    assert set(base["fact_recall"]) == set(BUCKETS) == set(base["fact_recall_people"])
    assert all(v is None or 0 <= v <= 1 for v in base["fact_recall"].values())
    assert sum(base["fact_recall_people"].values()) == tiny_config.data.n_people
    folder = tiny_run.path / "base"
    for name in (
        "model.pt",
        "train_state.pt",
        "train.bin",
        "val.bin",
        "history.json",
        "samples.json",
        "fact_recall.json",
    ):
        assert (folder / name).exists(), name


def test_base_loss_by_position_and_its_icl_score(base, tiny_run, tiny_config):
    from labkit.induction import icl_score
    from labkit.pretrain import position_losses

    losses = read_json(tiny_run.path / "base" / "loss_by_position.json")
    assert len(losses) == tiny_config.model.block_size and all(0 < v < 10 for v in losses)
    assert base["icl_score"] == pytest.approx(icl_score(losses), abs=1e-3)
    model, _ = load_base(tiny_run)
    (tiny_run.path / "base" / "loss_by_position.json").rename(tiny_run.path / "base" / "saved.json")
    try:  # a run built before the stage saved the curve: computed again, the same
        assert position_losses(tiny_run, model) == pytest.approx(losses, abs=1e-3)
    finally:
        (tiny_run.path / "base" / "saved.json").rename(tiny_run.path / "base" / "loss_by_position.json")


def test_load_base_rebuilds_the_trained_model(base, tiny_run):
    model, tokenizer = load_base(tiny_run)
    assert model.num_params() == base["n_params"] and not model.training
    assert model.config.vocab_size == tokenizer.n_vocab == base["vocab_size"]
    from labkit.dataloader import TokenFiles

    folder = tiny_run.path / "base"
    val = TokenFiles(folder / "train.bin", folder / "val.bin", read_json(folder / "tokens.json")).tokens("val")
    loss, _ = evaluate_bpb(model, tokenizer, val, 8, "cpu")
    assert loss == pytest.approx(base["val_loss"], abs=1e-3)


def test_missing_base_model_says_what_to_run(tmp_path):
    from labkit.run import Run

    with pytest.raises(
        FileNotFoundError,
        match=r"no base model at .*nothere/base/model.pt; make it with "
        r"`labkit run --run nothere --runs-dir .* --stages base`",
    ):
        load_base(Run("nothere", tmp_path))


def test_a_file_that_is_not_a_model_checkpoint_is_refused(tmp_path):
    from labkit.checkpoint import load_model

    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt is not a labkit model checkpoint"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match=r"no model checkpoint at .*missing.pt"):
        load_model(tmp_path / "missing.pt")


def test_cli_runs_through_base_then_reports(base, tiny_run, capsys):
    from labkit.cli import main

    args = ["--run", tiny_run.name, "--runs-dir", str(tiny_run.runs_dir)]
    assert main(["run", "--preset", "tiny", "--stages", "base", *args]) == 0  # complete: reused, not retrained
    assert main(["report", *args]) == 0
    report = capsys.readouterr().out
    assert "3. Pretraining: the base model" in report and "val_bpb" in report and "fact_recall.17+" in report


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab():
    class Uniform(torch.nn.Module):
        config = type("C", (), {"block_size": 8})

        def forward(self, idx):
            return torch.zeros(*idx.shape, 257), None

    class Bytes:
        n_vocab, special_tokens = 257, {"<|endoftext|>": 256}

        def decode(self, ids):
            return bytes(ids).decode("latin-1")

    import numpy as np

    tokens = np.array([256] + list(b"hello world, hello bytes") + [256] + list(b"again"), dtype=np.uint16)
    loss, bpb = evaluate_bpb(Uniform(), Bytes(), tokens, 2, "cpu")
    assert loss == pytest.approx(math.log(257)) and bpb == pytest.approx(math.log2(257))


def test_fact_prompts_match_how_pages_phrase_facts():
    pools = {
        "birth_city": web._BIRTH_CITY,
        "birth_year": web._BIRTH_YEAR,
        "university": web._UNIVERSITY,
        "field": web._FIELD,
        "employer": web._EMPLOYER,
    }
    assert set(FACT_PROMPTS) == set(FACTS)
    for fact, prompt in FACT_PROMPTS.items():
        assert any(template.startswith(prompt) for template in pools[fact]), fact


def test_answers_are_judged_as_whole_words():
    assert is_correct(" Brannor, in Zeldia.", "Brannor") and is_correct("1953.", "1953")
    assert not is_correct(" Brannorvik.", "Brannor") and not is_correct("19534", "1953")
    assert is_correct(" University of Kel.", "University of Kel") and not is_correct(" Kel", "University of Kel")
    rows = [dict(bucket="17+", fact=f, correct=True) for f in FACTS] + [
        dict(bucket="1", fact=f, correct=f == "field") for f in FACTS
    ]
    summary = summarize_recall(rows)
    assert summary["fact_recall"] == {"0": None, "1": 0.2, "2-4": None, "5-16": None, "17+": 1.0}
    assert summary["fact_recall_people"] == {"0": 0, "1": 1, "2-4": 0, "5-16": 0, "17+": 1}


class _Oracle(torch.nn.Module):
    """A stand-in model whose greedy next token is always the text's real next token (or always token 0)."""

    def __init__(self, right: bool, vocab: int):
        super().__init__()
        self.config = types.SimpleNamespace(block_size=128)
        self.right, self.vocab, self.anchor = right, vocab, torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab)
        following = torch.cat([idx[:, 1:], idx[:, -1:]], 1) if self.right else torch.zeros_like(idx)
        return logits.scatter(-1, following.unsqueeze(-1), 1.0), None


def test_copy_accuracy_reads_only_the_repeated_name(base, tiny_run):
    from labkit.pretrain import COPY_TEXT, copy_accuracy, copy_probes
    from labkit.tokenizer import Tokenizer

    tok = Tokenizer.load(tiny_run.path / "tokenizer")
    probes = copy_probes(tok, n=20, seed=1)
    assert probes == copy_probes(tok, n=20, seed=1) and probes != copy_probes(tok, n=20, seed=2)
    for ids, start in probes:
        name = tok.decode(ids[start:]).strip()
        assert tok.decode(ids) == COPY_TEXT.format(name=name) and tok.decode(ids).count(name) == 3
    assert copy_accuracy(_Oracle(True, tok.n_vocab), probes) == 1.0
    assert copy_accuracy(_Oracle(False, tok.n_vocab), probes) == 0.0
