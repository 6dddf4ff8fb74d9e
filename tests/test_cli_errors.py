"""Bad input at the command line: exit code 2, a one-line message, no traceback (unless LORAFIT_DEBUG=1)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import toy_recipe, write_recipe
from rich.console import Console

from lorafit.errors import LorafitError
from lorafit.recipe import recipe_from_dict
from lorafit.train import train


def lorafit(*args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORAFIT_DEBUG": "1" if debug else "0", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "lorafit", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120)


def assert_one_line_error(result, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {message}"


def train_error(run_cli, tmp_path, raw: dict, *args: str) -> str:
    """Run `lorafit train` on recipe `raw`; it must fail as bad input. Returns stderr as one line."""
    result = run_cli("train", write_recipe(tmp_path / "r.yaml", raw), *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr
    return " ".join(result.stderr.split())


def test_unknown_key_suggests_a_fix(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "r", "model": {"name": "m"}, "lora": {"rnak": 4}})
    assert_one_line_error(lorafit("validate", recipe), f"{recipe}: lora.rnak: unknown key (did you mean 'lora.rank'?)")


def test_wrong_type_from_set(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "r", "model": {"name": "m"}})
    assert_one_line_error(lorafit("train", recipe, "--set", "train.epochs=two"),
                          f"{recipe}: train.epochs: 'two' (str) is not valid: expected an integer")


def test_missing_recipe_file(tmp_path):
    assert_one_line_error(lorafit("train", tmp_path / "nope.yaml"), f"recipe file not found: {tmp_path / 'nope.yaml'}")


def test_debug_shows_the_traceback(tmp_path):
    result = lorafit("validate", tmp_path / "nope.yaml", debug=True)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "LorafitError: recipe file not found" in result.stderr


def test_validate_accepts_a_good_recipe():
    result = lorafit("validate", "configs/newsgroups.yaml")
    assert result.returncode == 0
    assert "configs/newsgroups.yaml is a valid recipe" in result.stdout


def test_no_matching_target_modules(tiny_models, toy_data, tmp_path, run_cli):
    raw = toy_recipe(tiny_models["bert"], toy_data, tmp_path / "out", lora={"target_modules": ["q_proj"]})
    error = train_error(run_cli, tmp_path, raw)
    assert error == (
        "error: lora.target_modules: none of ['q_proj'] matches a module of the model; its linear layers are named "
        "['classifier', 'dense', 'key', 'query', 'value']"
    )
    assert not (tmp_path / "out" / "adapter").exists()


def test_missing_data_file(tiny_models, toy_data, tmp_path, run_cli):
    raw = toy_recipe(tiny_models["bert"], toy_data, tmp_path / "out")
    raw["data"]["data_files"]["train"] = str(tmp_path / "missing.jsonl")
    error = train_error(run_cli, tmp_path, raw)
    assert f"error: data.data_files: file not found: {tmp_path / 'missing.jsonl'}" in error


def test_missing_text_column(tiny_models, toy_data, tmp_path, run_cli):
    raw = toy_recipe(tiny_models["bert"], toy_data, tmp_path / "out", data={"text_column": "body"})
    error = train_error(run_cli, tmp_path, raw)
    assert "data.text_column: column 'body' not found in split 'train'; columns are ['text', 'label']" in error


def test_existing_output_dir_is_not_overwritten(tiny_models, toy_data, tmp_path, run_cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    error = train_error(run_cli, tmp_path, toy_recipe(tiny_models["bert"], toy_data, out))
    assert "exists and is not empty; pass --overwrite" in error
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_max_length_above_model_limit(tiny_models, toy_data, tmp_path, run_cli):
    raw = toy_recipe(tiny_models["bert"], toy_data, tmp_path / "out", data={"max_length": 128})
    error = train_error(run_cli, tmp_path, raw)
    assert "data.max_length: 128 is above the model's limit of 64 tokens; use at most 64" in error


def test_dry_run_prints_plan_and_writes_nothing(tiny_models, toy_data, tmp_path, run_cli):
    out = tmp_path / "out"
    raw = toy_recipe(tiny_models["bert"], toy_data, out, lora={"target_modules": ["query", "value"]})
    result = run_cli("train", write_recipe(tmp_path / "r.yaml", raw), "--dry-run", "--set", "lora.rank=2")
    assert result.exit_code == 0, result.output
    # 2 layers × (query, value) × rank 2 × (32 in + 32 out) + classifier 32×3+3
    assert "trainable params  611 of" in result.stdout
    assert "rank: 2" in result.stdout
    assert not out.exists()


def test_missing_model_directory(toy_data, tmp_path, run_cli):
    raw = toy_recipe(tmp_path / "no-such-model", toy_data, tmp_path / "out")
    error = train_error(run_cli, tmp_path, raw)
    assert error == f"error: model.name: '{tmp_path / 'no-such-model'}' is not a model directory (and not a hub id)"


def test_missing_label_column(tiny_models, toy_data, tmp_path, run_cli):
    raw = toy_recipe(tiny_models["bert"], toy_data, tmp_path / "out", data={"label_column": "topic"})
    error = train_error(run_cli, tmp_path, raw)
    assert "data.label_column: column 'topic' not found in split 'train'; columns are ['text', 'label']" in error


def test_empty_dataset(tiny_models, toy_data, tmp_path, run_cli):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    raw = toy_recipe(tiny_models["bert"], {**toy_data, "train": empty}, tmp_path / "out")
    raw["data"]["path"] = "csv"
    raw["data"]["data_files"] = {"train": str(empty)}
    raw["data"]["eval_split"] = raw["data"]["test_split"] = None
    error = train_error(run_cli, tmp_path, raw)
    # datasets itself refuses a file with no rows; the message still says which dataset and why.
    assert error == "error: data: could not load dataset 'csv': Instruction \"train\" corresponds to no data!"


def test_test_labels_absent_from_train(tiny_models, toy_data, tmp_path, run_cli):
    from conftest import write_jsonl

    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "the ball", "label": "cooking"}])
    raw = toy_recipe(tiny_models["bert"], {**toy_data, "test": test}, tmp_path / "out")
    error = train_error(run_cli, tmp_path, raw)
    assert "error: data: the test split has labels the train split lacks: ['cooking']" in error
    assert not (tmp_path / "out" / "adapter").exists()


# ---------------------------------------------------------------- resume and overwrite


def test_resume_and_overwrite_together_are_refused(tiny_models, toy_data, tmp_path, run_cli):
    raw = toy_recipe(tiny_models["bert"], toy_data, tmp_path / "out")
    message = "--resume continues a run and --overwrite replaces it; pass only one"
    with pytest.raises(LorafitError) as err:  # from Python, where `overwrite` was silently ignored
        train(recipe_from_dict(raw), console=Console(quiet=True), overwrite=True, resume="latest")
    assert str(err.value) == message
    assert train_error(run_cli, tmp_path, raw, "--resume", "--overwrite") == f"error: {message}"
    assert not (tmp_path / "out").exists()
