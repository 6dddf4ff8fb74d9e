"""Token classification: a tag for every word (named-entity recognition, part of speech, chunking).

Data are sentences of words with one tag per word: a dataset's `data.tokens_column` and
`data.tags_column` (a list each per row), or CoNLL-style text files (`data.path: conll`). A word's
tag goes on its first sub-word (on every sub-word with `data.label_all_subwords`); every other
position, special tokens and padding get -100 and no loss.

Evaluation is per word, on the tag predicted at its first sub-word: entity-level precision, recall
and F1 through seqeval under `data.tag_scheme`, a per-entity-type table, and token accuracy (the
share of words tagged right). Every word of the data is scored: a word cut off by `data.max_length`
has no sub-word, counts as predicted "O", and the number of such words is logged and reported.
"""

from __future__ import annotations

import re
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lorafit.distributed import merge_items
from lorafit.errors import LorafitError
from lorafit.tasks.base import Task, TaskData

IGNORE = -100
"""The label of a position without a target: cross-entropy's `ignore_index`, as transformers uses it."""
OUTSIDE = "O"
CONLL = "conll"
# The chunk prefixes a scheme writes before "-TYPE"; "none" has tags that are not entities.
SCHEME_PREFIXES = {"IOB1": ("I", "B"), "IOB2": ("B", "I"), "IOBES": ("B", "I", "E", "S")}
SAMPLES = 5
"""Sentences the eval report shows with their gold and predicted entities."""


# ---------------------------------------------------------------- raw data


@dataclass
class TaggedSentences:
    """Sentences as words and tag ids (into `names`), one list each per sentence."""

    words: list[list[str]]
    tags: list[list[int]]
    names: list[str]

    def __len__(self) -> int:
        return len(self.words)

    def head(self, n: int | None) -> TaggedSentences:
        """The first `n` sentences (all for None)."""
        return self if not n else TaggedSentences(self.words[:n], self.tags[:n], self.names)

    def pick(self, indices: list[int]) -> TaggedSentences:
        return TaggedSentences([self.words[i] for i in indices], [self.tags[i] for i in indices], self.names)


@dataclass
class RawSplit:
    """One split as read: words and tags as the data gives them (names or integers), the tag names of
    the dataset's ClassLabel feature (None without one), and where it came from, for messages."""

    words: list[list[str]]
    tags: list[list[Any]]
    names: list[str] | None
    name: str


def read_conll(path: Path) -> tuple[list[list[str]], list[list[str]]]:
    """Sentences of a CoNLL-style file: one `WORD ... TAG` per line (the word is the first column and
    the tag the last; columns between, such as CoNLL-2003's part of speech and chunk, are ignored),
    blank lines between sentences, `-DOCSTART-` lines skipped."""
    words: list[list[str]] = []
    tags: list[list[str]] = []
    sentence_words: list[str] = []
    sentence_tags: list[str] = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if sentence_words:
                    words.append(sentence_words)
                    tags.append(sentence_tags)
                    sentence_words, sentence_tags = [], []
                continue
            if len(fields) < 2:
                raise LorafitError(f"{path}: line {number} is {line.strip()!r}: expected a word and its tag "
                                   f"('WORD TAG', the tag in the last column)")
            sentence_words.append(fields[0])
            sentence_tags.append(fields[-1])
    if sentence_words:
        words.append(sentence_words)
        tags.append(sentence_tags)
    return words, tags


def _read_conll_split(cfg, split: str) -> RawSplit:
    from lorafit.data import _check_data_files, split_files

    files = split_files(cfg, split)
    if not files:
        raise LorafitError(f"data.data_files: no file for split {split!r}; give data.data_files as "
                           f"{{{split}: FILE, ...}} with data.path: conll")
    _check_data_files(files)
    words: list[list[str]] = []
    tags: list[list[str]] = []
    for file in files:
        file_words, file_tags = read_conll(Path(file))
        words += file_words
        tags += file_tags
    if not words:
        raise LorafitError(f"data: split {split!r} is empty: {', '.join(files)} has no sentences")
    return RawSplit(words, tags, None, split)


