"""Causal LMs after training: PEFT compatibility, `lorafit merge`, `lorafit generate` and `lorafit eval`."""

from __future__ import annotations

import json
import math
import warnings
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from conftest import lm_recipe, lm_tokenizer, read_metrics, tiny_lm, write_jsonl, write_recipe
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafit.adapter import WEIGHTS_FILE, AdapterSpec, load_adapter_model, save_adapter
from lorafit.errors import LorafitError
from lorafit.generate import fit_context, generate_ids, generate_text
from lorafit.inference import load_trained as load_causal_lm
from lorafit.inference import run_generate
from lorafit.lora import add_lora, lora_layers
from lorafit.models import load_model, load_tokenizer, resolve_model
from lorafit.recipe import recipe_from_dict
from lorafit.device import autocast_for, pick_device, resolve_precision
from lorafit.train import train

peft = pytest.importorskip("peft")

PROMPT = "the cat"
COMPLETION = "sat on a mat and the dog ran to the park"
TEXTS = ["the cat sat on a mat", "hello how are you", "a dog ran to the park and the cat sat", "hi"]


def error_line(result) -> str:
    """The whole of stderr, which must be exactly one line."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@torch.inference_mode()
def lm_logits(model, texts=TEXTS) -> torch.Tensor:
    """Logits at the real (unpadded) positions of a right-padded batch: (tokens, vocabulary)."""
    batch = lm_tokenizer()(texts, padding=True, return_tensors="pt")
    logits = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[batch["attention_mask"].bool()].float()


# ---------------------------------------------------------------- PEFT as the oracle


@pytest.fixture(scope="module")
def short_runs(lm_model_dirs, tmp_path_factory) -> dict[str, Path]:
    """A few fp32 steps on raw text per model, so lora_B (and Llama's saved lm_head) leave their init."""
    root = tmp_path_factory.mktemp("short-runs")
    data = write_jsonl(root / "train.jsonl", [{"text": t} for t in TEXTS] * 4)
    adapters = {}
    for kind, model_dir in lm_model_dirs.items():
        saved = {"modules_to_save": ["lm_head"]} if kind == "llama" else {}  # GPT-2 ties lm_head to wte
        raw = lm_recipe(model_dir, {"train": data}, root / kind, lora={"target_modules": "all-linear", **saved},
                        train={"precision": "fp32"})
        train(recipe_from_dict(raw), console=Console(quiet=True))
        adapters[kind] = root / kind / "adapter"
    return adapters


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_loads_our_causal_lm_adapter_with_same_logits(kind, lm_model_dirs, short_runs):
    base = AutoModelForCausalLM.from_pretrained(lm_model_dirs[kind])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(base, short_runs[kind])
    messages = [str(w.message).lower() for w in caught]
    assert not [m for m in messages if "missing" in m or "unexpected" in m or "unknown" in m], messages
    assert type(theirs).__name__ == "PeftModelForCausalLM"

    ours, _, spec = load_adapter_model(short_runs[kind])
    assert spec.task == "causal-lm"
    expected = lm_logits(ours)
    torch.testing.assert_close(lm_logits(theirs), expected, atol=1e-5, rtol=0)
    # Training moved the adapter: it is not a no-op on the base model's logits.
    weights = load_file(short_runs[kind] / WEIGHTS_FILE)
    assert all(t.abs().sum() > 0 for k, t in weights.items() if k.endswith("lora_B.weight"))
    assert (lm_logits(AutoModelForCausalLM.from_pretrained(lm_model_dirs[kind])) - expected).abs().max() > 1e-2


PEFT_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_we_load_a_peft_causal_lm_adapter_with_same_logits(kind, lm_model_dirs, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(lm_model_dirs[kind])
    config = peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=PEFT_TARGETS[kind],
                             fan_in_fan_out=kind == "gpt2")
    theirs = peft.get_peft_model(base, config)
    torch.manual_seed(3)
    with torch.no_grad():  # stand-in for training: move B away from zero
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    theirs.save_pretrained(tmp_path / "peft-adapter")
    expected = lm_logits(theirs)

    ours, _, spec = load_adapter_model(tmp_path / "peft-adapter", base=str(lm_model_dirs[kind]))
    assert spec.task == "causal-lm" and spec.labels is None
    assert len(lora_layers(ours)) == 2 * len(PEFT_TARGETS[kind])  # two layers, each with these targets
    torch.testing.assert_close(lm_logits(ours), expected, atol=1e-5, rtol=0)
    plain = AutoModelForCausalLM.from_pretrained(lm_model_dirs[kind])
    assert (lm_logits(plain) - expected).abs().max() > 1e-2


# ---------------------------------------------------------------- merge


def random_lm_adapter(directory: Path, base: Path | str, modules_to_save: list[str]) -> Path:
    """An adapter on all linear layers with random B (and a changed lm_head if saved), as lorafit saves it."""
    source = resolve_model(str(base))
    tokenizer = load_tokenizer(source)
    model, _ = load_model(source, "causal-lm", tokenizer)
    plan = add_lora(model, rank=4, alpha=8, target_modules="all-linear", modules_to_save=modules_to_save)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.1)
        for name in modules_to_save:
            for param in model.get_submodule(name).parameters():
                param.add_(0.3 * torch.randn_like(param))
    spec = AdapterSpec(str(base), "causal-lm", 4, 8.0, 0.0, "all-linear", modules_to_save,
                       meta={"max_length": 32})
    return save_adapter(directory, model, plan, spec)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merged_causal_lm_logits_equal_adapter_logits(kind, lm_model_dirs, tmp_path, run_cli):
    adapter = random_lm_adapter(tmp_path / "adapter", lm_model_dirs[kind], ["lm_head"] if kind == "llama" else [])
    out = tmp_path / "merged"
    result = run_cli("merge", adapter, "-o", out)
    assert result.exit_code == 0, result.output

    expected = lm_logits(load_adapter_model(adapter)[0])
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no lorafit code involved
    assert type(merged).__name__ == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[kind]
    torch.testing.assert_close(lm_logits(merged), expected, atol=1e-5, rtol=0)
    base = AutoModelForCausalLM.from_pretrained(lm_model_dirs[kind])
    assert (lm_logits(base) - expected).abs().max() > 0.1
    weights = load_file(out / "model.safetensors")
    assert not any("lora_" in key for key in weights)
    meta = json.loads((out / "lorafit.json").read_text())
    assert meta["task"] == "causal-lm" and meta["labels"] is None
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer(TEXTS)["input_ids"] == lm_tokenizer()(TEXTS)["input_ids"]
    assert tokenizer.chat_template == lm_tokenizer().chat_template


