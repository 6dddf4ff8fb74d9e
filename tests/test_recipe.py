"""Recipe schema: defaults, overrides, and errors that name the key, the value and the fix."""

from __future__ import annotations

import pytest

from lorafit.errors import LorafitError
from lorafit.recipe import RecipeError, apply_overrides, load_recipe, recipe_from_dict

MINIMAL = {"name": "t", "model": {"name": "some/model"}}


def problems(raw: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw)
    return info.value.problems


def test_defaults_come_from_the_schema():
    recipe = recipe_from_dict(MINIMAL)
    assert recipe.lora.rank == 8 and recipe.lora.alpha == 16.0 and recipe.lora.target_modules == ["query", "value"]
    assert recipe.train.batch_size == 16 and recipe.train.precision == "auto"
    assert str(recipe.output_dir) == "runs/t"


def test_shipped_recipe_is_valid():
    recipe = load_recipe("configs/newsgroups.yaml")
    assert recipe.name == "newsgroups"
    assert recipe.model.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert recipe.data.remove == ["headers", "footers", "quotes"]


def test_unknown_key_suggests_the_near_miss():
    assert problems({**MINIMAL, "lora": {"rnak": 4}}) == ["lora.rnak: unknown key (did you mean 'lora.rank'?)"]


def test_unknown_key_without_near_miss_lists_valid_keys():
    (problem,) = problems({**MINIMAL, "lora": {"zzz": 1}})
    assert problem.startswith("lora.zzz: unknown key (valid keys: rank, alpha, dropout, target_modules")


def test_wrong_type():
    assert problems({**MINIMAL, "train": {"batch_size": "abc"}}) == [
        "train.batch_size: 'abc' (str) is not valid: expected an integer"
    ]
    assert problems({**MINIMAL, "train": {"group_by_length": 1}}) == [
        "train.group_by_length: 1 (int) is not valid: expected true/false"
    ]


@pytest.mark.parametrize(
    ("section", "key", "value", "fix"),
    [
        ("lora", "rank", 0, "use a positive integer such as 8"),
        ("optim", "lr", -1, "use a positive learning rate such as 5.0e-4"),
        ("lora", "dropout", 1.5, "use a value in [0, 1), e.g. 0.1"),
        ("data", "eval_fraction", 1.0, "use a fraction in (0, 1), e.g. 0.05"),
        ("train", "label_smoothing", 1.0, "use a fraction in [0, 1), e.g. 0.1"),
    ],
)
def test_out_of_range(section, key, value, fix):
    (problem,) = problems({**MINIMAL, section: {key: value}})
    assert problem == f"{section}.{key}: {float(value) if key != 'rank' else value!r} is out of range: {fix}"


def test_literal_values_are_listed():
    assert problems({**MINIMAL, "optim": {"scheduler": "step"}}) == [
        "optim.scheduler: 'step' (str) is not valid: expected one of 'linear', 'cosine', 'constant'"
    ]


def test_all_problems_reported_at_once():
    found = problems({"name": "t", "model": {"name": "m", "tsk": "x"}, "lora": {"rank": -2},
                      "train": {"epochs": "many"}})
    assert len(found) == 3
    with pytest.raises(RecipeError, match="recipe has 3 problems"):
        recipe_from_dict({"name": "t", "model": {"name": "m", "tsk": "x"}, "lora": {"rank": -2},
                          "train": {"epochs": "many"}})


def test_missing_model_name():
    assert problems({"name": "t"}) == ["model.name: missing: give a hub id or a local model directory"]


def test_float_written_without_dot_is_accepted():
    # PyYAML reads `5e-4` as a string; a learning rate written that way must still work.
    assert recipe_from_dict({**MINIMAL, "optim": {"lr": "5e-4"}}).optim.lr == 5e-4


def test_set_overrides_nested_keys_as_yaml():
    raw = apply_overrides({"lora": {"rank": 8}}, ["lora.rank=4", "lora.target_modules=[q, v]", "train.max_steps=50"])
    assert raw == {"lora": {"rank": 4, "target_modules": ["q", "v"]}, "train": {"max_steps": 50}}


def test_set_without_equals_is_an_error():
    with pytest.raises(RecipeError, match=r"expected KEY=VALUE, e.g. --set lora.rank=4"):
        apply_overrides({}, ["lora.rank"])


def test_load_recipe_name_defaults_to_file_stem(tmp_path):
    path = tmp_path / "my-run.yaml"
    path.write_text("model:\n  name: some/model\n")
    assert load_recipe(path).name == "my-run"


def test_malformed_yaml_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: x\nlora:\n  rank: [1, 2\n")
    with pytest.raises(LorafitError, match=r"bad.yaml: invalid YAML at line 5"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(LorafitError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_label_smoothing_is_for_classification_only():
    assert problems({**MINIMAL, "model": {"name": "m", "task": "causal-lm"}, "train": {"label_smoothing": 0.1}}) == [
        "train.label_smoothing: only for model.task: sequence-classification or token-classification"]
