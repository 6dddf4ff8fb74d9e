"""Tokenize once: tokenized splits kept on disk under a hash of the tokenizer, the settings and the data.

An entry is one `.npz` file in `tokens_dir()`, named by its key, read without pickle: every list of
token-id lists is a flat int32 array plus int64 offsets, and a small JSON document holds the rest
(counts, strings). An entry is written to a temporary file and renamed into place, so a killed run
never leaves half an entry behind; an entry that cannot be read counts as missing and is rewritten.
The cache only saves time: when it cannot be written, the run goes on without it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
import warnings
import weakref
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tokenizers
import transformers

import lorafit

FORMAT = 1  # bump when the layout of an entry or the meaning of the token ids it holds changes

lookups: Counter[str] = Counter()  # "hit" / "miss" counts of `load_tokens`, for reporting

_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> digest of its model


def cache_root() -> Path:
    """$LORAFIT_CACHE if set, else $XDG_CACHE_HOME/lorafit, else ~/.cache/lorafit."""
    if os.environ.get("LORAFIT_CACHE"):
        return Path(os.environ["LORAFIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "lorafit"


def tokens_dir() -> Path:
    """Where tokenized splits are kept."""
    return cache_root() / "tokens"


def _vocabulary_digest(tokenizer) -> str:
    """sha256 of the tokenizer's model (vocabulary, merges), the slow part (~15 ms for 49k tokens),
    computed once per tokenizer object. Added tokens live outside the model and are hashed on every
    call, so `add_tokens` after the first call is still seen."""
    try:
        return _vocabularies[tokenizer]
    except (KeyError, TypeError):  # TypeError: a tokenizer that cannot be weakly referenced
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = backend.model.__getstate__()  # JSON bytes
    else:
        state = json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    digest = hashlib.sha256(state).hexdigest()
    try:
        _vocabularies[tokenizer] = digest
    except TypeError:
        pass
    return digest


def tokenizer_fingerprint(tokenizer) -> str:
    """A sha256 hex digest of everything that decides the tokenizer's token ids.

    The vocabulary is hashed once per tokenizer object; the rest (pipeline, added and special
    tokens, sides, chat template, library versions) is cheap and hashed on every call. Not
    `backend_tokenizer.to_str()` as a whole: it holds the truncation and padding of the last call,
    which would change the fingerprint every time the tokenizer is used with another max_length.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pipeline = {}
    if backend is not None:
        for part in ("normalizer", "pre_tokenizer", "post_processor"):
            component = getattr(backend, part)
            pipeline[part] = None if component is None else component.__getstate__().decode()
    settings = {
        "class": type(tokenizer).__name__,
        "vocabulary": _vocabulary_digest(tokenizer),
        "pipeline": pipeline,
        "added_tokens": [[i, repr(token)] for i, token in sorted(tokenizer.added_tokens_decoder.items())],
        "special_tokens": tokenizer.special_tokens_map,
        "special_ids": [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id],
        "sides": [tokenizer.padding_side, tokenizer.truncation_side],
        "chat_template": tokenizer.chat_template,
        "versions": [transformers.__version__, tokenizers.__version__],
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def cache_key(params: dict, content: Iterable[str]) -> str:
    """sha256 hex digest of `params` (e.g. kind, tokenizer fingerprint, max_length, format flags) and
    the strings of `content`, hashed one at a time, each prefixed by its length so that no two
    different sequences of strings hash alike."""
    header = {"format": FORMAT, "lorafit": lorafit.__version__, **params}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for item in content:
        data = item.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _entry_path(key: str) -> Path:
    return tokens_dir() / f"{key}.npz"


def load_tokens(key: str, lists: Iterable[str],
                meta: Iterable[str] = ()) -> tuple[dict[str, list[list[int]]], dict] | None:
    """The entry stored under `key`: ({name: list of int lists} for the names in `lists`, its JSON
    metadata, which must have the keys in `meta`). None when there is no such entry or it cannot be
    read or lacks a name (a damaged entry is overwritten by the next `save_tokens`)."""
    try:
        with np.load(_entry_path(key), allow_pickle=False) as archive:
            stored_meta = json.loads(archive["meta"].tobytes())
            if not isinstance(stored_meta, dict) or not set(meta) <= set(stored_meta):
                raise ValueError("metadata lacks a key")
            found = {}
            for name in lists:
                offsets, values = archive[f"{name}.offsets"], archive[f"{name}.values"]
                if (offsets.ndim != 1 or values.ndim != 1 or len(offsets) == 0 or offsets[0] != 0
                        or offsets[-1] != len(values) or (np.diff(offsets) < 0).any()):
                    raise ValueError(f"inconsistent offsets for {name!r}")
                flat, bounds = values.tolist(), offsets.tolist()
                found[name] = [flat[start:end] for start, end in itertools.pairwise(bounds)]
    except Exception:  # noqa: BLE001 - missing, or damaged in many ways (zip, zlib, numpy, JSON): tokenize again
        lookups["miss"] += 1
        return None
    lookups["hit"] += 1
    return found, stored_meta


def save_tokens(key: str, lists: dict[str, list[list[int]]], meta: dict) -> None:
    """Store an entry under `key` atomically. When the cache cannot be written, warn and go on."""
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    for name, rows in lists.items():
        offsets = np.cumsum([0] + [len(row) for row in rows], dtype=np.int64)
        arrays[f"{name}.offsets"] = offsets
        arrays[f"{name}.values"] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32,
                                               count=int(offsets[-1]))
    path = _entry_path(key)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{key}.", suffix=".tmp", delete=False) as handle:
            tmp = Path(handle.name)
            np.savez(handle, **arrays)
        # No fsync: after a power loss a renamed entry may be damaged, and damaged entries are ignored.
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        warnings.warn(f"tokenization cache: could not write to {path.parent} ({err.strerror or err}); "
                      f"tokenized splits are not cached", stacklevel=2)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
