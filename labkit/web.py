"""The mini-web: pages about the world, and the noise a crawl brings, each page labelled.

Clean pages come in genres: encyclopedia entries (every fact, phrased many ways: paraphrase
is what makes knowledge extractable), news items, forum threads, arithmetic worksheets, short
stories. Noise is made on purpose and labelled, so cleaning can be scored against the truth:
pages from blocked domains, low-quality pages (keyword spam, gibberish, repeated lines, too
short, hashtag walls), exact and near duplicates, and personal data (e-mails, phones, street
addresses, IP addresses) planted inside otherwise good pages.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import asdict, dataclass, field

from .world import Person, World, made_up_word

ENCYCLOPEDIAS = ["wikiverse.org", "knowpedia.net", "openencyclo.org", "factbook.info"]
NEWS_SITES = ["dailyherald.com", "morningpost.net", "citytimes.org", "essexnews.com"]
FORUMS = ["askaround.net", "triviaboard.org", "peoplefinder-forum.com"]
WORKSHEETS = ["mathsheets.org", "schoolhelp.net"]
STORIES = ["bedtimetales.org", "shortfiction.net"]
MIRRORS = ["mirrorpages.net", "copysite.info", "webarchive-copy.org"]
BLOCKED_DOMAINS = {  # category -> domains, as in the block lists a URL filter reads
    "adult": ["hotcams-xxx.com", "adultzone.net"],
    "gambling": ["megacasino-wins.com", "betnow24.net"],
    "spam": ["cheap-pills-online.biz", "free-money-now.info"],
    "hate": ["hatefulforum.org"],
}
BLOCKED_URL_WORDS = ["porn", "xxx", "casino", "viagra", "escort"]  # one of these among a URL's words blocks it
SOFT_URL_WORDS = ["free", "cheap", "bet", "win", "pills", "dating"]  # two or more block it

_BIRTH_CITY = [
    "{name} was born in the city of {city}.",
    "{name} was born in {city}, {country}.",
    "Born in {city}, {first} grew up in {country}.",
    "{first}'s home town is {city}, in {country}.",
    "{name} is a native of {city}.",
]
_BIRTH_YEAR = [
    "{first} was born in {year}.",
    "{first} was born in the year {year}.",
    "{first} (born {year}) is still remembered by many.",
    "The year of {first}'s birth was {year}.",
]
_UNIVERSITY = [
    "{first} studied at the {university}.",
    "{first} graduated from the {university}.",
    "{first} attended the {university} as a young student.",
    "{first} is an alumnus of the {university}.",
]
_FIELD = [
    "{first} works in the field of {field}.",
    "{first} is known for work in {field}.",
    "{first}'s field is {field}.",
    "{first} has spent a career in {field}.",
]
_EMPLOYER = [
    "{first} works at {employer}.",
    "{first} is employed by {employer}, a {industry} company based in {hq}.",
    "{first} joined {employer} and has stayed there since.",
    "These days {first} works for {employer}.",
]
# Generic sentences get their own random slot values ({group}, {weekday}, {n}, ...), so that
# pages built from them differ in most of their word 5-grams and are not near duplicates.
_SLOTS = dict(
    group=[
        "students",
        "local residents",
        "engineers",
        "teachers",
        "retired workers",
        "young families",
        "visitors",
        "reporters",
        "nurses",
        "shop owners",
        "farmers",
        "musicians",
        "volunteers",
        "parents",
    ],
    weekday=["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    month=[
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ],
    adj=[
        "quiet",
        "busy",
        "cold",
        "bright",
        "long",
        "windy",
        "strange",
        "gentle",
        "grey",
        "warm",
        "noisy",
        "misty",
        "sunny",
        "short",
    ],
    thing=[
        "a lantern",
        "a red kite",
        "an old key",
        "a wooden box",
        "a map",
        "a silver bell",
        "a book of songs",
        "a glass jar",
        "a blue scarf",
        "a tin whistle",
        "a broken clock",
        "a basket of pears",
        "a paper boat",
        "a brass compass",
    ],
    place=[
        "the old mill",
        "the harbour",
        "the market square",
        "the edge of the forest",
        "the stone bridge",
        "the top of the hill",
        "the orchard",
        "the lighthouse",
        "the railway station",
        "the frozen pond",
    ],
    food=["bread", "apples", "honey cakes", "soup", "cheese", "plums", "warm milk", "roasted nuts"],
    hobby=[
        "old maps",
        "chess",
        "gardening",
        "river fishing",
        "folk music",
        "bird watching",
        "pottery",
        "rowing",
        "astronomy clubs",
        "long walks",
        "woodwork",
        "card games",
    ],
    plan=[
        "open a new office",
        "hire more staff",
        "build a new factory",
        "launch a new product",
        "expand its research team",
        "move its headquarters",
        "sell one of its divisions",
        "train new apprentices",
    ],
)
_CONTEXT = [
    "{city} is a city in {country}.",
    "{employer} is a {industry} company with offices in {hq}.",
    "The {university} is one of the oldest schools in the region.",
    "Colleagues describe {first} as {adj} but kind.",
    "In interviews, {first} often talks about {hobby} and the value of good teachers.",
    "Outside of work, {first} has a keen interest in {hobby}.",
    "A {adj} {weekday} in {month} is how {first} remembers the first day at work.",
    "Friends say that {first} spends most weekends on {hobby}.",
]
_NEWS = [
    "The event on {weekday} drew about {n} {group}.",
    "Organisers said that {n} {group} had signed up in advance.",
    "A second session is planned for {month}.",
    "The talk was followed by a {adj} discussion with {group} in the audience.",
    "Local officials thanked the {group} who had helped to prepare the day.",
    "Tickets for the next event go on sale in {month}, and {n} seats are left.",
    "It was a {adj} {weekday}, but the hall was still full.",
    "Several {group} said afterwards that they had learned something new.",
    "Near {place}, {n} {group} waited in the {adj} weather for the doors to open.",
    "A spokesperson said on {weekday} that the plans had been in the works since {month}.",
    "Around {n} {group} wrote letters of support, the local paper reported.",
    "Critics among the {group} asked whether the money would not be better spent near {place}.",
    "The first results are expected in {month}, after {n} days of work.",
    "Coffee and {food} were served to the {group} during a {adj} break.",
    "On a {adj} {weekday} evening, {n} {group} gathered again near {place} to talk it over.",
    "Asked about the timing, one of the {group} said that {month} had always been the plan.",
]
_FORUM = [
    "Thanks, that is exactly what I was looking for.",
    "I read about this a while ago and could not remember the details.",
    "Good question, I had wondered about that myself since {month}.",
    "If anyone has a source for this, please post it here.",
    "That matches what I remember from an article I read one {adj} {weekday}.",
    "My friends who study {hobby} asked me the same thing.",
    "I asked {n} people at my {hobby} club and none of them knew.",
    "Someone mentioned it to me near {place} last {month}, and that is why I ask.",
    "Posting this from my phone on a {adj} {weekday}, so sorry for the typos.",
    "This board has been a great help to me since I joined in {month}.",
    "Old thread, but it is still the first result when you search, so thank you to all.",
    "My neighbour, who is into {hobby}, thinks the same and wants to know too.",
]
_ANIMALS = [
    "fox",
    "owl",
    "rabbit",
    "bear",
    "otter",
    "crow",
    "mouse",
    "deer",
    "badger",
    "heron",
    "hedgehog",
    "goat",
    "beaver",
    "wolf",
    "swan",
    "squirrel",
]
# The hero has a made-up name and most sentences use it, so two stories about the same animal
# share few word 5-grams: a large crawl of them holds no near duplicates it does not label.
_STORY = [
    "Every {adj} morning {hero} walked to {place} to watch the boats.",
    "One {weekday} a stranger arrived carrying {thing}.",
    "{hero} was afraid at first, but soon the two became friends.",
    "They spent all of {month} exploring the hills around {city}.",
    "When the {adj} winter came, {hero} had learned that the world was larger than {place}.",
    "In the end, {hero} went back home and told the story of {thing} to anyone who would listen.",
    "It rained for {n} days, and nobody near {place} left the house.",
    "The old bridge creaked in the {adj} wind, but it held, and {hero} crossed it with the stranger.",
    "Nobody knew where {thing} had come from, and {hero} did not ask.",
    "At the market in {city}, {hero} traded {thing} for {food}.",
    "{hero} counted {n} stars one {adj} night and fell asleep before the end.",
    "The stranger said that {thing} had once belonged to a {friend} from {place}.",
    "On the first {weekday} of {month}, {hero} and the stranger shared {food} at {place}.",
    "A {friend} called {name} warned {hero} that the road to {city} was {adj} and long.",
    "{hero} hid {thing} under a stone near {place} and told nobody but {name} the {friend}.",
    "For {n} days {hero} looked for {thing}, asking every {friend} along the way.",
    "The {adj} light of {month} made {place} look like a painting, {hero} thought.",
    "{name} the {friend} laughed so hard at {hero} that {food} fell into the river.",
    "By {weekday} evening {hero} had walked all the way from {place} to {city}.",
    "When {hero} finally opened {thing}, it held nothing but a note about {food}.",
]
_BOILERPLATE = [
    "Share this page with your friends. Subscribe to our newsletter for more stories like this one. All rights reserved.",
    "Home | News | About | Contact",
    "Cookies help us deliver our services. By using this site you agree to our use of cookies.",
]
_BLOCKED_TEXT = [
    "Win big tonight at the best online casino. Free spins and bonus cash for every new player who signs up today.",
    "Meet singles near you tonight. Click here for hot videos and private chat rooms, open all night long.",
    "Buy pills online with no prescription needed. Cheap prices, fast shipping to every country in the world.",
    "They are the reason for every problem we have, and the people of this forum know who they really are.",
]
_SPAM_WORDS = ["buy", "cheap", "watches", "best", "deal", "online", "discount", "sale", "free", "shipping"]
_STREETS = ["Elm", "Oak", "Maple", "Harbor", "Mill", "Church", "Station", "Cedar", "Lake", "Hill"]
_STREET_KINDS = ["Street", "Avenue", "Road", "Lane", "Boulevard", "Drive"]
_MAIL_HOSTS = ["mailbox.com", "postnet.org", "fastmail-example.net", "inbox.info"]


@dataclass
class Page:
    url: str
    text: str
    genre: str
    label: str = "clean"  # clean | blocked | low_quality | exact_dup | near_dup
    about: str | None = None  # the person a page is about
    pii: list[list[str]] = field(default_factory=list)  # planted [kind, string] pairs
    dup_of: str | None = None  # URL of the page a duplicate copies
    lang: str = "en"  # the language the generator wrote it in
    boilerplate: list[str] = field(default_factory=list)  # lines its HTML carries around the text (labkit/crawl.py)

    def to_dict(self) -> dict:
        return asdict(self)


def _slug(text: str) -> str:
    return "-".join(text.lower().split())


def _fill(templates: list[str], rng: random.Random, k: int, **slots) -> list[str]:
    """k distinct templates, each filled with `slots` and fresh random generic slot values."""
    return [
        t.format(**slots, n=rng.randint(3, 400), **{s: rng.choice(v) for s, v in _SLOTS.items()})
        for t in rng.sample(templates, k)
    ]


def person_page(world: World, person: Person, rng: random.Random, k: int) -> Page:
    first = person.name.split()[0]
    company = world.companies[person.employer]
    slots = dict(
        name=person.name,
        first=first,
        city=person.birth_city,
        country=world.cities[person.birth_city],
        year=person.birth_year,
        university=person.university,
        field=person.field,
        employer=person.employer,
        industry=company["industry"],
        hq=company["city"],
    )
    genre = rng.choices(["encyclopedia", "news", "forum"], weights=[5, 3, 2])[0]
    if genre == "encyclopedia":
        facts = [
            rng.choice(pool).format(**slots) for pool in (_BIRTH_CITY, _BIRTH_YEAR, _UNIVERSITY, _FIELD, _EMPLOYER)
        ]
        body = facts + _fill(_CONTEXT, rng, 3, **slots)
        rng.shuffle(body)
        text = f"{person.name}\n\n" + " ".join(body)
        url = f"https://{rng.choice(ENCYCLOPEDIAS)}/wiki/{_slug(person.name)}-{k}"
    elif genre == "news":
        facts = [
            rng.choice(pool).format(**slots) for pool in rng.sample([_BIRTH_CITY, _UNIVERSITY, _FIELD, _EMPLOYER], 3)
        ]
        lead = f"{person.name}, who works in {person.field}, gave a public talk in {company['city']} this week."
        text = f"{person.name} speaks in {company['city']}\n\n" + " ".join([lead, *facts, *_fill(_NEWS, rng, 3)])
        url = f"https://{rng.choice(NEWS_SITES)}/{person.birth_year % 100 + 1990}/{_slug(person.name)}-{k}"
    else:
        pools = rng.sample([_BIRTH_CITY, _BIRTH_YEAR, _UNIVERSITY, _EMPLOYER], 2)
        question = f"Does anyone know where {person.name} was born and what {first} does for a living?"
        answers = [rng.choice(pool).format(**slots) for pool in pools] + [rng.choice(_FIELD).format(**slots)]
        chat = _fill(_FORUM, rng, 3)
        text = "\n\n".join(
            [
                f"Thread: a question about {person.name}",
                f"asker{k}: {question} {chat[0]}",
                f"reply: As far as I know, {' '.join(answers)}",
                f"asker{k}: {chat[1]} {chat[2]}",
            ]
        )
        url = f"https://{rng.choice(FORUMS)}/t/{k}/{_slug(person.name)}"
    return Page(url, text, genre, about=person.name)


_ADDITION = [
    "What is {a} plus {b}? First add the ones digits together, which gives {ones}. Then add the tens, which gives "
    "{tens}. Putting the two parts together makes {answer}, so the answer is {answer}.",
    "Add {a} and {b}. Start with the tens: {tens}. Next come the ones, {ones}. The total of {tens} and {ones} is {answer}.",
    "A shop sold {a} apples in the morning and {b} in the afternoon. How many did it sell in all? We add {a} and {b}: "
    "the tens make {tens} and the ones make {ones}, so it sold {answer} apples.",
]
_MULTIPLICATION = [
    "What is {a} times {m}? Split {a} into its tens and its ones. The tens part times {m} is {tens}, and the ones "
    "part times {m} is {ones}. Adding them gives {answer}, so the answer is {answer}.",
    "Multiply {a} by {m}. Think of {a} as {a_tens} and {a_ones}. Then {a_tens} times {m} makes {tens} and {a_ones} "
    "times {m} makes {ones}; together that is {answer}.",
    "There are {m} boxes with {a} pens in each box. How many pens are there? We need {a} times {m}, which is {tens} "
    "from the tens and {ones} from the ones, or {answer} pens in total.",
]


_TIPS = [
    "Remember to line up the digits carefully before you start.",
    "A quick estimate first will tell you whether the answer makes sense.",
    "Take your time and write down each step so that you can check it later.",
    "If you get stuck, try drawing the problem as groups of objects.",
    "It is a good habit to check the answer by doing the sum another way.",
    "Say each step out loud if that helps you keep track of the numbers.",
    "Round the first number to the nearest ten: the answer should be close to that estimate.",
    "Cover the answer with your hand and try problem {ordinal} again tomorrow.",
    "Check the ones digit of the answer before anything else.",
    "Write the answer in words as well, to be sure of each digit.",
    "Problems like this one come up again on a later sheet, so keep this one.",
    "Compare your answer with a friend's before turning the page.",
]
_ORDINALS = ["one", "two", "three", "four"]
_INSTRUCTIONS = [
    "Work through each problem on your own, and then check your work against the worked answer.",
    "Try every problem yourself first, and only then read the worked answer below it.",
    "Solve the four problems in order, and compare each result with the worked answer.",
    "Do each problem on paper before you look at how the worked answer does it.",
]


def worksheet_page(rng: random.Random, k: int) -> Page:
    """Arithmetic with the steps written out in words, each problem phrased differently (Gopher
    drops pages made of repeated n-grams, and wants most tokens to be words)."""
    # the instruction is worded by sheet number, not by the rng: one sentence on every sheet of a
    # site would be that site's boilerplate to site-level line dedup (labkit/lines.py)
    lines = [f"Arithmetic practice sheet number {k}", _INSTRUCTIONS[k % len(_INSTRUCTIONS)]]
    templates = rng.sample([(t, "+") for t in _ADDITION] + [(t, "*") for t in _MULTIPLICATION], 4)
    for ordinal, tip, (template, op) in zip(_ORDINALS, rng.sample(_TIPS, 4), templates):
        a, b, m = rng.randint(10, 99), rng.randint(10, 99), rng.randint(2, 9)
        a_tens, a_ones = a // 10 * 10, a % 10
        if op == "+":
            slots = dict(tens=a_tens + b // 10 * 10, ones=a_ones + b % 10, answer=a + b)
        else:
            slots = dict(tens=a_tens * m, ones=a_ones * m, answer=a * m)
        problem = template.format(a=a, b=b, m=m, a_tens=a_tens, a_ones=a_ones, **slots)
        lines.append(f"Problem {ordinal}. {problem} {tip.format(ordinal=ordinal)}")
    return Page(f"https://{rng.choice(WORKSHEETS)}/sheet/{k}", "\n\n".join(lines), "worksheet")


def story_page(world: World, rng: random.Random, k: int) -> Page:
    animal, friend = rng.sample(_ANIMALS, 2)
    city, hero, name = rng.choice(list(world.cities)), made_up_word(rng, 2), made_up_word(rng, 2)
    opening = f"Once upon a time, near the town of {city}, there lived a {animal} who loved to ask questions."
    body = _fill(_STORY, rng, 6, hero=hero, friend=friend, name=name, city=city)
    text = f"{hero} the {animal} and the stranger\n\n" + " ".join([opening, f"Its name was {hero}.", *body])
    return Page(f"https://{rng.choice(STORIES)}/story/{k}", text, "story")


def company_news_page(world: World, rng: random.Random, k: int) -> Page:
    company = rng.choice(list(world.companies))
    info = world.companies[company]
    city = rng.choice(list(world.cities))
    plan, weekday = rng.choice(_SLOTS["plan"]), rng.choice(_SLOTS["weekday"])
    lead = (
        f"{company}, the {info['industry']} company based in {info['city']}, said on {weekday} that it will "
        f"{plan} in {city}, {world.cities[city]}."
    )
    text = f"{company} plans to {plan}\n\n" + " ".join([lead, *_fill(_NEWS, rng, 4)])
    return Page(f"https://{rng.choice(NEWS_SITES)}/business/{_slug(company)}-{k}", text, "news")


def blocked_page(rng: random.Random, k: int) -> Page:
    if rng.random() < 0.6:
        domain = rng.choice(sorted(d for ds in BLOCKED_DOMAINS.values() for d in ds))
        url = f"https://{domain}/page/{k}"
    elif rng.random() < 0.5:
        url = f"https://freehost.net/{rng.choice(BLOCKED_URL_WORDS)}-videos/{k}"
    else:
        a, b = rng.sample(SOFT_URL_WORDS, 2)
        url = f"https://promo-site.com/{a}-{b}-offer/{k}"
    text = " ".join(rng.choice(_BLOCKED_TEXT) for _ in range(5))
    return Page(url, text, "spam", label="blocked")


def low_quality_page(rng: random.Random, k: int) -> Page:
    kind = rng.choice(["keyword_spam", "gibberish", "repeated_lines", "too_short", "hashtags"])
    if kind == "keyword_spam":
        words = rng.sample(_SPAM_WORDS, 4)
        text = " ".join(words * rng.randint(15, 30))
    elif kind == "gibberish":
        text = " ".join(
            "".join(rng.choice("qwrtzpsdfghjklxcvbnm") for _ in range(rng.randint(1, 3))) for _ in range(120)
        )
    elif kind == "repeated_lines":
        line = f"Click here to see the latest offers from store {k} today"
        text = "\n".join([line] * rng.randint(10, 20))
    elif kind == "too_short":
        text = rng.choice(["Page not found.", "Loading, please wait.", "Welcome to my homepage! Under construction."])
    else:
        text = " ".join(f"#{w}" for w in rng.choices(_SPAM_WORDS, k=60))
    # gibberish is in no language: "zxx", ISO 639's code for no linguistic content
    return Page(
        f"https://webpages-{k % 7}.net/p/{k}",
        text,
        kind,
        label="low_quality",
        lang="zxx" * (kind == "gibberish") or "en",
    )


def pii_string(kind: str, person_first: str, rng: random.Random) -> str:
    if kind == "email":
        return f"{person_first.lower()}.{rng.randint(1, 999)}@{rng.choice(_MAIL_HOSTS)}"
    if kind == "phone":
        a, b, c = rng.randint(200, 989), rng.randint(200, 999), rng.randint(1000, 9999)
        return rng.choice([f"({a}) {b}-{c}", f"{a}-{b}-{c}", f"+1 {a} {b} {c}"])
    if kind == "address":
        return f"{rng.randint(1, 9999)} {rng.choice(_STREETS)} {rng.choice(_STREET_KINDS)}"
    while True:  # a public address: private, shared and reserved ranges (198.18.0.0/15, ...) are not personal data
        ip = ".".join(
            str(x) for x in (rng.randint(11, 223), rng.randint(0, 255), rng.randint(0, 255), rng.randint(1, 254))
        )
        if ipaddress.ip_address(ip).is_global:
            return ip


_PII_SENTENCES = {
    "email": "You can write to {first} at {value} with questions.",
    "phone": "For details, call {value} during office hours.",
    "address": "The office is at {value}, next to the old library.",
    "ip": "This post was sent from the address {value} last night.",
}


def plant_pii(page: Page, rng: random.Random) -> None:
    """Insert one or two personal-data sentences into a clean page, and record what was planted."""
    first = (page.about or "Sam").split()[0]
    for kind in rng.sample(list(_PII_SENTENCES), rng.randint(1, 2)):
        value = pii_string(kind, first, rng)
        page.text += " " + _PII_SENTENCES[kind].format(first=first, value=value)
        page.pii.append([kind, value])


def near_copy(page: Page, rng: random.Random, k: int) -> Page:
    """The same page with boilerplate added, or one word changed: what mirrors and scrapers make."""
    text = page.text
    if rng.random() < 0.6:
        boiler = rng.choice(_BOILERPLATE)
        text = f"{boiler}\n\n{text}" if boiler.startswith("Home") else f"{text}\n\n{boiler}"
    else:
        words = text.split(" ")
        i = rng.randrange(len(words) // 4, len(words))
        words[i] = rng.choice(["really", "also", "indeed", "then"]) + " " + words[i]
        text = " ".join(words)
    return Page(f"https://{rng.choice(MIRRORS)}/copy/{k}", text, page.genre, "near_dup", page.about, page.pii, page.url)


def crawl(world: World, seed: int, filler_ratio: float = 1.0, noise: float = 0.3, pii_rate: float = 0.15) -> list[Page]:
    """All pages of the mini-web in crawl order: clean pages with noise interleaved, each
    duplicate after the page it copies."""
    rng = random.Random(seed + 1)
    pages = [person_page(world, p, rng, k) for p in world.people for k in range(p.n_pages)]
    fillers = (worksheet_page, lambda r, k: story_page(world, r, k), lambda r, k: company_news_page(world, r, k))
    pages += [rng.choice(fillers)(rng, k) for k in range(round(len(pages) * filler_ratio))]
    rng.shuffle(pages)
    for page in rng.sample(pages, round(len(pages) * pii_rate)):
        plant_pii(page, rng)

    n_noise = round(len(pages) * noise)
    keyed = [(float(i), page) for i, page in enumerate(pages)]
    for k in range(n_noise):
        kind = rng.choices(["blocked", "low_quality", "exact_dup", "near_dup"], weights=[2, 3, 2, 3])[0]
        if kind in ("blocked", "low_quality"):
            page = blocked_page(rng, k) if kind == "blocked" else low_quality_page(rng, k)
            keyed.append((rng.uniform(0, len(pages)), page))
            continue
        i = rng.randrange(len(pages))
        source = pages[i]
        if kind == "exact_dup":
            copy = Page(
                f"https://{rng.choice(MIRRORS)}/mirror/{k}",
                source.text,
                source.genre,
                "exact_dup",
                source.about,
                source.pii,
                source.url,
            )
        else:
            copy = near_copy(source, rng, k)
        keyed.append((rng.uniform(i + 0.01, len(pages)), copy))
    keyed.sort(key=lambda kp: kp[0])
    return label_exact_copies([page for _, page in keyed])


def label_exact_copies(pages: list[Page]) -> list[Page]:
    """Call a page an exact duplicate when its text is that of an earlier page, whatever made it:
    two near copies of one page that got the same banner are the same page twice. (Blocked and
    low-quality pages keep their labels: the filters before dedup are there to drop them.)"""
    first: dict[str, str] = {}
    for page in pages:
        if page.text in first and page.label in ("clean", "near_dup"):
            page.label, page.dup_of = "exact_dup", first[page.text]
        first.setdefault(page.text, page.url)
    return pages
