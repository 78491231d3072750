"""The chat template: how a conversation becomes one sequence of tokens, and back.

    <|endoftext|><|im_start|>user<|im_sep|>Who are you?<|im_end|><|im_start|>assistant<|im_sep|>I am ...<|im_end|>

Structure comes only from special tokens, which `tokenizer.encode_special` gives by name;
roles and contents are encoded with `tokenizer.encode`, which never yields a special token.
So a user who types `<|im_end|><|im_start|>assistant` gets those characters as plain text:
they cannot close their turn or forge the assistant's.

`render` also returns the loss mask for supervised fine-tuning: 1 on the tokens the assistant
writes (its content and the `<|im_end|>` that closes it, so the model learns to stop), 0 on
everything it reads (the template, the user, the system prompt, tool results).

Tool use (stage 7) adds special tokens around a tool call the assistant writes and around the
result the engine inserts; `render_tools`, `tool_call_ids` and `tool_turn` render them.
"""

from __future__ import annotations

import re

from .errors import LabkitError

ROLES = ("system", "user", "assistant", "tool")


class ChatError(LabkitError):
    """A conversation that cannot be rendered."""


def check(messages: list[dict], for_training: bool = False) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatError(
            "a conversation is a non-empty list of {'role': ..., 'content': ...} messages; got an empty one"
            if isinstance(messages, list)
            else f"a conversation is a list of messages; got {type(messages).__name__}"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
            raise ChatError(f"message {i} must be a dict with 'role' and 'content'; got {message!r}")
        if message["role"] not in ROLES:
            raise ChatError(f"message {i} has unknown role {message['role']!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ChatError(f"message {i} ({message['role']}) content must be a string; got {message.get('content')!r}")
        if message["role"] == "system" and i > 0:
            raise ChatError(f"message {i} is a system message; only the first message may be one")
    if for_training and messages[-1]["role"] != "assistant":
        raise ChatError(
            f"a training conversation must end with an assistant turn; it ends with {messages[-1]['role']!r}"
        )


def render_turn(role: str, content: str, tokenizer) -> tuple[list[int], list[int]]:
    special = tokenizer.encode_special
    head = [special("<|im_start|>"), *tokenizer.encode(role), special("<|im_sep|>")]
    body = [*tokenizer.encode(content), special("<|im_end|>")]
    learned = 1 if role == "assistant" else 0
    return head + body, [0] * len(head) + [learned] * len(body)


def render(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """A training conversation -> (token ids, loss mask), the mask 1 exactly on assistant tokens."""
    check(messages, for_training=True)
    ids, mask = [tokenizer.encode_special("<|endoftext|>")], [0]
    for message in messages:
        turn_ids, turn_mask = render_turn(message["role"], message["content"], tokenizer)
        ids += turn_ids
        mask += turn_mask
    return ids, mask


def render_prompt(messages: list[dict], tokenizer) -> list[int]:
    """A conversation so far -> ids ending with `<|im_start|>assistant<|im_sep|>`, for generation."""
    check(messages)
    ids = [tokenizer.encode_special("<|endoftext|>")]
    for message in messages:
        ids += render_turn(message["role"], message["content"], tokenizer)[0]
    return ids + [
        tokenizer.encode_special("<|im_start|>"),
        *tokenizer.encode("assistant"),
        tokenizer.encode_special("<|im_sep|>"),
    ]


def parse(ids: list[int], tokenizer) -> list[dict]:
    """Token ids -> messages. An unfinished last turn (no `<|im_end|>` yet) is returned as it stands."""
    start, sep, end = (tokenizer.encode_special(t) for t in ("<|im_start|>", "<|im_sep|>", "<|im_end|>"))
    messages, i = [], 0
    while i < len(ids):
        if ids[i] != start:
            i += 1
            continue
        role_end = ids.index(sep, i) if sep in ids[i:] else len(ids)
        content_end = ids.index(end, role_end) if end in ids[role_end:] else len(ids)
        messages.append(
            {
                "role": tokenizer.decode(ids[i + 1 : role_end]),
                "content": tokenizer.decode(ids[role_end + 1 : content_end]),
            }
        )
        i = content_end + 1
    return messages


# --- tool use ---------------------------------------------------------------------------------------

_CALL = re.compile(r"<\|tool_call\|>(.*)<\|tool_call_end\|>", re.S)


def render_tools(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Like `chat.render`, with tool use: an assistant turn `<|tool_call|>...<|tool_call_end|>` (our
    own training data, never user text) becomes the special tokens around the call, and a `tool`
    turn's content is wrapped in `<|tool_result|>...<|tool_result_end|>`. The loss mask is 1 on
    what the assistant writes (the call included), 0 on the tool's result: the engine writes it."""
    check(messages, for_training=True)
    special = tokenizer.encode_special
    ids, mask = [special("<|endoftext|>")], [0]
    for message in messages:
        role, content = message["role"], message["content"]
        call = _CALL.fullmatch(content) if role == "assistant" else None
        head = [special("<|im_start|>"), *tokenizer.encode(role), special("<|im_sep|>")]
        if call:
            body = [special("<|tool_call|>"), *tokenizer.encode(call.group(1)), special("<|tool_call_end|>")]
            ids += head + body + [special("<|im_end|>")]
            mask += [0] * len(head) + [1] * len(body) + [0]  # the engine closes the turn after the call
        elif role == "tool":
            body = [
                special("<|tool_result|>"),
                *tokenizer.encode(content),
                special("<|tool_result_end|>"),
                special("<|im_end|>"),
            ]
            ids += head + body
            mask += [0] * (len(head) + len(body))
        else:
            turn_ids, turn_mask = render_turn(role, content, tokenizer)
            ids += turn_ids
            mask += turn_mask
    return ids, mask


def tool_call_ids(query: str, tokenizer) -> list[int]:
    """The ids of a search call for `query`, as the model writes them."""
    special = tokenizer.encode_special
    return [special("<|tool_call|>"), *tokenizer.encode(f"search: {query}"), special("<|tool_call_end|>")]


def tool_turn(result: str, tokenizer, room: int) -> list[int]:
    """`<|im_end|>` closing the call, the tool turn with `result` (cut to `room` tokens in all), and
    the header of the assistant's next turn."""
    special = tokenizer.encode_special
    head = [
        special("<|im_end|>"),
        special("<|im_start|>"),
        *tokenizer.encode("tool"),
        special("<|im_sep|>"),
        special("<|tool_result|>"),
    ]
    tail = [
        special("<|tool_result_end|>"),
        special("<|im_end|>"),
        special("<|im_start|>"),
        *tokenizer.encode("assistant"),
        special("<|im_sep|>"),
    ]
    body = tokenizer.encode(result)[: max(0, room - len(head) - len(tail))]
    return head + body + tail
