"""A deterministic synthetic world: people with consistent facts, rendered as text.

Random tokens are not enough to show quantization damage: a model has to *know* something that
low-bit weights can forget. Every person here has ten attributes; the same facts are restated in
bios, stories and Q&A, so a small Llama learns them, and a held-out slice of people is only ever
seen in pretraining bios (the fine-tune cannot simply memorise the eval answers).
"""

from __future__ import annotations

import dataclasses
import random

FIRST = """Ada Bela Cyra Dora Edda Fina Gala Hana Ines Juno Kira Lena Mira Nora Orla Pia Rhea Sara
Tara Uma Vera Wanda Xena Yara Zora Abel Bram Cato Dirk Emil Finn Gert Hugo Ivo Jorn Kai Lars Milo
Nils Otto Per Rolf Sven Tom Ulf Vik Wim Yves Zeno""".split()
LAST = """Ash Birch Cole Dale Eden Frost Glen Hale Irons Jade Kent Lark Moss Nash Oak Pike Quill
Rook Stone Thorn Vale Wells Yew Zinc""".split()
# (city, country, river): a city fixes its country and river, so facts are mutually consistent.
CITIES = [
    ("Arden", "Norland", "Velt"), ("Brisa", "Norland", "Ambre"), ("Corvo", "Sudmark", "Lisse"),
    ("Delta", "Sudmark", "Orne"), ("Elm", "Westria", "Tamber"), ("Fenn", "Westria", "Calder"),
    ("Garo", "Ostland", "Mira"), ("Holm", "Ostland", "Senn"), ("Ilse", "Kethia", "Dova"),
    ("Jarro", "Kethia", "Rhun"), ("Kilm", "Palvia", "Essa"), ("Lorn", "Palvia", "Brae"),
]
JOBS = "baker pilot doctor farmer painter teacher sailor miner writer judge potter tailor".split()
COLOURS = "red blue green yellow purple orange white black grey pink brown silver".split()
PETS = "cat dog parrot rabbit turtle horse goat owl ferret lizard hamster goose".split()
FOODS = "bread rice soup cheese apples fish beans noodles plums honey olives pears".split()
HOBBIES = "chess rowing singing hiking knitting fishing dancing painting archery cycling gardening climbing".split()

ATTRS = ("city", "country", "river", "job", "colour", "pet", "food", "hobby", "age", "friend")


@dataclasses.dataclass(frozen=True)
class Person:
    name: str
    city: str
    country: str
    river: str
    job: str
    colour: str
    pet: str
    food: str
    hobby: str
    age: int
    friend: str


def make_people(n: int, seed: int) -> list[Person]:
    rng = random.Random(seed)
    names = [f"{f} {l}" for f in FIRST for l in LAST]
    rng.shuffle(names)
    if n > len(names):
        raise ValueError(f"at most {len(names)} people can be generated, asked for {n}")
    names = names[:n]
    people = []
    for i, name in enumerate(names):
        city, country, river = rng.choice(CITIES)
        friend = names[(i + 1 + rng.randrange(n - 1)) % n]
        people.append(Person(name, city, country, river, rng.choice(JOBS), rng.choice(COLOURS),
                             rng.choice(PETS), rng.choice(FOODS), rng.choice(HOBBIES),
                             rng.randrange(20, 80), friend))
    return people


# Several surface forms per fact: the model must learn the fact, not one sentence.
STATEMENTS = {
    "city": ["{n} lives in {v}.", "{n} has a home in the city of {v}.", "The city of {v} is where {n} lives."],
    "country": ["{n} is from {v}.", "{n} was born in the country of {v}.", "{n} grew up in {v}."],
    "river": ["{n} lives near the river {v}.", "The river {v} flows past the home of {n}."],
    "job": ["{n} works as a {v}.", "By trade, {n} is a {v}.", "{n} earns a living as a {v}."],
    "colour": ["The favourite colour of {n} is {v}.", "{n} likes the colour {v} best."],
    "pet": ["{n} keeps a {v} as a pet.", "{n} has a pet {v}."],
    "food": ["{n} loves to eat {v}.", "The favourite food of {n} is {v}."],
    "hobby": ["In free time, {n} enjoys {v}.", "The hobby of {n} is {v}.", "{n} enjoys {v}."],
    "age": ["{n} is {v} years old.", "{n} has lived for {v} years."],
    "friend": ["The best friend of {n} is {v}.", "{n} is best friends with {v}."],
}
QUESTIONS = {
    "city": "Where does {n} live?", "country": "Which country is {n} from?",
    "river": "Which river flows near the home of {n}?", "job": "What does {n} do for work?",
    "colour": "What is the favourite colour of {n}?", "pet": "What pet does {n} keep?",
    "food": "What food does {n} love?", "hobby": "What is the hobby of {n}?",
    "age": "How old is {n}?", "friend": "Who is the best friend of {n}?",
}
ANSWERS = {
    "city": "{n} lives in {v}.", "country": "{n} is from {v}.", "river": "The river {v}.",
    "job": "{n} is a {v}.", "colour": "It is {v}.", "pet": "{n} keeps a {v}.",
    "food": "{n} loves {v}.", "hobby": "{n} enjoys {v}.", "age": "{n} is {v} years old.",
    "friend": "It is {v}.",
}
# Phrases used by the multiple-choice endings: "<fact a> and <fact b>".
CLAUSES = {
    "city": "lives in {v}", "country": "is from {v}", "river": "lives near the river {v}",
    "job": "works as a {v}", "colour": "likes the colour {v}", "pet": "keeps a {v}",
    "food": "loves to eat {v}", "hobby": "enjoys {v}", "age": "is {v} years old",
    "friend": "is best friends with {v}",
}


