"""`lorafit inspect`, `resize` and `extract` end to end on tiny models, with PEFT as the oracle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import lm_tokenizer, make_tokenizer, save_tiny_model, tiny_lm
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification

from lorafit.adapter import AdapterSpec, load_adapter_model, save_adapter
from lorafit.lora import add_lora, lora_layers
from lorafit.models import load_model, load_tokenizer, resolve_model

peft = pytest.importorskip("peft")

LABELS = ["space", "sports", "tech"]
TEXTS = ["the ball and the goal", "a rocket to the moon in orbit", "chip", "disk driver for the chip is it"]
PREFIX = "base_model.model."


def random_adapter(directory: Path, model_dir: Path, rank: int = 4, true_rank: int | None = None,
                   rank_pattern: dict[str, int] | None = None, seed: int = 1) -> Path:
    """A lorafit adapter on all linear layers with random B (as after training) and a changed head.

    `true_rank` < rank zeroes B's last columns, so every ΔW has that rank while the factors keep `rank`.
    """
    source = resolve_model(str(model_dir))
    model, _ = load_model(source, "sequence-classification", load_tokenizer(source), LABELS)
    head = "classifier" if hasattr(model, "classifier") else "score"
    plan = add_lora(model, rank, 2.0 * rank, "all-linear", modules_to_save=[head], rank_pattern=rank_pattern)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            B = torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.3
            B[:, true_rank or layer.rank:] = 0
            layer.lora_B.weight.copy_(B)
        for param in model.get_submodule(head).parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    spec = AdapterSpec(str(model_dir), "sequence-classification", rank, 2.0 * rank, 0.0, "all-linear", [head],
                       labels=LABELS, meta={"max_length": 32})
    return save_adapter(directory, model, plan, spec)


def deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW = (alpha/r)·B·A of every module, in float64, straight from the files."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    weights = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, A in weights.items():
        if key.endswith(".lora_A.weight"):
            name = key[len(PREFIX):-len(".lora_A.weight")]
            alpha = config["alpha_pattern"].get(name, config["lora_alpha"])
            B = weights[f"{PREFIX}{name}.lora_B.weight"]
            out[name] = alpha / A.shape[0] * (B.double() @ A.double())
    return out


@torch.inference_mode()
def logits(model) -> torch.Tensor:
    batch = make_tokenizer()(TEXTS, padding=True, return_tensors="pt")
    return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def peft_logits(model_dir: Path, adapter: Path) -> torch.Tensor:
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(LABELS))
    return logits(peft.PeftModel.from_pretrained(base, adapter))


def best_approximation(delta: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {kind: random_adapter(root / kind, tiny_models[kind]) for kind in ("bert", "gpt2")}


# ---------------------------------------------------------------- inspect


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_inspect_singular_values_equal_svdvals_of_the_full_update(kind, adapters, run_cli):
    result = run_cli("inspect", adapters[kind], "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    expected = deltas(adapters[kind])
    assert sorted(m["name"] for m in report["modules"]) == sorted(expected)
    assert report["total_rank"] == 4 * len(expected)
    for module in report["modules"]:
        svdvals = torch.linalg.svdvals(expected[module["name"]])[:4]
        torch.testing.assert_close(torch.tensor(module["singular_values"], dtype=torch.float64), svdvals,
                                   rtol=1e-6, atol=1e-9)
        assert module["norm"] == pytest.approx(torch.linalg.matrix_norm(expected[module["name"]]).item(), rel=1e-6)
        assert module["rank"] == 4 and module["scaling"] == 2.0


def test_inspect_prints_a_table_and_draws_the_spectra(adapters, run_cli, tmp_path):
    png = tmp_path / "spectra.png"
    result = run_cli("inspect", adapters["bert"], "--plot", png)
    assert result.exit_code == 0, result.output
    report = json.loads(run_cli("inspect", adapters["bert"], "--json").stdout)
    for module in report["modules"]:  # numbers are never cut, however narrow the terminal
        assert f"{module['norm']:.4g}" in result.stdout and f"{module['effective_rank']:.2f}" in result.stdout
    assert f"spectra in {png}" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_inspect_and_load_a_peft_adapter_with_rank_and_alpha_patterns(tiny_models, tmp_path, run_cli):
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=3)
    config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"],
                             rank_pattern={"query": 2}, alpha_pattern={"layer.1.attention.self.value": 3.0})
    model = peft.get_peft_model(base, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(tmp_path / "peft-adapter")

    report = json.loads(run_cli("inspect", tmp_path / "peft-adapter", "--json").stdout)
    got = {m["name"].split("encoder.")[1]: (m["rank"], m["alpha"]) for m in report["modules"]}
    assert got == {"layer.0.attention.self.query": (2, 8.0), "layer.0.attention.self.value": (4, 8.0),
                   "layer.1.attention.self.query": (2, 8.0), "layer.1.attention.self.value": (4, 3.0)}
    ours, _, spec = load_adapter_model(tmp_path / "peft-adapter", base=str(tiny_models["bert"]))
    assert {layer.rank for layer in lora_layers(ours).values()} == {2, 4}
    torch.testing.assert_close(logits(ours), logits(model), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- resize


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_resize_is_the_best_approximation_and_loads_in_peft_with_the_same_logits(kind, adapters, tiny_models,
                                                                                  tmp_path, run_cli):
    out = tmp_path / "rank2"
    result = run_cli("resize", adapters[kind], "--rank", "2", "--output", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (2, 4.0, {})  # scaling 2 kept
    before, after = deltas(adapters[kind]), deltas(out)
    kept = sum(torch.linalg.matrix_norm(d).item() ** 2 for d in after.values())
    whole = sum(torch.linalg.matrix_norm(d).item() ** 2 for d in before.values())
    for name, delta in before.items():
        torch.testing.assert_close(after[name], best_approximation(delta, 2), rtol=0, atol=1e-6)
    assert f"{100 * kept / whole:.2f}% of the update's energy kept" in result.stdout
    lora_before = sum(4 * sum(d.shape) for d in before.values())
    assert f"LoRA parameters {lora_before:,} -> {lora_before // 2:,} (50.0%)" in result.stdout
    weights = load_file(out / "adapter_model.safetensors")
    head = {k: v for k, v in load_file(adapters[kind] / "adapter_model.safetensors").items() if "lora_" not in k}
    assert head and all(torch.equal(weights[k], v) for k, v in head.items())

    ours, _, _ = load_adapter_model(out)
    torch.testing.assert_close(peft_logits(tiny_models[kind], out), logits(ours), atol=1e-5, rtol=0)


def test_resize_keeps_modules_whose_rank_is_not_above_the_one_asked_for(tiny_models, tmp_path, run_cli):
    adapter = random_adapter(tmp_path / "mixed", tiny_models["bert"], rank=4, rank_pattern={"query": 2})
    out = tmp_path / "rank3"
    result = run_cli("resize", adapter, "--rank", "3", "--output", out)
    assert result.exit_code == 0, result.output
    assert ("--rank 3 is above the rank of 2 modules (e.g. bert.encoder.layer.0.attention.self.query); "
            "they are kept as they are") in result.stdout
    before, after = load_file(adapter / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    for key, tensor in after.items():
        if ".query." in key:
            assert torch.equal(tensor, before[key]), key
        elif key.endswith("lora_A.weight"):
            assert tensor.shape[0] == 3, key
    ours, _, _ = load_adapter_model(out)
    torch.testing.assert_close(peft_logits(tiny_models["bert"], out), logits(ours), atol=1e-5, rtol=0)


def test_energy_resize_keeps_at_least_the_energy_asked_for_per_module(adapters, tmp_path, run_cli):
    out = tmp_path / "e90"
    result = run_cli("resize", adapters["bert"], "--energy", "0.9", "--output", out)
    assert result.exit_code == 0, result.output
    before, after = deltas(adapters["bert"]), deltas(out)
    ranks = set()
    for name, delta in before.items():
        rank = torch.linalg.matrix_rank(after[name]).item()
        ranks.add(rank)
        whole = torch.linalg.matrix_norm(delta) ** 2
        assert torch.linalg.matrix_norm(after[name]) ** 2 >= 0.9 * whole - 1e-9, name
        assert torch.linalg.matrix_norm(best_approximation(delta, rank - 1)) ** 2 < 0.9 * whole, name  # minimal
    assert len(ranks) > 1  # the ranks differ per module: written with rank_pattern
    assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"]


def test_resize_to_full_rank_is_lossless(tiny_models, tmp_path, run_cli):
    adapter = random_adapter(tmp_path / "deficient", tiny_models["bert"], rank=4, true_rank=2)
    reference, _, _ = load_adapter_model(adapter)
    out = tmp_path / "full"
    result = run_cli("resize", adapter, "--energy", "1.0", "--output", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2  # each ΔW has rank 2
    assert "100.00% of the update's energy kept" in result.stdout
    resized, _, _ = load_adapter_model(out)
    torch.testing.assert_close(logits(resized), logits(reference), atol=1e-5, rtol=0)
    for name, delta in deltas(adapter).items():
        torch.testing.assert_close(deltas(out)[name], delta, atol=1e-6, rtol=0)


def test_resize_bad_input(adapters, tmp_path, run_cli):
    result = run_cli("resize", adapters["bert"], "--energy", "1.5", "--output", tmp_path / "x")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --energy 1.5 is out of range: use a fraction in (0, 1], e.g. 0.9"
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    result = run_cli("resize", adapters["bert"], "--rank", "2", "--output", tmp_path / "busy")
    assert result.exit_code == 2
    assert "exists and is not empty; pass --overwrite to replace it" in result.stderr
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- extract


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_a_merged_model_extracts_back_to_its_adapter(kind, adapters, tiny_models, tmp_path, run_cli):
    merged = tmp_path / "merged"
    assert run_cli("merge", adapters[kind], "--output", merged).exit_code == 0
    out = tmp_path / "extracted"
    result = run_cli("extract", "--base", tiny_models[kind], "--tuned", merged, "--rank", "4", "--output", out)
    assert result.exit_code == 0, result.output
    assert "100.00% of the difference's energy kept" in result.stdout
    original, extracted = deltas(adapters[kind]), deltas(out)
    assert extracted.keys() == original.keys()
    for name, delta in original.items():
        torch.testing.assert_close(extracted[name], delta, atol=1e-5, rtol=0, msg=name)
    weights = load_file(out / "adapter_model.safetensors")
    for key, tensor in load_file(adapters[kind] / "adapter_model.safetensors").items():
        if "lora_" not in key:  # the head, saved by default
            assert torch.equal(weights[key], tensor), key
    ours, _, spec = load_adapter_model(out)
    assert spec.labels == LABELS
    merged_model = AutoModelForSequenceClassification.from_pretrained(merged)
    torch.testing.assert_close(logits(ours), logits(merged_model), atol=1e-4, rtol=0)
    torch.testing.assert_close(peft_logits(tiny_models[kind], out), logits(ours), atol=1e-5, rtol=0)


def tuned_copy(directory: Path, model_dir: Path, change) -> Path:
    """The tiny model with `change(name, module)` applied under no_grad, saved as a fine-tune is."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(LABELS),
                                                               id2label=dict(enumerate(LABELS)),
                                                               label2id={n: i for i, n in enumerate(LABELS)})
    with torch.no_grad():
        for name, module in model.named_modules():
            change(name, module)
    model.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory


