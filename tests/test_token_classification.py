"""Token classification (`model.task: token-classification`): data, label alignment, the loss the
model defines, seqeval scores, entities with offsets, PEFT TOKEN_CLS adapters, merge, the CLI end to end.

The toy data: sentences of filler words and keyword entities (conftest.KEYWORDS: `ball goal` is a
SPORTS entity, `orbit` a SPACE one), tagged IOB2, so a tiny model learns them in a few steps.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from conftest import FILLER, KEYWORDS, make_tokenizer, read_metrics, write_jsonl, write_recipe
from rich.console import Console
from safetensors.torch import load_file
from test_heads import shrink
from transformers import CONFIG_MAPPING, AutoModelForTokenClassification

from lorafit.adapter import load_adapter_model
from lorafit.errors import LorafitError
from lorafit.recipe import DataConfig, TrainConfig, recipe_from_dict
from lorafit.tasks.token_classification import (IGNORE, TaggedSentences, TokenClassification, entity_spans,
                                                read_conll, scores, tokenize_sentences)
from lorafit.train import train

TASK = TokenClassification()


def toy_sentences(n: int, seed: int) -> list[dict]:
    """Rows {"tokens", "ner_tags"}: filler words tagged O around one or two keyword entities (1-2 words)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.choices(FILLER, k=rng.randint(2, 5))
        tags = ["O"] * len(words)
        for _ in range(rng.randint(1, 2)):
            kind = rng.choice(sorted(KEYWORDS))
            entity = rng.sample(KEYWORDS[kind], rng.randint(1, 2))
            at = rng.randint(0, len(words))
            words[at:at] = entity
            tags[at:at] = [f"B-{kind.upper()}"] + [f"I-{kind.upper()}"] * (len(entity) - 1)
        rows.append({"tokens": words, "ner_tags": tags})
    return rows


