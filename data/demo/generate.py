#!/usr/bin/env python3
"""Generate ragkit's bundled demo data: a synthetic knowledge base about fictional entities.

The world holds invented people, companies, products, towns, countries, rivers and universities whose
names are built from syllables (so no model has seen them). Each entity has attributes (birthplace,
spouse, founder, headquarters, maker, capital, source of a river, ...), and each attribute is stated in
exactly one passage, in one of several wordings. A question asks for one attribute of one entity; its
answer is a short span of that passage, its one gold passage.

What makes it a retrieval demo rather than a lookup table:
- Questions are worded away from their passages ("Where was X born?" against "X is a native of Y",
  "headquartered" against "has its main office in"): a mapping a trained dense retriever can learn and
  lexical BM25 cannot.
- Name words are shared: people draw first names and surnames from small pools, companies and
  universities carry surnames, towns share a stem ("Port Velmora", "Velmora Falls"), product lines share
  brands and model names. Entities with several passages are cut like articles, so only the first passage
  names the entity in its text; the others carry the name in their title only.
- About a quarter of the passages are distractors: committees, class lists, fairs, expeditions, court cases and
  letters that mention many entities in passing, next to the words questions use ("born", "founded",
  "headquarters", "invented"), stating no attribute that is asked about. Lexical overlap with them often
  outscores the gold passage.
- Train, dev and test are split by entity: all questions about one entity land in one split, so a dev
  question's gold passage is never a train question's gold passage.

Output, in formats ``ragkit ingest`` reads:
    DIR/passages.tsv              DPR psgs_w100 format: header ``id<TAB>text<TAB>title``
    DIR/{train,dev,test}.jsonl    one question per line: {"id", "question", "answers", "positive_ids"}

Usage: ``python data/demo/generate.py --out DIR [--seed 0] [--scale 1.0]``. Standard library only and
deterministic: the same seed and scale give byte-identical files. ``EXPECTED_COUNTS`` records what seed 0
at scale 1.0 writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import random
import string
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

EXPECTED_COUNTS = {"passages": 4763, "train": 2897, "dev": 359, "test": 364}
"""What ``--seed 0 --scale 1.0`` writes: passages, and questions per split."""

SPLITS = (("train", 0.8), ("dev", 0.1), ("test", 0.1))

# Entities per kind at scale 1.0, and the fewest kept at small scales so every link can be made.
BASE_COUNTS = {"person": 700, "company": 250, "product": 250, "city": 160, "country": 16, "river": 40,
               "university": 36}
MIN_COUNTS = {"person": 40, "company": 10, "product": 10, "city": 10, "country": 2, "river": 3, "university": 3}
FIRST_NAMES_PER_GENDER = 14
SURNAMES = 50
PRODUCTS_PER_BRAND = 12
DISTRACTOR_FRACTION = 0.35
"""Distractor passages per entity passage."""
ZIPF_EXPONENT = 0.7
"""How unevenly founders, employers, birthplaces, ... are drawn (0: uniformly)."""
QUESTIONS_PER_ENTITY = {"person": 3, "company": 2, "product": 2, "city": 2, "country": 3, "river": 2,
                        "university": 2}
DESCRIPTOR_RATE = 0.3
"""Fraction of questions naming the entity with a descriptor: "the chemist X", "the town of X"."""

# ---------------------------------------------------------------------------------------------------
# Invented names
# ---------------------------------------------------------------------------------------------------

_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "tr", "th", "st", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou", "ei")
_CODAS = ("", "", "", "", "n", "r", "l", "s", "m")
_FINALS = ("a", "o", "in", "en", "is", "ar", "eth", "ael", "ov", "un", "ix", "ane", "ur", "esh", "ia",
           "ora", "ek", "and", "ith", "os")


class NameMaker:
    """Invented words from syllables, each handed out once, so two pools never share a word by accident."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: int) -> str:
        while True:
            parts = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                     for _ in range(syllables - 1)]
            parts.append(self.rng.choice(_ONSETS) + self.rng.choice(_FINALS))
            word = "".join(parts).capitalize()
            if 5 <= len(word) <= 10 and word not in self.used:
                self.used.add(word)
                return word


# ---------------------------------------------------------------------------------------------------
# The world: entities and their attributes
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Entity:
    """One fictional thing. ``facts`` maps an attribute to another Entity, a year, a number or a string."""

    kind: str
    name: str
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)
    gender: str = ""
    """'m' or 'f' for people (pronouns); empty otherwise."""
    detail: str = ""
    """A descriptive noun: profession, industry, product type, part of the country."""


PROFESSIONS = ("chemist", "engineer", "architect", "painter", "novelist", "surgeon", "botanist", "composer",
               "lawyer", "pilot", "geologist", "photographer", "sculptor", "economist", "astronomer",
               "clockmaker", "cartographer", "journalist", "physician", "mathematician", "violinist",
               "shipbuilder", "historian", "poet")
# industry -> (what it makes, name suffixes, product types it sells)
INDUSTRIES = {
    "textile": ("fabrics and yarn", ("Mills", "Textiles", "Weavers"), ("loom", "sewing machine", "spinning wheel")),
    "optics": ("lenses and instruments", ("Optics", "Lensworks"), ("telescope", "camera", "microscope")),
    "engineering": ("engines and pumps", ("Engineering", "Works", "Machines"),
                    ("water pump", "tractor", "steam engine")),
    "electrical": ("radios and lamps", ("Electric", "Radio", "Signals"), ("radio", "desk lamp", "telephone")),
    "household": ("kitchen goods", ("Home", "Housewares"), ("kettle", "pressure cooker", "stove")),
    "precision": ("clocks and gauges", ("Instruments", "Precision"), ("wristwatch", "barometer", "typewriter")),
    "transport": ("bicycles and motorcycles", ("Motors", "Cycles", "Coachworks"), ("bicycle", "motorcycle", "scooter")),
}
PRODUCT_TYPES = tuple(sorted({t for _, _, types in INDUSTRIES.values() for t in types}))
MODELS = ("Mini", "Duo", "Classic", "Pro", "Deluxe", "Junior", "Star", "Plus", "Royal", "Lite", "Sport",
          "Major", "100", "200", "300", "400", "500", "600", "700", "800", "900", "50", "60", "70")
