"""Shared fixtures: tiny random models built from configs, a word-level tokenizer, toy data files.

The toy task is learnable: each text is filler words plus two keywords that name its class.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

FILLER = "the a of and to in is it that was for on are with as this be at by".split()
KEYWORDS = {"sports": ["ball", "goal", "team"], "space": ["orbit", "rocket", "moon"], "tech": ["disk", "chip", "driver"]}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
VOCAB = SPECIALS + FILLER + [w for words in KEYWORDS.values() for w in words]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", eos_token="[EOS]")


def tiny_config(kind: str):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    common = {"vocab_size": len(VOCAB), "pad_token_id": 0}
    if kind == "bert":
        return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          max_position_embeddings=64, **common)
    if kind == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=4, eos_token_id=4, **common)
    if kind == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, max_position_embeddings=64, bos_token_id=2, eos_token_id=4,
                           **common)
    raise ValueError(kind)


def save_tiny_model(directory: Path, kind: str, num_labels: int = 3) -> Path:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = tiny_config(kind)
    config.num_labels = num_labels
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def token_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own empty tokenization cache, outside its tmp_path; nothing is written
    to the user's ~/.cache."""
    root = tmp_path_factory.mktemp("lorafit-cache")
    monkeypatch.setenv("LORAFIT_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random BERT, GPT-2 (Conv1D) and Llama classification models saved to disk."""
    root = tmp_path_factory.mktemp("models")
    return {kind: save_tiny_model(root / kind, kind) for kind in ("bert", "gpt2", "llama")}


# ---------------------------------------------------------------- causal LM

WORDS = "the cat sat on a mat and dog ran to park user assistant system : hello hi how are you fine thanks".split()
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")


def lm_tokenizer():
    """A word-level tokenizer over WORDS with [BOS]/[EOS] and a small chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"] + WORDS
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                        bos_token="[BOS]", eos_token="[EOS]")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_lm(kind: str):
    """A tiny random causal LM (fixed seed) whose vocabulary fits `lm_tokenizer`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config(kind)
    config.vocab_size = len(WORDS) + 4
    config.eos_token_id = 3
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def lm_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random Llama and GPT-2 causal LMs with `lm_tokenizer`, saved to disk."""
    root = tmp_path_factory.mktemp("lm-models")
    dirs = {}
    for kind in ("llama", "gpt2"):
        tiny_lm(kind).save_pretrained(root / kind)
        lm_tokenizer().save_pretrained(root / kind)
        dirs[kind] = root / kind
    return dirs


def lm_recipe(model_dir: Path, data_files: dict[str, Path], output_dir: Path, **sections) -> dict:
    """A short causal-LM recipe; `sections` update its sections, e.g. data={"packing": True}."""
    recipe = {
        "name": "lm", "seed": 0,
        "model": {"name": str(model_dir), "task": "causal-lm"},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"path": "json", "data_files": {k: str(v) for k, v in data_files.items()}, "eval_split": "train",
                 "test_split": None, "max_length": 32},
        "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "scheduler": "constant"},
        "train": {"max_steps": 4, "batch_size": 4, "log_every": 10, "eval_every": None, "save_every": None,
                  "output_dir": str(output_dir)},
    }
    for section, values in sections.items():
        recipe[section].update(values)
    return recipe


def toy_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = sorted(KEYWORDS)[i % len(KEYWORDS)]
        words = rng.choices(FILLER, k=rng.randint(2, 6))
        for _ in range(2):
            words.insert(rng.randint(0, len(words)), rng.choice(KEYWORDS[label]))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        "train": write_jsonl(root / "train.jsonl", toy_rows(96, seed=1)),
        "validation": write_jsonl(root / "validation.jsonl", toy_rows(24, seed=2)),
        "test": write_jsonl(root / "test.jsonl", toy_rows(24, seed=3)),
    }


def toy_recipe(model_dir: Path, data_files: dict[str, Path], output_dir: Path, **sections) -> dict:
    """A recipe dict for the toy task; `sections` update its sections, e.g. train={"max_steps": 5}."""
    recipe = {
        "name": "toy",
        "seed": 0,
        "model": {"name": str(model_dir), "task": "sequence-classification"},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"path": "json", "data_files": {k: str(v) for k, v in data_files.items()}, "eval_split": "validation",
                 "test_split": "test", "max_length": 32},
        "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "scheduler": "constant"},
        "train": {"epochs": 1, "batch_size": 8, "log_every": 2, "eval_every": 10, "save_every": 10,
                  "output_dir": str(output_dir)},
    }
    for section, values in sections.items():
        recipe[section].update(values)
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def run_cli():
    """Invoke the lorafit CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from lorafit.cli import app, normalize_args

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, normalize_args([str(a) for a in args]), catch_exceptions=False)

    return run


# ---------------------------------------------------------------- processes that start torchrun ranks

JOB_VARIABLE = "LORAFIT_TEST_JOB"


class Job(subprocess.Popen):
    """A command that starts torchrun's ranks (torchrun itself, or `lorafit train --nproc`), which
    `kill_all` ends whole: the launcher and every process started under it.

    The launcher gets a session of its own, but torchrun starts each rank in a new session too, and a
    rank outlives a launcher killed alone (one sat in a futex for 35 minutes in CI). So every process
    of the job carries `LORAFIT_TEST_JOB=<id>` in its environment (inherited from the launcher), and
    `kill_all` ends each process that has it, wherever it sits in the process tree.
    """

    def __init__(self, command: list[str], env: dict[str, str], **popen):
        self.id = uuid.uuid4().hex
        super().__init__(command, env={**env, JOB_VARIABLE: self.id}, start_new_session=True, **popen)

    def processes(self) -> list[int]:
        """The live processes of this job (a zombie's environment reads empty)."""
        mark = f"{JOB_VARIABLE}={self.id}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and mark in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:  # gone meanwhile, or another user's
                continue
        return pids

    def kill_all(self) -> None:
        """SIGKILL the launcher's process group and every process of the job, until none is left."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 30
        while (pids := self.processes()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def finish(self, timeout: float) -> subprocess.CompletedProcess:
        """Wait for the job to end, collecting its output. If it runs past `timeout` seconds (a hang),
        kill it whole and fail the test with its output; if the wait is interrupted, kill it too."""
        try:
            stdout, stderr = self.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            try:
                stdout, stderr = self.communicate(timeout=30)
            except subprocess.TimeoutExpired:  # a survivor holds the pipes: the test must not hang on it
                stdout, stderr = "", "(no output: a process of the job survived, holding its output open)"
            pytest.fail(f"{' '.join(map(str, self.args))} timed out after {timeout:g} s; killed its processes. "
                        f"Its output:\n{(stdout or '')[-2000:]}\n{(stderr or '')[-4000:]}")
        except BaseException:
            self.kill_all()
            raise
        return subprocess.CompletedProcess(self.args, self.returncode, stdout, stderr)


def run_job(command: list[str], env: dict[str, str], timeout: float = 180, **popen) -> subprocess.CompletedProcess:
    """Run `command` as a `Job`, its output captured as text, failing the test if it hangs past `timeout`
    (which should catch a hang only: two ranks with their imports take many seconds on a busy 2-core machine)."""
    return Job(command, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen).finish(timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- PNGs

MATPLOTLIB_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]  # C0..C3, the default colour cycle


def read_png(path: Path):
    """A PNG's pixels: (height, width, 3) floats in [0, 1]."""
    from matplotlib.image import imread

    return imread(path)[..., :3]


def axes_boxes(image) -> list[tuple[int, int, int, int]]:
    """The inside (left, top, right, bottom; inclusive) of every black-framed rectangle in a matplotlib
    image (axes and colour bars), left to right. Frames are found from their spines: columns dark over
    half the image's height, paired left and right; rows dark across the width between them."""
    import numpy as np

    dark = image.max(-1) < 0.25
    columns = np.flatnonzero(dark.sum(0) > image.shape[0] / 2)
    spines = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)
    boxes = []
    for left, right in zip(spines[0::2], spines[1::2]):
        rows = np.flatnonzero(dark[:, left[-1] + 1:right[0]].mean(1) > 0.9)
        top, bottom = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
        boxes.append((int(left[-1]) + 1, int(top[-1]) + 1, int(right[0]) - 1, int(bottom[0]) - 1))
    return boxes


def colour_pixels(image, box: tuple[int, int, int, int], colour: str, atol: float = 0.02):
    """(rows, columns) of the pixels inside `box` that have `colour` (hex), in image coordinates."""
    import numpy as np
    from matplotlib.colors import to_rgb

    left, top, right, bottom = box
    inside = image[top:bottom + 1, left:right + 1]
    rows, columns = np.nonzero((np.abs(inside - np.array(to_rgb(colour))) <= atol).all(-1))
    return rows + top, columns + left


def assert_confusion_png(path: Path, matrix: list[list[int]]) -> None:
    """The first framed image of `path` is `matrix` drawn cell by cell in the Blues colour map, scaled
    from 0 to the largest count: rows are true classes, columns predicted."""
    import numpy as np
    from matplotlib import colormaps

    image = read_png(path)
    left, top, right, bottom = axes_boxes(image)[0]
    n = len(matrix)
    cell_w, cell_h = (right - left + 1) / n, (bottom - top + 1) / n
    peak = max(max(row) for row in matrix)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            # A patch off the cell's centre, clear of the count written there.
            x, y = int(left + (j + 0.8) * cell_w), int(top + (i + 0.8) * cell_h)
            got = np.median(image[y - 2:y + 3, x - 2:x + 3].reshape(-1, 3), axis=0)
            expected = colormaps["Blues"](count / peak)[:3]
            np.testing.assert_allclose(got, expected, atol=0.01, err_msg=f"cell ({i}, {j}) with count {count}")
