"""Bad input at the command line: exit code 2, a one-line message, no traceback (unless LORAFIT_DEBUG=1)."""

from __future__ import annotations

import os
import subprocess
import sys

import datasets
import pytest
from conftest import toy_recipe, write_jsonl, write_recipe
from rich.console import Console

from lorafit.errors import LorafitError
from lorafit.recipe import recipe_from_dict
from lorafit.train import train


def lorafit(*args: str, debug: bool = False) -> subprocess.CompletedProcess:
    """`python -m lorafit ARGS` in a process of its own: what a user's shell sees, import-time noise
    included. It costs an import of torch and transformers, so most tests here use `run_cli`."""
    env = {**os.environ, "LORAFIT_DEBUG": "1" if debug else "0", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "lorafit", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120)


def assert_one_line_error(result, message: str) -> None:
    """`result`, of `lorafit` or `run_cli`, is bad input: exit code 2 and `message` alone on stderr."""
    code = result.returncode if isinstance(result, subprocess.CompletedProcess) else result.exit_code
    assert code == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {message}"


def train_error(run_cli, tmp_path, raw: dict, *args: str) -> str:
    """Run `lorafit train` on recipe `raw`; it must fail as bad input. Returns stderr as one line."""
    result = run_cli("train", write_recipe(tmp_path / "r.yaml", raw), *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr
    return " ".join(result.stderr.split())


def test_unknown_key_suggests_a_fix(tmp_path, run_cli):
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "r", "model": {"name": "m"}, "lora": {"rnak": 4}})
    assert_one_line_error(run_cli("validate", recipe), f"{recipe}: lora.rnak: unknown key (did you mean 'lora.rank'?)")


def test_wrong_type_from_set(tmp_path, run_cli):
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "r", "model": {"name": "m"}})
    assert_one_line_error(run_cli("train", recipe, "--set", "train.epochs=two"),
                          f"{recipe}: train.epochs: 'two' (str) is not valid: expected an integer")


def test_missing_recipe_file(tmp_path):
    assert_one_line_error(lorafit("train", tmp_path / "nope.yaml"), f"recipe file not found: {tmp_path / 'nope.yaml'}")


def test_debug_shows_the_traceback(tmp_path):
    result = lorafit("validate", tmp_path / "nope.yaml", debug=True)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "LorafitError: recipe file not found" in result.stderr


def test_validate_accepts_a_good_recipe(run_cli):
    result = run_cli("validate", "configs/newsgroups.yaml")
    assert result.exit_code == 0
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


def test_test_labels_absent_from_train(tiny_models, toy_data, tmp_path, run_cli):
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "the ball", "label": "cooking"}])
    raw = toy_recipe(tiny_models["bert"], {**toy_data, "test": test}, tmp_path / "out")
    error = train_error(run_cli, tmp_path, raw)
    assert "error: data: the test split has labels the train split lacks: ['cooking']" in error
    assert not (tmp_path / "out" / "adapter").exists()


# ---------------------------------------------------------------- empty data


def write_rows(path, fmt: str, text: str | None) -> None:
    """A data file of `fmt` with the columns text and label and no row; `text` overrides the content."""
    if fmt == "parquet":
        datasets.Dataset.from_dict({"text": [], "label": []}).to_parquet(str(path))
    else:
        path.write_text(text)


@pytest.mark.parametrize("fmt, name, content", [
    ("json", "train.jsonl", ""),  # no bytes: datasets raised StopIteration (a traceback)
    ("json", "train.jsonl", "\n  \n"),  # blank lines: 'Instruction "train" corresponds to no data!'
    ("json", "train.json", "[]"),  # the same
    ("csv", "train.csv", "text,label\n"),  # a header and no row: the same
    ("text", "train.txt", ""),  # 'An error occurred while generating the dataset'
    ("parquet", "train.parquet", None),  # the columns and no row: 'Instruction "train" corresponds to no data!'
])
def test_data_file_with_no_rows(fmt, name, content, tiny_models, toy_data, tmp_path, run_cli):
    path = tmp_path / name
    write_rows(path, fmt, content)
    raw = toy_recipe(tiny_models["bert"], toy_data, tmp_path / "out")
    raw["data"].update(path=fmt, data_files={"train": str(path)}, eval_split=None, test_split=None)
    assert train_error(run_cli, tmp_path, raw) == f"error: data: split 'train' is empty: {path} has no rows"


def test_empty_test_file_names_its_split(tiny_models, toy_data, tmp_path, run_cli):
    empty = tmp_path / "test.jsonl"
    empty.write_text("")
    raw = toy_recipe(tiny_models["bert"], {**toy_data, "test": empty}, tmp_path / "out")
    assert train_error(run_cli, tmp_path, raw) == f"error: data: split 'test' is empty: {empty} has no rows"


def test_split_whose_texts_are_all_empty(tiny_models, toy_data, tmp_path, run_cli):
    blank = write_jsonl(tmp_path / "validation.jsonl", [{"text": "", "label": "space"}, {"text": " ", "label": "tech"}])
    raw = toy_recipe(tiny_models["bert"], {**toy_data, "validation": blank}, tmp_path / "out")
    assert train_error(run_cli, tmp_path, raw) == (
        f"error: data: split 'validation' has no text: data.text_column is empty in every row of {blank}")


def lm_recipe(model_dir, train_file, out) -> dict:
    return {"name": "lm", "model": {"name": str(model_dir), "task": "causal-lm"},
            "lora": {"target_modules": ["q_proj", "v_proj"]},
            "data": {"path": "json", "data_files": {"train": str(train_file)}, "eval_split": "train",
                     "test_split": None, "max_length": 16},
            "train": {"max_steps": 2, "batch_size": 2, "output_dir": str(out)}}


def test_causal_lm_texts_all_empty(lm_model_dirs, tmp_path, run_cli):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": ""}, {"text": "  "}])
    assert train_error(run_cli, tmp_path, lm_recipe(lm_model_dirs["llama"], data, tmp_path / "out")) == (
        f"error: data: split 'train' has no text: data.text_column is empty in every row of {data}")


def test_causal_lm_examples_all_dropped(lm_model_dirs, tmp_path, run_cli):
    """Chats whose user turn fills max_length: truncation leaves no assistant token to learn."""
    chat = [{"role": "user", "content": "the cat sat on a mat and the dog ran to the park"},
            {"role": "assistant", "content": "hello"}]
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": chat}] * 2)
    raw = lm_recipe(lm_model_dirs["llama"], data, tmp_path / "out")
    raw["data"].update(messages_column="messages", max_length=8)
    assert train_error(run_cli, tmp_path, raw) == (
        f"error: data: split 'train' has no example left: none of the 2 in {data} has a token to learn after "
        f"truncation to 8 tokens (data.max_length)")


# ---------------------------------------------------------------- resume and overwrite


def test_resume_and_overwrite_together_are_refused(tiny_models, toy_data, tmp_path, run_cli):
    raw = toy_recipe(tiny_models["bert"], toy_data, tmp_path / "out")
    message = "--resume continues a run and --overwrite replaces it; pass only one"
    with pytest.raises(LorafitError) as err:  # from Python, where `overwrite` was silently ignored
        train(recipe_from_dict(raw), console=Console(quiet=True), overwrite=True, resume="latest")
    assert str(err.value) == message
    assert train_error(run_cli, tmp_path, raw, "--resume", "--overwrite") == f"error: {message}"
    assert not (tmp_path / "out").exists()
