"""A person ranking answers: what the ranking widget shows and what each of its controls does.

The widget (`widgets.RankingWidget`) only draws this state. A session offers, one at a time,
every prompt no person has ranked (the simulated labeler's rankings are defaults, shown as a
hint, never a wall); a person clicks the answers best first or types their letters ("BAC"),
skips a prompt, or undoes: the last click, else their last stored ranking, also one made before
a kernel restart, because the history is read from rankings.jsonl, never kept in memory alone.
"""

from __future__ import annotations

from .preferences import HUMAN, RankingError, Rankings

LETTERS = "ABCDEFGHIJKLMNOP"  # how a person names the K answers of a prompt


def order_letters(order: list[int]) -> str:
    return " > ".join(LETTERS[i] for i in order)


def parse_order(text: str, k: int) -> list[int]:
    """A ranking typed as letters, best first ("BAC", "b > a > c") -> completion numbers. A
    ValueError says what is wrong (a letter that names no answer, a letter twice or missing)
    and what is allowed."""
    allowed, typed = LETTERS[:k], [c for c in text.upper() if c not in " ,>"]
    unknown = sorted({c for c in typed if c not in allowed})
    twice = sorted({c for c in typed if typed.count(c) > 1})
    missing = [c for c in allowed if c not in typed]
    if unknown or twice or missing:
        problem = (
            f"{', '.join(unknown)} names no answer"
            if unknown
            else f"{', '.join(twice)} comes more than once"
            if twice
            else f"{', '.join(missing)} is missing"
        )
        raise ValueError(f"{problem}; type each of {', '.join(allowed)} once, best first, e.g. {allowed[::-1]}")
    return [LETTERS.index(c) for c in typed]


class RankingSession:
    """The prompt on show, the answers clicked so far, and the message after the last action
    (`error` True when the action was refused). Every action returns nothing and says what happened."""

    def __init__(self, rankings: Rankings):
        self.rankings, self.pid, self.clicked = rankings, rankings.next_to_rank(), []
        self.message, self.error = "", False

    def say(self, text: str, error: bool = False) -> None:
        self.message, self.error = text, error

    @property
    def k(self) -> int:
        return len(self.rankings.prompts[self.pid]["completions"]) if self.pid else 0

    def counts(self) -> str:
        store = self.rankings
        return f"{store.count()} of {len(store.order)} prompts ranked, {store.count(HUMAN)} by a person"

    def hint(self) -> str:
        """Where the prompt on show stands: ranked by the simulated labeler (its order), or by nobody."""
        simulated = self.rankings.simulated.get(self.pid)
        if simulated is None:
            return "nobody has ranked it yet"
        return f"the simulated labeler ranked it {order_letters(simulated['order'])}: a default, which yours replaces"

    def left(self) -> int:
        return sum(1 for pid in self.rankings.order if pid not in self.rankings.by_person)

    def store(self, order: list[int]) -> None:
        pid = self.pid
        try:
            self.rankings.add(pid, order, by=HUMAN)
        except RankingError as error:
            return self.say(str(error), error=True)
        self.pid, self.clicked = self.rankings.next_to_rank(after=pid), []
        self.say(f"stored: prompt {pid} ranked {order_letters(order)}")

    def click(self, i: int) -> None:
        """Answer `i` is the next best; once one answer is left, it is the worst and the ranking is stored."""
        if self.pid is None or i in self.clicked:
            return
        self.clicked.append(i)
        if len(self.clicked) == self.k - 1:
            self.clicked.append(next(j for j in range(self.k) if j not in self.clicked))
        if len(self.clicked) == self.k:
            self.store(self.clicked)
        else:
            self.say(f"{order_letters(self.clicked)} > ...")

    def type_letters(self, text: str) -> bool:
        """Store a ranking typed as letters (True when stored); if the text is not one, say what is allowed."""
        if self.pid is None:
            self.say("there is no prompt left to rank: undo takes back your last ranking", error=True)
            return False
        try:
            order = parse_order(text, self.k)
        except ValueError as why:
            self.say(f'"{text.strip()}" is not a ranking of this prompt: {why}', error=True)
            return False
        self.clicked = []
        self.store(order)
        return not self.error

    def skip(self) -> None:
        if self.pid is None:
            return self.say("nothing to skip: you have ranked every prompt", error=True)
        skipped, self.pid, self.clicked = self.pid, self.rankings.next_to_rank(after=self.pid), []
        if self.pid == skipped:
            return self.say("this is the only prompt no person has ranked", error=True)
        self.say(f"skipped prompt {skipped}: it comes back after the others")

    def undo(self) -> None:
        if self.clicked:
            self.clicked.pop()
            return self.say("took back the last click")
        if not self.rankings.person_history:
            return self.say("nothing to undo: no prompt of this run has a ranking by a person", error=True)
        record = self.rankings.undo()
        self.pid = record["id"]
        self.say(
            f"took back your ranking of prompt {self.pid} ({order_letters(record['order'])}): rank it again or skip"
        )

    def refresh(self) -> None:
        """Read rankings.jsonl afresh (a stage build adds the simulated labeler's rankings)."""
        self.rankings.reload()
        if self.pid is None or self.pid in self.rankings.by_person:
            self.pid, self.clicked = self.rankings.next_to_rank(after=self.pid), []
