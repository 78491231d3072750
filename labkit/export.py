"""Leaving labkit: a model and its tokenizer as a Hugging Face `transformers` folder.

labkit's `gpt2` architecture is GPT-2's, module names included, so a model trained here is a
`GPT2LMHeadModel`. `export` writes the folder that the rest of the field reads:

  config.json, generation_config.json   a GPT2Config; generation stops at <|im_end|> or <|endoftext|>
  model.safetensors                     the weights (the four projections transposed back to
                                        GPT-2's Conv1D layout, [in, out])
  tokenizer.json, tokenizer_config.json the byte-level BPE (`Tokenizer.save_huggingface`) and the
                                        chat template, so `apply_chat_template` gives labkit's ids

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    reply = model.generate(**inputs, max_new_tokens=64, do_sample=False)  # stops at <|im_end|>

One difference stays: Hugging Face's tokenizer turns `<|im_start|>` typed in a message into the
special token (labkit's never does); `tokenizer.backend_tokenizer.encode_special_tokens = True`
turns that off for text encoded outside the template.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .errors import LabkitError
from .model import GPT, GPT2_CONV1D, GPTConfig, ScalarModel
from .run import read_json, write_json

# labkit.chat.render_prompt as Jinja: <|endoftext|>, then each turn, then the assistant's opening
CHAT_TEMPLATE = (
    "<|endoftext|>{% for message in messages %}<|im_start|>{{ message['role'] }}<|im_sep|>"
    "{{ message['content'] }}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant<|im_sep|>{% endif %}"
)


class ExportError(LabkitError):
    """A model that Hugging Face's GPT-2 cannot hold."""


def hf_config(c: GPTConfig, **kw):
    """The `transformers.GPT2Config` of a labkit GPT of config `c` (no dropout, GPT-2's tanh GELU,
    tied head); `kw` sets any other field. The token ids are left unset: GPT2Config's defaults
    are GPT-2's own, and `export` sets the tokenizer's."""
    from transformers import GPT2Config

    fields = dict(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
    )
    return GPT2Config(**{**fields, **kw})


def to_hf(model: GPT):
    """The same network as a `transformers.GPT2LMHeadModel` (same logits, in float32)."""
    if isinstance(model, ScalarModel) or not isinstance(model, GPT):
        raise ExportError(f"only a language model (labkit.model.GPT) can be exported; got {type(model).__name__}")
    arch = getattr(model.config, "arch", "gpt2")
    if arch != "gpt2":
        raise ExportError(
            f"a model of architecture {arch!r} cannot be exported as GPT-2 (rotary positions, RMSNorm and the rest "
            f"have no place in GPT2LMHeadModel); only model.arch='gpt2' exports"
        )
    from transformers import GPT2LMHeadModel

    config = hf_config(model.config)
    hf = GPT2LMHeadModel(config)
    theirs = hf.state_dict()
    ours = {name: tensor.detach().float().cpu() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        for name, target in theirs.items():
            if name.endswith((".attn.bias", ".attn.masked_bias")):  # GPT-2's causal-mask buffers, not weights
                continue
            if name not in ours:  # a model trained with bias=False: GPT-2's biases are zeros
                if not name.endswith(".bias"):
                    raise ExportError(f"no weight for {name} in the labkit model")
                target.zero_()
                continue
            target.copy_(ours[name].t() if name.endswith(GPT2_CONV1D) else ours[name])
    return hf.eval()


def export(model: GPT, tokenizer, folder: str | Path) -> Path:
    """Write `model` and `tokenizer` to `folder` in Hugging Face's format; return the folder. An earlier
    export there is replaced; a folder holding anything else is refused."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not (folder / "config.json").exists():
        raise ExportError(f"{folder} is a folder that holds something else; export to a new or empty folder")
    hf = to_hf(model)  # refuses before anything is written
    special = tokenizer.special_tokens
    stops = [special[name] for name in ("<|im_end|>", "<|endoftext|>") if name in special]
    hf.config.bos_token_id = special.get("<|endoftext|>")
    hf.config.eos_token_id = stops[0] if stops else None
    hf.generation_config.bos_token_id = hf.config.bos_token_id
    hf.generation_config.eos_token_id = stops or None
    hf.generation_config.pad_token_id = special.get("<|endoftext|>")
    partial = folder.with_name(f".{folder.name}.partial")  # written whole, then moved into place
    shutil.rmtree(partial, ignore_errors=True)
    hf.save_pretrained(partial)
    tokenizer.save_huggingface(partial)
    config = read_json(partial / "tokenizer_config.json")
    write_json(partial / "tokenizer_config.json", dict(config, chat_template=CHAT_TEMPLATE))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder
