"""`lorafit merge` and `lorafit eval` on tiny random BERT, GPT-2 (Conv1D) and Llama models."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (assert_confusion_png, read_metrics, save_tiny_model, toy_recipe, toy_rows, write_jsonl,
                      write_recipe)
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from lorafit.adapter import AdapterSpec, load_adapter_model, peft_modules_to_save, save_adapter
from lorafit.cli import app
from lorafit.lora import add_lora, lora_layers
from lorafit.models import load_model, load_tokenizer, resolve_model

LABELS = ["space", "sports", "tech"]
TEXTS = ["ball goal the team", "orbit of the moon", "a disk and a chip", "the", "rocket is in orbit and the moon"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def make_adapter(directory: Path, model_dir: Path) -> Path:
    """A random adapter on all linear layers with a non-zero update and a changed head, saved as lorafit does."""
    source = resolve_model(str(model_dir))
    tokenizer = load_tokenizer(source)
    model, _ = load_model(source, "sequence-classification", tokenizer, LABELS)
    (head,) = peft_modules_to_save(model, [], "sequence-classification")
    plan = add_lora(model, rank=4, alpha=8, target_modules="all-linear", modules_to_save=[head])
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05)
        for param in model.get_submodule(head).parameters():
            param.add_(0.3 * torch.randn_like(param))
    spec = AdapterSpec(str(model_dir), "sequence-classification", 4, 8.0, 0.0, "all-linear", [head],
                       labels=LABELS, meta={"max_length": 32})
    return save_adapter(directory, model, plan, spec)


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {kind: make_adapter(root / kind, path) for kind, path in tiny_models.items()}


@torch.inference_mode()
def logits_of(model, tokenizer, texts=TEXTS) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


# ---------------------------------------------------------------- merge


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_logits_equal_adapter_logits(kind, dtype, adapters, tiny_models, tmp_path):
    out = tmp_path / "merged"
    result = cli("merge", adapters[kind], "--output", out, "--dtype", dtype)
    assert result.exit_code == 0, result.output
    assert "largest logit difference on the probe batch" in result.output

    adapter_model, tokenizer, _ = load_adapter_model(adapters[kind])
    expected = logits_of(adapter_model, tokenizer)
    merged = AutoModelForSequenceClassification.from_pretrained(out, dtype="auto").eval()
    assert merged.dtype == getattr(torch, dtype)
    assert merged.config.id2label == dict(enumerate(LABELS))
    assert merged.config.label2id == {name: i for i, name in enumerate(LABELS)}
    got = logits_of(merged, AutoTokenizer.from_pretrained(out))
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models[kind]).eval()
    scale = expected.abs().max().item()
    # The adapter changes the logits by far more than any tolerance below, so the test can fail.
    assert (logits_of(base, tokenizer) - expected).abs().max() > 0.2 * scale
    if dtype == "float32":
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    else:
        # bf16 weights and compute: about 2% of the logit scale on these models (see merge.py).
        assert (got - expected).abs().max() < 0.05 * scale
    weights = load_file(out / "model.safetensors")
    assert all(t.dtype == getattr(torch, dtype) for t in weights.values() if t.is_floating_point())
    assert not any("lora_" in key for key in weights)
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", "lorafit.json"}


def test_merged_model_loads_without_lorafit(adapters, tmp_path):
    out = tmp_path / "merged"
    assert cli("merge", adapters["bert"], "-o", out).exit_code == 0
    script = (
        "import sys, json; sys.modules['lorafit'] = None; sys.modules['peft'] = None\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        f"model = AutoModelForSequenceClassification.from_pretrained({str(out)!r}).eval()\n"
        f"tok = AutoTokenizer.from_pretrained({str(out)!r})\n"
        f"print(json.dumps(model(**tok({TEXTS[0]!r}, return_tensors='pt')).logits[0].tolist()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    adapter_model, tokenizer, _ = load_adapter_model(adapters["bert"])
    expected = logits_of(adapter_model, tokenizer, TEXTS[:1])[0]
    torch.testing.assert_close(torch.tensor(json.loads(done.stdout.strip().splitlines()[-1])), expected,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_merged_weights_equal_peft_merge_and_unload(kind, adapters, tiny_models, tmp_path):
    from peft import PeftModel

    out = tmp_path / "merged"
    assert cli("merge", adapters[kind], "-o", out).exit_code == 0
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models[kind], num_labels=3)
    theirs = PeftModel.from_pretrained(base, adapters[kind]).merge_and_unload().state_dict()
    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(theirs)
    for key, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[key], atol=1e-6, rtol=0, msg=key)
    # The merge changed every adapted weight: the comparison is not of two copies of the base.
    base_weights = load_file(tiny_models[kind] / "model.safetensors")
    changed = [k for k in ours if k in base_weights and not torch.equal(ours[k], base_weights[k])]
    assert len(changed) >= len(lora_layers(load_adapter_model(adapters[kind])[0]))


def test_merge_adapter_written_by_peft(tiny_models, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["gpt2"], num_labels=3)
    peft_model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["c_attn"],
                                                 fan_in_fan_out=True))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "score" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "peft")
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    expected = logits_of(peft_model.eval(), tokenizer)

    result = cli("merge", tmp_path / "peft", "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits_of(merged, tokenizer), expected, atol=1e-5, rtol=0)
    assert merged.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}


def error_line(result) -> str:
    """The whole of stderr, which must be exactly one line."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_merge_refuses_non_empty_output(adapters, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = cli("merge", adapters["bert"], "-o", out)
    assert result.exit_code == 2
    assert error_line(result) == f"error: output directory {out} exists and is not empty; pass --overwrite to replace it"
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    # --overwrite replaces a model directory, but never a folder of other things.
    result = cli("merge", adapters["bert"], "-o", out, "--overwrite")
    assert result.exit_code == 2
    assert error_line(result) == (f"error: output directory {out} is not empty and holds no model (no config.json); "
                                  f"refusing to replace it, choose another directory")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_merge_overwrite_replaces_model_directory(adapters, tmp_path):
    out = tmp_path / "merged"
    assert cli("merge", adapters["bert"], "-o", out, "--dtype", "bfloat16").exit_code == 0
    assert cli("merge", adapters["bert"], "-o", out, "--overwrite").exit_code == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary directories left