def wordpiece_tokenizer():
    """BERT-style WordPiece: `football` is `foot ##ball`, `rockets` is `rocket ##s`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "foot", "##ball", "rocket", "##s", "goal", "fly", "."]
    core = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def byte_level_tokenizer():
    """GPT-2/RoBERTa-style byte-level BPE, trained here on words without `football` and `rockets` (which
    become `Ġfoot bal l` and `Ġrocket s`): a word's first token carries the space before it, and its
    character offsets start at that space."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<pad>"])
    core.train_from_iterator(["the foot ball goal rocket fly"] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>")


def sentences(*rows: tuple[list[str], list[str]]) -> TaggedSentences:
    names = sorted({t for _, tags in rows for t in tags})
    return TaggedSentences([w for w, _ in rows], [[names.index(t) for t in tags] for _, tags in rows], names)


# ---------------------------------------------------------------- label alignment


@pytest.mark.parametrize("make", [wordpiece_tokenizer, byte_level_tokenizer], ids=["wordpiece", "byte-level-bpe"])
def test_tag_goes_on_the_first_sub_word_only(make):
    tokenizer = make()
    data = sentences((["the", "football", "rockets", "fly"], ["O", "B-X", "I-X", "O"]))
    split = tokenize_sentences(data, tokenizer, max_length=32)
    tokens = tokenizer.convert_ids_to_tokens(split.input_ids[0])
    by_word = {}
    for position, token in enumerate(tokens):
        by_word.setdefault(token.lstrip("Ġ#"), position)
    # The first piece of `football` is `foot`, of `rockets` is `rocket`; their second pieces get no label.
    names = data.names  # ["B-X", "I-X", "O"]
    first = [by_word["the"], by_word["foot"], by_word["rocket"], by_word["fly"]]
    assert split.first_tokens[0] == first
    expected = [IGNORE] * len(tokens)
    for position, tag in zip(first, ["O", "B-X", "I-X", "O"]):
        expected[position] = names.index(tag)
    assert split.labels[0] == expected
    assert sum(label != IGNORE for label in split.labels[0]) == 4 < len(tokens) - 2

    every = tokenize_sentences(data, tokenizer, max_length=32, label_all_subwords=True)
    # Every piece of a word carries its tag; special tokens still carry none.
    owner = {p: w for w, p in enumerate(first)}
    word = -1
    for position, label in enumerate(every.labels[0]):
        word = owner.get(position, word)
        special = tokens[position] in ("[CLS]", "[SEP]")
        assert label == (IGNORE if special else data.tags[0][word]), (position, tokens[position])


def test_words_cut_off_by_max_length_are_counted_and_scored_as_o():
    data = sentences((["the", "ball", "goal", "orbit", "moon"], ["O", "B-SPORTS", "I-SPORTS", "B-SPACE", "I-SPACE"]),
                     (["the", "orbit"], ["O", "B-SPACE"]))
    cfg = DataConfig(max_length=4, cache=False)  # [CLS] + 3 words
    split = TASK.tokenize(data, make_tokenizer(), cfg, cfg.max_length)
    assert split.words_truncated == 2 and split.first_tokens[0] == [1, 2, 3, -1, -1]
    assert TASK.check_split("test", data, split, cfg) == [
        "test: 2 words in 1 of 2 sentences are past data.max_length (4 tokens); they get no tag, and count as "
        "predicted O in evaluation"]
    metrics = TASK.evaluate(OracleModel(data, make_tokenizer()), split, batch_size=2, pad_id=0)
    # The cut-off SPACE entity counts as missed: 2 of 3 gold entities found, none predicted wrongly.
    assert (metrics["precision"], metrics["recall"], metrics["words_truncated"]) == (1.0, 2 / 3, 2)
    assert metrics["token_accuracy"] == 5 / 7


class OracleModel(torch.nn.Module):
    """Logits that put each token's known tag first: evaluation on it scores every word it sees right."""

    def __init__(self, data: TaggedSentences, tokenizer):
        super().__init__()
        self.tag_of = {tokenizer.convert_tokens_to_ids(w): t
                       for words, tags in zip(data.words, data.tags) for w, t in zip(words, tags)}
        self.num_labels = len(data.names)
        self.unknown = data.names.index("O")  # [UNK], [CLS], padding
        self.config = SimpleNamespace(num_labels=self.num_labels, id2label=dict(enumerate(data.names)))

    def forward(self, input_ids, attention_mask):
        tags = torch.tensor([[self.tag_of.get(int(i), self.unknown) for i in row] for row in input_ids])
        return type("Out", (), {"logits": torch.nn.functional.one_hot(tags, self.num_labels).float()})


def test_predict_gives_entities_with_character_offsets():
    data = sentences((["the", "ball", "goal", "orbit", "moon", "a"], ["O", "B-SPORTS", "I-SPORTS", "B-SPACE",
                                                                    "I-SPACE", "O"]))
    trained = SimpleNamespace(model=OracleModel(data, make_tokenizer()), tokenizer=make_tokenizer(), recipe=None,
                              max_length=32, train_config=TrainConfig(precision="fp32"), labels=data.names)
    text = "the  ball goal, then\torbit moon a"
    row, other = TASK.predict(trained, [text, "then the a"], console=None)
    assert other == {"text": "then the a", "entities": []}
    # Words split on whitespace: "goal," is one word (its first sub-word, "goal", carries the tag).
    assert row == {"text": text, "entities": [{"text": "ball goal,", "type": "SPORTS", "start": 5, "end": 15},
                                              {"text": "orbit moon", "type": "SPACE", "start": 21, "end": 31}]}
    assert [text[e["start"]:e["end"]] for e in row["entities"]] == ["ball goal,", "orbit moon"]


def test_tokenization_cache_gives_the_same_split():
    from lorafit import cache

    data = sentences((["the", "football", "rockets", "fly"], ["O", "B-X", "I-X", "O"]), (["goal"], ["B-X"]))
    fresh = tokenize_sentences(data, wordpiece_tokenizer(), max_length=5, cache=True)
    hits = cache.lookups["hit"]
    cached = tokenize_sentences(data, wordpiece_tokenizer(), max_length=5, label_all_subwords=True, cache=True)
    assert cache.lookups["hit"] == hits + 1
    assert (cached.input_ids, cached.first_tokens, cached.words_truncated) == \
        (fresh.input_ids, fresh.first_tokens, fresh.words_truncated) == \
        ([[2, 4, 5, 6, 3], [2, 9, 3]], [[1, 2, -1, -1], [1]], 2)
    # label_all_subwords is applied after the cache: `football`'s second piece is labelled only here.
    assert (fresh.labels[0][3], cached.labels[0][3]) == (IGNORE, 0)


# ---------------------------------------------------------------- the loss the model defines

ARCHITECTURES = ["bert", "roberta", "distilbert", "deberta-v2", "electra", "gpt2", "llama"]


def tiny_tagger(model_type: str, num_labels: int):
    torch.manual_seed(0)
    config = CONFIG_MAPPING[model_type]()
    shrink(config, {"pad_token_id": 0})
    config.num_labels = num_labels
    return AutoModelForTokenClassification.from_config(config).eval()


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_summed_loss_is_the_models_own_loss_times_the_targets(model_type):
    data = TaggedSentences([r["tokens"] for r in toy_sentences(4, seed=0)], [], ["B-A", "I-A", "O"])
    data.tags = [[random.Random(i).randrange(3) for _ in words] for i, words in enumerate(data.words)]
    model = tiny_tagger(model_type, 3)
    for every in (False, True):
        split = tokenize_sentences(data, make_tokenizer(), max_length=16, label_all_subwords=every)
        batch = TASK.collate(split, [0, 1, 2, 3], pad_id=0)
        count = TASK.count_targets(batch)
        assert count == sum(len(w) for w in data.words)  # one target per word: the toy tokenizer has no sub-words
        with torch.no_grad():
            own = model(**batch).loss * count
            ours = TASK.loss(model, batch)
        torch.testing.assert_close(ours, own, rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------- seqeval scores and entities


def test_scores_under_each_scheme():
    # IOB2 as conlleval reads it: PER found, LOC missed, one ORG predicted wrongly.
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "O"]]
    predicted = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "O"]]
    got = scores(gold, predicted, "IOB2")
    assert (got["precision"], got["recall"], got["f1"]) == (0.5, 0.5, 0.5)
    assert got["token_accuracy"] == 4 / 6
    assert got["per_entity"] == {"LOC": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
                                 "ORG": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0},
                                 "PER": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}}
    # IOB1: I-X starts an entity, B-X only splits two of the same type. Two PERs here, not one.
    assert entity_spans(["I-PER", "I-PER", "B-PER", "O"], "IOB1") == [("PER", 0, 2), ("PER", 2, 3)]
    iob1 = scores([["I-PER", "I-PER", "B-PER", "O"]], [["I-PER", "I-PER", "I-PER", "O"]], "IOB1")
    assert (iob1["precision"], iob1["recall"]) == (0.0, 0.0)
    # IOBES (strict): B-E is one entity, S one more; a B without its E is no entity.
    assert entity_spans(["B-LOC", "E-LOC", "O", "S-PER"], "IOBES") == [("LOC", 0, 2), ("PER", 3, 4)]
    iobes = scores([["B-LOC", "E-LOC", "S-PER"]], [["B-LOC", "I-LOC", "S-PER"]], "IOBES")
    assert (iobes["precision"], iobes["recall"]) == (1.0, 0.5)
    # none: token accuracy only.
    assert scores([["NN", "VB"]], [["NN", "NN"]], "none") == {"token_accuracy": 0.5}


