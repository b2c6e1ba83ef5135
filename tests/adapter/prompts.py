"""Long test prompts built from a seed (no data set download): records a model can read and continue."""

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


def passkey_prompt(seed: int, filler_sentences: int, position: float) -> tuple[str, str]:
    """A number hidden at a relative `position` of repeated filler text; returns (prompt, passkey)."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    at = int(filler_sentences * position)
    parts = [filler] * filler_sentences
    parts.insert(at, f"The pass key is {key}. Remember it. {key} is the pass key. ")
    prompt = (
        "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n"
        + "".join(parts)
        + "\nWhat is the pass key? The pass key is"
    )
    return prompt, key