def test_merge_refuses_base_that_does_not_fit(adapters, tmp_path):
    from transformers import BertConfig

    wider = tmp_path / "wider-bert"
    save_tiny_model(wider, "bert")
    config = BertConfig.from_pretrained(wider)
    config.hidden_size, config.intermediate_size = 48, 96
    AutoModelForSequenceClassification.from_config(config).save_pretrained(wider)
    result = cli("merge", adapters["bert"], "-o", tmp_path / "merged", "--base", wider)
    assert result.exit_code == 2
    assert error_line(result).startswith(
        f"error: {adapters['bert']}: adapter does not fit the base model: base_model.model.")
    assert "has shape (4, 32), the model needs (4, 48)" in error_line(result)
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_to_replace_its_adapter(adapters):
    run_dir = adapters["bert"].parent
    for target in (adapters["bert"], run_dir):
        result = cli("merge", adapters["bert"], "-o", target, "--overwrite")
        assert result.exit_code == 2
        assert error_line(result) == (f"error: --output {target} would replace the adapter {adapters['bert']}; "
                                      f"choose another directory")
    assert (adapters["bert"] / "adapter_model.safetensors").is_file()


def test_merge_rejects_unknown_dtype(adapters, tmp_path):
    result = cli("merge", adapters["bert"], "-o", tmp_path / "merged", "--dtype", "int8")
    assert result.exit_code == 2
    assert error_line(result) == "error: --dtype 'int8' is not supported; use one of float32, bfloat16, float16"
    assert not (tmp_path / "merged").exists()


def test_merge_writes_nothing_when_verification_fails(adapters, tmp_path, monkeypatch):
    import lorafit.merge

    monkeypatch.setitem(lorafit.merge.RELATIVE_TOLERANCE, "bfloat16", 1e-9)
    result = cli("merge", adapters["llama"], "-o", tmp_path / "merged", "--dtype", "bfloat16")
    assert result.exit_code == 2
    line = error_line(result)
    assert line.startswith("error: merged model saved in bfloat16 differs from the adapter: largest logit difference ")
    assert line.endswith("; nothing written")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- eval


@pytest.fixture(scope="module")
def trained_run(tiny_models, toy_data, tmp_path_factory) -> Path:
    """A short real training run; precision "auto", as the shipped recipes use (bf16 where native)."""
    root = tmp_path_factory.mktemp("run")
    recipe = write_recipe(root / "toy.yaml", toy_recipe(tiny_models["bert"], toy_data, root / "run",
                                                        train={"epochs": 2, "eval_every": None, "save_every": None}))
    result = cli("train", recipe)
    assert result.exit_code == 0, result.output
    return root / "run"


def test_eval_of_run_equals_test_metrics_logged_in_training(trained_run, tmp_path):
    logged = next(m for m in read_metrics(trained_run) if m.get("split") == "test")
    for target, output in ((trained_run, None), (trained_run / "adapter", tmp_path / "adapter.json")):
        result = cli("eval", target, *(["--output", output] if output else []))
        assert result.exit_code == 0, result.output
        report = json.loads((output or trained_run / "eval-test.json").read_text())
        assert report["split"] == "test" and report["examples"] == 24
        assert report["accuracy"] == logged["accuracy"]
        assert report["macro_f1"] == logged["macro_f1"]
        assert report["loss"] == pytest.approx(logged["loss"], abs=1e-6)
    # Each report's PNG draws that report's confusion matrix.
    for report_path in (trained_run / "eval-test.json", tmp_path / "adapter.json"):
        matrix = json.loads(report_path.read_text())["confusion_matrix"]
        assert_confusion_png(report_path.with_name(f"{report_path.stem}-confusion.png"), matrix)