# ---------------------------------------------------------------- data


CONLL_TEXT = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC

Peter NNP B-NP B-PER
Blackburn NNP B-NP I-PER
"""


def test_conll_files_word_and_last_column(tmp_path):
    (tmp_path / "train.txt").write_text(CONLL_TEXT)
    (tmp_path / "test.txt").write_text("Peter B-PER\n\n\nGerman B-MISC\n")  # two columns, doubled blank line
    assert read_conll(tmp_path / "train.txt") == ([["EU", "rejects", "German"], ["Peter", "Blackburn"]],
                                                  [["B-ORG", "O", "B-MISC"], ["B-PER", "I-PER"]])
    cfg = DataConfig(path="conll", data_files={"train": str(tmp_path / "train.txt"), "test": str(tmp_path / "test.txt")},
                     eval_split="train")
    data = TASK.load_data(cfg, seed=0)
    assert data.labels == ["B-MISC", "B-ORG", "B-PER", "I-PER", "O"]
    assert data.test.words == [["Peter"], ["German"]] and data.test.tags == [[2], [0]]

    (tmp_path / "bad.txt").write_text("EU B-ORG\nrejects\n")
    with pytest.raises(LorafitError) as err:
        read_conll(tmp_path / "bad.txt")
    assert str(err.value) == (f"{tmp_path / 'bad.txt'}: line 2 is 'rejects': expected a word and its tag "
                              f"('WORD TAG', the tag in the last column)")


def test_integer_tags_take_their_names_from_the_class_label(tmp_path):
    names = ["O", "B-SPORTS", "I-SPORTS"]
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    rows = {"tokens": [["the", "ball", "goal"], ["a", "team"]], "ner_tags": [[0, 1, 2], [0, 1]]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "train.parquet")
    cfg = DataConfig(path="parquet", data_files={"train": str(tmp_path / "train.parquet")}, eval_split="train",
                     test_split=None)
    data = TASK.load_data(cfg, seed=0)
    assert data.labels == names and data.train.tags == [[0, 1, 2], [0, 1]]

    # Without a ClassLabel, integer tags are their own names, which are no IOB2 tags: the scheme says so.
    write_jsonl(tmp_path / "ints.jsonl", [{"tokens": w, "ner_tags": t} for w, t in zip(rows["tokens"], rows["ner_tags"])])
    ints = DataConfig(path="json", data_files={"train": str(tmp_path / "ints.jsonl")}, eval_split="train",
                      test_split=None)
    with pytest.raises(LorafitError) as err:
        TASK.load_data(ints, seed=0)
    assert str(err.value) == ("data.tag_scheme: the tag '0' of split 'train' is not IOB2 (O, or B/I-TYPE); set "
                              "data.tag_scheme to the data's scheme, or to none to score token accuracy only")
    assert TASK.load_data(dataclasses.replace(ints, tag_scheme="none"), seed=0).labels == ["0", "1", "2"]


def bad_data(tmp_path, train: list[dict], test: list[dict] | None = None) -> str:
    files = {"train": str(write_jsonl(tmp_path / "train.jsonl", train))}
    if test is not None:
        files["test"] = str(write_jsonl(tmp_path / "test.jsonl", test))
    cfg = DataConfig(path="json", data_files=files, eval_split="train", test_split="test" if test else None)
    with pytest.raises(LorafitError) as err:
        TASK.load_data(cfg, seed=0)
    return str(err.value)


def test_bad_rows_are_named(tmp_path):
    good = {"tokens": ["the", "ball"], "ner_tags": ["O", "B-SPORTS"]}
    assert bad_data(tmp_path, [good, {"tokens": ["the", "ball"], "ner_tags": "O B-SPORTS"}]) == (
        "data.tags_column: row 1 of split 'train' is 'O B-SPORTS', not a list of tags (one per word)")
    assert bad_data(tmp_path, [good, good, {"tokens": ["the", "ball", "goal"], "ner_tags": ["O", "B-SPORTS"]}]) == (
        "data.tags_column: row 2 of split 'train' has 2 tags for 3 words (data.tokens_column); give one tag per word")
    assert bad_data(tmp_path, [{"tokens": "the ball", "ner_tags": ["O", "B-SPORTS"]}]) == (
        "data.tokens_column: row 0 of split 'train' is 'the ball', not a list of words (strings)")
    assert bad_data(tmp_path, [good], [good, {"tokens": ["orbit"], "ner_tags": ["B-SPACE"]}]) == (
        "data.tags_column: row 1 of split 'test' has the tag 'B-SPACE', which the train split lacks; "
        "known tags: ['B-SPORTS', 'O']")


# ---------------------------------------------------------------- adapters, merge and the CLI, end to end


@pytest.fixture(scope="module")
def toy_ner(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ner-data")
    return {split: write_jsonl(root / f"{split}.jsonl", toy_sentences(n, seed))
            for split, n, seed in (("train", 96, 1), ("validation", 16, 2), ("test", 24, 3))}


def save_base_without_head(directory: Path, model_type: str) -> Path:
    """A tiny `model_type` saved as a pretrained checkpoint is: the body's weights, no tagging head."""
    model = tiny_tagger(model_type, 3)
    prefix = model.base_model_prefix + "."
    state = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    model.save_pretrained(directory, state_dict=state)
    make_tokenizer().save_pretrained(directory)
    return directory


