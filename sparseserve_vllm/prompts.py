"""Long prompts built from a seed, no data set download: records to continue, and pass-key retrieval documents.

Used by the demo, the tests and the accuracy benchmarks.
"""

import random

CITIES = ["Lisbon", "Oslo", "Kyoto", "Quito", "Accra", "Perth", "Tunis", "Lima", "Hanoi", "Porto", "Riga", "Cork"]
THINGS = ["bridges", "libraries", "bakeries", "gardens", "museums", "harbours", "schools", "markets"]


def long_prompt(seed: int, min_words: int) -> str:
    rng = random.Random(seed)
    lines, words = [], 0
    i = 0
    while words < min_words:
        i += 1
        line = (
            f"Record {i}: {rng.choice(CITIES)} has {rng.randint(2, 900)} {rng.choice(THINGS)} and "
            f"{rng.randint(10, 99)} of them were built in {rng.randint(1700, 2020)}."
        )
        lines.append(line)
        words += len(line.split())
    return "\n".join(lines) + f"\nQuestion: which city appears in record {rng.randint(1, i)}? Answer:"


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_document(filler_sentences: int, key: str, position: float = 1 / 3) -> str:
    """`key` hidden at a relative `position` of repeated filler text."""
    parts = [FILLER] * filler_sentences
    parts.insert(int(filler_sentences * position), f"The pass key is {key}. Remember it. {key} is the pass key. ")
    return "".join(parts)


def passkey_prompt(seed: int, filler_sentences: int, position: float) -> tuple[str, str]:
    """A question about a random five-digit key hidden at `position`; returns (prompt, key)."""
    key = str(random.Random(seed).randint(10000, 99999))
    prompt = (
        "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n"
        + passkey_document(filler_sentences, key, position)
        + "\nWhat is the pass key?"
    )
    return prompt, key
