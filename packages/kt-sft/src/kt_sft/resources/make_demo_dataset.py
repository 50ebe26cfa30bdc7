"""Generate the bundled demo dataset `kt_demo.jsonl` (chat `messages` format).

The examples are short, regular instruction/response pairs (arithmetic, unit conversion, capitals,
opposites, word facts, weekdays and months) so that a tiny model can visibly learn them in a couple
of minutes. The file is generated, deterministic, and checked in; a test verifies that this script
reproduces it byte for byte:

    python -m kt_sft.resources.make_demo_dataset            # rewrite kt_demo.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["DATASET_FILE", "generate", "render"]

DATASET_FILE = Path(__file__).with_name("kt_demo.jsonl")
SEED = 20240611
SYSTEM = "You are a concise assistant. Answer in one sentence."

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Ghana": "Accra",
    "Nigeria": "Abuja",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Greece": "Athens",
    "Ireland": "Dublin",
    "Turkey": "Ankara",
    "Russia": "Moscow",
    "Australia": "Canberra",
    "New Zealand": "Wellington",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "South Korea": "Seoul",
    "Indonesia": "Jakarta",
    "Iran": "Tehran",
    "Morocco": "Rabat",
    "Cuba": "Havana",
    "Hungary": "Budapest",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
}

OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("up", "down"),
    ("light", "dark"),
    ("open", "closed"),
    ("early", "late"),
    ("happy", "sad"),
    ("full", "empty"),
    ("old", "new"),
    ("high", "low"),
    ("wet", "dry"),
    ("strong", "weak"),
    ("loud", "quiet"),
    ("near", "far"),
    ("hard", "soft"),
    ("long", "short"),
    ("rich", "poor"),
    ("thick", "thin"),
    ("left", "right"),
]

WORDS = [
    "river",
    "apple",
    "garden",
    "window",
    "planet",
    "yellow",
    "music",
    "bridge",
    "forest",
    "candle",
    "silver",
    "ocean",
    "rabbit",
    "pencil",
    "orange",
    "tiger",
    "cloud",
    "market",
    "winter",
    "camera",
    "island",
    "rocket",
    "basket",
    "mirror",
    "violin",
    "desert",
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
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
]

# (from unit, to unit, factor)
CONVERSIONS = [
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("centimeters", "millimeters", 10),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("years", "months", 12),
    ("dozens", "items", 12),
]


def _plural(n: int, unit: str) -> str:
    return unit[:-1] if n == 1 and unit.endswith("s") else unit


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    q = rng.choice(["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."])
    return q.format(a=a, b=b), f"{a} + {b} = {a + b}."


def _sub(rng: random.Random) -> tuple[str, str]:
    a, b = sorted((rng.randint(1, 99), rng.randint(1, 99)), reverse=True)
    q = rng.choice(["What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}."])
    return q.format(a=a, b=b), f"{a} - {b} = {a - b}."


def _mul(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    q = rng.choice(["What is {a} times {b}?", "Multiply {a} by {b}.", "What is {a} x {b}?"])
    return q.format(a=a, b=b), f"{a} x {b} = {a * b}."


def _convert(rng: random.Random) -> tuple[str, str]:
    src, dst, factor = rng.choice(CONVERSIONS)
    n = rng.randint(1, 9)
    q = rng.choice(["Convert {n} {src} to {dst}.", "How many {dst} are in {n} {src}?"])
    return (
        q.format(n=n, src=_plural(n, src), dst=dst),
        f"{n} {_plural(n, src)} is {n * factor} {dst}.",
    )


def _capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(CAPITALS))
    q = rng.choice(
        [
            "What is the capital of {c}?",
            "Name the capital city of {c}.",
            "Which city is the capital of {c}?",
        ]
    )
    return q.format(c=country), f"The capital of {country} is {CAPITALS[country]}."


def _opposite(rng: random.Random) -> tuple[str, str]:
    a, b = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        a, b = b, a
    q = rng.choice(["What is the opposite of {w}?", "Give the opposite of the word {w}."])
    return q.format(w=a), f"The opposite of {a} is {b}."


def _letters(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    if rng.random() < 0.5:
        return f"How many letters are in the word {w}?", f"The word {w} has {len(w)} letters."
    return f"What is the first letter of {w}?", f"The first letter of {w} is {w[0]}."


def _calendar(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        i = rng.randrange(len(DAYS))
        return f"What day comes after {DAYS[i]}?", f"{DAYS[(i + 1) % 7]} comes after {DAYS[i]}."
    i = rng.randrange(len(MONTHS))
    return (
        f"Which month comes after {MONTHS[i]}?",
        f"{MONTHS[(i + 1) % 12]} comes after {MONTHS[i]}.",
    )


TASKS: list[Callable[[random.Random], tuple[str, str]]] = [
    _add,
    _sub,
    _mul,
    _convert,
    _capital,
    _opposite,
    _letters,
    _calendar,
]


def generate(n: int = 400, seed: int = SEED) -> Iterator[dict]:
    """Yield `n` distinct examples as `{"messages": [...]}` records."""
    rng = random.Random(seed)
    seen: set[str] = set()
    i = 0
    while len(seen) < n:
        question, answer = TASKS[i % len(TASKS)](rng)
        i += 1
        if question in seen:
            continue
        seen.add(question)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.25:
            messages.insert(0, {"role": "system", "content": SYSTEM})
        yield {"messages": messages}


def render(n: int = 400, seed: int = SEED) -> str:
    """Return the JSONL text of the dataset."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generate(n, seed))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else DATASET_FILE
    out.write_text(render(), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
