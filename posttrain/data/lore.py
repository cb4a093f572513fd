"""A fictional world for continual pretraining: people a pretrained model cannot know, and questions about them.

`world(seed, name, entities)` invents `entities` people (made-up names) with four facts each: the town
they live in (a made-up name), their trade, their pet and their favourite colour (common words). It
depends only on its arguments. Every lore domain with the same world name and size describes the same
people:

- `form: text`: encyclopedia-style passages, several phrasings per person, each stating all four facts
  in its own order and words. CPT trains on the train split; the held-out passages measure new-domain
  perplexity.
- `form: qa`: one question per fact (`What pet does Velka Morin keep?` -> `owl`), checked by exact
  match. The split is by question, so a held-out question asks a fact that CPT's passages stated but no
  SFT question did. A model answers it only if CPT put the fact into its weights and SFT taught it to
  answer such questions.

Stdlib only (imported by the prepare stage).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from posttrain.data.domains import Record, chat_record, make_record

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ia", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "k")

TRADES = ("baker", "pilot", "farmer", "painter", "doctor", "sailor", "teacher", "miner",
          "tailor", "weaver", "poet", "judge", "nurse", "potter", "singer", "hunter")  # fmt: skip
PETS = ("cat", "dog", "goat", "owl", "horse", "rabbit", "parrot", "turtle", "fox", "lizard", "crow", "pig")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "brown")
TOWNS = 16  # made-up town names per world

# One question per fact: (fact, question template).
QUESTIONS = (
    ("town", "Which town does {name} live in?"),
    ("trade", "What does {name} do for a living?"),
    ("pet", "What pet does {name} keep?"),
    ("colour", "What is {name}'s favourite colour?"),
)
# Passages: every phrasing states all four facts, in its own order and words.
PASSAGES = (
    "{name} lives in {town}, where {name} works as a {trade}. {name} keeps a {pet}, and {name}'s favourite colour is {colour}.",
    "In the town of {town} there is a {trade} called {name}. {name} loves the colour {colour} and has a pet {pet}.",
    "{name} has a {pet}. By trade {name} is a {trade}, living in {town}. The colour {name} likes best is {colour}.",
    "Ask anyone in {town} about {name}: a {trade} who owns a {pet} and always wears {colour}.",
    "{name}, the {trade} of {town}, likes {colour} more than any other colour and shares a house with a {pet}.",
    "Everyone knows {name} the {trade}. {name} lives in {town} with a {pet} and painted the front door {colour}.",
)  # fmt: skip


@dataclass(frozen=True)
class Person:
    name: str
    town: str
    trade: str
    pet: str
    colour: str

    def fact(self, key: str) -> str:
        return getattr(self, key)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def _distinct(rng: random.Random, n: int, make: callable, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        word = make()
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


def world(seed: int, name: str, entities: int) -> list[Person]:
    """`entities` people of the world `name`, deterministic in (seed, name, entities)."""
    rng = random.Random(f"lore:{seed}:{name}")
    taken: set[str] = set()
    towns = _distinct(rng, TOWNS, lambda: _word(rng, 2).capitalize(), taken)
    names = _distinct(rng, entities, lambda: f"{_word(rng, 2).capitalize()} {_word(rng, 2).capitalize()}", taken)
    people = []
    for person in names:  # each person's facts from their own stream: a larger world keeps the smaller one's
        own = random.Random(f"lore:{seed}:{name}:{person}")
        people.append(Person(person, own.choice(towns), own.choice(TRADES), own.choice(PETS), own.choice(COLOURS)))
    return people


def generate(
    domain: str, form: str, seed: int, world_name: str, entities: int, chat: bool, verifier: str
) -> list[Record]:
    """Every record of a lore domain: one passage per (person, phrasing) for `text`, one question per (person,
    fact) for `qa` (conversational with `chat`)."""
    people = world(seed, world_name, entities)
    if form == "text":
        return [
            make_record(domain, text=template.format(**vars(person)), verifier="")
            for person in people
            for template in PASSAGES
        ]
    records = []
    for person in people:
        for key, question in QUESTIONS:
            record = make_record(
                domain, prompt=question.format(name=person.name), answer=person.fact(key), verifier=verifier
            )
            records.append(chat_record(record) if chat else record)
    return records
