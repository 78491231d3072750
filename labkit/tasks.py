"""Verifiable tasks: problems whose answer a rule can check, for reinforcement learning.

The lesson: to reinforce reasoning we need a score for every attempt, and for some problems
no human has to give it. A sum, a product, a word problem, the number of r's in "strawberry":
the generator that writes the problem knows the answer, so a few lines of code (labkit/rewards.py)
judge any reply. No labels, no learned reward model.

Every prompt asks for the steps and then a final answer in one fixed, stated format, the one
the assistant learned in SFT: the last sentence is `The answer is N.` A task is a dict:

    {"task": "addition", "key": "addition:23+45", "prompt": "What is 23 plus 45? ...",
     "answer": "68", "solution": "Add the tens: ... The answer is 68."}

`solution` is a worked answer in the expected format (what a perfect reply looks like).

Held-out problems: each problem's `key` is hashed, and a fixed share of keys is kept for
evaluation only; training draws only the others, so pass@1 is measured on problems the policy
never practised. Real data is one parameter away: `load_gsm8k(source)` reads GSM8K's format
(`question`, `answer` ending in `#### N`) from a Hugging Face dataset or a local file.
"""

from __future__ import annotations

import random
import re

from .errors import ConfigError
from .rules import TASK_NAMES
from .rules import parse_tasks as parse_tasks  # grpo.tasks' names, for the stage and notebook 06
from .run import in_share

FORMAT = "The answer is N."
INSTRUCTION = "Show your steps, then end with: The answer is N."
HELDOUT_SHARE = 0.2

ADDITION = ["What is {a} plus {b}?", "Add {a} and {b}.", "What is the sum of {a} and {b}?"]
MULTIPLICATION = ["What is {a} times {m}?", "Multiply {a} by {m}.", "What is the product of {a} and {m}?"]
LARGER = ["Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?", "What is the larger of {a} and {b}?"]
STORIES = [
    ("{name} had {a} books and bought {b} more. How many books does {first} have now?", "books"),
    ("{name} walked {a} km on Monday and {b} km on Tuesday. How many km is that in all?", "km"),
    ("{company} had {a} workers and hired {b} more. How many workers does it have now?", "workers"),
    ("{company} sold {a} machines in May and {b} in June. How many machines did it sell?", "machines"),
]
WORDS = [
    "strawberry",
    "banana",
    "apple",
    "letter",
    "coffee",
    "balloon",
    "bottle",
    "cherry",
    "pepper",
    "mirror",
    "garden",
    "little",
    "summer",
    "rabbit",
    "butter",
    "kitten",
    "pizza",
    "hello",
    "tomato",
    "puppy",
    "river",
    "paper",
    "sister",
    "teacher",
    "window",
    "yellow",
    "orange",
    "doctor",
    "happy",
    "dinner",
    "cookie",
    "carrot",
    "bubble",
    "planet",
    "street",
    "grass",
    "tree",
    "moon",
    "school",
    "button",
]
FALLBACK_PEOPLE = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Emmy Noether"]
FALLBACK_COMPANIES = ["Acme Shipping", "Globex Software", "Initech Energy"]


def is_heldout(key: str) -> bool:
    """A stable share of problem keys is kept for evaluation (the same for every seed)."""
    return in_share(key, HELDOUT_SHARE)


def ask(question: str) -> str:
    return f"{question} {INSTRUCTION}"


def add_steps(a: int, b: int) -> str:
    """Two-digit addition by place value, the way the mini-web's worksheets write it."""
    a_tens, b_tens, a_ones, b_ones = a // 10 * 10, b // 10 * 10, a % 10, b % 10
    tens, ones = a_tens + b_tens, a_ones + b_ones
    return (
        f"Add the tens: {a_tens} + {b_tens} = {tens}. Add the ones: {a_ones} + {b_ones} = {ones}. "
        f"Together: {tens} + {ones} = {a + b}."
    )


