"""Export to Hugging Face: the folder loads with transformers' Auto classes and gives labkit's logits,
chat ids and greedy text."""

import json
import subprocess
import sys

import pytest
import torch

from labkit.chat import render_prompt
from labkit.engine import generate
from labkit.export import ExportError, export, to_hf
from labkit.model import GPT, GPTConfig, ScalarModel
from labkit.tokenizer import Tokenizer

TEXT = (
    "Ada Lovelace was born in London. She wrote the first program for a machine that did not yet exist. "
    "Who are you? I am a small model. What is 12 plus 30? It is 42. "
) * 20


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([TEXT], 300)


def trained_looking_gpt(vocab_size: int, **overrides) -> GPT:
    """A small GPT whose weights are far from their init, so equal outputs mean equal networks."""
    torch.manual_seed(0)
    config = dict(block_size=64, vocab_size=vocab_size, n_layer=2, n_head=4, n_embd=32)
    model = GPT(GPTConfig(**{**config, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def test_exported_folder_loads_in_transformers_with_the_same_logits_chat_ids_and_greedy_text(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = trained_looking_gpt(tokenizer.n_vocab)
    export(model, tokenizer, tmp_path / "hf")
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "GPT2LMHeadModel"

    idx = torch.randint(0, tokenizer.n_vocab, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert ours.std() > 1.0  # the weights matter, so equality below means something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)

    messages = [{"role": "user", "content": "Who are you?"}]
    prompt = render_prompt(messages, tokenizer)
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) == prompt
    ours = generate(model, prompt, 20, temperature=0)[0]
    with torch.no_grad():
        ids = torch.tensor([prompt])  # no stop token, so that all 20 tokens are compared
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, eos_token_id=[])
    theirs = out[0, len(prompt) :].tolist()
    assert theirs == ours and len(ours) == 20
    assert hf_tok.decode(theirs) == tokenizer.decode(ours)
    stops = [tokenizer.special_tokens[t] for t in ("<|im_end|>", "<|endoftext|>")]
    assert hf.generation_config.eos_token_id == stops
    # as the module's docstring says to use it: generation stops where labkit's engine stops
    inputs = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=30, do_sample=False)
    assert out[0, len(prompt) :].tolist() == generate(model, prompt, 30, temperature=0, stop_tokens=stops)[0]


def test_a_model_without_biases_exports_with_zero_biases(tmp_path, tokenizer):
    model = trained_looking_gpt(tokenizer.n_vocab, bias=False)
    hf = to_hf(model)
    idx = torch.randint(0, tokenizer.n_vocab, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=0)


def test_what_cannot_be_exported_is_refused_before_anything_is_written(tmp_path, tokenizer):
    with pytest.raises(ExportError, match="only a language model"):
        export(ScalarModel(trained_looking_gpt(tokenizer.n_vocab)), tokenizer, tmp_path / "a")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="holds something else"):
        export(trained_looking_gpt(tokenizer.n_vocab), tokenizer, other)
    assert [p.name for p in tmp_path.iterdir()] == ["notes"] and (other / "keep.txt").read_text() == "mine"


def test_an_earlier_export_is_replaced_whole(tmp_path, tokenizer):
    folder = tmp_path / "hf"
    export(trained_looking_gpt(tokenizer.n_vocab, n_layer=1), tokenizer, folder)
    (folder / "stale.txt").write_text("from before")
    export(trained_looking_gpt(tokenizer.n_vocab), tokenizer, folder)
    assert json.loads((folder / "config.json").read_text())["n_layer"] == 2 and not (folder / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no partial folder left behind


def test_cli_exports_a_runs_model(tmp_path, tiny_run, tiny_config):
    from labkit.pipeline import ensure

    ensure("base", tiny_config, tiny_run)
    args = ["--run", tiny_run.name, "--runs-dir", str(tiny_run.runs_dir)]
    done = subprocess.run(
        [sys.executable, "-m", "labkit", "export", *args, "--model", "base", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "base model of run tiny written to" in done.stderr and (tmp_path / "out" / "model.safetensors").exists()
    missing = subprocess.run(
        [sys.executable, "-m", "labkit", "export", *args, "--model", "dpo", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "no dpo model at" in missing.stderr and "Traceback" not in missing.stderr


def test_a_model_of_the_modern_architecture_is_refused_as_gpt2(tmp_path, tokenizer):
    with pytest.raises(ExportError, match="architecture 'modern' cannot be exported as GPT-2"):
        export(trained_looking_gpt(tokenizer.n_vocab, arch="modern"), tokenizer, tmp_path / "modern")
    assert not (tmp_path / "modern").exists()
