"""The GPT: a decoder-only Transformer with GPT-2's architecture or today's (`arch`), in one file.

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

`arch="modern"` is the recipe small GPTs train with since 2024 (nanochat, modded-nanogpt), the
same skeleton with these parts changed, side by side with GPT-2's below:

- positions enter as rotations of each head's queries and keys (rotary embeddings, RoPE): the
  score of query i on key j then depends on i - j only, and there is no position table;
- RMSNorm without parameters in place of LayerNorm, also right after the token embedding, and
  on each head's queries and keys (QK-norm: attention scores cannot blow up);
- a ReLU² MLP (relu(x)²) in place of GELU, no biases anywhere;
- an untied head, and the projections that write the residual stream start at zero, so each
  block starts as the identity and the untrained model is a bigram model;
- logits squashed smoothly into (-softcap, softcap): softcap * tanh(logits / softcap).

Only `arch="gpt2"` has GPT-2's modules and weights (`from_hf`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

ARCHS = ("gpt2", "modern")
ROPE_BASE = 10_000  # rotary: channel pair i turns by position * ROPE_BASE ** (-2i / head_size)


@dataclass
class GPTConfig:
    block_size: int = 128  # longest sequence the model reads (positions it has embeddings for)
    vocab_size: int = 2048  # comes from the tokenizer
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2 (arch gpt2 only; modern has none)
    arch: str = "gpt2"  # "gpt2": GPT-2's architecture; "modern": the recipe of nanochat and modded-nanogpt
    softcap: float = 15.0  # arch modern: logits squashed into (-softcap, softcap); 0 turns it off

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
        if self.arch not in ARCHS:
            raise ValueError(f"GPTConfig.arch={self.arch!r} is not allowed; allowed: {', '.join(ARCHS)}")
        if self.arch == "modern" and (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"GPTConfig: arch='modern' rotates channel pairs, so the head size n_embd // n_head = "
                f"{self.n_embd // self.n_head} must be even"
            )
        if not self.softcap >= 0:
            raise ValueError(f"GPTConfig.softcap={self.softcap!r} is not allowed; it must be >= 0 (0: off)")


class RMSNorm(nn.Module):
    """x / rms(x) over the channels, with no parameters (the modern recipe's only norm)."""

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),))