# --- generators: one problem each ------------------------------------------------------------------


def one_digit(rng: random.Random, world=None) -> dict:
    """The easiest sums (one-digit numbers): a tiny model gets some right, which gives RL a start."""
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return dict(
        task="one_digit",
        key=f"one_digit:{a}+{b}",
        prompt=ask(rng.choice(ADDITION).format(a=a, b=b)),
        answer=str(a + b),
        solution=f"{a} + {b} = {a + b}. The answer is {a + b}.",
    )


def addition(rng: random.Random, world=None) -> dict:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return dict(
        task="addition",
        key=f"addition:{a}+{b}",
        prompt=ask(rng.choice(ADDITION).format(a=a, b=b)),
        answer=str(a + b),
        solution=f"{add_steps(a, b)} The answer is {a + b}.",
    )


def multiplication(rng: random.Random, world=None) -> dict:
    a, m = rng.randint(10, 99), rng.randint(2, 9)
    a_tens, a_ones = a // 10 * 10, a % 10
    steps = (
        f"Split {a} into {a_tens} and {a_ones}. {a_tens} times {m} is {a_tens * m}, and {a_ones} times {m} "
        f"is {a_ones * m}. Together: {a_tens * m} + {a_ones * m} = {a * m}."
    )
    return dict(
        task="multiplication",
        key=f"multiplication:{a}*{m}",
        prompt=ask(rng.choice(MULTIPLICATION).format(a=a, m=m)),
        answer=str(a * m),
        solution=f"{steps} The answer is {a * m}.",
    )


def word_problem(rng: random.Random, world=None) -> dict:
    """An addition told as a story about one of the world's people or companies: first find the
    sum in the words, then do it."""
    people = [p.name for p in world.people] if world is not None else FALLBACK_PEOPLE
    companies = sorted({p.employer for p in world.people}) if world is not None else FALLBACK_COMPANIES
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    story, unit = rng.choice(STORIES)
    name = rng.choice(people)
    question = story.format(name=name, first=name.split()[0], company=rng.choice(companies), a=a, b=b)
    return dict(
        task="word_problem",
        key=f"word_problem:{a}+{b}",
        prompt=ask(question),
        answer=str(a + b),
        solution=f"{a} {unit} and {b} {unit}: {a} + {b}. {add_steps(a, b)} The answer is {a + b}.",
    )


def larger(rng: random.Random, world=None) -> dict:
    """Which of two numbers is larger: compare the tens, then the ones."""
    a, b = rng.sample(range(10, 100), 2)
    big = max(a, b)
    if a // 10 != b // 10:
        steps = f"{a} has {a // 10} tens and {b} has {b // 10} tens, so {big} is larger."
    else:
        steps = f"Both have {a // 10} tens; {a} has {a % 10} ones and {b} has {b % 10} ones, so {big} is larger."
    return dict(
        task="larger",
        key=f"larger:{a},{b}",
        prompt=ask(rng.choice(LARGER).format(a=a, b=b)),
        answer=str(big),
        solution=f"{steps} The answer is {big}.",
    )


def count_letter(rng: random.Random, world=None) -> dict:
    """How many times a letter appears in a word. Hard for a language model: it sees tokens, not
    letters, so it must spell the word out first (the tokenizer notebook's "strawberry")."""
    word = rng.choice(WORDS)
    letter = rng.choice(word) if rng.random() < 0.85 else rng.choice([c for c in "bdfgklmnpstwz" if c not in word])
    n = word.count(letter)
    steps = f"Spell it: {', '.join(word)}. The letter {letter} is there {n} times."
    return dict(
        task="count_letter",
        key=f"count_letter:{letter}@{word}",
        prompt=ask(f"How many times does the letter {letter} appear in the word {word}?"),
        answer=str(n),
        solution=f"{steps} The answer is {n}.",
    )


# the names live in labkit/rules.py, which checks grpo.tasks before any stage runs (it parses them, too)
TASKS = dict(zip(TASK_NAMES, (one_digit, addition, multiplication, word_problem, larger, count_letter), strict=True))