def _read_dataset_splits(cfg, splits: list[str]) -> dict[str, RawSplit]:
    """Splits of a `datasets` dataset, every row checked: a list of words and a list of as many tags."""
    import datasets

    from lorafit.data import get_split, open_hf, split_source

    dataset = open_hf(cfg)
    found = {}
    for split in splits:
        part = get_split(dataset, split, {"tokens_column": cfg.tokens_column, "tags_column": cfg.tags_column})
        inner = getattr(part.features[cfg.tags_column], "feature", None)  # Sequence / List of ClassLabel
        names = list(inner.names) if isinstance(inner, datasets.ClassLabel) else None
        words, tags = part[cfg.tokens_column], part[cfg.tags_column]
        for row, (row_words, row_tags) in enumerate(zip(words, tags)):
            if not isinstance(row_words, list) or not all(isinstance(w, str) for w in row_words):
                raise LorafitError(f"data.tokens_column: row {row} of split {split!r} is {row_words!r}, "
                                   f"not a list of words (strings)")
            if not isinstance(row_tags, list):
                raise LorafitError(f"data.tags_column: row {row} of split {split!r} is {row_tags!r}, "
                                   f"not a list of tags (one per word)")
            if len(row_tags) != len(row_words):
                raise LorafitError(f"data.tags_column: row {row} of split {split!r} has {len(row_tags)} tags for "
                                   f"{len(row_words)} words (data.tokens_column); give one tag per word")
        if not words:
            raise LorafitError(f"data: split {split!r} is empty: {split_source(cfg, split)} has no rows")
        found[split] = RawSplit(list(words), list(tags), names, split)
    return found


def read_splits(cfg, splits: list[str]) -> dict[str, RawSplit]:
    """The named splits of the recipe's data, as read (see `RawSplit`)."""
    if cfg.path == CONLL:
        return {split: _read_conll_split(cfg, split) for split in splits}
    return _read_dataset_splits(cfg, splits)


def tag_names(split: RawSplit) -> list[str]:
    """The tag names of a training split in id order: its ClassLabel's names, else its tags sorted
    (integers numerically, strings as text)."""
    if split.names is not None:
        return split.names
    values = {tag for tags in split.tags for tag in tags}
    kinds = {type(v) for v in values}
    if not (kinds <= {int} or kinds <= {str}):
        raise LorafitError(f"data.tags_column: tags in split {split.name!r} must be all strings or all integers, "
                           f"found {sorted(k.__name__ for k in kinds)}")
    return [str(v) for v in sorted(values)]


def check_scheme(names: list[str], scheme: str, where: str) -> None:
    """Every tag name is "O" or PREFIX-TYPE with a prefix of `scheme` (seqeval could not read it else)."""
    if scheme == "none":
        return
    prefixes = SCHEME_PREFIXES[scheme]
    for name in names:
        prefix, dash, kind = name.partition("-")
        if name != OUTSIDE and not (dash and kind and prefix in prefixes):
            raise LorafitError(f"data.tag_scheme: the tag {name!r} of {where} is not {scheme} (O, or "
                               f"{'/'.join(prefixes)}-TYPE); set data.tag_scheme to the data's scheme, or to none "
                               f"to score token accuracy only")


def encode_tags(split: RawSplit, names: list[str], known_as: str) -> TaggedSentences:
    """`split` with its tags as ids into `names`; empty sentences are dropped (nothing to learn or score).

    Integer tags are ids into the split's ClassLabel names when it has some, else the names' own text.
    A tag outside `names` is an error naming its row; `known_as` says whose tags `names` are.
    """
    index = {name: i for i, name in enumerate(names)}
    if names == [f"LABEL_{i}" for i in range(len(names))]:
        # A model without tag names (e.g. from a PEFT adapter): integer tags are the ids.
        index.update({str(i): i for i in range(len(names))})
    words, tags = [], []
    for row, (row_words, row_tags) in enumerate(zip(split.words, split.tags)):
        if not row_words:
            continue
        texts = [split.names[t] if split.names is not None and isinstance(t, int) else str(t) for t in row_tags]
        unknown = next((t for t in texts if t not in index), None)
        if unknown is not None:
            raise LorafitError(f"data.tags_column: row {row} of split {split.name!r} has the tag {unknown!r}, "
                               f"which {known_as} lacks; known tags: {names[:20]}")
        words.append(row_words)
        tags.append([index[t] for t in texts])
    return TaggedSentences(words, tags, names)


