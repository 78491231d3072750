"""The mini-web's world: people, cities, countries, companies and universities, from a seed.

Every fact the lab later asks a model about lives here, so every answer can be judged.
Names are invented (syllable by syllable) so that a model cannot know them from anywhere
but the mini-web. How many pages each person gets is drawn from a heavy-tailed (log-normal)
spread: a few people on dozens of pages, many on one or two, some on none.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from functools import cached_property
from statistics import NormalDist

FIRST_NAMES = [
    "Ada",
    "Alan",
    "Amara",
    "Anton",
    "Bea",
    "Bruno",
    "Carla",
    "Cyrus",
    "Dara",
    "Dmitri",
    "Edith",
    "Elio",
    "Farah",
    "Felix",
    "Greta",
    "Hugo",
    "Ines",
    "Ivan",
    "Jana",
    "Joel",
    "Kira",
    "Lars",
    "Lena",
    "Luca",
    "Maya",
    "Milo",
    "Nadia",
    "Nils",
    "Olga",
    "Omar",
    "Petra",
    "Pablo",
    "Quinn",
    "Rosa",
    "Rafael",
    "Sana",
    "Soren",
    "Tara",
    "Tomas",
    "Uma",
    "Viktor",
    "Vera",
    "Wren",
    "Xavier",
    "Yara",
    "Yusuf",
    "Zofia",
    "Zane",
]
FIELDS = [
    "physics",
    "chemistry",
    "botany",
    "linguistics",
    "economics",
    "history",
    "mathematics",
    "medicine",
    "architecture",
    "geology",
    "astronomy",
    "music",
    "philosophy",
    "zoology",
    "sculpture",
    "engineering",
]
INDUSTRIES = ["shipping", "software", "textiles", "banking", "pharmaceuticals", "robotics", "publishing", "energy"]
FACTS = ("birth_year", "birth_city", "university", "field", "employer")
_ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s"]


@dataclass
class Person:
    name: str
    birth_year: int
    birth_city: str
    university: str
    field: str
    employer: str
    n_pages: int = 0

    def fact(self, name: str) -> str:
        return str(getattr(self, name))


@dataclass
class World:
    seed: int
    countries: list[str]
    cities: dict[str, str]  # city -> country
    companies: dict[str, dict]  # company -> {"city", "industry"}
    universities: dict[str, str]  # university -> city
    people: list[Person]

    def person(self, name: str) -> Person:
        if name not in self._by_name:
            raise KeyError(f"no person named {name!r} in the world")
        return self._by_name[name]

    @cached_property
    def _by_name(self) -> dict[str, Person]:  # the world is made once and never changed: look names up in O(1)
        return {p.name: p for p in self.people}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> World:
        return cls(**{**d, "people": [Person(**p) for p in d["people"]]})


def made_up_word(rng: random.Random, syllables: int) -> str:
    return "".join(
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
    ).capitalize()


def _unique_words(rng: random.Random, n: int, syllables: tuple[int, int], suffixes=("",)) -> list[str]:
    words: list[str] = []
    while len(words) < n:
        w = made_up_word(rng, rng.randint(*syllables)) + rng.choice(suffixes)
        if w not in words and len(w) <= 12:
            words.append(w)
    return words


def pages_per_person(n_people: int, median: float, spread: float, unseen_fraction: float, cap: int, rng) -> list[int]:
    """Log-normal page counts, taken at evenly spaced quantiles so that small worlds still
    cover the whole spread; the first `unseen_fraction` get no page. Shuffled over people."""
    n_unseen = round(n_people * unseen_fraction)
    n_seen = n_people - n_unseen
    normal = NormalDist()
    counts = [0] * n_unseen + [
        min(cap, max(1, round(median * math.exp(spread * normal.inv_cdf((i + 0.5) / n_seen))))) for i in range(n_seen)
    ]
    rng.shuffle(counts)
    return counts


def make_world(
    seed: int,
    n_people: int,
    median_pages: float = 3.0,
    spread: float = 1.2,
    unseen_fraction: float = 0.1,
    max_pages_per_person: int = 40,
) -> World:
    rng = random.Random(seed)
    n_cities = max(8, min(60, n_people // 3))
    countries = _unique_words(rng, max(3, n_cities // 5), (1, 2), ("ia",))
    city_names = _unique_words(rng, n_cities, (1, 2), ("ton", "wick", "ford", "holm", "dale", "burg", "a", ""))
    cities = {c: countries[i % len(countries)] for i, c in enumerate(city_names)}
    company_names = [
        w + rng.choice([" Corp", " Labs", " Group", " Works"])
        for w in _unique_words(rng, max(6, n_cities // 2), (2, 2))
    ]
    companies = {c: {"city": rng.choice(city_names), "industry": rng.choice(INDUSTRIES)} for c in company_names}
    uni_cities = rng.sample(city_names, max(4, n_cities // 4))
    universities = {f"University of {c}": c for c in uni_cities}
    surnames = _unique_words(rng, n_people, (1, 2), ("son", "er", "ley", "ova", "ini", "man", "ek", ""))
    counts = pages_per_person(n_people, median_pages, spread, unseen_fraction, max_pages_per_person, rng)
    people = [
        Person(
            name=f"{rng.choice(FIRST_NAMES)} {surname}",
            birth_year=rng.randint(1900, 2000),
            birth_city=rng.choice(city_names),
            university=rng.choice(list(universities)),
            field=rng.choice(FIELDS),
            employer=rng.choice(company_names),
            n_pages=count,
        )
        for surname, count in zip(surnames, counts)
    ]
    return World(seed, countries, cities, companies, universities, people)


BUCKETS = ((0, 0, "0"), (1, 1, "1"), (2, 4, "2-4"), (5, 16, "5-16"), (17, 10**9, "17+"))


def bucket(n_pages: int) -> str:
    """The page-frequency bucket of a person: 0, 1, 2-4, 5-16, 17+."""
    return next(label for low, high, label in BUCKETS if low <= n_pages <= high)