def draw(name: str, rng: random.Random, world=None, heldout: bool = False, tries: int = 1000) -> dict:
    """A random problem of task `name` from the training split (or the held-out one)."""
    for _ in range(tries):
        task = TASKS[name](rng, world)
        if is_heldout(task["key"]) == heldout:
            return task
    raise RuntimeError(f"no {'held-out' if heldout else 'training'} problem of task {name!r} in {tries} draws")


def heldout_problems(names: list[str], n_per_task: int, seed: int, world=None) -> list[dict]:
    """`n_per_task` distinct held-out problems of each task (fewer if the task has fewer)."""
    rng = random.Random(f"{seed}-grpo-heldout")
    out = []
    for name in names:
        seen: dict[str, dict] = {}
        for _ in range(50 * n_per_task):
            if len(seen) == n_per_task:
                break
            task = draw(name, rng, world, heldout=True)
            seen.setdefault(task["key"], task)
        out += list(seen.values())
    return out


class TaskStream:
    """Training problems forever: each draw picks a task at random, then a training-split problem.
    Its position (the generator's state) can be saved and restored."""

    def __init__(self, names: list[str], seed: int, world=None, pool: list[dict] | None = None, purpose: str = "train"):
        self.names, self.seed, self.world, self.pool = names, seed, world, pool
        self.rng = random.Random(f"{seed}-grpo-{purpose}")

    def fork(self, purpose: str) -> TaskStream:
        """Another stream over the same training problems, in its own random order."""
        return TaskStream(self.names, self.seed, self.world, self.pool, purpose)

    def next(self, n: int) -> list[dict]:
        if self.pool is not None:
            return [self.rng.choice(self.pool) for _ in range(n)]
        return [draw(self.rng.choice(self.names), self.rng, self.world) for _ in range(n)]

    def state_dict(self):
        return self.rng.getstate()

    def load_state_dict(self, state) -> None:
        self.rng.setstate(state)


# --- real data: GSM8K's format ---------------------------------------------------------------------


def gsm8k_answer(answer: str) -> str:
    """GSM8K's final answer: the number after '####', without thousands separators."""
    if "####" not in answer:
        raise ValueError(f"a GSM8K answer ends with '#### N'; this one has no '####': {answer[-80:]!r}")
    return answer.split("####")[-1].strip().replace(",", "")


def load_gsm8k(source: str, max_rows: int = 0, split: str = "train", config: str = "main") -> list[dict]:
    """Tasks from GSM8K's format (`question`, `answer` ending in `#### N`), streamed: a local
    .jsonl/.json/.parquet file or a Hugging Face dataset name (e.g. 'openai/gsm8k', config 'main')."""
    from .data import open_dataset

    data = open_dataset(source, "grpo.source", split, config, streaming=True)
    tasks = []
    for i, row in enumerate(data):
        if max_rows and i >= max_rows:
            break
        missing = {"question", "answer"} - set(row)
        if missing:
            raise ConfigError(
                f"grpo.source={source!r} lacks column(s) {', '.join(sorted(missing))}; GSM8K's format has "
                f"'question' and 'answer' (ending in '#### N'); its columns: {', '.join(row)}"
            )
        try:
            answer = gsm8k_answer(row["answer"])
        except ValueError as error:
            raise ConfigError(f"grpo.source={source!r}, row {i}: {error}") from None
        steps = re.sub(r"<<[^>]*>>", "", row["answer"].split("####")[0]).strip()  # drop the calculator annotations
        tasks.append(
            dict(
                task="gsm8k",
                key=f"gsm8k:{i}",
                prompt=ask(row["question"].strip()),
                answer=answer,
                solution=f"{steps} The answer is {answer}.",
            )
        )
    if not tasks:
        raise ConfigError(f"grpo.source={source!r} holds no problems")
    return tasks
