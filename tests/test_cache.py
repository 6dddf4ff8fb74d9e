"""The tokenization cache: cached splits equal fresh ones, hits skip the tokenizer, any change of
data, settings or tokenizer misses, and a damaged or unwritable cache never fails a run."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import lm_tokenizer, make_tokenizer, toy_recipe, toy_rows
from rich.console import Console
from transformers import PreTrainedTokenizerFast

from lorafit import cache
from lorafit.data import TextSplit
from lorafit.tasks import TaskData
from lorafit.tasks.classification import tokenize
from lorafit.lm import tokenize_lm
from lorafit.recipe import recipe_from_dict
from lorafit.train import Setup, tokenize_splits

LM_WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "the", "dog", "ran", "to", "the", "park"]


def toy_split(n: int = 30, seed: int = 1) -> TextSplit:
    rows = toy_rows(n, seed)
    return TextSplit([r["text"] for r in rows], [i % 3 for i in range(n)])


def lm_examples(fmt: str) -> list[dict]:
    examples = []
    for i in range(12):
        words = LM_WORDS[i % 5: i % 5 + 3 + i % 7]
        if fmt == "text":
            examples.append({"text": " ".join(words)})
        elif fmt == "prompt-completion":
            examples.append({"prompt": " ".join(words[:2]), "completion": " ".join(words[2:])})
        else:
            examples.append({"messages": [{"role": "user", "content": " ".join(words[:2])},
                                          {"role": "assistant", "content": " ".join(words[2:])}]})
    return examples


def entries() -> list[Path]:
    """Every file in the cache directory, temporary ones included."""
    return sorted(cache.tokens_dir().iterdir()) if cache.tokens_dir().is_dir() else []


@pytest.fixture
def forbid_tokenizing(monkeypatch):
    """Call it to make every later tokenizer call fail, so that results can only come from the cache."""
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer was called")

    def forbid() -> None:
        monkeypatch.setattr(PreTrainedTokenizerFast, "__call__", refuse)
        monkeypatch.setattr(PreTrainedTokenizerFast, "apply_chat_template", refuse)

    return forbid


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "mine"
    monkeypatch.delenv("LORAFIT_CACHE")
    assert cache.cache_root() == tmp_path / "xdg" / "lorafit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "lorafit"


def test_tests_do_not_write_to_the_home_cache(token_cache):
    assert cache.tokens_dir() == token_cache / "tokens"


def test_classification_from_cache_equals_fresh_and_skips_the_tokenizer(forbid_tokenizing):
    split, tokenizer = toy_split(), make_tokenizer()
    fresh = tokenize(split, tokenizer, 8)
    assert max(fresh.lengths) == 8 and min(fresh.lengths) < 8  # truncation and ragged rows both exercised

    hits = cache.lookups["hit"]
    stored = tokenize(split, tokenizer, 8, cache=True)
    assert cache.lookups["hit"] == hits
    assert [p.suffix for p in entries()] == [".npz"]  # one entry, no temporary file left behind

    forbid_tokenizing()
    cached = tokenize(split, make_tokenizer(), 8, cache=True)  # another tokenizer object, same tokenizer
    assert cache.lookups["hit"] == hits + 1
    assert stored == fresh
    assert cached == fresh
    assert all(type(i) is int for row in cached.input_ids for i in row)


@pytest.mark.parametrize(("fmt", "chat", "packing"), [("text", False, False), ("text", False, True),
                                                       ("prompt-completion", False, False),
                                                       ("prompt-completion", True, True), ("chat", True, False)])
def test_lm_from_cache_equals_fresh(fmt, chat, packing, forbid_tokenizing):
    examples, tokenizer = lm_examples(fmt), lm_tokenizer()
    fresh = tokenize_lm(examples, tokenizer, 6, fmt, use_chat_template=chat, packing=packing)
    assert (fresh.dropped > 0) == (fmt == "chat")  # max_length 6 cuts off some assistant turns entirely
    assert any(fresh.references) == (fmt == "prompt-completion")
    assert (fresh.segments is not None) == packing

    assert tokenize_lm(examples, tokenizer, 6, fmt, use_chat_template=chat, packing=packing, cache=True) == fresh
    hits = cache.lookups["hit"]

    forbid_tokenizing()
    cached = tokenize_lm(examples, lm_tokenizer(), 6, fmt, use_chat_template=chat, packing=packing, cache=True)
    assert cache.lookups["hit"] == hits + 1
    assert cached == fresh
    assert cached.references == fresh.references and cached.dropped == fresh.dropped


def test_fingerprint_is_stable_and_sees_token_changes():
    tokenizer = make_tokenizer()
    before = cache.tokenizer_fingerprint(tokenizer)
    tokenizer(["the ball"], truncation=True, max_length=3)  # leaves truncation state in the backend
    assert cache.tokenizer_fingerprint(tokenizer) == before
    assert cache.tokenizer_fingerprint(make_tokenizer()) == before

    tokenizer.add_special_tokens({"additional_special_tokens": ["[NEW]"]})
    assert cache.tokenizer_fingerprint(tokenizer) != before
    other = make_tokenizer()
    other.padding_side = "left"
    assert cache.tokenizer_fingerprint(other) != before
    assert cache.tokenizer_fingerprint(lm_tokenizer()) != before


def test_changed_texts_max_length_or_tokenizer_miss():
    split, tokenizer = toy_split(), make_tokenizer()
    tokenize(split, tokenizer, 8, cache=True)
    changed_text = TextSplit([split.texts[0] + " ball"] + split.texts[1:], split.labels)
    split_differently = TextSplit(["the ball", "goal"], [0, 1]), TextSplit(["the", "ball goal"], [0, 1])
    new_token = make_tokenizer()
    new_token.add_special_tokens({"additional_special_tokens": ["ock"]})  # "rocket" becomes [UNK] ock [UNK]

    misses = cache.lookups["miss"]
    assert tokenize(changed_text, tokenizer, 8, cache=True) == tokenize(changed_text, tokenizer, 8)
    assert tokenize(split, tokenizer, 9, cache=True) == tokenize(split, tokenizer, 9)
    with_new_token = tokenize(split, new_token, 8, cache=True)
    assert with_new_token == tokenize(split, new_token, 8)
    assert with_new_token != tokenize(split, tokenizer, 8)
    for part in split_differently:  # the same characters, cut into texts differently
        tokenize(part, tokenizer, 8, cache=True)
    assert cache.lookups["miss"] == misses + 5
    assert len(entries()) == 6


def test_lm_settings_are_part_of_the_key():
    examples, tokenizer = lm_examples("prompt-completion"), lm_tokenizer()
    for chat in (False, True):
        for packing in (False, True):
            tokenize_lm(examples, tokenizer, 8, "prompt-completion", use_chat_template=chat, packing=packing,
                        cache=True)
    assert len(entries()) == 4


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "no offsets"])
def test_a_damaged_entry_is_ignored_and_rewritten(damage):
    split, tokenizer = toy_split(), make_tokenizer()
    fresh = tokenize(split, tokenizer, 8, cache=True)
    [path] = entries()
    good = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * len(good))
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a readable archive without the arrays an entry needs
        with open(path, "wb") as handle:
            np.savez(handle, meta=np.frombuffer(b"{}", dtype=np.uint8))

    misses = cache.lookups["miss"]
    assert tokenize(split, tokenizer, 8, cache=True) == fresh
    assert cache.lookups["miss"] == misses + 1
    assert entries() == [path] and path.read_bytes() == good
    hits = cache.lookups["hit"]
    assert tokenize(split, tokenizer, 8, cache=True) == fresh
    assert cache.lookups["hit"] == hits + 1


def test_an_unwritable_cache_does_not_fail(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("LORAFIT_CACHE", str(blocker))  # mkdir fails, even for root
    split, tokenizer = toy_split(), make_tokenizer()
    with pytest.warns(UserWarning, match=r"tokenization cache: could not write to .*not-a-directory/tokens"):
        cached = tokenize(split, tokenizer, 8, cache=True)
    assert cached == tokenize(split, tokenizer, 8)


def test_a_write_cut_short_leaves_nothing_behind(monkeypatch):
    def full_disk(file, **arrays):
        file.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    split, tokenizer = toy_split(), make_tokenizer()
    with pytest.warns(UserWarning, match="No space left on device"):
        assert tokenize(split, tokenizer, 8, cache=True) == tokenize(split, tokenizer, 8)
    assert entries() == []  # neither a half entry nor the temporary file

    def interrupted(file, **arrays):
        file.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tokenize(split, tokenizer, 8, cache=True)
    assert entries() == []


def test_tokenize_splits_reports_cache_hits(tmp_path, toy_data):
    recipe = recipe_from_dict(toy_recipe(tmp_path / "model", toy_data, tmp_path / "run"))
    rows = {name: toy_split(n, seed) for name, n, seed in (("train", 24, 1), ("eval", 6, 2), ("test", 6, 3))}
    setup = Setup(model=None, tokenizer=make_tokenizer(), plan=None, spec=None,
                  data=TaskData(rows["train"], rows["eval"], rows["test"], ["space", "sports", "tech"]))

    def run() -> tuple[dict, str]:
        console = Console(file=io.StringIO(), width=300)
        return tokenize_splits(recipe, setup, console), console.file.getvalue()

    first, first_log = run()
    second, second_log = run()
    assert f"tokenized splits: 0 of 3 from cache ({cache.tokens_dir()})" in first_log
    assert f"tokenized splits: 3 of 3 from cache ({cache.tokens_dir()})" in second_log
    assert second == first == {name: tokenize(split, setup.tokenizer, 32) for name, split in rows.items()}
