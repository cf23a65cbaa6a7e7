"""The project's own labeled question set, generated deterministically.

Where the labels come from: arithmetic and number questions are computed; the other categories
come from the small fact tables below (world capitals, chemical symbols, English antonyms,
irregular plurals and past tenses), written for this project from common knowledge. Each table is
split by a seeded shuffle into a `calibration` half (fits routers) and a `test` half (evaluates
pools), so no question is in both.

Each record: `{"question": str, "answers": [str, ...], "category": str}`.
"""

from __future__ import annotations

import random
from typing import Any

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
    "Argentina": "Buenos Aires", "Canada": "Ottawa", "Australia": "Canberra",
    "India": "New Delhi", "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin",
    "Hungary": "Budapest", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Cuba": "Havana",
    "Mexico": "Mexico City", "Colombia": "Bogota", "Turkey": "Ankara", "Iran": "Tehran",
    "Iraq": "Baghdad", "South Korea": "Seoul", "Denmark": "Copenhagen",
    "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern",
    "Ukraine": "Kyiv", "Nigeria": "Abuja", "Morocco": "Rabat",
}  # fmt: skip

SYMBOLS = {
    "hydrogen": "H", "helium": "He", "carbon": "C", "nitrogen": "N", "oxygen": "O",
    "sodium": "Na", "magnesium": "Mg", "aluminium": "Al", "silicon": "Si",
    "phosphorus": "P", "sulfur": "S", "chlorine": "Cl", "potassium": "K", "calcium": "Ca",
    "iron": "Fe", "copper": "Cu", "zinc": "Zn", "silver": "Ag", "gold": "Au", "tin": "Sn",
    "lead": "Pb", "mercury": "Hg", "neon": "Ne", "argon": "Ar", "uranium": "U",
    "nickel": "Ni", "iodine": "I", "fluorine": "F", "lithium": "Li", "platinum": "Pt",
}  # fmt: skip

ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark",
    "up": "down", "open": "closed", "early": "late", "full": "empty", "hard": "soft",
    "high": "low", "long": "short", "old": "young", "rich": "poor", "strong": "weak",
    "thick": "thin", "wet": "dry", "loud": "quiet", "true": "false", "win": "lose",
    "begin": "end", "buy": "sell", "push": "pull", "love": "hate", "inside": "outside",
    "above": "below", "day": "night", "north": "south", "east": "west", "left": "right",
    "clean": "dirty", "cheap": "expensive", "heavy": "light", "near": "far",
    "first": "last", "top": "bottom", "friend": "enemy", "question": "answer",
}  # fmt: skip

PLURALS = {
    "child": "children", "mouse": "mice", "goose": "geese", "man": "men", "woman": "women",
    "tooth": "teeth", "foot": "feet", "person": "people", "ox": "oxen", "leaf": "leaves",
    "knife": "knives", "wife": "wives", "life": "lives", "wolf": "wolves", "half": "halves",
    "cactus": "cacti", "fungus": "fungi", "crisis": "crises", "analysis": "analyses",
    "box": "boxes", "city": "cities", "baby": "babies", "potato": "potatoes",
    "hero": "heroes", "bus": "buses", "church": "churches", "lady": "ladies",
    "loaf": "loaves", "thief": "thieves", "shelf": "shelves",
}  # fmt: skip

PAST_TENSES = {
    "go": "went", "eat": "ate", "see": "saw", "take": "took", "give": "gave",
    "write": "wrote", "speak": "spoke", "run": "ran", "swim": "swam", "drink": "drank",
    "sing": "sang", "begin": "began", "break": "broke", "choose": "chose", "drive": "drove",
    "fly": "flew", "forget": "forgot", "freeze": "froze", "know": "knew", "ride": "rode",
    "rise": "rose", "steal": "stole", "throw": "threw", "wear": "wore", "buy": "bought",
    "catch": "caught", "teach": "taught", "think": "thought", "bring": "brought",
    "sleep": "slept",
}  # fmt: skip


def _record(question: str, answers: list[str], category: str) -> dict[str, Any]:
    return {"question": question, "answers": answers, "category": category}


def _table(rng: random.Random, table: dict[str, str]) -> tuple[list[str], list[str]]:
    keys = sorted(table)
    rng.shuffle(keys)
    half = len(keys) // 2
    return keys[:half], keys[half:]


def _distinct_pairs(rng: random.Random, low: int, high: int, count: int) -> list[tuple[int, int]]:
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < count:
        pairs.add((rng.randint(low, high), rng.randint(low, high)))
    return sorted(pairs, key=lambda _: rng.random())


def generate(seed: int = 0, per_category: int = 20) -> dict[str, list[dict[str, Any]]]:
    """Both splits, `calibration` and `test`, each with up to `per_category` of every category."""
    rng = random.Random(seed)
    splits: dict[str, list[dict[str, Any]]] = {"calibration": [], "test": []}

    def add_table(table: dict[str, str], category: str, question: str) -> None:
        for split, keys in zip(splits, _table(rng, table), strict=True):
            for key in keys[:per_category]:
                splits[split].append(_record(question.format(key), [table[key]], category))

    add_table(CAPITALS, "capitals", "What is the capital of {}? Answer with the city only.")
    add_table(SYMBOLS, "chemistry", "What is the chemical symbol for {}? Answer with the symbol.")
    add_table(ANTONYMS, "antonyms", "What is the opposite of the word '{}'? Answer with one word.")
    add_table(PLURALS, "plurals", "What is the plural of the word '{}'? Answer with one word.")
    add_table(PAST_TENSES, "past_tense", "What is the past tense of '{}'? Answer with one word.")

    pairs = _distinct_pairs(rng, 10, 99, 2 * per_category)
    products = _distinct_pairs(rng, 2, 9, 2 * per_category)
    successors = rng.sample(range(10, 1000), 2 * per_category)
    for i, split in enumerate(splits):
        part = slice(i * per_category, (i + 1) * per_category)
        for a, b in pairs[part]:
            q = f"What is {a} + {b}? Answer with the number."
            splits[split].append(_record(q, [str(a + b)], "addition"))
        for a, b in products[part]:
            q = f"What is {a} times {b}? Answer with the number."
            splits[split].append(_record(q, [str(a * b)], "multiplication"))
        for n in successors[part]:
            q = f"What number comes right after {n}? Answer with the number."
            splits[split].append(_record(q, [str(n + 1)], "successor"))
    return splits