TOWN_PREFIXES = ("Port", "New", "Upper", "Lower", "North", "South", "East", "West", "Old", "Saint")
TOWN_SUFFIXES = ("Falls", "Bridge", "Ford", "Harbour", "Heights", "Crossing", "Green", "Hollow", "Point", "Wells")
UNIVERSITY_KINDS = ("University", "College", "Institute", "Academy", "Polytechnic")
CURRENCY_UNITS = ("crown", "mark", "florin", "thaler", "shilling", "ducat")
REGIONS = ("north", "south", "east", "west", "far north", "south-west", "hill country", "lowlands")
RIVER_SOURCES = ("Mount {}", "the {} Hills", "the {} Glacier", "Lake {}")
RIVER_MOUTHS = ("Lake {}", "the {} Sea", "the Gulf of {}")
FIGURES = ("population", "employees", "students", "length")
"""Attributes holding counts or measures (written with thousands separators), not years."""


def _count(kind: str, scale: float) -> int:
    return max(MIN_COUNTS[kind], round(BASE_COUNTS[kind] * scale))


class Prominence:
    """Draws entities with Zipf-like weights: a few are linked to everywhere, most rarely, as in real
    corpora. A prominent entity's name then occurs in many passages that answer nothing about it."""

    def __init__(self, rng: random.Random, items: list[Entity], exponent: float = ZIPF_EXPONENT) -> None:
        self.rng = rng
        self.items = items
        self.weights = [1.0 / (rank + 1) ** exponent for rank in range(len(items))]

    def pick(self, accept: Callable[[Entity], bool] = lambda e: True) -> Entity | None:
        """A weighted draw among the entities ``accept`` allows; None when it allows none."""
        allowed = [(e, w) for e, w in zip(self.items, self.weights) if accept(e)]
        if not allowed:
            return None
        return self.rng.choices([e for e, _ in allowed], weights=[w for _, w in allowed])[0]


