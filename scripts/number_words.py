"""Write a German -> English translation data set of number words, for the offline seq2seq recipe.

Each example is one or two numbers from 0 to 999, written out by the `num2words` package:

    {"de": "dreihundertzweiundvierzig, siebzehn", "en": "three hundred and forty two, seventeen"}

The numbers are split once, at random (seeded), into train, validation and test numbers, so the
test split holds only numbers the model never saw in training: scoring it measures whether the
model learned how German composes number words (units before tens, one word for the whole
number), not whether it remembers them. English hyphens are written as spaces: MiniLM's tokenizer
splits a hyphen off and decodes it with spaces around it ("forty - two"), which BLEU's tokenizer
would count as other words than the reference's "forty-two".

    pip install -e ".[number-words]"      # num2words
    python scripts/number_words.py data/number-words
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

def words(number: int, lang: str) -> str:
    from num2words import num2words

    text = num2words(number, lang=lang)
    return text.replace("-", " ") if lang == "en" else text


def examples(numbers: list[int], count: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(count):
        picked = rng.sample(numbers, rng.randint(1, 2))
        rows.append({"de": ", ".join(words(n, "de") for n in picked), "en": ", ".join(words(n, "en") for n in picked)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=3000, help="training examples")
    parser.add_argument("--eval", type=int, default=100, help="validation and test examples, each")
    parser.add_argument("--held-out", type=int, default=100, help="numbers kept for validation and for test, each")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    numbers = list(range(1000))
    rng.shuffle(numbers)
    held = args.held_out
    splits = {"validation": examples(numbers[:held], args.eval, rng),
              "test": examples(numbers[held:2 * held], args.eval, rng),
              "train": examples(numbers[2 * held:], args.train, rng)}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        print(f"{path}: {len(rows)} examples")


if __name__ == "__main__":
    main()