def test_extract_recovers_a_known_low_rank_delta_from_under_noise(tiny_models, tmp_path, run_cli):
    generator = torch.Generator().manual_seed(0)
    planted: dict[str, torch.Tensor] = {}

    def change(name, module):
        if isinstance(module, torch.nn.Linear) and name != "classifier":
            out_features, in_features = module.weight.shape
            U, _ = torch.linalg.qr(torch.randn(out_features, 2, generator=generator))
            V, _ = torch.linalg.qr(torch.randn(in_features, 2, generator=generator))
            planted[name] = U @ torch.diag(torch.tensor([3.0, 2.0])) @ V.T
            noise = 0.005 * torch.randn(module.weight.shape, generator=generator)
            module.weight += planted[name] + noise

    tuned = tuned_copy(tmp_path / "tuned", tiny_models["bert"], change)
    for args in (("--rank", "2"), ("--energy", "0.99")):
        out = tmp_path / f"extracted{args[0]}"
        result = run_cli("extract", "--base", tiny_models["bert"], "--tuned", tuned, *args, "--output", out)
        assert result.exit_code == 0, result.output
        extracted = deltas(out)
        assert extracted.keys() == planted.keys()
        for name, delta in planted.items():
            assert torch.linalg.matrix_rank(extracted[name]).item() == 2, name
            error = torch.linalg.matrix_norm(extracted[name].float() - delta)
            # ‖noise‖_F is about 0.005·√(out·in); the rank-2 truncation keeps only the noise inside the
            # planted subspaces, about 0.005·√(2·(out + in)): 0.056 against 0.16 for the 32×32 layers.
            noise = 0.005 * (delta.numel() ** 0.5)
            assert error < 0.5 * noise and error / torch.linalg.matrix_norm(delta) < 0.025, name