def ner_recipe(base: Path, data: dict[str, Path], out: Path, **train) -> dict:
    return {
        "name": "ner", "seed": 0,
        "model": {"name": str(base), "task": "token-classification"},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"path": "json", "data_files": {k: str(v) for k, v in data.items()}, "eval_split": "validation",
                 "test_split": "test", "max_length": 32},
        "optim": {"lr": 3e-2, "warmup_ratio": 0.0, "scheduler": "constant"},
        "train": {"epochs": 3, "batch_size": 8, "log_every": 5, "eval_every": None, "save_every": None,
                  "precision": "fp32", "output_dir": str(out), **train},
    }


def tagger_logits(model, texts: list[str]) -> torch.Tensor:
    """fp32 logits at the real tokens of `texts`."""
    batch = make_tokenizer()(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[batch["attention_mask"].bool()].float()


PROBE = ["the ball goal and the orbit", "a moon rocket is in the team", "chip"]



def test_train_eval_predict_merge_end_to_end(toy_ner, tmp_path, run_cli):
    base = save_base_without_head(tmp_path / "base", "bert")
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "ner.yaml", ner_recipe(base, toy_ner, run, eval_at_start=True))
    result = run_cli("train", recipe)
    assert result.exit_code == 0, result.output
    assert "not in checkpoint classifier" in " ".join(result.stdout.split())

    # Training learns: entity F1 and token accuracy on the test split rise well above the untrained model's.
    before, logged = [m for m in read_metrics(run) if m.get("split") == "test"]
    assert (before["step"], logged["step"]) == (0, 36)
    assert logged["f1"] > before["f1"] + 0.3 and logged["token_accuracy"] > before["token_accuracy"] + 0.2

    # eval reproduces the test numbers training logged, with seqeval's entity scores and a per-type table.
    assert run_cli("eval", run).exit_code == 0
    report = json.loads((run / "eval-test.json").read_text())
    keys = ("loss", "precision", "recall", "f1", "token_accuracy", "words", "words_truncated")
    assert {k: report[k] for k in keys} == {k: logged[k] for k in keys}
    assert report["tag_scheme"] == "IOB2" and report["words_truncated"] == 0
    assert set(report["per_entity"]) == {"SPACE", "SPORTS", "TECH"}
    gold_entities = sum(t.startswith("B-") for row in toy_sentences(24, 3) for t in row["ner_tags"])
    assert sum(s["support"] for s in report["per_entity"].values()) == gold_entities

    # predict: entities as (span, type, character offsets), as JSON lines; the same entities as eval
    # predicted for those sentences, the offsets pointing at them in texts spaced unevenly.
    samples = report["samples"]
    texts = [sample["text"].replace(" ", "  ", 1) for sample in samples]
    assert run_cli("predict", run, *texts, "--output", tmp_path / "p.jsonl").exit_code == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [row["text"] for row in rows] == texts
    assert [[(e["text"].replace("  ", " "), e["type"]) for e in row["entities"]] for row in rows] == \
        [[(e["text"], e["type"]) for e in sample["predicted"]] for sample in samples]
    assert all(row["text"][e["start"]:e["end"]] == e["text"] for row in rows for e in row["entities"])
    assert sum(len(row["entities"]) for row in rows) >= 3

    # merge: the merged model's logits are the adapter's, and it scores the test split alike.
    assert run_cli("merge", run / "adapter", "-o", tmp_path / "merged").exit_code == 0
    merged = AutoModelForTokenClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.id2label == {i: name for i, name in enumerate(report["labels"])}
    adapter, _, _ = load_adapter_model(run / "adapter")
    torch.testing.assert_close(tagger_logits(merged, PROBE), tagger_logits(adapter, PROBE), atol=1e-4, rtol=0)
    assert run_cli("eval", tmp_path / "merged", "--recipe", recipe, "-o", tmp_path / "m.json").exit_code == 0
    assert json.loads((tmp_path / "m.json").read_text())["f1"] == report["f1"]


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "roberta"])
def test_peft_loads_our_adapter_and_we_load_peft_s(model_type, toy_ner, tmp_path):
    peft = pytest.importorskip("peft")
    base = save_base_without_head(tmp_path / "base", model_type)
    raw = ner_recipe(base, toy_ner, tmp_path / "run", epochs=1)
    train(recipe_from_dict(raw), console=Console(quiet=True))
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "TOKEN_CLS" and config["modules_to_save"] == ["classifier"]
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(
        load_file(adapter / "adapter_model.safetensors"))

    # PEFT loads ours (the head random at every load of the base, so it must come from the adapter).
    ours, _, spec = load_adapter_model(adapter)
    assert spec.labels == ["B-SPACE", "B-SPORTS", "B-TECH", "I-SPACE", "I-SPORTS", "I-TECH", "O"]
    fresh = AutoModelForTokenClassification.from_pretrained(base, num_labels=7)
    theirs = peft.PeftModel.from_pretrained(fresh, adapter)
    torch.testing.assert_close(tagger_logits(theirs, PROBE), tagger_logits(ours, PROBE), atol=1e-5, rtol=0)

    # We load PEFT's: a TOKEN_CLS adapter with no lorafit.json, its lora_B and head moved off their init.
    fresh = AutoModelForTokenClassification.from_pretrained(base, num_labels=7)
    made = peft.get_peft_model(fresh, peft.LoraConfig(task_type=peft.TaskType.TOKEN_CLS, r=4, lora_alpha=8,
                                                      target_modules=["query", "value"] if model_type != "distilbert"
                                                      else ["q_lin", "v_lin"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in made.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_(0, 0.1)
    made.save_pretrained(tmp_path / "peft")
    loaded, _, spec = load_adapter_model(tmp_path / "peft")
    assert spec.task == "token-classification" and len(spec.labels) == 7
    torch.testing.assert_close(tagger_logits(loaded, PROBE), tagger_logits(made, PROBE), atol=1e-5, rtol=0)


def test_recipe_keys_belong_to_the_task():
    raw = {"name": "r", "model": {"name": "m", "task": "sequence-classification"},
           "data": {"tag_scheme": "IOBES", "tokens_column": "words"}, "train": {"label_smoothing": 0.1}}
    with pytest.raises(LorafitError) as err:
        recipe_from_dict(raw)
    assert str(err.value).splitlines()[1:] == ["  - data.tokens_column: only for model.task: token-classification",
                                               "  - data.tag_scheme: only for model.task: token-classification"]
    raw["model"]["task"] = "token-classification"
    assert recipe_from_dict(raw).data.tag_scheme == "IOBES"
