"""The task interface and registry: what the recipe accepts per task, and a model the task's class refuses."""

from __future__ import annotations

import pytest
from conftest import make_tokenizer
from test_recipe import MINIMAL, problems

from lorafit.errors import LorafitError
from lorafit.models import ModelSource, load_model
from lorafit.recipe import recipe_from_dict
from lorafit.tasks import TASK_NAMES, get_task, task_for_peft_type


def test_the_registry_lists_the_tasks_and_finds_them_by_peft_task_type():
    assert TASK_NAMES[:2] == ("sequence-classification", "causal-lm")
    assert task_for_peft_type("SEQ_CLS").name == "sequence-classification"
    assert task_for_peft_type("CAUSAL_LM").name == "causal-lm"
    assert task_for_peft_type("QUESTION_ANS") is None
    with pytest.raises(LorafitError, match=r"^unknown task 'ner'; use one of sequence-classification, causal-lm"):
        get_task("ner")


def test_recipe_task_must_be_a_registered_one():
    assert problems({**MINIMAL, "model": {"name": "m", "task": "translation"}}) == [
        "model.task: 'translation' (str) is not valid: expected one of "
        + ", ".join(repr(name) for name in TASK_NAMES)]


def test_data_keys_of_another_task_are_named_with_their_task():
    raw = {**MINIMAL, "data": {"prompt_column": "q", "completion_column": "a", "packing": True}}
    assert problems(raw) == ["data.prompt_column: only for model.task: causal-lm",
                             "data.completion_column: only for model.task: causal-lm",
                             "data.packing: only for model.task: causal-lm"]
    # the same keys are the causal LM's own
    recipe_from_dict({**raw, "model": {"name": "m", "task": "causal-lm"}})


@pytest.fixture(scope="module")
def tiny_bodies(tmp_path_factory):
    """Base checkpoints (bodies only) of a DistilBERT encoder and a Marian encoder-decoder."""
    from transformers import AutoModel, DistilBertConfig, MarianConfig

    root = tmp_path_factory.mktemp("bodies")
    configs = {
        "distilbert": DistilBertConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                                       max_position_embeddings=32),
        "marian": MarianConfig(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1,
                               encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                               decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=0,
                               decoder_start_token_id=0),
    }
    for name, config in configs.items():
        AutoModel.from_config(config).save_pretrained(root / name)
    return root


@pytest.mark.parametrize("model_type, task, auto_class", [
    ("distilbert", "causal-lm", "AutoModelForCausalLM"),
    ("marian", "sequence-classification", "AutoModelForSequenceClassification"),
])
def test_a_model_without_a_class_for_the_task_is_a_one_line_error(tiny_bodies, model_type, task, auto_class):
    path = str(tiny_bodies / model_type)
    with pytest.raises(LorafitError) as caught:
        load_model(ModelSource(path, path), task, make_tokenizer(), ["a", "b"])
    assert str(caught.value) == (f"model.task: {task}: {auto_class} has no class for {path} (model type "
                                 f"{model_type!r}); pick a model made for {task}, or another model.task")


def test_hold_out_is_seeded_stratified_where_it_can_be_and_needs_two_examples():
    from lorafit.data import hold_out

    keep, held = hold_out(10, 0.3, seed=0)
    assert (keep, held) == ([9, 1, 6, 7, 3, 0, 5], [2, 8, 4])  # scikit-learn's seeded order, as recipes ran it
    assert hold_out(10, 0.3, seed=0) == (keep, held) and hold_out(10, 0.3, seed=1) != (keep, held)
    labels = ["a"] * 12 + ["b"] * 8
    for seed, plain_a in ((1, 4), (4, 2)):  # seeds where a plain split misses the 3:2 share
        assert [labels[i] for i in hold_out(20, 0.25, seed)[1]].count("a") == plain_a
        keep, held = hold_out(20, 0.25, seed, stratify=labels)
        assert sorted(keep + held) == list(range(20))
        assert [labels[i] for i in held].count("a") == 3 and [labels[i] for i in held].count("b") == 2
    # One example of class "b": no stratified split exists, so the plain one is taken.
    assert hold_out(10, 0.3, 0, stratify=["a"] * 9 + ["b"]) == hold_out(10, 0.3, 0)
    for n in (0, 1):
        with pytest.raises(LorafitError) as error:
            hold_out(n, 0.3, 0)
        assert str(error.value) == "data: too few training examples to hold out an eval split; set data.eval_split"