def write_tiny_gguf(path: Path) -> Path:
    """A tiny random Llama as a GGUF file laid out like SmolLM2's: byte-level BPE vocabulary with
    ChatML special tokens and chat template, Q4_1 matrices, no output.weight (tied embeddings)."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = ["th", "the", "\u0120the", "at", "cat"]
    tokens = specials + list(bytes_to_unicode().values()) + words
    hidden, layers, heads, kv_heads, ff = 32, 2, 2, 1, 64
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    writer.add_token_merges(["t h", "th e", "\u0120 the", "a t", "c at"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rng = np.random.default_rng(0)

    def matrix(name: str, rows: int, cols: int) -> None:
        data = (rng.standard_normal((rows, cols)) * 0.2).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q4_1),
                          raw_dtype=gguf.GGMLQuantizationType.Q4_1)

    matrix("token_embd.weight", len(tokens), hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for name, rows, cols in (("attn_q", hidden, hidden), ("attn_k", hidden // heads * kv_heads, hidden),
                                 ("attn_v", hidden // heads * kv_heads, hidden), ("attn_output", hidden, hidden),
                                 ("ffn_gate", ff, hidden), ("ffn_up", ff, hidden), ("ffn_down", hidden, ff)):
            matrix(f"blk.{i}.{name}.weight", rows, cols)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_merge_of_a_gguf_based_adapter_saves_a_plain_model(tmp_path, monkeypatch, run_cli):
    """Like the offline SmolLM2 copy: a hub id that resolves to a GGUF file shipped in a package."""
    import lorafit.models

    package = tmp_path / "site" / "tiny_gguf_llama"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    write_tiny_gguf(package / "tiny.Q4_1.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(lorafit.models.BUNDLED, "tiny/gguf-llama", ("tiny_gguf_llama", "", "tiny.Q4_1.gguf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("tiny/gguf-llama").kwargs == {"gguf_file": "tiny.Q4_1.gguf"}

    adapter = random_lm_adapter(tmp_path / "adapter", "tiny/gguf-llama", [])
    out = tmp_path / "merged"
    result = run_cli("merge", adapter, "-o", out)
    assert result.exit_code == 0, result.output
    assert not list(out.glob("*.gguf")) and (out / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    model, gguf_tokenizer, _ = load_adapter_model(adapter)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer(TEXTS)["input_ids"] == gguf_tokenizer(TEXTS)["input_ids"]
    assert tokenizer.chat_template == gguf_tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    with torch.inference_mode():
        expected = model(**batch).logits[mask]
        got = AutoModelForCausalLM.from_pretrained(out).eval()(**batch).logits[mask]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    result = run_cli("generate", out, "--prompt", "the cat", "--temperature", "0", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- a model that memorized a completion


@pytest.fixture(scope="module")
def memorized(lm_model_dirs, tmp_path_factory) -> Path:
    """Tiny Llama trained (precision auto, as shipped recipes) to complete PROMPT with COMPLETION.

    The run has a test split, so its metrics.jsonl logs the test loss and perplexity.
    """
    root = tmp_path_factory.mktemp("memorized")
    train_file = write_jsonl(root / "train.jsonl", [{"prompt": PROMPT, "completion": COMPLETION}] * 16)
    test_file = write_jsonl(root / "test.jsonl", [{"prompt": PROMPT, "completion": COMPLETION},
                                                  {"prompt": PROMPT, "completion": "the dog ran to the park"},
                                                  {"prompt": "hello", "completion": "hi how are you"}])
    raw = lm_recipe(lm_model_dirs["llama"], {"train": train_file, "test": test_file}, root / "run",
                    # A tiny random model's frozen output head caps how confident its logits can get; train it too.
                    lora={"rank": 8, "alpha": 16, "modules_to_save": ["lm_head"]},
                    data={"prompt_column": "prompt", "completion_column": "completion", "test_split": "test"},
                    train={"max_steps": 150})
    train(recipe_from_dict(raw), console=Console(quiet=True))
    return root / "run"


def fp32_recipe(run: Path, path: Path) -> Path:
    raw = json.loads((run / "adapter" / "lorafit.json").read_text())["recipe"]
    raw["train"]["precision"] = "fp32"
    return write_recipe(path, raw)


def test_generate_streams_the_memorized_completion(memorized, run_cli):
    for target in (memorized, memorized / "adapter"):
        result = run_cli("generate", target, "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "20")
        assert result.exit_code == 0, result.output
        assert result.stdout == COMPLETION + "\n"

    pieces: list[str] = []
    text = run_generate(memorized, PROMPT, max_new_tokens=20, temperature=0, on_text=pieces.append)
    assert text == COMPLETION
    assert len(pieces) > 1 and "".join(pieces) == text  # streamed piece by piece


def test_merged_memorized_model_generates_the_same(memorized, tmp_path, run_cli):
    out = tmp_path / "merged"
    result = run_cli("merge", memorized / "adapter", "-o", out)
    assert result.exit_code == 0, result.output
    result = run_cli("generate", out, "--prompt", PROMPT, "--temperature", "0")
    assert result.exit_code == 0, result.output
    assert result.stdout == COMPLETION + "\n"

    # Plain transformers, the prompt rendered by hand with the saved chat template.
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    generated = model.generate(**ids, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == COMPLETION

    # And it scores as its adapter (both fp32): lorafit.json carries the recipe, so eval finds the test split.
    recipe = fp32_recipe(memorized, tmp_path / "fp32.yaml")
    reports = {}
    for name, target in (("adapter", memorized / "adapter"), ("merged", out)):
        result = run_cli("eval", target, "--recipe", recipe, "-o", tmp_path / f"{name}.json")
        assert result.exit_code == 0, result.output
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert reports["merged"]["kind"] == "merged" and reports["merged"]["tokens"] == reports["adapter"]["tokens"]
    assert reports["merged"]["loss"] == pytest.approx(reports["adapter"]["loss"], abs=1e-5)
    assert reports["merged"]["generations"] == reports["adapter"]["generations"]


def test_sampling_follows_temperature_and_top_p(memorized):
    # top_p so small that only the most likely token survives: sampling is greedy.
    torch.manual_seed(0)
    assert run_generate(memorized, PROMPT, max_new_tokens=20, temperature=1.0, top_p=1e-6) == COMPLETION
    # A very high temperature flattens the distribution: 20 sampled tokens are not the memorized text.
    torch.manual_seed(0)
    assert run_generate(memorized, PROMPT, max_new_tokens=20, temperature=100.0, top_p=1.0) != COMPLETION


def test_eval_of_run_equals_test_perplexity_logged_in_training(memorized):
    from lorafit.inference import run_eval

    logged = [m for m in read_metrics(memorized) if m.get("split") == "test"][-1]
    result = run_eval(memorized, console=Console(quiet=True))
    assert result.report_path == memorized / "eval-test.json"
    report = json.loads(result.report_path.read_text())
    assert report["kind"] == "run" and report["split"] == "test" and report["examples"] == 3
    assert report["tokens"] == logged["tokens"]
    assert report["loss"] == pytest.approx(logged["loss"], abs=1e-6)
    assert report["perplexity"] == pytest.approx(logged["perplexity"], rel=1e-6)
    # The first test example is the memorized one; the second shares its prompt, so cannot match too.
    assert [g["match"] for g in report["generations"]][:2] == [True, False]


@torch.inference_mode()
def test_eval_numbers_equal_hand_computation(memorized, tmp_path, run_cli):
    rows = [{"prompt": PROMPT, "completion": COMPLETION},
            {"prompt": PROMPT, "completion": f"  {COMPLETION} "},  # equal once stripped
            {"prompt": PROMPT, "completion": "sat on a mat"},  # a prefix is not a match
            {"prompt": "how are you", "completion": "fine thanks"},
            {"prompt": "hello", "completion": "hi"}]  # beyond --max-samples
    data = write_jsonl(tmp_path / "small.jsonl", rows)
    recipe = fp32_recipe(memorized, tmp_path / "fp32.yaml")
    result = run_cli("eval", memorized / "adapter", "--recipe", recipe, "--data-files", data, "--max-samples", 4,
                     "-o", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["examples"] == 4 and report["precision"] == "fp32" and report["chat_template"] is True

    # By hand, one example at a time: the summed NLL of each completion and its end token after
    # the chat-rendered prompt, and greedy generation without padding.
    model, tokenizer, _ = load_adapter_model(memorized / "adapter")
    nll, count, matches = 0.0, 0, 0
    for row in rows[:4]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                               add_generation_prompt=True, return_dict=True)["input_ids"]
        target = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        log_probs = model(torch.tensor([prompt + target])).logits[0].log_softmax(-1)
        nll -= sum(log_probs[len(prompt) - 1 + j, token].item() for j, token in enumerate(target))
        count += len(target)
        out = model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        matches += tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True).strip() == row["completion"].strip()
    assert report["tokens"] == count
    assert report["loss"] == pytest.approx(nll / count, abs=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert report["exact_match"] == matches / 4
    assert [g["match"] for g in report["generations"]][:3] == [True, True, False]


@torch.inference_mode()
def greedy_by_hand(model, prompt: list[int], max_new_tokens: int, eos: int, autocast=nullcontext) -> list[int]:
    """Greedy decoding from the model's own logits: one full forward per new token, no padding, no
    KV cache, no `generate`. Returns the new tokens before `eos`."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        with autocast():
            token = int(model.eval()(torch.tensor([ids])).logits[0, -1].argmax())
        if token == eos:
            break
        ids.append(token)
    return ids[len(prompt):]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_left_padded_generation_equals_one_prompt_at_a_time(kind):
    # GPT-2's learned absolute positions would shift under left padding if position ids did not follow the mask.
    model, tokenizer = tiny_lm(kind), lm_tokenizer()
    prompts = [tokenizer(text)["input_ids"] for text in ("the cat sat on a mat", "hi", "how are you fine")]
    batched = generate_ids(model, tokenizer, prompts, max_new_tokens=8)
    assert batched == [greedy_by_hand(model, ids, 8, tokenizer.eos_token_id) for ids in prompts]
    assert sum(len(ids) for ids in batched) > 0


