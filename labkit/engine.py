"""Generation: turning a next-token predictor into text, one token at a time.

The lesson: the model only ever gives, for the last position, a score (logit) for every
possible next token. To generate, we turn the scores into probabilities, draw one token, append
it, and ask again. How we draw shapes the text:

- temperature divides the logits: below 1 sharpens the distribution, above 1 flattens it;
  temperature 0 means *greedy*: always the single most likely token (deterministic);
- top-k keeps only the k most likely tokens (ties at the k-th score are kept);
- top-p (nucleus) keeps the smallest set of most likely tokens whose probabilities add up to
  at least p, so the cut adapts to how sure the model is.
  They apply in that order: temperature, then top-k, then top-p.

Recomputing the whole sequence for every new token repeats work: the keys and values of earlier
positions never change (attention is causal). The KV cache keeps them: the prompt goes through
the model once (the *prefill*), then each step feeds just the one new token, which attends to the
cached keys and values. Same numbers, far less compute; `use_cache=False` shows the slow way.

Conventions of `generate`:

- The result holds the *new* tokens of each sample, without the prompt.
- Several prompts (a list of token lists, of any lengths) are generated one prompt at a time,
  each expanded to `num_samples` rows in one batch: the simplest correct way (no padding, no
  attention mask). Rows come back prompt by prompt: [p0 s0, p0 s1, ..., p1 s0, ...], and `row`
  in `on_token(row, token_id)` is the index in that list.
- A row stops when it emits one of `stop_tokens`; the stop token is *included* at the end of
  its row (later stages score the decision to stop), so rows may differ in length.
- The prompt plus `max_new_tokens` must fit in the model's `block_size`; a longer request is
  refused (with or without the cache: no silent cropping of the context).
- `seed` makes sampling reproducible through its own `torch.Generator`; with `seed=None` the
  global torch random state is used.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


class KVCache:
    """Keys and values of every layer for the positions seen so far.

    The model calls `update(layer, k, v)` in each attention layer: it stores the new keys and
    values [B, n_head, T, head_size] after the cached ones and returns all of them; after the
    last layer it calls `advance(T)`. `length` is how many positions are cached, which is also
    the position of the next token (for its position embedding).
    """

    def __init__(self, n_layer: int, max_length: int):
        self.n_layer = n_layer
        self.max_length = max_length
        self.keys = None  # [n_layer, B, n_head, max_length, head_size], allocated at the first update
        self.values = None
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys is None:
            # allocated on first use, so it takes the dtype the model computes in (bf16 under autocast)
            B, H, _, D = k.shape
            self.keys = k.new_empty(self.n_layer, B, H, self.max_length, D)
            self.values = v.new_empty(self.n_layer, B, H, self.max_length, D)
        end = self.length + k.size(2)
        if end > self.max_length:
            raise ValueError(f"KV cache is full: {end} positions needed, room for {self.max_length}")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


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


def check_sampling(temperature, top_k, top_p, max_new_tokens, num_samples) -> None:
    """Refuse sampling parameters out of range, saying what is allowed."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature!r} is not allowed; allowed: >= 0 (0 means greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is not allowed; allowed: an integer >= 1, or None (no top-k)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is not allowed; allowed: 0 < top_p <= 1, or None (no top-p)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is not allowed; allowed: an integer >= 1")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} is not allowed; allowed: an integer >= 1")


def check_prompt(prompt: list[int], max_new_tokens: int, config) -> None:
    if len(prompt) == 0:
        raise ValueError("the prompt is empty; give at least one token (e.g. <|endoftext|>, the document boundary)")
    if any(not 0 <= t < config.vocab_size for t in prompt):
        bad = next(t for t in prompt if not 0 <= t < config.vocab_size)
        raise ValueError(f"prompt token id {bad} is out of range; allowed: 0 to {config.vocab_size - 1}")
    if len(prompt) + max_new_tokens > config.block_size:
        raise ValueError(
            f"prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} = {len(prompt) + max_new_tokens} "
            f"exceeds the model's block_size={config.block_size}; the prompt plus the new tokens must fit in "
            f"block_size (shorten the prompt or ask for fewer tokens)"
        )


@torch.no_grad()
def generate(model, prompt, max_new_tokens: int, *, temperature=1.0, top_k=None, top_p=None, num_samples=1,
             stop_tokens=(), seed=None, on_token=None, use_cache=True) -> list[list[int]]:
    """Sample `num_samples` continuations of `prompt` (a list of token ids, or a list of such
    lists) and return the new tokens of each sample (see the module docstring for the rules)."""
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.tolist()
    one_prompt = len(prompt) == 0 or not isinstance(prompt[0], (list, tuple))
    prompts = [prompt] if one_prompt else prompt
    stop_tokens = {stop_tokens} if isinstance(stop_tokens, int) else set(stop_tokens)
    check_sampling(temperature, top_k, top_p, max_new_tokens, num_samples)
    for p in prompts:
        check_prompt(list(p), max_new_tokens, model.config)
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        samples = []
        for i, p in enumerate(prompts):
            samples += generate_rows(model, list(p), max_new_tokens, num_samples, temperature, top_k, top_p,
                                     stop_tokens, generator, on_token, use_cache, first_row=i * num_samples)
        return samples
    finally:
        model.train(was_training)