def rotary_tables(length: int, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_size // 2] of the angle each channel pair turns by at each position:
    fast turns for the first pairs (near positions), slow ones for the last (far positions)."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate channel pairs (j, j + head_size / 2) of x [B, n_head, T, head_size] by their angles
    (cos, sin [T, head_size // 2], or [B, 1, T, head_size // 2] for per-row positions). Rotating
    a query by angle(i) and a key by angle(j) leaves their dot product a function of i - j."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# GPT-2's checkpoints store these projections as Conv1D ([in, out]); labkit's are nn.Linear ([out, in])
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class CausalSelfAttention(nn.Module):
    """Every position mixes in the values of itself and earlier positions, weighted by how
    well its query matches their keys; `n_head` heads do this in parallel on slices of the
    channels."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of the KV cache is ours
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.modern = config.arch == "modern"
        C = config.n_embd
        if self.modern:  # three matrices (Muon orthogonalises each on its own), no biases
            self.c_q, self.c_k, self.c_v = (nn.Linear(C, C, bias=False) for _ in range(3))
            self.c_proj = nn.Linear(C, C, bias=False)
        else:
            self.c_attn = nn.Linear(C, 3 * C, bias=config.bias)  # query, key, value at once
            self.c_proj = nn.Linear(C, C, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def queries_keys_values(self, x, rope=None):
        """x [B, T, C] -> q, k, v [B, n_head, T, head_size], positions already in q and k (modern)."""
        B, T, C = x.size()
        if self.modern:
            q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        else:
            q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): heads become a batch dimension
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            # modern: positions enter here, as rotations of queries and keys (before they are
            # cached), then QK-norm: unit-scale queries and keys keep the scores in range
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        return q, k, v

    def forward(self, x, kv_cache=None, rope=None):
        B, T, C = x.size()
        q, k, v = self.queries_keys_values(x, rope)
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


class ReLUSquared(nn.Module):
    def forward(self, x):
        return F.relu(x).square()


class MLP(nn.Module):
    """Per-position feed-forward network: widen 4x, GELU (gpt2) or ReLU² (modern), project back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        bias = config.bias and config.arch == "gpt2"
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=bias)
        # GPT-2's "gelu_new" is the tanh approximation of GELU
        self.act = nn.GELU(approximate="tanh") if config.arch == "gpt2" else ReLUSquared()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


def make_norm(config: GPTConfig) -> nn.Module:
    """LayerNorm with a gain (and a bias) for gpt2; the parameter-free RMSNorm for modern."""
    return nn.LayerNorm(config.n_embd, bias=config.bias) if config.arch == "gpt2" else RMSNorm()


class Block(nn.Module):
    """Pre-norm residual block: normalise, transform, add back onto the residual stream."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, rope=None):
        x = x + self.attn(self.ln_1(x), kv_cache, rope)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        gpt2 = config.arch == "gpt2"
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
                # gpt2: a learned position embedding; modern: a norm (positions are rotations)
                **(dict(wpe=nn.Embedding(config.block_size, config.n_embd)) if gpt2 else dict(ln_e=RMSNorm())),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=make_norm(config),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if gpt2:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying: one matrix reads and writes tokens
            self.init_gpt2()
        else:
            cos, sin = rotary_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)  # rebuilt, never saved
            self.register_buffer("rope_sin", sin, persistent=False)
            self.init_modern()

    def init_gpt2(self):
        """GPT-2's initialisation: small normal weights, zero biases; the projections that write
        into the residual stream are scaled down by 1/sqrt(2 * n_layer), because each of the
        2 * n_layer of them adds to the same stream and the sum's variance would grow with depth."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def init_modern(self):
        """nanochat's initialisation: unit-scale embeddings (normed anyway), matrices at std
        1/sqrt(fan_in) (each output starts at about unit scale), a near-zero head, and the
        projections that write the residual stream at exactly zero: every block starts as the
        identity, and each learns to add something only as training finds it useful."""
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for name, p in self.transformer.h.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=p.size(1) ** -0.5)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. By default the lookup tables that do no compute are left out: gpt2's
        position embedding (its token embedding, tied, is also the head), modern's token embedding
        (its head is a matrix of its own)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= (self.transformer.wpe if self.config.arch == "gpt2" else self.transformer.wte).weight.numel()
        return n

    def hidden_states(self, idx, kv_cache=None):
        """The final normed states [B, T, n_embd]: what the head reads (a reward or value head
        reads them too)."""
        B, T = idx.size()
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence of length {past + T} is longer than the model's block_size={self.config.block_size}; "
                f"give at most {self.config.block_size} tokens"
            )
        # [T], or [B, T] when the cache's rows are padded on the left (each row starts at 0)
        pos = torch.arange(T, device=idx.device) if kv_cache is None else kv_cache.positions(T, idx.device)
        x, rope = self.embed(idx, pos)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, kv_cache, rope)
        if kv_cache is not None:
            kv_cache.advance(T)  # every layer has stored this step's keys and values
        return self.transformer.ln_f(x)

    def embed(self, idx, pos):
        """Token ids [B, T] at positions pos ([T] or [B, T]) -> (the residual stream's start
        [B, T, n_embd], the rotary tables the attention layers turn queries and keys by, or None)."""
        x = self.transformer.wte(idx)
        if self.config.arch == "gpt2":
            return x + self.transformer.wpe(pos), None
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        rope = (cos, sin) if pos.dim() == 1 else (cos.unsqueeze(1), sin.unsqueeze(1))  # over the heads
        return self.transformer.ln_e(x), rope

    def logits(self, hidden):
        """Hidden states [..., n_embd] -> next-token logits [..., vocab_size]: the head, and for
        modern the softcap (in float32, where tanh is exact enough)."""
        logits = self.lm_head(hidden)
        cap = self.config.softcap
        if self.config.arch == "modern" and cap > 0:
            logits = cap * torch.tanh(logits.float() / cap)
        return logits

    def forward(self, idx, targets=None, kv_cache=None):
        """idx [B, T] token ids -> (logits [B, T, vocab_size], loss or None).

        Logits come for every position (later stages need per-token log-probabilities).
        The loss is the mean cross-entropy of `targets` [B, T]; positions whose target is -1
        are ignored (SFT masks everything but the assistant's tokens that way).
        """
        logits = self.logits(self.hidden_states(idx, kv_cache))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

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
        if isinstance(model_or_path, GPT):
            raise ValueError(
                f"from_hf reads Hugging Face's GPT2LMHeadModel, not a labkit GPT (this one is arch "
                f"{model_or_path.config.arch!r}); only arch 'gpt2' is GPT-2-compatible, and a labkit model "
                f"loads with labkit.checkpoint.load_model"
            )
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
        with torch.no_grad():
            for name, tensor in theirs.items():
                if name.endswith(GPT2_CONV1D):
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
