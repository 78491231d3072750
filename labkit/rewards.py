"""Rule-based rewards: a few lines of code score every reply, no learned model in the loop.

The lesson: when the answer can be checked (a sum, a count), the reward is a rule. DeepSeek-R1
used two kinds: *accuracy* (is the final answer right?) and *format* (is the answer where the
format says?). Each reward here is a plain callable `reward(completion, task) -> float`
(the completion is the reply's text, the task the dict of labkit/tasks.py); `REWARDS` maps each
name `grpo.rewards` may use (labkit/rules.py) to its function; `combine` adds them up with weights,
as TRL's `reward_weights` do.

A reward that raises, or returns something that is not a finite number, stops training with
`RewardError` naming the reward and showing the sample: a silent NaN would poison every
advantage of its group, and a silent 0 would teach the wrong thing.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable

from .errors import LabkitError
from .rules import REWARD_NAMES
from .rules import parse_weights as parse_weights  # grpo.rewards' weights, for the stage and notebook 06

ANSWER = re.compile(r"The answer is\s+(-?\d[\d,]*(?:\.\d+)?)")
FINAL = re.compile(r"(?:^|[\s.])The answer is\s+-?\d[\d,]*(?:\.\d+)?\.?$")


class RewardError(LabkitError):
    """A reward function failed (raised, or returned a non-number) on one sample."""


def normalize_number(text: str) -> str:
    """'1,234' -> '1234', '42.0' -> '42', '-7' -> '-7'."""
    text = text.replace(",", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value == int(value) else str(value)


def extract_answer(completion: str) -> str | None:
    """The number in the last 'The answer is N' of the reply, or None if there is none."""
    found = ANSWER.findall(completion)
    return normalize_number(found[-1]) if found else None


def correct(completion: str, task: dict) -> float:
    """1 if the final answer equals the task's answer, else 0."""
    answer = extract_answer(completion)
    return float(answer is not None and answer == normalize_number(str(task["answer"])))


def format_ok(completion: str, task: dict) -> float:
    """1 if the reply ends with exactly one 'The answer is N.' (the stated format), else 0."""
    text = completion.strip()
    return float(FINAL.search(text) is not None and len(ANSWER.findall(text)) == 1)


def close(completion: str, task: dict) -> float:
    """Partial credit for a number near the answer: 1 - |error| / |answer| (at least 0). A dense
    signal for a model that is never exactly right yet (a rule too, but a softer one)."""
    answer = extract_answer(completion)
    try:
        value, truth = float(answer), float(normalize_number(str(task["answer"])))
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, 1.0 - abs(value - truth) / max(1.0, abs(truth)))


def shows_work(completion: str, task: dict) -> float:
    """1 if some working (a calculation or a spelled-out word) comes before the final answer."""
    before = completion.split("The answer is")[0]
    return float(bool(re.search(r"\d\s*[+\-x*=]\s*\d|\w, \w", before)))


# the names live in labkit/rules.py, which checks grpo.rewards before any stage runs
REWARDS: dict[str, Callable[[str, dict], float]] = dict(
    zip(REWARD_NAMES, (correct, format_ok, close, shows_work), strict=True)
)


def check_value(value, name: str, completion: str, task: dict) -> float:
    if not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise RewardError(
            f"reward {name!r} returned {value!r} (allowed: a finite number) for task "
            f"{task.get('key', task.get('task'))!r} on the sample {completion!r}"
        )
    return float(value)


def combine(
    completions: list[str], tasks: list[dict], weights: dict[str, float], registry: dict | None = None
) -> tuple[list[float], dict[str, list[float]]]:
    """(weighted total per completion, {reward name: its values}), checking every value."""
    registry = REWARDS if registry is None else registry
    per_reward = {}
    for name in weights:
        fn = registry[name]
        values = []
        for completion, task in zip(completions, tasks):
            try:
                value = fn(completion, task)
            except Exception as error:
                raise RewardError(
                    f"reward {name!r} raised {type(error).__name__}: {error} for task "
                    f"{task.get('key', task.get('task'))!r} on the sample {completion!r}"
                ) from error
            values.append(check_value(value, name, completion, task))
        per_reward[name] = values
    totals = [sum(weights[n] * per_reward[n][i] for n in weights) for i in range(len(completions))]
    return totals, per_reward
