"""Regenerate the bundled demo data (src/cpm_live/demo_data/*.jsonl) deterministically.

Two small tasks in CPM-Bee's JSON format, both scored by exact match:

- ``base_train.jsonl``: add two digits, repeat a word, or say whether one word is an animal. The demo's
  stand-in base model is trained on this only: it knows the sample format, every word and which words
  are animals, but has never counted anything.
- ``train.jsonl`` / ``eval.jsonl``: how many of four comma-separated words are animals (0-4). New to the
  base; QLoRA teaches it by reusing the base's animal feature (a base without that feature in its
  layers cannot be taught this by adapters on its linear layers). Every eval
  input is absent from the training file, so a right answer is the skill (count the animals), not a
  remembered line.
"""

import json
import random
from pathlib import Path

ANIMALS = "cat dog horse bird fish cow sheep lion tiger bear wolf fox duck goat frog mouse".split()
OTHERS = ("red blue green apple bread table chair stone river cloud paper glass spoon door "
          "window book lamp road sand milk rice cup box hat").split()
OUT = Path(__file__).parents[1] / "src" / "cpm_live" / "demo_data"


def animal_sample(rng: random.Random) -> dict:
    count = rng.randrange(5)
    words = rng.sample(ANIMALS, count) + rng.sample(OTHERS, 4 - count)
    rng.shuffle(words)
    # No spaces: each word is one token ("dog", not " dog"), the token the base saw in "Repeat the word".
    return {"input": ",".join(words), "question": "How many animals?", "<ans>": str(count)}


def repeat_sample(rng: random.Random) -> dict:
    word = rng.choice(ANIMALS + OTHERS)
    return {"input": word, "question": "Repeat the word.", "<ans>": word}


def is_animal_sample(rng: random.Random) -> dict:
    word = rng.choice(ANIMALS + OTHERS)
    return {"input": word, "question": "Is it an animal?", "<ans>": "yes" if word in ANIMALS else "no"}


def sum_sample(rng: random.Random) -> dict:
    a, b = rng.randrange(10), rng.randrange(10)
    return {"input": f"{a} + {b}", "question": "What is the sum?", "<ans>": str(a + b)}


def write(name: str, samples: list[dict]) -> None:
    with open(OUT / name, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)


def main() -> None:
    rng = random.Random(20261122)
    base_tasks = (sum_sample, repeat_sample, is_animal_sample)
    write("base_train.jsonl", [base_tasks[i % 3](rng) for i in range(600)])
    evals: list[dict] = []
    while len(evals) < 64:
        sample = animal_sample(rng)
        if sample["input"] not in {s["input"] for s in evals}:
            evals.append(sample)
    held_out = {s["input"] for s in evals}
    train: list[dict] = []
    while len(train) < 800:
        sample = animal_sample(rng)
        if sample["input"] not in held_out:
            train.append(sample)
    write("train.jsonl", train)
    write("eval.jsonl", evals)


if __name__ == "__main__":
    main()