def test_extract_saves_the_modules_asked_for_and_reports_other_changes(tiny_models, tmp_path, run_cli):
    def change(name, module):
        if name == "bert.embeddings.LayerNorm":
            module.weight += 0.25
        elif name == "bert.encoder.layer.0.attention.self.query":
            module.weight += 0.1
            module.bias += 0.05

    tuned = tuned_copy(tmp_path / "tuned", tiny_models["bert"], change)
    result = run_cli("extract", "--base", tiny_models["bert"], "--tuned", tuned, "--rank", "1",
                     "--output", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert "saved in full: classifier" in result.stdout
    assert ("not in the adapter: 2 other tensors changed (the largest change is 0.25 in "
            "bert.embeddings.LayerNorm.weight); add --save-module NAME") in " ".join(result.stdout.split())
    result = run_cli("extract", "--base", tiny_models["bert"], "--tuned", tuned, "--rank", "1", "--output",
                     tmp_path / "b", "--save-module", "bert.embeddings.LayerNorm", "--target-modules", "query")
    assert result.exit_code == 0, result.output
    assert "saved in full: bert.embeddings.LayerNorm, classifier" in result.stdout  # model order
    assert "1 other tensors changed (the largest change is 0.05 in bert.encoder.layer.0.attention.self.query.bias)" \
        in " ".join(result.stdout.split())
    weights = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert sorted(k for k in weights if "lora_A" in k) == [f"{PREFIX}bert.encoder.layer.{i}.attention.self.query"
                                                           f".lora_A.weight" for i in range(2)]
    tuned_weights = load_file(tuned / "model.safetensors")
    assert torch.equal(weights[f"{PREFIX}bert.embeddings.LayerNorm.weight"],
                       tuned_weights["bert.embeddings.LayerNorm.weight"])


def test_extract_names_the_first_tensor_that_does_not_match(adapters, tiny_models, tmp_path, run_cli):
    merged = tmp_path / "merged"
    assert run_cli("merge", adapters["bert"], "--output", merged).exit_code == 0
    wide = tmp_path / "wide"
    save_tiny_model(wide, "bert")
    config = json.loads((wide / "config.json").read_text())
    config.update(hidden_size=48, intermediate_size=96)
    (wide / "config.json").write_text(json.dumps(config))
    AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(wide)).save_pretrained(wide)
    result = run_cli("extract", "--base", wide, "--tuned", merged, "--rank", "2", "--output", tmp_path / "x")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: --base and --tuned differ in shape: bert.embeddings.word_embeddings."
                                     "weight is (33, 48) in --base and (33, 32) in --tuned")
    result = run_cli("extract", "--base", tiny_models["gpt2"], "--tuned", merged, "--rank", "2", "--output",
                     tmp_path / "x")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: --base and --tuned are different architectures: transformer.wte.weight "
                                     "is in --base but not in --tuned")
    assert not (tmp_path / "x").exists()
    shutil.rmtree(merged)