def fp32_recipe(trained_run: Path, path: Path) -> Path:
    raw = json.loads((trained_run / "adapter" / "lorafit.json").read_text())["recipe"]
    raw["train"]["precision"] = "fp32"
    return write_recipe(path, raw)


def test_merged_model_scores_as_its_adapter(trained_run, tmp_path):
    recipe = fp32_recipe(trained_run, tmp_path / "fp32.yaml")
    assert cli("merge", trained_run / "adapter", "-o", tmp_path / "merged").exit_code == 0
    reports = {}
    for name, target in (("adapter", trained_run / "adapter"), ("merged", tmp_path / "merged")):
        result = cli("eval", target, "--recipe", recipe, "--split", "validation", "-o", tmp_path / f"{name}.json")
        assert result.exit_code == 0, result.output
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert reports["merged"]["precision"] == "fp32"
    assert reports["merged"]["confusion_matrix"] == reports["adapter"]["confusion_matrix"]
    assert reports["merged"]["accuracy"] == reports["adapter"]["accuracy"]
    assert reports["merged"]["loss"] == pytest.approx(reports["adapter"]["loss"], abs=1e-5)


def test_eval_numbers_equal_hand_computation(trained_run, tmp_path):
    recipe = fp32_recipe(trained_run, tmp_path / "fp32.yaml")
    assert cli("merge", trained_run / "adapter", "-o", tmp_path / "merged").exit_code == 0
    rows = toy_rows(9, seed=7)
    data = write_jsonl(tmp_path / "small.jsonl", rows)
    result = cli("eval", tmp_path / "merged", "--recipe", recipe, "--data-files", data, "--max-samples", 7,
                 "-o", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())

    # By hand: one text at a time through plain transformers, then counting.
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    truth = [LABELS.index(r["label"]) for r in rows[:7]]
    logits = torch.cat([logits_of(model, tokenizer, [r["text"]]) for r in rows[:7]])
    predicted = logits.argmax(-1).tolist()
    loss = sum(-torch.log_softmax(logits[i], -1)[t].item() for i, t in enumerate(truth)) / 7
    assert report["examples"] == 7
    assert report["loss"] == pytest.approx(loss, abs=1e-5)
    assert report["accuracy"] == pytest.approx(sum(p == t for p, t in zip(predicted, truth)) / 7)
    confusion = [[sum(t == i and p == j for t, p in zip(truth, predicted)) for j in range(3)] for i in range(3)]
    assert report["confusion_matrix"] == confusion
    f1s = []
    for c, name in enumerate(LABELS):
        tp = confusion[c][c]
        n_pred, n_true = sum(row[c] for row in confusion), sum(confusion[c])
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert report["per_class"][name] == pytest.approx(
            {"precision": precision, "recall": recall, "f1": f1, "support": n_true})
        if n_pred or n_true:
            f1s.append(f1)
    assert report["macro_f1"] == pytest.approx(sum(f1s) / len(f1s))
    assert not math.isnan(report["macro_f1"])


def test_eval_errors_are_one_line(trained_run, tmp_path):
    result = cli("eval", tmp_path / "nothing")
    assert result.exit_code == 2
    assert error_line(result) == f"error: {tmp_path / 'nothing'} not found"

    (tmp_path / "empty").mkdir()
    result = cli("eval", tmp_path / "empty")
    assert result.exit_code == 2
    assert error_line(result) == (f"error: {tmp_path / 'empty'} is not a run directory (adapter/ and recipe.yaml), "
                                  f"an adapter (adapter_config.json) or a model directory (config.json)")

    result = cli("eval", trained_run, "--split", "dev", "-o", tmp_path / "r.json")
    assert result.exit_code == 2
    assert error_line(result) == "error: data: split 'dev' not found; the dataset has ['test', 'train', 'validation']"
    assert not (tmp_path / "r.json").exists()

    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "ball", "label": "weather"}])
    result = cli("eval", trained_run, "--data-files", other, "-o", tmp_path / "r.json")
    assert result.exit_code == 2
    assert error_line(result) == ("error: data: split 'test' has labels the model does not know: ['weather']; "
                                  "the model's labels are ['space', 'sports', 'tech']")
    assert not (tmp_path / "r.json").exists()


def test_eval_of_merged_peft_model_needs_data(tiny_models, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=3)
    get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"])).save_pretrained(tmp_path / "a")
    assert cli("merge", tmp_path / "a", "-o", tmp_path / "m").exit_code == 0
    result = cli("eval", tmp_path / "m")
    assert result.exit_code == 2
    assert error_line(result) == (f"error: {tmp_path / 'm'} records no recipe to say what data to score it on; "
                                  f"pass --recipe RECIPE.yaml or --data-files FILE")
    # Integer labels score against a model whose labels are LABEL_0..LABEL_2.
    data = write_jsonl(tmp_path / "ints.jsonl", [{"text": "ball goal", "label": i % 3} for i in range(6)])
    result = cli("eval", tmp_path / "m", "--data-files", data, "-o", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [s["support"] for s in report["per_class"].values()] == [2, 2, 2]