def statement(p: Person, attr: str, rng: random.Random) -> str:
    return rng.choice(STATEMENTS[attr]).format(n=p.name, v=getattr(p, attr))


def pair_statement(p: Person, a: str, b: str) -> str:
    """Two facts in one sentence, the surface form the multiple-choice endings use."""
    return (f"{p.name} {CLAUSES[a].format(v=getattr(p, a))} "
            f"and {CLAUSES[b].format(v=getattr(p, b))}.")


def bio(p: Person, rng: random.Random) -> str:
    attrs = list(ATTRS)
    rng.shuffle(attrs)
    if rng.random() < 0.5:
        return " ".join(statement(p, a, rng) for a in attrs)
    return " ".join(pair_statement(p, attrs[i], attrs[i + 1]) for i in range(0, len(attrs), 2))


def story(p: Person, people_by_name: dict[str, Person], rng: random.Random) -> str:
    f = people_by_name[p.friend]
    return (f"One morning {p.name} left {p.city} with a {p.pet} and a basket of {p.food}. "
            f"{p.name} walked along the river {p.river} to meet {f.name}, who works as a {f.job}. "
            f"They talked about {p.hobby} until the sky turned {p.colour}. "
            f"Then {p.name}, the {p.job}, went home to {p.city} in {p.country}.")


def city_fact(rng: random.Random) -> str:
    city, country, river = rng.choice(CITIES)
    return rng.choice([f"{city} is a city in {country}.", f"The river {river} runs through {city}.",
                       f"{city} lies on the river {river} in {country}."])


def arithmetic(rng: random.Random) -> str:
    a, b = rng.randrange(50), rng.randrange(50)
    return rng.choice([f"{a} plus {b} is {a + b}.", f"{a + b} minus {b} is {a}."])


def pretrain_document(people: list[Person], rng: random.Random) -> str:
    """One pretraining-style document: a few bios, stories, city facts and sums."""
    by_name = {p.name: p for p in people}
    parts = []
    for _ in range(rng.randrange(3, 6)):
        kind = rng.random()
        p = rng.choice(people)
        if kind < 0.6:
            parts.append(bio(p, rng))
        elif kind < 0.8:
            parts.append(story(p, by_name, rng))
        elif kind < 0.9:
            parts.append(city_fact(rng))
        else:
            parts.append(arithmetic(rng))
    return " ".join(parts)


def qa_conversation(p: Person, rng: random.Random, turns: int = 3) -> list[dict[str, str]]:
    """A chat transcript of questions about one person, in the `messages` schema."""
    msgs = [{"role": "system", "content": "You answer questions about people in the world."}]
    for attr in rng.sample(ATTRS, turns):
        v = getattr(p, attr)
        msgs.append({"role": "user", "content": QUESTIONS[attr].format(n=p.name)})
        msgs.append({"role": "assistant", "content": ANSWERS[attr].format(n=p.name, v=v)})
    return msgs


def _wrong(attr: str, right, rng: random.Random, people: list[Person]):
    pool = {
        "city": [c for c, _, _ in CITIES], "country": sorted({c for _, c, _ in CITIES}),
        "river": [r for _, _, r in CITIES], "job": JOBS, "colour": COLOURS, "pet": PETS,
        "food": FOODS, "hobby": HOBBIES, "age": list(range(20, 80)),
        "friend": [q.name for q in people],
    }[attr]
    while True:
        v = rng.choice(pool)
        if v != right:
            return v


def mc_item(p: Person, people: list[Person], rng: random.Random, ind: int, split: str) -> dict:
    """A hellaswag-schema row: context about a person, four endings, one consistent with the world.

    Each ending states two facts; the distractors are wrong/right, right/wrong and wrong/wrong,
    so a model must know *both* facts to pick the right ending.
    """
    a, b = rng.sample(ATTRS, 2)
    va, vb = getattr(p, a), getattr(p, b)
    wa, wb = _wrong(a, va, rng, people), _wrong(b, vb, rng, people)

    def ending(x, y):
        return f"{CLAUSES[a].format(v=x)} and {CLAUSES[b].format(v=y)}."

    endings = [ending(va, vb), ending(wa, vb), ending(va, wb), ending(wa, wb)]
    order = list(range(4))
    rng.shuffle(order)
    shuffled = [endings[i] for i in order]
    label = order.index(0)
    # lm-eval renders "<activity_label>: <ctx_a> <ctx_b.capitalize()> <ending>"; capitalize()
    # would lower-case a surname, so the name goes in ctx_a and ctx_b stays empty.
    ctx_a, ctx_b = p.name, ""
    return {"ind": ind, "activity_label": "World facts", "ctx_a": ctx_a, "ctx_b": ctx_b,
            "ctx": ctx_a, "endings": shuffled, "source_id": f"world~{ind}",
            "split": split, "split_type": "indomain", "label": str(label)}
