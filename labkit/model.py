"""The GPT: a decoder-only Transformer with GPT-2's architecture, in one file.

The lesson: a language model is a function from a sequence of token ids to, at every
position, a score (a *logit*) for each possible next token. It is built from a few parts:

- a token embedding (one learned vector per vocabulary entry) plus a learned position
  embedding (one vector per position, up to `block_size`), added together;
- `n_layer` identical blocks, each a *pre-LayerNorm* residual pair:
  `x = x + attention(layernorm(x))` (tokens look at earlier tokens), then
  `x = x + mlp(layernorm(x))` (each token thinks on its own);
- a final LayerNorm and a linear "head" back to the vocabulary, whose weight is the token
  embedding itself (weight tying: the same vectors read and write tokens).

Attention is causal (a position sees itself and the past, never the future), so one forward
pass over a sequence trains on every next-token prediction in it at once. It goes through
`torch.nn.functional.scaled_dot_product_attention`, which picks a fused kernel
(FlashAttention on a GPU).

The names of the modules follow GPT-2's (as in Hugging Face's `GPT2LMHeadModel`), so its
weights load with `GPT.from_hf` and give the same logits. Generation (sampling, the KV cache)
lives in `labkit.engine`; the model only accepts a `kv_cache` object in `forward`, which tells
it where the new tokens sit (their positions, and which cached positions they may attend to).

`ScalarModel` is the same body with a one-number head instead of the vocabulary head: the reward
model of RLHF and PPO's value model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 128  # longest sequence the model reads (positions it has embeddings for)
    vocab_size: int = 2048  # comes from the tokenizer
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name}={value!r} is not allowed; it must be a positive integer")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"n_embd must be a multiple of n_head (each head gets n_embd // n_head channels)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout={self.dropout!r} is not allowed; it must be in [0, 1)")


class CausalSelfAttention(nn.Module):
    """Every position mixes in the values of itself and earlier positions, weighted by how
    well its query matches their keys; `n_head` heads do this in parallel on slices of the
    channels."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of the KV cache is ours
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # query, key, value at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): heads become a batch dimension
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        past, mask = 0, None
        if kv_cache is not None:
            # keep this step's keys/values and attend over everything cached so far
            past, mask = kv_cache.length, kv_cache.attention_mask(T)
            k, v = kv_cache.update(self.layer_idx, k, v)
        dropout = self.dropout if self.training else 0.0
        if mask is not None:
            # rows padded on the left (a batch of prompts of different lengths): the cache's mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        elif past == 0:
            # the usual case (training, or the first pass over a prompt): plain causal mask
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        elif T == 1:
            # one new token: it may see every cached position, so no mask at all
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:
            # several new tokens after a cached prefix: new token i sits at position past + i
            # and sees keys 0..past + i (is_causal would wrongly align the mask to the top left)
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Per-position feed-forward network: widen 4x, GELU, project back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new" is the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm residual block: normalise, transform, add back onto the residual stream."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
                wpe=nn.Embedding(config.block_size, config.n_embd),  # position embedding
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one matrix reads and writes tokens

        # GPT-2's initialisation: small normal weights, zero biases; the projections that write
        # into the residual stream are scaled down by 1/sqrt(2 * n_layer), because each of the
        # 2 * n_layer of them adds to the same stream and the sum's variance would grow with depth.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. The position embedding is left out by default (it does no compute);
        the token embedding stays in because, tied, it is also the output head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def hidden_states(self, idx, kv_cache=None):
        """The final layer-normed states [B, T, n_embd]: what the head reads (a reward or value
        head reads them too)."""
        B, T = idx.size()
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence of length {past + T} is longer than the model's block_size={self.config.block_size}; "
                f"give at most {self.config.block_size} tokens"
            )
        pos = torch.arange(T, device=idx.device) if kv_cache is None else kv_cache.positions(T, idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)  # every layer has stored this step's keys and values
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, kv_cache=None):
        """idx [B, T] token ids -> (logits [B, T, vocab_size], loss or None).

        Logits come for every position (later stages need per-token log-probabilities).
        The loss is the mean cross-entropy of `targets` [B, T]; positions whose target is -1
        are ignored (SFT masks everything but the assistant's tokens that way).
        """
        logits = self.lm_head(self.hidden_states(idx, kv_cache))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW where only 2-D tensors (matmul weights, embeddings) are decayed; biases and
        LayerNorm gains are not, since shrinking them towards zero is no regularisation."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
            dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0),
        ]
        fused = device_type == "cuda"  # one kernel for the whole update
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def flops_per_token(self) -> int:
        """Training FLOPs per token (PaLM appendix B): 6 per parameter (forward 2, backward 4)
        plus the attention scores and weighted sums, 12 * layers * heads * head_size * context."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float) -> float:
        """Model FLOPs utilisation: the share of the hardware's peak FLOP/s that training uses
        (e.g. peak_flops=989e12 for an H100's bf16 dense tensor cores)."""
        return self.flops_per_token() * tokens_per_second / peak_flops

    @classmethod
    def from_hf(cls, model_or_path, dropout: float = 0.0) -> GPT:
        """A GPT holding the weights of a Hugging Face `GPT2LMHeadModel`, given as an instance
        or as a local folder saved with `save_pretrained`.

        GPT-2's checkpoints store the four projections as `Conv1D` ([in, out]), ours are
        `nn.Linear` ([out, in]), so those weights are transposed on the way in.
        """
        is_model = isinstance(model_or_path, nn.Module)
        if not is_model:
            from transformers import GPT2Config, GPT2LMHeadModel
        # the config first: a model labkit's GPT cannot hold is refused before any weight is read
        c = model_or_path.config if is_model else GPT2Config.from_pretrained(model_or_path, local_files_only=True)
        check_hf_config(c)
        hf = model_or_path if is_model else GPT2LMHeadModel.from_pretrained(model_or_path, local_files_only=True)
        config = GPTConfig(
            block_size=c.n_positions,
            vocab_size=c.vocab_size,
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_embd=c.n_embd,
            dropout=dropout,
            bias=True,
        )
        model = cls(config)
        ours = model.state_dict()
        theirs = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        if set(ours) != set(theirs):
            raise ValueError(
                f"from_hf: parameter names differ; missing {sorted(set(ours) - set(theirs))}, "
                f"unexpected {sorted(set(theirs) - set(ours))}"
            )
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for name, tensor in theirs.items():
                if name.endswith(conv1d):
                    tensor = tensor.t()
                ours[name].copy_(tensor)
        return model


def check_hf_config(c) -> None:
    """Refuse a transformers GPT2Config whose model labkit's GPT cannot reproduce, saying why."""
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(
            f"from_hf: activation_function={c.activation_function!r} is not supported; "
            f"labkit's GPT uses GPT-2's tanh GELU ('gelu_new')"
        )
    if c.n_inner is not None and c.n_inner != 4 * c.n_embd:
        raise ValueError(
            f"from_hf: n_inner={c.n_inner} (the MLP's hidden width) is not 4 * n_embd = {4 * c.n_embd}; "
            f"labkit's GPT has GPT-2's MLP, 4 * n_embd wide (n_inner=None or {4 * c.n_embd})"
        )
    if c.scale_attn_by_inverse_layer_idx or not c.scale_attn_weights or c.layer_norm_epsilon != 1e-5:
        raise ValueError("from_hf: only GPT-2's standard attention scaling and layer_norm_epsilon=1e-5 are supported")


class ScalarModel(nn.Module):
    """A GPT body and a linear head from its last hidden states to one number per position.
    The reward model reads it at the answer's last token; PPO's value head at every token."""

    def __init__(self, body: GPT):
        super().__init__()
        self.body = body
        self.config = body.config
        self.head = nn.Linear(body.config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(body.config.n_embd + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T] scalars."""
        return self.head(self.body.hidden_states(idx)).squeeze(-1)

    def score(self, idx: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The scalar at each row's position `last` [B] (the answer's last token)."""
        return self(idx).gather(1, last.unsqueeze(1)).squeeze(1)
