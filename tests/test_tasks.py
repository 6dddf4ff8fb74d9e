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
        f"model.task: 'translation' is out of range: use one of {', '.join(TASK_NAMES)}"]


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