# ---------------------------------------------------------------- tokens


@dataclass
class TokenSplit:
    """Tokenized sentences: per token its id and label (IGNORE: no loss); per word the position of its
    first sub-word (-1: it has none, e.g. cut off by max_length) and its gold tag id."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    first_tokens: list[list[int]]
    tags: list[list[int]]
    names: list[str]
    words_truncated: int
    """Words past max_length: they have no sub-word, and count as predicted "O"."""
    sentences_truncated: int
    scheme: str = "IOB2"
    """The data's tag scheme (`data.tag_scheme`), which evaluation reads entities by."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def word_of_tokens(words: list[list[str]], tokenizer, max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each sentence (its words joined by single spaces, truncated to `max_length`) and, per
    token, the index of the word it belongs to (-1 for special tokens).

    Tokens are matched to words through the fast tokenizer's character offsets: this works alike for
    WordPiece, byte-level BPE (RoBERTa, GPT-2: no `add_prefix_space` needed) and SentencePiece.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise LorafitError(f"token classification needs a fast tokenizer (for character offsets); "
                           f"{type(tokenizer).__name__} is not one")
    texts = [" ".join(sentence) for sentence in words]
    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
    owners = []
    for sentence, text, offsets in zip(words, texts, encoded["offset_mapping"]):
        char_word = [-1] * len(text)  # spaces between words stay -1
        start = 0
        for index, word in enumerate(sentence):
            char_word[start:start + len(word)] = [index] * len(word)
            start += len(word) + 1
        # A token's word: the first word character it covers (byte-level BPE tokens start with the space).
        owners.append([next((char_word[c] for c in range(s, e) if char_word[c] >= 0), -1) for s, e in offsets])
    return encoded["input_ids"], owners


def tokenize_sentences(sentences: TaggedSentences, tokenizer, max_length: int, label_all_subwords: bool = False,
                       scheme: str = "IOB2", cache: bool = False) -> TokenSplit:
    """Token ids and per-token labels of `sentences` (see `TokenSplit`; `scheme` is the tags' scheme);
    with `cache`, ids and word indices come from the tokenization cache when this tokenizer has seen
    these sentences before."""
    from lorafit.cache import cache_key, load_tokens, save_tokens, tokenizer_fingerprint

    key = None
    if cache:
        params = {"kind": "token-classification", "tokenizer": tokenizer_fingerprint(tokenizer),
                  "max_length": max_length}
        key = cache_key(params, ("\x1f".join(sentence) for sentence in sentences.words))
        entry = load_tokens(key, ["input_ids", "word_index"])
    if key is not None and entry is not None:
        input_ids, owners = entry[0]["input_ids"], entry[0]["word_index"]
    else:
        input_ids, owners = word_of_tokens(sentences.words, tokenizer, max_length)
        if key is not None:
            save_tokens(key, {"input_ids": input_ids, "word_index": owners}, {})
    labels, first_tokens, truncated, cut_sentences = [], [], 0, 0
    for ids, owner, tags in zip(input_ids, owners, sentences.tags):
        first = [-1] * len(tags)
        row = [IGNORE] * len(ids)
        for position, word in enumerate(owner):
            if word < 0:
                continue
            if first[word] < 0:
                first[word] = position
                row[position] = tags[word]
            elif label_all_subwords:
                row[position] = tags[word]
        if len(ids) >= max_length:
            last = max((w for w in owner if w >= 0), default=-1)
            cut = len(tags) - 1 - last
            truncated += cut
            cut_sentences += cut > 0
        labels.append(row)
        first_tokens.append(first)
    return TokenSplit(input_ids, labels, first_tokens, sentences.tags, sentences.names, truncated, cut_sentences,
                      _scheme_for(sentences.names, scheme))


