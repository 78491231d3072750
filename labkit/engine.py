"""The engine: the one way labkit samples from a model, scores text under it, and reads replies.

The lesson: the model only ever gives, for each position, a score (logit) for every possible
next token. Everything a later stage does with a model is one of three things:

1. *Sample* (`generate`): turn the last position's scores into probabilities, draw a token,
   append it, ask again. How we draw shapes the text:
   - temperature divides the logits: below 1 sharpens the distribution, above 1 flattens it;
     temperature 0 means *greedy*: always the single most likely token (deterministic);
   - top-k keeps only the k most likely tokens (ties at the k-th score are kept);
   - top-p (nucleus) keeps the smallest set of most likely tokens whose probabilities add up
     to at least p, so the cut adapts to how sure the model is.
   They apply in that order: temperature, then top-k, then top-p.
2. *Score* (`score`, `logprobs`): the log-probability the model gives each token of a known
   completion after its prompt, in one forward pass (RLHF, GRPO and the probes need it). At a
   temperature, the logits are divided by it first, as when sampling (and as TRL does), so a
   policy sampled at 0.7 is scored as the distribution it was sampled from.
3. *Read a reply* (`decode_reply`): ids -> text, and whether the reply ended properly.

Recomputing the whole sequence for every new token repeats work: the keys and values of
earlier positions never change (attention is causal). The KV cache keeps them: the prompt goes
through the model once (the *prefill*), then each step feeds just the one new token, which
attends to the cached keys and values. Same numbers, far less compute; `use_cache=False`
shows the slow way.

Many prompts of different lengths go through the model together: each row is padded on the
left to the longest prompt of its batch, padding is masked out of attention, and every row's
positions start at 0 at its first real token, so a row gets the same tokens as it would alone.
A row that stops is dropped from the batch (and from the cache): it costs nothing more.
Memory is bounded by `max_batch`, the most rows that go through the model at once, not by
how many prompts a stage asks about.

Conventions of `generate`:

- The result holds the *new* tokens of each sample, without the prompt. Rows come back prompt
  by prompt: [p0 s0, p0 s1, ..., p1 s0, ...], and `row` in `on_token(row, token_id)` is the
  index in that list.
- A row stops when it emits one of `stop_tokens`; the stop token is *included* at the end of
  its row (later stages score the decision to stop), so rows may differ in length.
- The prompt plus `max_new_tokens` must fit in the model's `block_size`; a longer request is
  refused (no silent cropping of the context). `fit` crops a chat prompt from the left.
- `seed` makes sampling reproducible through its own `torch.Generator`; with `seed=None` the
  global torch random state is used.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn import functional as F

MAX_BATCH = 64  # default rows through the model at once (config.max_batch in the stages)


class KVCache:
    """Keys and values of every layer for the positions seen so far, for a batch of rows that
    may be padded on the left (`pad[b]` padding tokens before row b's first real token).

    The model calls `update(layer, k, v)` in each attention layer: it stores the new keys and
    values [B, n_head, T, head_size] after the cached ones and returns all of them; after the
    last layer it calls `advance(T)`. `length` is how many positions are cached. `positions(T)`
    and `attention_mask(T)` tell the model where the next T tokens sit in each row.
    """

    def __init__(self, n_layer: int, max_length: int, pad: torch.Tensor | None = None):
        self.n_layer = n_layer
        self.max_length = max_length
        self.pad = pad if pad is not None and bool(pad.any()) else None  # [B] or None: no row is padded
        self.keys = None  # [n_layer, B, n_head, max_length, head_size], allocated at the first update
        self.values = None
        self.length = 0
        self._mask = None  # ((length, T), the attention mask of the current step); `keep` clears it

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys is None:
            # allocated on first use, so it takes the dtype the model computes in (bf16 under autocast)
            B, H, _, D = k.shape
            self.keys = k.new_empty(self.n_layer, B, H, self.max_length, D)
            self.values = v.new_empty(self.n_layer, B, H, self.max_length, D)
        end = self.length + k.size(2)
        if end > self.max_length:
            raise ValueError(f"KV cache is full: {end} positions needed, room for {self.max_length}")
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows (the others stopped): their cost ends here."""
        if self.keys is not None:
            self.keys, self.values = self.keys[:, rows], self.values[:, rows]
        if self.pad is not None:
            self.pad = self.pad[rows]
        self._mask = None

    def positions(self, T: int, device) -> torch.Tensor:
        """Position of each of the next T tokens: [T], or [B, T] when rows are padded (a row's
        first real token is at position 0; padding sits at 0 too, and is never attended to)."""
        pos = torch.arange(self.length, self.length + T, device=device)
        return pos if self.pad is None else (pos - self.pad.unsqueeze(1)).clamp(min=0)

    def attention_mask(self, T: int) -> torch.Tensor | None:
        """[B, 1, T, length + T] booleans (True: may attend) when rows are padded, else None.
        A query sees earlier real tokens and itself; a padding query sees only itself, so that
        no softmax row is empty."""
        if self.pad is None:
            return None
        if self._mask is not None and self._mask[0] == (self.length, T):
            return self._mask[1]  # every layer asks the same question within one step
        device = self.pad.device
        keys = torch.arange(self.length + T, device=device)
        queries = torch.arange(self.length, self.length + T, device=device)
        causal = keys[None, :] <= queries[:, None]  # [T, L]
        real = keys[None, :] >= self.pad[:, None]  # [B, L]
        itself = keys[None, :] == queries[:, None]
        mask = (causal[None] & (real[:, None, :] | itself[None])).unsqueeze(1)
        self._mask = ((self.length, T), mask)
        return mask


def sample_next(logits: torch.Tensor, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """Next-token logits [B, vocab] -> chosen token ids [B, 1]."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        # a token is dropped once the tokens above it already reach top_p (the best one always stays)
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


def check_sampling(temperature, top_k, top_p, max_new_tokens, num_samples, max_batch=MAX_BATCH) -> None:
    """Refuse sampling parameters out of range, saying what is allowed."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature!r} is not allowed; allowed: >= 0 (0 means greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is not allowed; allowed: an integer >= 1, or None (no top-k)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is not allowed; allowed: 0 < top_p <= 1, or None (no top-p)")
    for name, value in (("max_new_tokens", max_new_tokens), ("num_samples", num_samples), ("max_batch", max_batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is not allowed; allowed: an integer >= 1")


def check_prompt(prompt: list[int], max_new_tokens: int, config) -> None:
    if len(prompt) == 0:
        raise ValueError("the prompt is empty; give at least one token (e.g. <|endoftext|>, the document boundary)")
    bad = next((t for t in prompt if not 0 <= t < config.vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} is out of range; allowed: 0 to {config.vocab_size - 1}")
    if len(prompt) + max_new_tokens > config.block_size:
        raise ValueError(
            f"prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} = {len(prompt) + max_new_tokens} "
            f"exceeds the model's block_size={config.block_size}; the prompt plus the new tokens must fit in "
            f"block_size (shorten the prompt or ask for fewer tokens)"
        )


# --- 1. sampling ---------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    model,
    prompt,
    max_new_tokens: int,
    *,
    temperature=1.0,
    top_k=None,
    top_p=None,
    num_samples=1,
    stop_tokens=(),
    seed=None,
    on_token=None,
    use_cache=True,
    max_batch: int = MAX_BATCH,
) -> list[list[int]]:
    """Sample `num_samples` continuations of `prompt` (a list of token ids, or a list of such
    lists) and return the new tokens of each sample (see the module docstring for the rules)."""
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.tolist()
    one_prompt = len(prompt) == 0 or not isinstance(prompt[0], (list, tuple))
    prompts = [list(prompt)] if one_prompt else [list(p) for p in prompt]
    stop_tokens = {stop_tokens} if isinstance(stop_tokens, int) else set(stop_tokens)
    check_sampling(temperature, top_k, top_p, max_new_tokens, num_samples, max_batch)
    for p in prompts:
        check_prompt(p, max_new_tokens, model.config)
    device = next(model.parameters()).device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    rows = [p for p in prompts for _ in range(num_samples)]
    # rows of similar length share a batch (less padding); results come back in the caller's order
    order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
    out: list[list[int]] = [[] for _ in rows]
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        for part in chunks(len(order), max_batch):
            chunk = order[part]
            new = generate_batch(
                model,
                [rows[r] for r in chunk],
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                stop_tokens,
                generator,
                use_cache,
                None if on_token is None else (lambda i, t, chunk=chunk: on_token(chunk[i], t)),
            )
            for r, tokens in zip(chunk, new):
                out[r] = tokens
        return out
    finally:
        model.train(was_training)


def generate_batch(
    model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, generator, use_cache, on_token
) -> list[list[int]]:
    """One batch of rows, left-padded to the longest prompt; stopped rows leave the batch."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad = torch.tensor([width - len(p) for p in prompts], device=device)
    sequence = torch.tensor([[0] * (width - len(p)) + p for p in prompts], dtype=torch.long, device=device)
    cache = KVCache(model.config.n_layer, width + max_new_tokens, pad)
    active = torch.arange(len(prompts), device=device)  # which rows are still generating
    new_tokens: list[list[int]] = [[] for _ in prompts]
    stops = torch.tensor(sorted(stop_tokens), dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        if use_cache:  # feed what the cache has not seen: the whole prompt first (prefill), then one token
            hidden = model.hidden_states(sequence[:, cache.length :], kv_cache=cache)
        else:  # the slow way: the whole sequence again, through a cache that is thrown away
            hidden = model.hidden_states(sequence, kv_cache=KVCache(model.config.n_layer, sequence.size(1), cache.pad))
        logits = model.logits(hidden[:, -1, :])  # only the last position predicts the next token
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)
        for row, token in zip(active.tolist(), next_ids[:, 0].tolist()):
            new_tokens[row].append(token)
            if on_token is not None:
                on_token(row, token)
        sequence = torch.cat([sequence, next_ids], dim=1)
        stopped = torch.isin(next_ids[:, 0], stops)
        if bool(stopped.any()):
            keep = (~stopped).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            active, sequence = active[keep], sequence[keep]
            cache.keep(keep)
    return new_tokens


def fit(prompts: list[list[int]], max_new_tokens: int, block_size: int) -> tuple[list[list[int]], int]:
    """(prompts, new tokens) that fit in the context: the reply gets at most half of it, and a
    prompt too long for the rest keeps its last tokens (the question's end and the template)."""
    budget = max(1, min(max_new_tokens, block_size // 2))
    return [prompt[-(block_size - budget) :] for prompt in prompts], budget


# --- 2. scoring ----------------------------------------------------------------------------------


class Completions(NamedTuple):
    """Prompts and their completions as one right-padded batch (the model is causal: padding
    after a row changes nothing before it). Completion token j of row b is `targets[b, j]`,
    predicted at position `positions[b, j]` of `ids`; `mask` is 1 on real completion tokens."""

    ids: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [B, T], T = the longest completion
    targets: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] float

    def rows(self, index) -> Completions:
        """The same batch for some rows only (a slice or an index tensor): a micro-batch."""
        return Completions(*(t[index] for t in self))

    def at_positions(self, values: torch.Tensor) -> torch.Tensor:
        """Per-position values [B, L] or [B, L, C] -> those at the completion's positions [B, T(, C)]."""
        index = self.positions if values.dim() == 2 else self.positions.unsqueeze(-1).expand(-1, -1, values.size(-1))
        return values.gather(1, index)


def pack(prompts: list[list[int]], completions: list[list[int]], device="cpu", pad_id: int = 0) -> Completions:
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    T = max(1, max(len(c) for c in completions))
    ids = [p + c + [pad_id] * (length - len(p) - len(c)) for p, c in zip(prompts, completions)]
    # completion token j sits at position len(p) + j and is predicted from position len(p) + j - 1
    positions = [[min(len(p) - 1 + j, length - 1) for j in range(T)] for p in prompts]
    targets = [c + [pad_id] * (T - len(c)) for c in completions]
    mask = [[1.0] * len(c) + [0.0] * (T - len(c)) for c in completions]
    as_tensor = lambda rows, dtype=torch.long: torch.tensor(rows, dtype=dtype, device=device)  # noqa: E731
    return Completions(as_tensor(ids), as_tensor(positions), as_tensor(targets), as_tensor(mask, torch.float32))


def logprobs(model, batch: Completions, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability [B, T] of each completion token (0 on padding), in one forward pass that
    keeps gradients when they are on. Only the completion's positions go through the head and
    the softmax (a [B, T, vocab] tensor, not [B, L, vocab])."""
    hidden = batch.at_positions(model.hidden_states(batch.ids))
    logits = model.logits(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    logps = torch.log_softmax(logits, dim=-1).gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
    return logps * batch.mask


@torch.no_grad()
def score(
    model,
    prompts: list[list[int]] | Completions,
    completions: list[list[int]] | None = None,
    *,
    temperature: float = 1.0,
    max_batch: int = MAX_BATCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of many completions after their prompts (or of a batch `pack`
    made already), `max_batch` rows per forward pass. Returns (logps [N, T], mask [N, T]) with T
    the longest completion, on the model's device."""
    batch = prompts if isinstance(prompts, Completions) else pack(prompts, completions, next(model.parameters()).device)
    parts = chunks(batch.ids.size(0), max_batch)
    logps = torch.cat([logprobs(model, batch.rows(part), temperature).float() for part in parts])
    return logps, batch.mask


def chunks(n: int, size: int) -> list[slice]:
    """Slices of at most `size` rows covering range(n): the micro-batches."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# --- 3. replies ----------------------------------------------------------------------------------


class Reply(NamedTuple):
    text: str  # what the assistant said, without any special token
    ended: bool  # it closed its turn with <|im_end|>, and wrote no other special token before
    ids: list[int]  # the reply's tokens, up to (not including) where it was cut
    tokens: int  # tokens generated, the stop token included


def reply_stops(tokenizer) -> tuple[int, ...]:
    """Where an assistant's reply ends: its <|im_end|>, a document boundary, or a new turn."""
    return tuple(tokenizer.encode_special(t) for t in ("<|im_end|>", "<|endoftext|>", "<|im_start|>"))


def decode_reply(ids: list[int], tokenizer) -> Reply:
    """The assistant's generated ids -> Reply. The reply is cut at the first of `reply_stops`
    (a reply that opens a new turn is cut there); special tokens inside never reach the text."""
    end = tokenizer.encode_special("<|im_end|>")
    stops, special = set(reply_stops(tokenizer)), set(tokenizer.special_tokens.values())
    cut = next((i for i, t in enumerate(ids) if t in stops), None)
    body = ids if cut is None else ids[:cut]
    ended = cut is not None and ids[cut] == end and not special & set(body)
    text = tokenizer.decode([t for t in body if t not in special]).strip()
    return Reply(text, ended, body, len(ids) if cut is None else cut + 1)


def replies(
    model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, *, max_batch: int = MAX_BATCH, **sampling
) -> list[Reply]:
    """The assistant's replies to many conversations at once (greedy unless `sampling` says
    otherwise); a conversation too long for the context keeps its end."""
    from .chat import render_prompt

    prompts, budget = fit([render_prompt(m, tokenizer) for m in conversations], max_new_tokens, model.config.block_size)
    if not prompts:
        return []
    sampling.setdefault("temperature", 0.0)
    outputs = generate(model, prompts, budget, stop_tokens=reply_stops(tokenizer), max_batch=max_batch, **sampling)
    return [decode_reply(ids, tokenizer) for ids in outputs]


def sample_text(model, tokenizer, text, max_new_tokens: int = 64, *, stop_tokens=None, **sampling) -> list[str]:
    """Encode `text` (a string or a list of strings), generate, decode each sample.

    By default a sample stops at <|endoftext|> (the end of a document); the stop token is
    left out of the returned text. An empty text starts from <|endoftext|>: a new document.
    `sampling` takes `generate`'s keywords (temperature, top_k, top_p, num_samples, seed, ...).
    """
    eot = tokenizer.special_tokens.get("<|endoftext|>")
    if stop_tokens is None:
        stop_tokens = () if eot is None else (eot,)
    stop_tokens = {stop_tokens} if isinstance(stop_tokens, int) else set(stop_tokens)
    texts = [text] if isinstance(text, str) else list(text)
    prompts = [tokenizer.encode(t) or ([eot] if eot is not None else []) for t in texts]
    samples = generate(model, prompts, max_new_tokens, stop_tokens=stop_tokens, **sampling)
    return [tokenizer.decode(s[:-1] if s and s[-1] in stop_tokens else s) for s in samples]


def chat(model, tokenizer, messages: list[dict], max_new_tokens: int = 128, **sampling) -> str:
    """The assistant's reply to a conversation so far (greedy unless `sampling` says otherwise).

    The prompt is the conversation rendered with the chat template, ending with
    `<|im_start|>assistant<|im_sep|>`; generation stops at `<|im_end|>`. For several turns, append
    the reply and the next user message to `messages` and call again. When the conversation no
    longer fits the context, its oldest turns are left out (a system message is kept).
    """
    from .chat import ChatError, render_prompt

    block = model.config.block_size
    max_new_tokens = max(1, min(max_new_tokens, block // 2))
    messages = list(messages)
    prompt = render_prompt(messages, tokenizer)
    while len(prompt) + max_new_tokens > block and len(messages) > 1:
        keep_system = messages[0]["role"] == "system" and len(messages) > 2
        messages = messages[:1] + messages[2:] if keep_system else messages[1:]
        prompt = render_prompt(messages, tokenizer)
    if len(prompt) >= block:
        raise ChatError(
            f"the message is {len(prompt)} tokens with the template, more than the model's "
            f"block_size={block} leaves room for; write a shorter message"
        )
    max_new_tokens = min(max_new_tokens, block - len(prompt))  # a long last message leaves a shorter reply
    sampling.setdefault("temperature", 0.0)
    ids = generate(model, prompt, max_new_tokens, stop_tokens=reply_stops(tokenizer), **sampling)[0]
    return decode_reply(ids, tokenizer).text