def test_extract_from_a_causal_lm(tmp_path, run_cli):
    tiny_lm("llama").save_pretrained(tmp_path / "base")
    lm_tokenizer().save_pretrained(tmp_path / "base")
    tuned = tiny_lm("llama")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a rank-2 change of every linear layer but the (tied) LM head
        for name, module in tuned.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                out_features, in_features = module.weight.shape
                module.weight += 0.1 * (torch.randn(out_features, 2, generator=generator)
                                        @ torch.randn(2, in_features, generator=generator))
    tuned.save_pretrained(tmp_path / "tuned")
    lm_tokenizer().save_pretrained(tmp_path / "tuned")
    result = run_cli("extract", "--base", tmp_path / "base", "--tuned", tmp_path / "tuned", "--rank", "2",
                     "--output", tmp_path / "adapter")
    assert result.exit_code == 0, result.output
    assert "100.00% of the difference's energy kept" in result.stdout and "saved in full: -" in result.stdout
    ours, tokenizer, spec = load_adapter_model(tmp_path / "adapter")
    assert spec.task == "causal-lm" and len(lora_layers(ours)) == 14  # 2 layers × (q, k, v, o, gate, up, down)
    ids = tokenizer(["the cat sat on a mat", "hello how are you"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(ours(**ids).logits, tuned.eval()(**ids).logits, atol=1e-5, rtol=0)