def build_world(rng: random.Random, scale: float, names: NameMaker | None = None) -> dict[str, list[Entity]]:
    """All entities with their attributes, linked to each other: kind -> entities in creation order."""
    names = names or NameMaker(rng)

    countries = [Entity("country", names.word(3)) for _ in range(_count("country", scale))]
    for country in countries:
        country.facts["currency"] = f"{names.word(2)} {rng.choice(CURRENCY_UNITS)}"
        country.facts["independence"] = rng.randint(1640, 1995)
        country.facts["language"] = names.word(2) + "ian"

    rivers = [Entity("river", names.word(rng.choice((2, 3)))) for _ in range(_count("river", scale))]
    for river in rivers:
        river.facts["country"] = rng.choice(countries)
        river.facts["source"] = rng.choice(RIVER_SOURCES).format(names.word(2))
        river.facts["mouth"] = rng.choice(RIVER_MOUTHS).format(names.word(2))
        river.facts["length"] = rng.randrange(120, 2400, 10)
    for country in countries:
        own = [r for r in rivers if r.facts["country"] is country]
        if own:
            country.facts["longest_river"] = max(own, key=lambda r: r.facts["length"])

    # Towns come in pairs sharing a stem ("Port Velmora", "Velmora Falls"), so the stem alone does not
    # tell them apart.
    cities, taken = [], set()
    stems = [names.word(rng.choice((2, 3))) for _ in range((_count("city", scale) + 1) // 2)]
    stem_cycle = itertools.cycle(stems)
    while len(cities) < _count("city", scale):
        stem = next(stem_cycle)
        name = rng.choice((f"{rng.choice(TOWN_PREFIXES)} {stem}", f"{stem} {rng.choice(TOWN_SUFFIXES)}"))
        while name in taken:
            name = f"{rng.choice(TOWN_PREFIXES)} {stem} {rng.choice(TOWN_SUFFIXES)}"
        taken.add(name)
        city = Entity("city", name, detail=rng.choice(REGIONS))
        # The first towns go one to each country, so every country has a capital of its own.
        city.facts["country"] = countries[len(cities)] if len(cities) < len(countries) else rng.choice(countries)
        local = [r for r in rivers if r.facts["country"] is city.facts["country"]]
        city.facts["river"] = rng.choice(local or rivers)
        city.facts["founded"] = rng.randint(1010, 1820)
        city.facts["population"] = rng.randrange(4000, 900000, 500)
        cities.append(city)
    rng.shuffle(cities)
    city_pool = Prominence(rng, cities)
    for country in countries:
        country.facts["capital"] = rng.choice([c for c in cities if c.facts["country"] is country])

    # Pools grow with the square root of the scale, so there are always about twice as many possible full
    # names as people of each gender.
    n_people = _count("person", scale)
    n_first = max(4, round(FIRST_NAMES_PER_GENDER * math.sqrt(scale)))
    n_surnames = max(round(SURNAMES * math.sqrt(scale)), math.ceil(n_people / n_first))
    first_names = {g: [names.word(2) for _ in range(n_first)] for g in "mf"}
    surnames = [names.word(rng.choice((2, 3))) for _ in range(n_surnames)]

    universities, taken = [], set()
    while len(universities) < _count("university", scale):
        name = f"{rng.choice(surnames)} {rng.choice(UNIVERSITY_KINDS)}"
        if name in taken:
            continue
        taken.add(name)
        uni = Entity("university", name)
        uni.facts["founded"] = rng.randint(1580, 1960)
        uni.facts["city"] = city_pool.pick(lambda c: c.facts["founded"] < uni.facts["founded"])
        uni.facts["students"] = rng.randrange(800, 40000, 100)
        universities.append(uni)
    uni_pool = Prominence(rng, universities)

    people, taken = [], set()
    while len(people) < n_people:
        gender = rng.choice("mf")
        name = f"{rng.choice(first_names[gender])} {rng.choice(surnames)}"
        if name in taken:
            continue
        taken.add(name)
        person = Entity("person", name, gender=gender, detail=rng.choice(PROFESSIONS))
        born = person.facts["born"] = rng.randint(1820, 1992)
        if born < 1935:
            person.facts["died"] = born + rng.randint(38, min(96, 2023 - born))
        # The years in which this person can join an employer: aged 20 to 40, alive, not in the future.
        # They never include the birth or death year, the years questions ask for.
        person.facts["working"] = (born + 20, min(born + 40, person.facts.get("died", 2025) - 1, 2024))
        person.facts["birthplace"] = city_pool.pick()
        alma_mater = uni_pool.pick(lambda u: u.facts["founded"] <= born + 18)
        if alma_mater is not None:
            person.facts["alma_mater"] = alma_mater
        people.append(person)
    person_pool = Prominence(rng, people)
    # A marriage is stated in one partner's passage only, so the question about it has one gold passage.
    # Two in three people marry someone of about their age.
    partners = sorted(rng.sample(people, 2 * (len(people) // 3)), key=lambda p: (p.facts["born"], p.name))
    for a, b in zip(partners[0::2], partners[1::2]):
        if rng.random() < 0.5:
            a, b = b, a
        first = max(a.facts["born"], b.facts["born"]) + 19
        last = min([first + 21, 2024] + [p.facts["died"] - 1 for p in (a, b) if "died" in p.facts])
        if first <= last:
            a.facts["spouse"] = b
            a.facts["married"] = rng.randint(first, last)

    companies, taken = [], set()
    industries = sorted(INDUSTRIES)
    while len(companies) < _count("company", scale):
        industry = rng.choice(industries)
        stem = rng.choice(surnames) if rng.random() < 0.7 else names.word(rng.choice((2, 3)))
        name = f"{stem} {rng.choice(INDUSTRIES[industry][1])}"
        if name in taken:
            continue
        taken.add(name)
        company = Entity("company", name, detail=industry)
        founder = person_pool.pick(lambda p: p.facts["born"] < 1975)
        company.facts["founder"] = founder
        lifetime = founder.facts.get("died", 2024) - founder.facts["born"]
        company.facts["founded"] = min(2020, founder.facts["born"] + rng.randint(22, min(50, lifetime - 1)))
        company.facts["hq"] = city_pool.pick()
        company.facts["origin"] = city_pool.pick(lambda c: c is not company.facts["hq"])
        company.facts["ceo"] = person_pool.pick(lambda p: "died" not in p.facts and p is not founder)
        company.facts["employees"] = rng.randrange(40, 60000, 10)
        companies.append(company)
    company_pool = Prominence(rng, companies)
    for person in people:
        # Someone joins a company between the ages of 20 and 40, so it must exist by then.
        employer = company_pool.pick(lambda k: k.facts["founded"] < person.facts["working"][1])
        if employer is not None and rng.random() < 0.7:
            person.facts["employer"] = employer

    brands = [names.word(2) for _ in range(max(3, round(_count("product", scale) / PRODUCTS_PER_BRAND)))]
    products, taken = [], set()
    while len(products) < _count("product", scale):
        name = f"{rng.choice(brands)} {rng.choice(MODELS)}"
        if name in taken:
            continue
        taken.add(name)
        maker = company_pool.pick()
        inventor = person_pool.pick(lambda p: p.facts["born"] < 1990)
        product = Entity("product", name, detail=rng.choice(INDUSTRIES[maker.detail][2]))
        product.facts["maker"] = maker
        product.facts["inventor"] = inventor
        earliest = max(maker.facts["founded"] + 1, inventor.facts["born"] + 24)
        product.facts["released"] = min(2023, earliest + rng.randint(0, 25))
        products.append(product)

    return {"country": countries, "river": rivers, "city": cities, "university": universities,
            "person": people, "company": companies, "product": products}


# ---------------------------------------------------------------------------------------------------
# Passages: each attribute stated once, in one of several wordings
# ---------------------------------------------------------------------------------------------------
# Templates refer to their entity with {S} (subject), {s} (subject, lower case), {P}/{p} (possessive)
# and {O} (object). In the first sentence of a named passage the first of these gets the entity's name
# and the rest pronouns; elsewhere all get pronouns or a short reference ("the company"). {x} is the
# attribute's value, {y} a second value (usually a year), {d} the entity's descriptive noun and {a_d}
# the same with its article ("an engineer").

STATEMENTS: dict[str, tuple[str, ...]] = {
    # people: life passage
    "birthplace": (
        "{S} is a native of {x}.",
        "{S} was raised in {x}, the town of {p} birth.",
        "{P} hometown is {x}.",
        "{S} comes from {x}.",
        "{S} first saw the light of day in {x}.",
        "{S} was born in {x}.",
        "{S} spent {p} childhood in {x}, where {p} family had lived for generations.",
    ),
    "born": (
        "{S} entered the world in {x}.",
        "{P} life began in {x}.",
        "{S} was born in {x}.",
        "{P} year of birth is {x}.",
        "{S} arrived in {x}, the youngest child of a large family.",
    ),
    "died": (
        "{S} died in {x}.",
        "{S} passed away in {x}.",
        "{P} life ended in {x}.",
        "{S} lived until {x}.",
    ),
    "alma_mater": (
        "{S} studied at {x}.",
        "{S} is a graduate of {x}.",
        "{S} trained at {x}.",
        "{P} education took place at {x}.",
        "{S} earned a degree from {x}.",
        "{S} attended lectures at {x} for several years.",
    ),
    "spouse": (
        "{S} married {x} in {y}.",
        "{S} and {x} wed in {y}.",
        "{S} shared {p} life with {x}, whom {s} met in {y}.",
        "In {y} {s} became the partner of {x}.",
        "{P} long marriage to {x} began in {y}.",
    ),
    # people: career passage
    "employer": (
        "{S} spent most of {p} career at {x}.",
        "{S} joined {x} in {y}.",
        "{S} was on the staff of {x}.",
        "{P} longest job was with {x}.",
        "For many years {s} drew a salary from {x}.",
        "{S} took a post at {x} in {y}.",
    ),
    # companies: profile passage
    "hq": (
        "{S} has its main office in {x}.",
        "{S} is based in {x}.",
        "{P} head office is in {x}.",
        "{S} is run from a tall building in {x}.",
        "{S} keeps its central offices in {x}.",
        "{S} is headquartered in {x}.",
    ),
    "ceo": (
        "{S} is led by {x}.",
        "{P} chief executive is {x}.",
        "{x} has run {O} since {y}.",
        "Day-to-day control of {O} rests with {x}.",
        "{P} managing director is {x}.",
        "{x} took charge of {O} in {y}.",
    ),
    # companies: history passage
    "founder": (
        "{S} was started by {x}.",
        "{x} set up {O}.",
        "{S} owes its existence to {x}.",
        "{S} began as the venture of {x}.",
        "{S} traces its origins to {x}, who opened a small workshop.",
        "{S} was founded by {x}.",
    ),
    "founded": (
        "{S} dates from {x}.",
        "{S} opened its doors in {x}.",
        "{S} has been trading since {x}.",
        "{S} was established in {x}.",
        "{S} began operating in {x}.",
    ),
    "origin": (
        "{P} first workshop stood in {x}.",
        "In its early years {s} operated from a rented shed in {x}.",
        "The earliest orders were filled in a small yard in {x}.",
    ),
    # products
    "maker": (
        "{S} is made by {x}.",
        "{S} is manufactured by {x}.",
        "{x} produces {O}.",
        "{S} comes from the factories of {x}.",
        "{S} is sold under the {x} name.",
        "{x} builds {O} in large numbers.",
    ),
    "inventor": (
        "{S} was designed by {x}.",
        "{S} was the idea of {x}.",
        "The first drawings of {O} were made by {x}.",
        "{S} was developed by {x}.",
        "{S} was invented by {x}.",
        "{x} came up with the design of {O}.",
    ),
    "released": (
        "{S} went on sale in {x}.",
        "{S} first reached shops in {x}.",
        "{S} was introduced in {x}.",
        "{S} has been on the market since {x}.",
        "{S} was launched in {x}.",
    ),
    # towns
    "country": (
        "{S} is a town in {x}.",
        "{S} is a city in {x}.",
        "{S} lies in the {d} of {x}.",
        "{S} belongs to {x}.",
        "{S} is one of the larger towns of {x}.",
    ),
    "river": (
        "{S} stands on the {x} River.",
        "The {x} River flows through {O}.",
        "{S} grew up along the banks of the {x}.",
        "{S} straddles the {x}.",
        "{S} sits where the {x} River bends.",
    ),
    "city_founded": (
        "{S} was settled in {x}.",
        "{S} received its charter in {x}.",
        "{S} dates back to {x}.",
        "{S} was first recorded in {x}.",
        "{S} was founded in {x}.",
    ),
    "population": (
        "{S} has about {x} inhabitants.",
        "Around {x} people live in {O}.",
        "{P} population is close to {x}.",
    ),
    # countries
    "capital": (
        "{S} is governed from {x}.",
        "The government of {O} sits in {x}.",
        "{P} seat of government is {x}.",
        "{x} is the seat of {p} parliament.",
        "{P} capital is {x}.",
    ),
    "longest_river": (
        "The longest river in {O} is the {x}.",
        "{P} greatest river is the {x}.",
        "No river in {O} runs further than the {x}.",
    ),
    "currency": (
        "People in {O} pay with the {x}.",
        "{P} money is the {x}.",
        "{S} uses the {x} as its money.",
        "The {x} is the legal tender of {O}.",
    ),
    "independence": (
        "{S} became independent in {x}.",
        "{S} gained self-rule in {x}.",
        "{S} has been sovereign since {x}.",
        "{P} independence dates from {x}.",
    ),
    "language": (
        "Most people in {O} speak {x}.",
        "{P} official language is {x}.",
    ),
    # rivers
    "source": (
        "{S} rises on {x}.",
        "{S} springs from {x}.",
        "{S} begins high on {x}.",
        "The headwaters of {O} lie on {x}.",
    ),
    "mouth": (
        "{S} empties into {x}.",
        "{S} ends in {x}.",
        "{S} drains into {x}.",
        "{S} reaches {x} after a long journey.",
    ),
    "length": (
        "{S} is {x} kilometres long.",
        "{S} runs for {x} kilometres.",
        "{S} covers a distance of {x} kilometres.",
        "{P} course measures {x} kilometres.",
    ),
    "river_country": (
        "{S} flows through {x}.",
        "{S} crosses the farmland of {x}.",
    ),
    # universities
    "uni_city": (
        "{S} is located in {x}.",
        "{P} campus lies in {x}.",
        "{S} occupies a hill above {x}.",
        "{S} has its grounds in {x}.",
        "{S} teaches its students in {x}.",
    ),
    "uni_founded": (
        "{S} opened in {x}.",
        "{S} was chartered in {x}.",
        "{S} admitted its first students in {x}.",
        "{S} was founded in {x}.",
    ),
    "students": (
        "About {x} students are enrolled at {O}.",
        "{S} teaches some {x} students.",
    ),
    # sentences that open a passage without stating an attribute that is asked about
    "profession": (
        "{S} worked as {a_d}.",
        "{S} made a name as {a_d}.",
        "By trade, {s} was {a_d}.",
        "{S} is remembered as {a_d}.",
    ),
    "industry": (
        "{S} is {a_d} company.",
        "{S} is a maker of {x}.",
        "{S} makes {x}.",
        "{S} is {a_d} business.",
    ),
    "product_type": (
        "{S} is {a_d}.",
        "{S} is a popular {d}.",
        "{S} is {a_d} of modest price.",
    ),
    "employees": (
        "{S} employs about {x} people.",
        "Some {x} people work for {O}.",
    ),
}

# Sentences that state nothing asked about: they give passages their length and shared vocabulary.
FILLERS: dict[str, tuple[str, ...]] = {
    "person_life": (
        "{P} parents ran a small shop near the market.",
        "As a child {s} was fond of long walks along the river.",
        "Relatives recall that {s} read everything {s} could find.",
        "{S} had two brothers and a sister.",
        "{P} early letters survive in a family collection.",
        "{S} learned to play the piano at an early age.",
        "Neighbours remembered {O} as quiet and curious.",
    ),
    "person_work": (
        "Colleagues remember {O} as patient and exacting.",
        "{S} kept detailed notebooks that are now held in a public archive.",
        "{S} rarely gave interviews.",
        "{P} methods were later taught to apprentices.",
        "In later years {s} advised younger colleagues.",
        "{S} wrote a short memoir about {p} working life.",
        "{S} travelled widely to give lectures.",
        "{P} work won several prizes.",
    ),
    "company": (
        "Its goods are sold through shops across the region.",
        "The firm publishes a report on its finances every spring.",
        "The business has been praised for its apprenticeship scheme.",
        "Its logo, a stylised bird, is widely recognised.",
        "The company has survived several changes of ownership.",
        "A museum of its early products is open to visitors.",
    ),
    "company_history": (
        "The early years were difficult, and the firm nearly closed twice.",
        "A fire destroyed much of the original workshop.",
        "The business grew quickly after a large order from the railways.",
        "Its first catalogue ran to only four pages.",
        "During hard times the workers agreed to shorter hours rather than layoffs.",
    ),
    "product": (
        "Reviewers praised its sturdy build.",
        "Early units are now sought after by collectors.",
        "A cheaper version followed a few years later.",
        "Its price put it within reach of ordinary households.",
        "Spare parts are still easy to find.",
        "Its design was copied widely.",
    ),
    "city": (
        "Its old market square is a popular meeting place.",
        "A stone bridge connects the two halves of the town.",
        "The local museum holds a collection of old maps.",
        "Summers are warm and winters are wet.",
        "A weekly market brings farmers from the surrounding villages.",
        "The town hall is decorated with painted tiles.",
    ),
    "country": (
        "Its landscape ranges from wide plains to forested hills.",
        "Farming and trade have long shaped its economy.",
        "Its railways link the major towns.",
        "Winters in the interior can be harsh.",
        "It is divided into provinces, each with its own council.",
    ),
    "river": (
        "Its waters are used to irrigate the surrounding fields.",
        "Boats carry grain along its lower course.",
        "Several old mills stand on its banks.",
        "Its floods were once feared by farmers downstream.",
        "Anglers prize it for its trout.",
    ),
    "university": (
        "It is known for its library, which holds many rare volumes.",
        "Its students compete in an annual rowing race.",
        "Lectures were once given in a converted granary.",
        "Its observatory is open to the public on clear nights.",
        "The main hall has a painted ceiling.",
    ),
}

_REFS = ("S", "s", "P", "p", "O")
_NOUNS = {"company": "the company", "product": "it", "city": "the town", "country": "the country",
          "river": "the river", "university": "the university"}
_FORMATTER = string.Formatter()


@dataclasses.dataclass(eq=False)
class Passage:
    title: str
    text: str
    states: tuple[str, ...] = ()
    """Attributes of the passage's entity it states (none for distractors)."""


class Writer:
    """Builds one passage about one entity, sentence by sentence.

    An entity with several passages is cut like an article: only the ``named`` passage (the first)
    names it in its text; the others say "she" or "the company" and carry the name in their title only.
    """

    def __init__(self, rng: random.Random, entity: Entity, named: bool = True) -> None:
        self.rng = rng
        self.entity = entity
        self.named = named
        self.sentences: list[str] = []
        self.states: list[str] = []

    def _pronoun(self, ref: str) -> str:
        e = self.entity
        if e.kind == "person":
            he, his, him = ("he", "his", "him") if e.gender == "m" else ("she", "her", "her")
            return {"S": he.capitalize(), "s": he, "P": his.capitalize(), "p": his, "O": him}[ref]
        noun = _NOUNS[e.kind]
        subject = noun if noun == "it" else self.rng.choice(("it", noun))
        return {"S": subject.capitalize(), "s": subject, "P": "Its", "p": "its", "O": noun}[ref]

    def add(self, template: str, **values: Any) -> None:
        name_pending = self.named and not self.sentences
        parts = []
        for literal, field, _, _ in _FORMATTER.parse(template):
            parts.append(literal)
            if field is None:
                continue
            if field in _REFS:
                if name_pending:
                    name = _display(self.entity)
                    parts.append(name + "'s" if field in "Pp" else name)
                    name_pending = False
                else:
                    parts.append(self._pronoun(field))
            else:
                parts.append(_show(values[field]))
        text = "".join(parts)
        self.sentences.append(text[0].upper() + text[1:])

    def state(self, attribute: str, templates: str | None = None, **extra: Any) -> None:
        """Add a sentence stating ``attribute`` (worded by ``STATEMENTS[templates or attribute]``)."""
        detail = self.entity.detail
        article = "an" if detail[:1] in tuple("aeiou") else "a"
        values = {"x": _show(self.entity.facts.get(attribute, ""), attribute), "d": detail,
                  "a_d": f"{article} {detail}", **extra}
        self.add(self.rng.choice(STATEMENTS[templates or attribute]), **values)
        if attribute in self.entity.facts:
            self.states.append(attribute)

    def passage(self, fillers: tuple[str, ...], lo: int = 42, hi: int = 96) -> Passage:
        """The opening sentence, the other sentences shuffled, padded with fillers to lo..hi words."""
        head, rest = self.sentences[:1], self.sentences[1:]
        self.rng.shuffle(rest)
        sentences = head + rest
        pool = list(fillers)
        self.rng.shuffle(pool)

        def words() -> int:
            return sum(len(s.split()) for s in sentences)

        while pool and (words() < lo or (self.rng.random() < 0.4 and words() < hi - 12)):
            filler = "".join(literal + (self._pronoun(field) if field else "")
                             for literal, field, _, _ in _FORMATTER.parse(pool.pop()))
            sentences.insert(self.rng.randint(1, len(sentences)), filler[0].upper() + filler[1:])
        if not lo <= words() <= hi:
            raise AssertionError(f"a passage about {self.entity.name} has {words()} words, not {lo}..{hi}")
        title = f"{self.entity.name} River" if self.entity.kind == "river" else self.entity.name
        return Passage(title, " ".join(sentences), tuple(self.states))


def _display(entity: Entity) -> str:
    if entity.kind == "river":
        return f"the {entity.name} River"
    if entity.kind == "product":
        return f"the {entity.name}"
    return entity.name


def _show(value: Any, attribute: str = "") -> str:
    """How a value is written. Figures get thousands separators, so the only four-digit numbers in the
    corpus are years and a year answer never matches a head count ("1500" against "1,500")."""
    if isinstance(value, Entity):
        return value.name
    if attribute in FIGURES:
        return f"{value:,}"
    return str(value)


# kind -> (opening statement, attributes questions ask about, other attributes, passages, filler pools)
ARTICLES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], int, tuple[str, ...]]] = {
    "person": ("profession", ("birthplace", "born", "died", "alma_mater", "spouse", "employer"), (), 3,
               ("person_life", "person_work")),
    "company": ("industry", ("hq", "ceo", "founder", "founded"), ("origin", "employees"), 2,
                ("company", "company_history")),
    "product": ("product_type", ("maker", "inventor", "released"), (), 2, ("product",)),
    "city": ("country", ("river", "founded"), ("population",), 2, ("city",)),
    "country": ("capital", ("longest_river", "independence", "currency"), ("language",), 2, ("country",)),
    "river": ("source", ("mouth", "length"), ("country",), 1, ("river",)),
    "university": ("city", ("founded",), ("students",), 1, ("university",)),
}
# Attributes worded by another attribute's templates for this kind of entity.
TEMPLATE_KEYS = {("city", "founded"): "city_founded", ("river", "country"): "river_country",
                 ("university", "city"): "uni_city", ("university", "founded"): "uni_founded"}


def _second_value(rng: random.Random, entity: Entity, attribute: str) -> dict[str, Any]:
    """The {y} of templates that carry a second value besides the attribute's own."""
    facts = entity.facts
    if attribute == "spouse":
        return {"y": facts["married"]}
    if attribute == "employer":
        first, last = facts["working"]
        return {"y": rng.randint(max(first, facts["employer"].facts["founded"]), last)}
    if attribute == "ceo":
        since = max(facts["founded"] + 1, facts["ceo"].facts["born"] + 30) + rng.randint(0, 10)
        return {"y": min(2024, since)}
    if attribute == "industry":
        return {"x": INDUSTRIES[entity.detail][0]}
    return {}


def article_passages(rng: random.Random, entity: Entity) -> list[Passage]:
    """An entity's passages, cut like an article: a named opening passage that states its opening
    attribute and one other, then unnamed passages that share out the remaining attributes."""
    opening, asked, others, count, fillers = ARTICLES[entity.kind]
    attributes = [a for a in asked if a in entity.facts]
    rng.shuffle(attributes)
    if count > 1:
        rest = attributes[1:] + [a for a in others if a in entity.facts]
        rng.shuffle(rest)
        groups = [attributes[:1]] + [group for i in range(count - 1) if (group := rest[i::count - 1])]
    else:
        groups = [attributes + [a for a in others if a in entity.facts]]
    passages = []
    for i, group in enumerate(groups):
        writer = Writer(rng, entity, named=i == 0)
        for attribute in ([opening] if i == 0 else []) + group:
            key = TEMPLATE_KEYS.get((entity.kind, attribute), attribute)
            writer.state(attribute, templates=key, **_second_value(rng, entity, attribute))
        passages.append(writer.passage(FILLERS[fillers[i % len(fillers)]]))
    return passages


# Distractors: many entities mentioned in passing, next to the words questions use, stating no attribute
# that is asked about. Slots: {P1}.. people, {K1}.. companies, {C1}.. towns, {N1} a country, {D1}..
# products, {R1} a river, {U1} a university, {y} a year, {W} an invented word, {T} a product type.
DISTRACTORS = (
    ("{C1} hall committee ({y})",
     "The {y} committee that planned the new hall in {C1} had ten members: {P1}, {P2}, {P3}, {P4}, {P5}, "
     "{P6}, {P7}, {P8}, {P9} and {P10}. Most were born in the district, two had founded local firms, and "
     "the minutes record long arguments about where the building should stand and who would pay for it."),
    ("Graduates of {U1} ({y})",
     "Among the students who graduated from {U1} in {y} were {P1}, {P2}, {P3}, {P4}, {P5}, {P6}, {P7} and "
     "{P8}. The class photograph, taken on the steps of the main hall, was reprinted decades later, when "
     "several of them had become well known. A reunion in {C1} brought together {P9} and {P10}."),
    ("{C1} exhibitors ({y})",
     "Exhibitors at the {y} fair in {C1} included {K1}, {K2}, {K3}, {K4}, {K5} and {K6}. Visitors came to "
     "see the {D1}, the {D2}, the {D3} and the {D4}. Prizes were handed out by {P1} and {P2}, and the "
     "founder of the fair, {P3}, spoke about where the new trade board should have its headquarters."),
    ("{R1} expedition ({y})",
     "The {y} expedition up the {R1} River was led by {P1}, with {P2}, {P3}, {P4}, {P5} and {P6}. They set "
     "out from {C1}, passed {C2} and {C3}, and returned by way of {C4}. {P7}, who was born in a fishing "
     "village, kept the diary, and {P8} drew the maps."),
    ("Letters of {y}",
     "A bundle of letters written in {y} to {P1} holds notes from {P2}, {P3}, {P4}, {P5}, {P6} and {P7}. "
     "They discuss where each writer was living, who had married whom, which company was hiring in {C1} "
     "and {C2}, and when {P8} would finally visit."),
    ("Railways of {N1}",
     "The main railway of {N1} runs from {C1} through {C2}, {C3}, {C4}, {C5} and {C6} to {C7}. The line "
     "was founded by a group of merchants, and its stations were built in one style. Trains once carried "
     "goods for {K1}, {K2}, {K3} and {K4}, and the company that runs the line has its headquarters in {C8}."),
    ("{C1} trade fair ({y})",
     "The {y} trade fair in {C1} drew crowds from across {N1}. {K1} and {K2} showed new goods side by side, "
     "and {P1} gave a talk on where companies should keep their headquarters. Several speakers had been "
     "born in small towns and spoke about leaving home. The fair was founded to help young firms find "
     "buyers, and the stand showing the {D1} drew the longest queue."),
    ("{W} Prize ({y})",
     "The {W} Prize of {y} went to {P1} for a lifetime of work. The jury, chaired by {P2}, also praised "
     "{P3}, {P4} and {P5}. The prize was established to honour people born or educated in {N1}, and the "
     "ceremony took place in {C1}. Past winners include engineers, painters and at least one founder of "
     "a large company."),
    ("{K1} v. {K2}",
     "A court in {C1} heard a dispute between {K1} and {K2} over the design of a {T}. Lawyers argued about "
     "who had invented the mechanism first, and {P1} and {P2} testified that the idea was older than "
     "either company. Both firms claimed their headquarters had kept the original drawings. The case "
     "ended with a settlement in {y}, and the {D1} was not affected."),
    ("Exhibition: the {T} ({y})",
     "An exhibition in {C1} in {y} traced the history of the {T}. On show were early models of the {D1}, "
     "the {D2}, the {D3} and the {D4}, with letters from {P1} and {P2} arguing about who should be credited "
     "as the inventor and which company should make the machine. Visitors could also see a workshop "
     "rebuilt from the founding days of {K1}."),
    ("Travels in {N1}",
     "A guide to {N1} suggests starting in {C1}, a busy market town, then following the {R1} River to "
     "{C2}. Travellers are often surprised by how old the towns are: {C3} and {C4} were founded many "
     "centuries ago. The guide recommends the museum in {C5}, which explains how the capital grew, and a "
     "boat trip to the place where the river begins."),
    ("{W} Conference ({y})",
     "The {W} Conference met in {C1} in {y}. Delegates discussed how new companies are founded, where "
     "they choose to place their headquarters, and who should lead them. {P1} chaired the opening "
     "session, while {P2}, {P3} and {P4} spoke about the {D1} and the people who designed it. Guests from "
     "{K1} and {K2} attended."),
)
_SLOT_KINDS = {"P": "person", "K": "company", "C": "city", "N": "country", "D": "product", "R": "river",
               "U": "university"}


def distractor_passages(rng: random.Random, world: dict[str, list[Entity]], count: int,
                        names: NameMaker) -> list[Passage]:
    """``count`` passages mentioning entities in passing; each entity drawn once per passage, uniformly,
    so no name dominates the lists."""
    passages = []
    for _ in range(count):
        title, text = rng.choice(DISTRACTORS)
        slots: dict[str, Any] = {"y": rng.randint(1870, 2022), "W": names.word(2), "T": rng.choice(PRODUCT_TYPES)}
        fields = {f for template in (title, text) for _, f, _, _ in _FORMATTER.parse(template) if f}
        for letter, kind in _SLOT_KINDS.items():
            wanted = sorted((f for f in fields if f[0] == letter), key=lambda f: int(f[1:]))
            chosen = rng.sample(world[kind], min(len(wanted), len(world[kind])))
            for field, entity in zip(wanted, itertools.cycle(chosen)):
                slots[field] = entity.name
        passages.append(Passage(title.format(**slots), text.format(**slots)))
    return passages


# ---------------------------------------------------------------------------------------------------
# Questions: worded away from the passage templates
# ---------------------------------------------------------------------------------------------------
# {n} is the entity's name, sometimes with a descriptor ("the chemist X").

QUESTIONS: dict[tuple[str, str], tuple[str, ...]] = {
    ("person", "birthplace"): (
        "Where was {n} born?",
        "In which city was {n} born?",
        "What is the birthplace of {n}?",
        "{n} was born in what town?",
        "Which town is the birthplace of {n}?",
    ),
    ("person", "born"): (
        "When was {n} born?",
        "In what year was {n} born?",
        "What is the birth year of {n}?",
        "{n} was born in which year?",
    ),
    ("person", "died"): (
        "When did {n} die?",
        "In what year did {n} die?",
        "What year did {n} pass away?",
        "When did the death of {n} occur?",
    ),
    ("person", "alma_mater"): (
        "Which university did {n} attend?",
        "Where did {n} go to college?",
        "What school did {n} graduate from?",
        "At which institution was {n} educated?",
    ),
    ("person", "spouse"): (
        "Who is {n} married to?",
        "Who was the spouse of {n}?",
        "Whom did {n} marry?",
        "Who was the husband or wife of {n}?",
    ),
    ("person", "employer"): (
        "Which company did {n} work for?",
        "Who employed {n}?",
        "What firm was {n} employed by?",
        "Where did {n} work?",
    ),
    ("company", "hq"): (
        "Where is {n} headquartered?",
        "In which city are the headquarters of {n}?",
        "Where are the headquarters of {n} located?",
        "What city is {n} based in?",
    ),
    ("company", "ceo"): (
        "Who is the CEO of {n}?",
        "Who runs {n}?",
        "Who is in charge of {n}?",
        "Who is the head of {n}?",
    ),
    ("company", "founder"): (
        "Who founded {n}?",
        "Who is the founder of {n}?",
        "By whom was {n} founded?",
        "Who created the company {n}?",
    ),
    ("company", "founded"): (
        "When was {n} founded?",
        "In what year was {n} founded?",
        "What year was {n} established?",
        "When did {n} come into being?",
    ),
    ("product", "maker"): (
        "Which company makes the {n}?",
        "Who manufactures the {n}?",
        "What company produces the {n}?",
        "The {n} is a product of which company?",
        "Who is the maker of the {n}?",
    ),
    ("product", "inventor"): (
        "Who invented the {n}?",
        "Who is the inventor of the {n}?",
        "Who designed the {n}?",
        "Who came up with the {n}?",
    ),
    ("product", "released"): (
        "When was the {n} released?",
        "In what year did the {n} come out?",
        "What year was the {n} first sold?",
        "When did the {n} go on sale?",
    ),
    ("city", "country"): (
        "In which country is {n}?",
        "What country is {n} in?",
        "{n} is located in which country?",
        "Which nation does {n} belong to?",
    ),
    ("city", "river"): (
        "Which river flows through {n}?",
        "What river is {n} on?",
        "On which river does {n} lie?",
        "Which river runs through {n}?",
    ),
    ("city", "founded"): (
        "When was {n} founded?",
        "In what year was {n} established?",
        "When was {n} first settled?",
        "How far back does the history of {n} go?",
    ),
    ("country", "capital"): (
        "What is the capital of {n}?",
        "Which city is the capital of {n}?",
        "What city serves as the capital of {n}?",
        "Where is the capital of {n}?",
    ),
    ("country", "longest_river"): (
        "What is the longest river in {n}?",
        "Which river is the longest in {n}?",
        "Name the longest river of {n}.",
    ),
    ("country", "currency"): (
        "What is the currency of {n}?",
        "What currency is used in {n}?",
        "What money do people use in {n}?",
    ),
    ("country", "independence"): (
        "When did {n} become independent?",
        "In what year did {n} gain independence?",
        "When did {n} achieve independence?",
    ),
    ("river", "source"): (
        "Where does the {n} River originate?",
        "What is the source of the {n} River?",
        "Where does the {n} River begin?",
        "Where is the source of the {n}?",
    ),
    ("river", "mouth"): (
        "Into which body of water does the {n} River flow?",
        "Where does the {n} River end?",
        "What is the mouth of the {n} River?",
        "Where does the {n} River discharge?",
    ),
    ("river", "length"): (
        "How long is the {n} River?",
        "What is the length of the {n} River?",
        "How many kilometres long is the {n}?",
    ),
    ("university", "city"): (
        "Where is {n} located?",
        "In which city is {n}?",
        "What city is {n} in?",
        "Where is the campus of {n}?",
    ),
    ("university", "founded"): (
        "When was {n} founded?",
        "In what year was {n} established?",
        "When did {n} open?",
    ),
}
DESCRIPTORS = {
    "person": ("the {d} {n}",),
    "company": ("the {d} firm {n}", "the {d} company {n}"),
    "city": ("the town of {n}", "the city of {n}"),
}


@dataclasses.dataclass
class Question:
    question: str
    answers: list[str]
    gold: Passage
    attribute: str


def entity_questions(rng: random.Random, entity: Entity, passages: list[Passage]) -> list[Question]:
    """Questions about ``entity``, each on a different attribute, each answered by the passage stating it."""
    askable = [(a, p) for p in passages for a in p.states if (entity.kind, a) in QUESTIONS]
    questions = []
    for attribute, passage in rng.sample(askable, min(QUESTIONS_PER_ENTITY[entity.kind], len(askable))):
        name = entity.name
        # No descriptor that repeats the name ("the optics firm Brek Optics").
        if entity.kind in DESCRIPTORS and rng.random() < DESCRIPTOR_RATE and entity.detail not in name.lower():
            name = rng.choice(DESCRIPTORS[entity.kind]).format(d=entity.detail, n=name)
        text = rng.choice(QUESTIONS[(entity.kind, attribute)]).format(n=name)
        answer = _show(entity.facts[attribute], attribute)
        if attribute == "length":
            answer += " kilometres"  # a bare number would also match unrelated figures ("840" in "840,000")
        questions.append(Question(text[0].upper() + text[1:], [answer], passage, attribute))
    return questions


# ---------------------------------------------------------------------------------------------------
# Assembly and output
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dataset:
    passages: list[tuple[str, str, str]]
    """(id, text, title) in file order."""
    splits: dict[str, list[dict[str, Any]]]
    """Split name -> question rows as written to ``<split>.jsonl``."""
    about: dict[str, tuple[str, str, str]]
    """Question id -> (entity kind, entity name, attribute asked): what each question is about."""


def generate(seed: int = 0, scale: float = 1.0) -> Dataset:
    """The demo dataset for ``seed`` at ``scale`` (1.0: a few thousand passages and questions)."""
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    rng = random.Random(seed)
    names = NameMaker(rng)
    world = build_world(rng, scale, names)
    kinds = sorted(world)

    articles = [(entity, article_passages(rng, entity)) for kind in kinds for entity in world[kind]]
    own = [p for _, ps in articles for p in ps]
    distractors = distractor_passages(rng, world, round(DISTRACTOR_FRACTION * len(own)), names)
    passages = own + distractors
    rng.shuffle(passages)
    ids = {p: str(i) for i, p in enumerate(passages, start=1)}

    # Split by entity, within each kind, so every split holds every kind of question.
    split_of: dict[Entity, str] = {}
    for kind in kinds:
        members = world[kind][:]
        rng.shuffle(members)
        start, cumulative = 0, 0.0
        for name, fraction in SPLITS:
            cumulative += fraction
            end = round(cumulative * len(members))
            split_of.update((e, name) for e in members[start:end])
            start = end

    rows: dict[str, list[tuple[dict[str, Any], tuple[str, str, str]]]] = {name: [] for name, _ in SPLITS}
    for entity, ps in articles:
        for q in entity_questions(rng, entity, ps):
            row = {"question": q.question, "answers": q.answers, "positive_ids": [ids[q.gold]]}
            rows[split_of[entity]].append((row, (entity.kind, entity.name, q.attribute)))
    splits, about = {}, {}
    for name, items in rows.items():
        rng.shuffle(items)
        splits[name] = []
        for i, (row, subject) in enumerate(items):
            qid = f"{name}-{i:05d}"
            splits[name].append({"id": qid, **row})
            about[qid] = subject
    return Dataset([(ids[p], p.text, p.title) for p in passages], splits, about)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write(dataset: Dataset, out: Path) -> None:
    """``passages.tsv`` and one ``<split>.jsonl`` per split under ``out``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    lines = ["id\ttext\ttitle"] + [f"{pid}\t{text}\t{title}" for pid, text, title in dataset.passages]
    _write_atomic(out / "passages.tsv", "\n".join(lines) + "\n")
    for name, rows in dataset.splits.items():
        _write_atomic(out / f"{name}.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="Output directory.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed (default 0).")
    parser.add_argument("--scale", type=float, default=1.0, help="Size relative to the default (default 1.0).")
    args = parser.parse_args(argv)
    if not args.scale > 0:
        parser.error(f"--scale must be > 0, got {args.scale}")
    dataset = generate(args.seed, args.scale)
    write(dataset, args.out)
    sizes = ", ".join(f"{name} {len(rows)}" for name, rows in dataset.splits.items())
    print(f"wrote {args.out}: {len(dataset.passages)} passages; questions: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