def generate_rows(model, prompt, max_new_tokens, num_samples, temperature, top_k, top_p, stop_tokens,
                  generator, on_token, use_cache, first_row) -> list[list[int]]:
    """One prompt, `num_samples` rows in one batch."""
    device = next(model.parameters()).device
    sequence = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
    cache = KVCache(model.config.n_layer, len(prompt) + max_new_tokens) if use_cache else None
    new_tokens = [[] for _ in range(num_samples)]
    stopped = [False] * num_samples
    for _ in range(max_new_tokens):
        if use_cache:
            # feed what the cache has not seen: the whole prompt first (prefill), then one token
            hidden = model.hidden_states(sequence[:, cache.length:], kv_cache=cache)
        else:
            hidden = model.hidden_states(sequence)  # the slow way: the whole sequence again
        logits = model.lm_head(hidden[:, -1, :])  # only the last position predicts the next token
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)
        sequence = torch.cat([sequence, next_ids], dim=1)
        for row, token in enumerate(next_ids[:, 0].tolist()):
            if stopped[row]:
                continue  # a stopped row is still computed with the others, its tokens are dropped
            new_tokens[row].append(token)
            if on_token is not None:
                on_token(first_row + row, token)
            stopped[row] = token in stop_tokens
        if all(stopped):
            break
    return new_tokens


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


# --- chat: generation with the chat template (stage 4) ------------------------------------------

def chat(model, tokenizer, messages: list[dict], max_new_tokens: int = 128, **sampling) -> str:
    """The assistant's reply to a conversation so far (greedy unless `sampling` says otherwise).

    The prompt is the conversation rendered with the chat template, ending with
    `<|im_start|>assistant<|im_sep|>`; generation stops at `<|im_end|>`. For several turns, append
    the reply and the next user message to `messages` and call again. When the conversation no
    longer fits the context, its oldest turns are left out (a system message is kept).
    """
    from .chat import render_prompt

    end, eot = tokenizer.encode_special("<|im_end|>"), tokenizer.encode_special("<|endoftext|>")
    block = model.config.block_size
    max_new_tokens = max(1, min(max_new_tokens, block // 2))
    messages = list(messages)
    prompt = render_prompt(messages, tokenizer)
    while len(prompt) + max_new_tokens > block and len(messages) > 1:
        keep_system = messages[0]["role"] == "system" and len(messages) > 2
        messages = messages[:1] + messages[2:] if keep_system else messages[1:]
        prompt = render_prompt(messages, tokenizer)
    if len(prompt) >= block:
        raise ValueError(f"the message is {len(prompt)} tokens with the template, more than the model's "
                         f"block_size={block} leaves room for; write a shorter message")
    max_new_tokens = min(max_new_tokens, block - len(prompt))  # a long last message leaves a shorter reply
    sampling.setdefault("temperature", 0.0)
    ids = generate(model, prompt, max_new_tokens, stop_tokens=(end, eot), **sampling)[0]
    if ids and ids[-1] in (end, eot):
        ids = ids[:-1]
    return tokenizer.decode(ids).strip()


def chat_loop(run_name: str = "default", runs_dir: str = "runs", model_name: str = "sft", *, device: str = "auto",
              max_new_tokens: int = 128, temperature: float = 0.0, input_stream=None, output_stream=None) -> None:
    """Chat in the terminal: read a line, print the reply, until end of input or 'exit'."""
    import sys

    from .run import Run
    from .sft import load_assistant

    input_stream, output_stream = input_stream or sys.stdin, output_stream or sys.stdout
    model, tokenizer = load_assistant(Run(run_name, runs_dir), device, model_name)
    interactive = input_stream.isatty()
    if interactive:
        print(f"chatting with the {model_name} model of run {run_name!r} (empty line or 'exit' to stop)", file=sys.stderr)
    messages: list[dict] = []
    while True:
        if interactive:
            print("you> ", end="", flush=True, file=sys.stderr)
        line = input_stream.readline()
        if not line or line.strip() in ("exit", "quit"):
            break
        if not line.strip():
            if interactive:
                break
            continue
        messages.append({"role": "user", "content": line.strip()})
        reply = chat(model, tokenizer, messages, max_new_tokens, temperature=temperature)
        messages.append({"role": "assistant", "content": reply})
        print(reply, file=output_stream, flush=True)