def test_generate_from_a_plain_transformers_model_directory(lm_model_dirs, run_cli):
    # No lorafit.json: config.json's architecture says it is a causal LM; no recipe, so the chat template is used.
    result = run_cli("generate", lm_model_dirs["gpt2"], "--prompt", "hello", "--temperature", "0",
                     "--max-new-tokens", "6")
    assert result.exit_code == 0, result.output
    model, tokenizer = AutoModelForCausalLM.from_pretrained(lm_model_dirs["gpt2"]), lm_tokenizer()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
    # With no recipe, generation runs at train.precision's default ("auto"): the same here.
    device = pick_device()
    new = greedy_by_hand(model, ids, 6, tokenizer.eos_token_id, autocast_for(device, resolve_precision("auto", device)))
    assert len(new) > 0
    assert result.stdout == tokenizer.decode(new, skip_special_tokens=True) + "\n"


# ---------------------------------------------------------------- errors


def test_generate_and_predict_errors_are_one_line(memorized, tiny_models, tmp_path, run_cli):
    result = run_cli("predict", memorized, "the cat")
    assert result.exit_code == 2
    assert error_line(result) == (f"error: {memorized} is a causal-lm model, which does not label texts; "
                                  f"generate with: lorafit generate {memorized} --prompt TEXT")

    result = run_cli("generate", tiny_models["bert"], "--prompt", "hi")
    assert result.exit_code == 2
    assert error_line(result) == (f"error: {tiny_models['bert']} is a sequence-classification model, which does "
                                  f"not generate text; label texts with: lorafit predict {tiny_models['bert']} TEXT")

    for option, value, message in (
            ("--temperature", "-1", "--temperature -1: use 0 (greedy) or a positive number such as 0.7"),
            ("--top-p", "0", "--top-p 0: use a probability in (0, 1], e.g. 0.9"),
            ("--max-new-tokens", "0", "--max-new-tokens 0: use a positive number of tokens")):
        result = run_cli("generate", memorized, "--prompt", "hi", option, value)
        assert result.exit_code == 2
        assert error_line(result) == f"error: {message}"

    lm = load_causal_lm(memorized)
    lm.tokenizer.chat_template = None
    with pytest.raises(LorafitError) as caught:
        generate_text(lm, "hi", use_chat_template=True)
    assert str(caught.value) == (f"--chat-template: the tokenizer of {memorized} has no chat template; "
                                 f"pass --no-chat-template")

    result = run_cli("generate", tmp_path / "nothing", "--prompt", "hi")
    assert result.exit_code == 2
    assert error_line(result) == f"error: {tmp_path / 'nothing'} not found"

    result = run_cli("eval", memorized, "--split", "dev", "-o", tmp_path / "r.json")
    assert result.exit_code == 2
    assert error_line(result) == "error: data: split 'dev' not found; the dataset has ['test', 'train']"
    assert not (tmp_path / "r.json").exists()


def test_fit_context_keeps_generation_inside_the_model():
    assert fit_context(list(range(10)), 5, None) == (list(range(10)), 5)
    assert fit_context(list(range(10)), 5, 64) == (list(range(10)), 5)
    assert fit_context(list(range(10)), 100, 64) == (list(range(10)), 54)
    # A prompt that fills the context loses its start, leaving room for half of it.
    assert fit_context(list(range(60)), 100, 64) == (list(range(28, 60)), 32)
    assert fit_context(list(range(60)), 8, 64) == (list(range(4, 60)), 8)
