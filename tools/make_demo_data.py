"""Regenerate the bundled demo data (src/cpm_live/demo_data/*.jsonl) deterministically.

Two small tasks in CPM-Bee's JSON format: pick the option that is an animal (an option task, scored
by accuracy) and add two small numbers (a generation task).
"""

import json
import random
from pathlib import Path

ANIMALS = "cat dog horse bird fish cow sheep lion tiger bear wolf fox duck goat frog mouse".split()
OTHERS = ("red blue green apple bread table chair stone river cloud paper glass spoon door "
          "window book lamp road sand milk rice cup box hat").split()
OUT = Path(__file__).parents[1] / "src" / "cpm_live" / "demo_data"


def option_sample(rng: random.Random) -> dict:
    answer = rng.randrange(4)
    words = rng.sample(OTHERS, 3)
    words.insert(answer, rng.choice(ANIMALS))
    return {"input": "Pick the animal.", "options": {f"<option_{i}>": w for i, w in enumerate(words)},
            "question": "Which one is an animal?", "<ans>": f"<option_{answer}>"}


def sum_sample(rng: random.Random) -> dict:
    a, b = rng.randrange(10), rng.randrange(10)
    return {"input": f"{a} + {b}", "question": "What is the sum?", "<ans>": str(a + b)}


def main() -> None:
    rng = random.Random(20261122)
    for name, n in (("train", 800), ("eval", 64)):
        samples = [option_sample(rng) if i % 2 == 0 else sum_sample(rng) for i in range(n)]
        with open(OUT / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)


if __name__ == "__main__":
    main()
