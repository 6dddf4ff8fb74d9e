"""Silver named-entity data from 20 Newsgroups, made by explicit rules, as CoNLL files (`WORD TAG`).

    python scripts/newsgroups_ner.py data/newsgroups-ner   # writes train.txt and test.txt there

No NER corpus is reachable offline here, so the tags are made by rules from the posts themselves
(scikit-learn's by-date split: train.txt from its train posts, test.txt from its test posts):
- PER: the poster's name as the post's `From:` header gives it ("jd@x.edu (John Doe)" or
  "John Doe <jd@x.edu>"; two or more capitalized words), wherever that word sequence appears in
  the post. The header is not part of the text, so the model has to spot the name from the
  context (mostly a signature), not copy it from the header. Other people's names stay O.
- EMAIL: a word shaped like an address (`name@host.domain`, brackets and punctuation around it
  ignored).
- PHONE: a North American phone number (`617-555-0123`, `(617)555-0123`, or two words: `(617) 555-0123`).
- GROUP: a newsgroup name (`sci.space`, `comp.sys.mac.hardware`: one of the eight Usenet hierarchies).

The text is each post without its headers and quoted lines (the signature is kept: that is where
names are), cut into paragraphs at blank lines, and paragraphs into pieces of at most 64 words.
A piece is a sentence of the output. Every piece with an entity is kept, plus as many pieces
without one (a fixed-seed sample), so that a small run sees entities often. Tags are IOB2.

The scores a model gets on this data measure how well it learns these rules, PER being the one
that needs context; they say nothing about real NER.
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

from sklearn.datasets import fetch_20newsgroups
from sklearn.datasets._twenty_newsgroups import strip_newsgroup_header, strip_newsgroup_quoting

MAX_WORDS = 64
EDGE = "<>()[]{},;:\"'!?."  # punctuation around a word that the word rules ignore
RULES = {
    "EMAIL": re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+"),
    "PHONE": re.compile(r"\(?\d{3}\)?-?\d{3}-\d{4}"),
    "GROUP": re.compile(r"(alt|comp|misc|rec|sci|soc|talk|news)(\.[a-z0-9+-]+)+"),
}
AREA_CODE, LOCAL_NUMBER = re.compile(r"\(\d{3}\)"), re.compile(r"\d{3}-\d{4}")
NAME_WORD = re.compile(r"[A-Z][a-zA-Z'-]*\.?")


def poster_name(post: str) -> list[str] | None:
    """The words of the real name in the `From:` header, when it is two or more capitalized words."""
    header = post.split("\n\n", 1)[0]
    sender = re.search(r"^From:\s*(.*)$", header, re.M)
    if sender is None:
        return None
    found = re.search(r"\(([^()]+)\)", sender[1]) or re.match(r'\s*"?([^"<]+?)"?\s*<', sender[1])
    words = found[1].split() if found else []
    return words if len(words) >= 2 and all(NAME_WORD.fullmatch(w) for w in words) else None


def tag_words(words: list[str], name: list[str] | None) -> list[str]:
    """IOB2 tags of one piece: the word rules, then the poster's name (a word sequence) over them."""
    tags = ["O"] * len(words)
    for i, word in enumerate(words):
        core = word.strip(EDGE)
        kind = next((k for k, rule in RULES.items() if rule.fullmatch(core)), None)
        if kind:
            tags[i] = f"B-{kind}"
        elif i and AREA_CODE.fullmatch(words[i - 1]) and LOCAL_NUMBER.fullmatch(core):
            tags[i - 1:i + 1] = ["B-PHONE", "I-PHONE"]
    if name:
        n = len(name)
        for i in range(len(words) - n + 1):
            if [w.rstrip(",.;:") for w in words[i:i + n]] == name and all(t == "O" for t in tags[i:i + n]):
                tags[i:i + n] = ["B-PER"] + ["I-PER"] * (n - 1)
    return tags


def pieces(post: str) -> list[list[str]]:
    """The post's text (no headers, no quoted lines) as paragraphs of at most MAX_WORDS words."""
    text = strip_newsgroup_quoting(strip_newsgroup_header(post))
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        words = paragraph.split()
        out += [words[i:i + MAX_WORDS] for i in range(0, len(words), MAX_WORDS)]
    return out


def sentences(subset: str, seed: int) -> list[tuple[list[str], list[str]]]:
    """Every tagged piece with an entity of one subset, and as many pieces without, drawn with `seed`."""
    posts = fetch_20newsgroups(subset=subset, remove=(), download_if_missing=False).data
    with_entity, without = [], []
    for post in posts:
        name = poster_name(post)
        for words in pieces(post):
            tags = tag_words(words, name)
            (with_entity if any(t != "O" for t in tags) else without).append((words, tags))
    rng = random.Random(seed)
    chosen = with_entity + rng.sample(without, min(len(without), len(with_entity)))
    rng.shuffle(chosen)
    return chosen


def write_conll(path: Path, rows: list[tuple[list[str], list[str]]]) -> None:
    path.write_text("".join("".join(f"{w} {t}\n" for w, t in zip(words, tags)) + "\n" for words, tags in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="folder to write train.txt and test.txt to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    for subset in ("train", "test"):
        rows = sentences(subset, args.seed)
        write_conll(args.output / f"{subset}.txt", rows)
        counts = {}
        for _, tags in rows:
            for tag in tags:
                if tag.startswith("B-"):
                    counts[tag[2:]] = counts.get(tag[2:], 0) + 1
        print(f"{args.output / f'{subset}.txt'}: {len(rows)} sentences, entities {dict(sorted(counts.items()))}")


if __name__ == "__main__":
    main()