def collate_tokens(split: TokenSplit, indices: list[int], pad_id: int, multiple: int = 1,
                   cap: int | None = None) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and per-token labels (IGNORE on padding) of the chosen sentences."""
    from lorafit.data import padded_width

    rows = [split.input_ids[i] for i in indices]
    width = padded_width([len(r) for r in rows], multiple, cap)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(split.input_ids[i])
        input_ids[row, :n] = torch.tensor(split.input_ids[i], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(split.labels[i], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def summed_loss(model, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy summed over the labelled tokens: the model's own `labels=` loss (their mean) times their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE,
                           reduction="sum", label_smoothing=label_smoothing)


@dataclass
class TagPredictions:
    """Per sentence, the tag id predicted for each word (-1: the word has no sub-word), and the loss."""

    tags: list[list[int]]
    loss: float
    """Mean cross-entropy over the labelled tokens."""
    targets: int

    @classmethod
    def from_sums(cls, tags: list[list[int]], total_loss: float, targets: int) -> TagPredictions:
        """From the loss summed over `targets` labelled tokens (`tag_sentences`)."""
        return cls(tags, total_loss / max(targets, 1), targets)


@torch.inference_mode()
def tag_sentences(model, split: TokenSplit, indices: list[int], batch_size: int, pad_id: int,
                  device: torch.device | str = "cpu", autocast: Callable = nullcontext,
                  on_batch: Callable[[int], None] | None = None) -> tuple[list[list[int]], float, int]:
    """Run `model` over the sentences `indices` of `split` in length-sorted batches. Returns, in `indices`
    order, each sentence's tags (per word, the argmax at its first sub-word; -1 for a word without one),
    and the cross-entropy summed over their labelled tokens, and how many those are."""
    from lorafit.data import default_pad_multiple, eval_order

    was_training = model.training
    model.eval()
    predicted: list[list[int]] = [[] for _ in indices]
    total, targets = 0.0, 0
    multiple, cap = default_pad_multiple(device), max(split.lengths, default=0)
    for rows in eval_order([split.lengths[i] for i in indices], batch_size):
        chosen = [indices[r] for r in rows]
        batch = {k: v.to(device) for k, v in collate_tokens(split, chosen, pad_id, multiple, cap).items()}
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits.float()
        total += F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE,
                                 reduction="sum").item()
        targets += int((batch["labels"] != IGNORE).sum())
        best = logits.argmax(-1).cpu()
        for row, (r, i) in enumerate(zip(rows, chosen)):
            predicted[r] = [int(best[row, p]) if p >= 0 else -1 for p in split.first_tokens[i]]
        if on_batch:
            on_batch(len(rows))
    model.train(was_training)
    return predicted, total, targets


def predict_tags(model, split: TokenSplit, batch_size: int, pad_id: int, device: torch.device | str = "cpu",
                 autocast: Callable = nullcontext, on_batch: Callable[[int], None] | None = None) -> TagPredictions:
    """`tag_sentences` over the whole `split`."""
    every = list(range(len(split)))
    return TagPredictions.from_sums(*tag_sentences(model, split, every, batch_size, pad_id, device, autocast,
                                                   on_batch))


# ---------------------------------------------------------------- scores


def as_names(ids: list[int], names: list[str]) -> list[str]:
    """Tag names of tag ids; a word with no prediction (-1) is "O"."""
    return [names[i] if i >= 0 else OUTSIDE for i in ids]


def entity_spans(tags: list[str], scheme: str) -> list[tuple[str, int, int]]:
    """(type, first word, last word + 1) of each entity in a sentence's tags, read as seqeval reads them
    for `scores`; with scheme "none" every word not tagged "O" is its own span, its tag the type."""
    if scheme == "none":
        return [(tag, i, i + 1) for i, tag in enumerate(tags) if tag != OUTSIDE]
    if scheme == "IOB2":
        from seqeval.metrics.sequence_labeling import get_entities

        return [(kind, start, end + 1) for kind, start, end in get_entities(tags)]
    from seqeval import scheme as schemes
    from seqeval.scheme import Entities

    return [(e.tag, e.start, e.end) for e in Entities([tags], getattr(schemes, scheme)).entities[0]]


def scores(gold: list[list[str]], predicted: list[list[str]], scheme: str) -> dict:
    """Entity-level precision, recall and F1 (micro-averaged over entities) and per entity type, and token
    accuracy, over word tag sequences.

    seqeval reads IOB2 as conlleval does (the numbers CoNLL results are quoted in); IOB1 and IOBES in
    its strict mode, which knows those schemes' rules. With scheme "none": token accuracy only.
    """
    words = sum(len(s) for s in gold)
    right = sum(g == p for gs, ps in zip(gold, predicted) for g, p in zip(gs, ps))
    out: dict[str, Any] = {"token_accuracy": right / max(words, 1)}
    if scheme == "none":
        return out
    from seqeval import scheme as schemes
    from seqeval.metrics import classification_report

    strict = {} if scheme == "IOB2" else {"mode": "strict", "scheme": getattr(schemes, scheme)}
    with warnings.catch_warnings():  # numpy's mean of no entity types, when a split has none
        warnings.simplefilter("ignore", RuntimeWarning)
        report = classification_report(gold, predicted, output_dict=True, zero_division=0, **strict)
    micro = report["micro avg"]
    out.update(precision=float(micro["precision"]), recall=float(micro["recall"]), f1=float(micro["f1-score"]))
    out["per_entity"] = {kind: {"precision": float(s["precision"]), "recall": float(s["recall"]),
                                "f1": float(s["f1-score"]), "support": int(s["support"])}
                         for kind, s in report.items() if not kind.endswith(" avg")}
    return out


def split_metrics(split: TokenSplit, out: TagPredictions) -> dict:
    """`scores` of predictions on a tokenized split, with its loss, words and words cut off."""
    gold = [as_names(tags, split.names) for tags in split.tags]
    predicted = [as_names(tags, split.names) for tags in out.tags]
    return {"loss": out.loss, **scores(gold, predicted, split.scheme), "words": sum(len(t) for t in gold),
            "words_truncated": split.words_truncated}


def evaluation_metrics(split: TokenSplit, out: TagPredictions) -> dict:
    """What training logs for a split: `split_metrics` without the per-entity table."""
    metrics = split_metrics(split, out)
    metrics.pop("per_entity", None)
    return metrics


# ---------------------------------------------------------------- the task


def _data_config(trained):
    """The recipe's data section of a trained model, or the schema's defaults without a recipe."""
    from lorafit.recipe import DataConfig

    return trained.recipe.data if trained.recipe else DataConfig()


def _scheme_for(names: list[str], scheme: str) -> str:
    """`scheme`, or "none" when the tag names do not follow it (a PEFT adapter's LABEL_0, LABEL_1 ...)."""
    try:
        check_scheme(names, scheme, "the model")
    except LorafitError:
        return "none"
    return scheme


WORD = re.compile(r"\S+")


class TokenClassification(Task):
    name = "token-classification"
    peft_task_type = "TOKEN_CLS"
    auto_class = "AutoModelForTokenClassification"
    peft_head_modules = ("classifier", "score")
    labels_text = True
    data_keys = ("tokens_column", "tags_column", "tag_scheme", "label_all_subwords")
    train_keys = ("label_smoothing",)
    eval_metrics = ("f1", "token_accuracy")

    def model_kwargs(self, labels: list[str] | None) -> dict:
        if not labels:
            raise LorafitError("token classification needs at least one tag")
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {name: i for i, name in enumerate(labels)}}

    def claims(self, config: dict) -> bool:
        return any(a.endswith("ForTokenClassification") for a in config.get("architectures") or [])

    # ------------------------------------------------------------ data

    def load_data(self, cfg, seed: int) -> TaskData:
        """Train, eval (held out of train, seeded, without `data.eval_split`) and test sentences, tags as
        ids into the train split's tag names (or its ClassLabel's); tags of other splits unseen in
        training are an error."""
        from lorafit.data import hold_out

        wanted = list(dict.fromkeys(s for s in (cfg.train_split, cfg.eval_split, cfg.test_split) if s))
        raw = read_splits(cfg, wanted)
        names = tag_names(raw[cfg.train_split])
        check_scheme(names, cfg.tag_scheme, f"split {cfg.train_split!r}")
        encode = lambda split: encode_tags(raw[split], names, "the train split")  # noqa: E731
        train = encode(cfg.train_split)
        if cfg.eval_split:
            eval_ = encode(cfg.eval_split)
        else:
            keep, held = hold_out(len(train), cfg.eval_fraction, seed)
            train, eval_ = train.pick(keep), train.pick(held)
        test = encode(cfg.test_split) if cfg.test_split else None
        train = train.head(cfg.max_train_samples)
        eval_ = eval_.head(cfg.max_eval_samples)
        test = test.head(cfg.max_eval_samples) if test is not None else None
        return TaskData(train, eval_, test, labels=names)

    def load_split(self, cfg, split: str, labels: list[str] | None, max_samples: int | None = None) -> TaggedSentences:
        """One split's sentences, tags as ids into the model's tag names `labels` (a tag the model does
        not know is an error naming its row)."""
        import dataclasses

        only = dataclasses.replace(cfg, train_split=split, eval_split=None, test_split=None)
        return encode_tags(read_splits(only, [split])[split], labels, "the model").head(max_samples)

    def tokenize(self, examples: TaggedSentences, tokenizer, cfg, max_length: int, train: bool = False) -> TokenSplit:
        return tokenize_sentences(examples, tokenizer, max_length, cfg.label_all_subwords, cfg.tag_scheme, cfg.cache)

    def check_split(self, name: str, examples: TaggedSentences, split: TokenSplit, cfg) -> list[str]:
        """A note on the words cut off by max_length, if any."""
        if not split.words_truncated:
            return []
        return [f"{name}: {split.words_truncated} words in {split.sentences_truncated} of {len(split)} sentences "
                f"are past data.max_length ({cfg.max_length} tokens); they get no tag, and count as predicted O "
                f"in evaluation"]

    def collate(self, split: TokenSplit, indices: list[int], pad_id: int, multiple: int = 1,
                cap: int | None = None) -> dict[str, torch.Tensor]:
        return collate_tokens(split, indices, pad_id, multiple, cap)

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE).sum())

    # ------------------------------------------------------------ training

    def loss(self, model, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
        return summed_loss(model, batch, label_smoothing)

    def evaluate(self, model, split: TokenSplit, batch_size: int, pad_id: int, device: torch.device | str = "cpu",
                 autocast: Callable = nullcontext, on_batch: Callable[[int], None] | None = None) -> dict:
        """Loss, entity precision/recall/F1 (under the split's tag scheme), token accuracy, and the number
        of words scored and cut off by max_length."""
        return evaluation_metrics(split, predict_tags(model, split, batch_size, pad_id, device, autocast, on_batch))

    def evaluate_share(self, model, split: TokenSplit, indices: list[int], batch_size: int, pad_id: int,
                       device: torch.device | str = "cpu", autocast: Callable = nullcontext) -> tuple:
        """The share's sentence indices and predicted tags, and its summed loss and labelled tokens
        (seqeval scores entities over the tags of every sentence of the split, not per share)."""
        tags, total_loss, targets = tag_sentences(model, split, indices, batch_size, pad_id, device, autocast)
        return indices, tags, total_loss, targets

    def reduce_eval(self, split: TokenSplit, shares: list[tuple]) -> dict:
        tags = merge_items([(indices, share_tags) for indices, share_tags, _, _ in shares], len(split))
        out = TagPredictions.from_sums(tags, sum(loss for _, _, loss, _ in shares),
                                       sum(targets for _, _, _, targets in shares))
        return evaluation_metrics(split, out)

    # ------------------------------------------------------------ merge

    def probe_batch(self, tokenizer, max_length: int) -> dict[str, torch.Tensor]:
        from lorafit.merge import text_probe_batch

        return text_probe_batch(tokenizer, max_length)

    # ------------------------------------------------------------ inference

    def eval_report(self, trained, examples: TaggedSentences, split: str, batch_size: int, device: torch.device,
                    autocast: Callable, console) -> dict:
        """Loss, entity-level precision/recall/F1 and token accuracy, a per-entity-type table, the words
        cut off by max_length, and the first sentences with their gold and predicted entities."""
        from lorafit.inference import progress_bar

        cfg = _data_config(trained)
        tokens = tokenize_sentences(examples, trained.tokenizer, trained.max_length, cfg.label_all_subwords,
                                    cfg.tag_scheme)
        with progress_bar(console, f"eval {split}", len(tokens)) as advance:
            out = predict_tags(trained.model, tokens, batch_size, trained.tokenizer.pad_token_id, device, autocast,
                               on_batch=advance)
        scheme = tokens.scheme
        report = {"examples": len(tokens), "tag_scheme": scheme, "max_length": trained.max_length,
                  "labels": examples.names, **split_metrics(tokens, out)}
        samples = []
        for words, gold, predicted in list(zip(examples.words, tokens.tags, out.tags))[:SAMPLES]:
            span = lambda tags: [{"text": " ".join(words[s:e]), "type": kind}  # noqa: E731
                                 for kind, s, e in entity_spans(as_names(tags, examples.names), scheme)]
            samples.append({"text": " ".join(words), "gold": span(gold), "predicted": span(predicted)})
        report["samples"] = samples
        return report

    def report_table(self, report: dict):
        from rich.table import Table

        table = Table(title=f"{report.get('split', '')} ({report['examples']} sentences, {report['words']} words)"
                      .strip())
        for column in ("entity", "precision", "recall", "F1", "support"):
            table.add_column(column, justify="left" if column == "entity" else "right")
        for kind, s in report.get("per_entity", {}).items():
            table.add_row(kind, f"{s['precision']:.4f}", f"{s['recall']:.4f}", f"{s['f1']:.4f}", str(s["support"]))
        table.add_section()
        if "f1" in report:
            table.add_row("all entities", f"{report['precision']:.4f}", f"{report['recall']:.4f}",
                          f"{report['f1']:.4f}", str(sum(s["support"] for s in report["per_entity"].values())))
        table.add_row("token accuracy", "", "", f"{report['token_accuracy']:.4f}", str(report["words"]))
        table.add_row("loss", "", "", f"{report['loss']:.4f}", "")
        if report["words_truncated"]:
            table.add_row("words past max_length", "", "", "", str(report["words_truncated"]))
        return table

    def predict(self, trained, texts: list[str], console) -> list[dict]:
        """For each text: {"text", "entities": [{"text", "type", "start", "end"}]}, with `start`/`end`
        character offsets into the text. Words are the text's whitespace-separated pieces (so
        punctuation stays on its word, as it was in the training data or not); an entity runs from
        its first word's first character to its last word's last."""
        from lorafit.inference import progress_bar, runtime

        names = trained.labels
        found = [list(WORD.finditer(text)) for text in texts]
        sentences = TaggedSentences([[m.group() for m in words] for words in found],
                                    [[0] * len(words) for words in found], names)
        tokens = tokenize_sentences(sentences, trained.tokenizer, trained.max_length,
                                    scheme=_data_config(trained).tag_scheme)
        run = runtime(trained)
        with progress_bar(console, "predict", len(tokens)) as advance:
            out = predict_tags(trained.model, tokens, run.batch_size, trained.tokenizer.pad_token_id, run.device,
                               run.autocast, on_batch=advance)
        rows = []
        for text, words, tags in zip(texts, found, out.tags):
            entities = [{"text": text[words[s].start():words[e - 1].end()], "type": kind,
                         "start": words[s].start(), "end": words[e - 1].end()}
                        for kind, s, e in entity_spans(as_names(tags, names), tokens.scheme)]
            rows.append({"text": text, "entities": entities})
        return rows

    def predictions_table(self, rows: list[dict]):
        """Each text's entities: text, type and character span."""
        from lorafit.report import predictions_table

        def cells(row: dict) -> list[str]:
            return ["; ".join(f"{e['text']!r} {e['type']} [{e['start']}:{e['end']}]" for e in row["entities"]) or "-"]

        return predictions_table(rows, {"entities": {"overflow": "fold"}}, cells)
