"""The loss lorafit trains and reports is the model's own, on many tiny decoder architectures.

`lm.lm_loss` takes the loss from the body and the output embedding at the labelled positions only
when a probe (`lm.probe_loss_path`) proves that this gives the model's own logits, with the
scaling or soft-capping its forward applies after the head reproduced (`fast.LogitTransform`);
otherwise from the model's forward. Here, for each architecture: the path the probe picks; the
training and evaluation loss against `model(input_ids, attention_mask, labels=...).loss`; and a
short `lorafit train` run whose logged test loss, `lorafit eval`, `lorafit merge` and
`lorafit generate` are checked against plain transformers + PEFT.

Causal-LM classes of transformers 5.24 whose forward changes the logits after `lm_head` (found by
reading every `*ForCausalLM`/`*LMHeadModel` forward from the head call to the loss), and what
lorafit does with them:

- final logit soft-capping, `cap * tanh(logits / cap)`: Gemma2, Gemma3 (text), Gemma3n (text),
  Gemma4 (text), Gemma4Unified (text), VaultGemma, NanoChat, Beam (`final_logit_softcapping`);
  RecurrentGemma (`logits_soft_cap`); xLSTM (`output_logit_soft_cap`); Inkling2 (a softcap module,
  `final_logit_softcapping`). Reproduced in the chunked head.
- `logits * logit_scale`: Cohere, Cohere2, Cohere2Moe, CohereCompass (text). Reproduced.
- `logits / logits_scaling`: Granite, GraniteSWA, GraniteMoe, GraniteMoeSWA, GraniteMoeShared,
  GraniteMoeHybrid. Reproduced.
- `logits * logits_scaling`: HyperCLOVAX (same key as Granite, the other way round). Reproduced.
- `lm_head(h) * lm_head_multiplier`: FalconH1. Reproduced.
- the head's input is not the body's output: MiniCPM3 (hidden / logits_scaling), Inkling (hidden /
  logits_mup_width_multiplier, and logits cut to `unpadded_vocab_size`), ModernBertDecoder and the
  BERT family used as decoders (a dense + norm prediction head before the output embedding).
  The model's forward.
- a head module with its own forward: Dory (a per-token learned logit scale in an `nn.Linear`
  subclass). The head runs as the model runs it, at the labelled positions.
- not covered here: Gemma4Assistant/Gemma4UnifiedAssistant (draft models fed by a target model's
  states; their "ordered embeddings" logits come from the head's weight, not its forward), CSM's
  depth decoder and MusicGen (audio codebook heads), CLVP (speech), ProphetNet, XLNet, XLM,
  Flaubert, TrOCR and Whisper decoders (not plain decoder-only text LMs). Mamba, Mamba2,
  FalconMamba, NemotronH, Mllama, BLT and HY-V4 only cast the logits to fp32, which changes
  nothing at fp32.

The scale factors are set far from 1 and the caps near the logits' size, so that a loss that
skipped them would differ.
"""

from __future__ import annotations

import copy
import json
import random
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import lm_recipe, lm_tokenizer, read_metrics, write_jsonl, write_recipe
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer

from lorafit.fast import LogitTransform
from lorafit.generate import eos_ids
from lorafit.lm import IGNORE, collate_lm, count_targets, lm_loss, loss_path, pack, prompt_ids, tokenize_lm
from lorafit.lora import add_lora, lora_layers
from lorafit.models import dropout_keys
from lorafit.recipe import recipe_from_dict
from lorafit.train import prepare_model

peft = pytest.importorskip("peft")

VOCAB = len(lm_tokenizer())
CHUNKED = None  # the chunked head, logits as they are
FORWARD = "forward"  # the model's own forward
CAP = 1.0  # near the size of these models' logits, so soft-capping matters

# name: (config overrides, the loss path the probe must choose)
ARCHITECTURES: dict[str, tuple[dict, LogitTransform | str | None]] = {
    "llama": ({}, CHUNKED),
    "gpt2": ({"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}, CHUNKED),
    "mistral": ({}, CHUNKED),
    "qwen2": ({}, CHUNKED),
    "qwen3": ({}, CHUNKED),
    "phi3": ({}, CHUNKED),
    "gemma": ({}, CHUNKED),
    "olmo2": ({}, CHUNKED),
    "stablelm": ({}, CHUNKED),
    "opt": ({"ffn_dim": 64, "word_embed_proj_dim": 32}, CHUNKED),
    "gpt_neox": ({}, CHUNKED),
    "falcon": ({"head_dim": None}, CHUNKED),
    "dory": ({}, CHUNKED),
    "gemma2": ({"final_logit_softcapping": CAP}, LogitTransform(softcap=CAP)),
    "gemma3_text": ({"final_logit_softcapping": CAP}, LogitTransform(softcap=CAP)),
    "gemma3n_text": ({"final_logit_softcapping": CAP, "num_kv_shared_layers": 0, "sliding_window": 16,
                      "layer_types": ["sliding_attention", "full_attention"], "vocab_size_per_layer_input": VOCAB,
                      "hidden_size_per_layer_input": 8, "laurel_rank": 4, "altup_num_inputs": 2,
                      "activation_sparsity_pattern": [0.0, 0.0]}, LogitTransform(softcap=CAP)),
    "gemma4_text": ({"final_logit_softcapping": CAP, "vocab_size_per_layer_input": VOCAB,
                     "hidden_size_per_layer_input": 8, "layer_types": ["sliding_attention", "full_attention"],
                     "sliding_window": 16}, LogitTransform(softcap=CAP)),
    "gemma4_unified_text": ({"final_logit_softcapping": CAP}, LogitTransform(softcap=CAP)),
    "vaultgemma": ({"final_logit_softcapping": CAP}, LogitTransform(softcap=CAP)),
    "nanochat": ({"final_logit_softcapping": CAP}, LogitTransform(softcap=CAP)),
    "beam": ({"final_logit_softcapping": CAP}, LogitTransform(softcap=CAP)),
    "recurrent_gemma": ({"logits_soft_cap": CAP}, LogitTransform(softcap=CAP)),
    "xlstm": ({"output_logit_soft_cap": CAP}, LogitTransform(softcap=CAP)),
    "inkling2_text": ({"final_logit_softcapping": CAP, "unpadded_vocab_size": VOCAB, "swa_num_attention_heads": 2,
                       "swa_num_key_value_heads": 1, "swa_head_dim": 16, "sliding_window_size": 16, "d_rel": 4,
                       "rel_extent": 16, "moe_intermediate_size": 16, "n_routed_experts": 4,
                       "num_experts_per_tok": 2, "log_scaling_n_floor": 16}, LogitTransform(softcap=CAP)),
    "cohere": ({"logit_scale": 4.0}, LogitTransform(scale=4.0)),
    "cohere2": ({"logit_scale": 4.0}, LogitTransform(scale=4.0)),
    "cohere2_moe": ({"logit_scale": 4.0}, LogitTransform(scale=4.0)),
    "cohere_compass_text": ({"logit_scale": 4.0, "rope_parameters": {"full_attention": {
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}}}, LogitTransform(scale=4.0)),
    "granite": ({"logits_scaling": 0.25}, LogitTransform(divisor=0.25)),
    "granite_swa": ({"logits_scaling": 0.25}, LogitTransform(divisor=0.25)),
    "granitemoe": ({"logits_scaling": 0.25}, LogitTransform(divisor=0.25)),
    "granitemoe_swa": ({"logits_scaling": 0.25}, LogitTransform(divisor=0.25)),
    "granitemoeshared": ({"logits_scaling": 0.25}, LogitTransform(divisor=0.25)),
    "granitemoehybrid": ({"logits_scaling": 0.25, "layer_types": ["mamba", "attention"], "mamba_n_heads": 4,
                          "mamba_d_state": 8, "mamba_d_head": 16, "mamba_chunk_size": 16, "num_local_experts": 4,
                          "shared_intermediate_size": 32}, LogitTransform(divisor=0.25)),
    "hyperclovax": ({"logits_scaling": 4.0}, LogitTransform(scale=4.0)),
    "falcon_h1": ({"lm_head_multiplier": 4.0, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8,
                   "mamba_d_state": 8, "mamba_chunk_size": 16}, LogitTransform(scale=4.0)),
    "minicpm3": ({"dim_model_base": 8, "kv_lora_rank": 8, "q_lora_rank": 16, "qk_nope_head_dim": 8,
                  "qk_rope_head_dim": 8, "v_head_dim": 16, "head_dim": None, "num_key_value_heads": 2}, FORWARD),
    "inkling_text": ({"vocab_size": VOCAB + 2, "unpadded_vocab_size": VOCAB, "logits_mup_width_multiplier": 4.0,
                      "swa_num_attention_heads": 2, "swa_num_key_value_heads": 1, "swa_head_dim": 16,
                      "sliding_window_size": 16, "d_rel": 4, "rel_extent": 16, "moe_intermediate_size": 16,
                      "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1}, FORWARD),
    "modernbert-decoder": ({}, FORWARD),
    "bert": ({"is_decoder": True}, FORWARD),
}
# Dory's MLP scales gate and up and normalizes their product: the fused gated MLP
# (`fast.use_fused_gated_mlp`), matched by name alone, would train another model. Its probe now
# declines there, which the loss and end-to-end tests below check.
# transformers 5.24's generate fails on these with a cache (with use_cache=False it works).
NO_GENERATE = {"recurrent_gemma", "xlstm"}
# End-to-end runs (train, eval, merge, generate; half a second each) check PEFT as the oracle, so
# two architectures are left out: Qwen2 (AutoTokenizer swaps the test's word-level tokenizer for
# Qwen2Tokenizer) and Beam (PEFT 0.21 rewrites its gate/up/down targets as fused MoE experts and
# drops them). Gemma3n stays in: its ModuleLists of Linears are named "0", "1", ..., which would
# also select decoder layers, so the adapter names those targets in full.
END_TO_END = [name for name in ARCHITECTURES if name not in ("qwen2", "beam")]
# The Mamba2 mixers of these hand out_proj's weight and bias straight to their fused training
# kernel: LoRA on out_proj would be skipped in training (and LoRALinear has no `.bias` to hand).
TARGETS = {name: ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "input_linear", "output_linear", "gate_proj",
                  "up_proj", "down_proj"] for name in ("granitemoehybrid", "falcon_h1")}
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 64,
          "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3, "initializer_range": 0.1}


def tiny_config(name: str):
    """COMMON with the architecture's overrides; an override of None drops a COMMON key."""
    settings = {**COMMON, **ARCHITECTURES[name][0]}
    config = CONFIG_MAPPING[name](**{key: value for key, value in settings.items() if value is not None})
    for key in dropout_keys(config):  # deterministic training mode, so that losses can be compared
        setattr(config, key, 0.0)
    return config


def tiny_model(name: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(name)).eval()


@pytest.fixture(scope="session")
def arch_dir(tmp_path_factory):
    """name -> a directory holding that tiny model and `lm_tokenizer`, built on first use."""
    root = tmp_path_factory.mktemp("architectures")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            tiny_model(name).save_pretrained(root / name)
            lm_tokenizer().save_pretrained(root / name)
            built[name] = root / name
        return built[name]

    return get


def with_lora(name: str, seed: int = 1):
    """The tiny model with LoRA on every Linear (lm_head excepted; see TARGETS), its B no longer
    zero, so that it changes the logits."""
    model = tiny_model(name)
    add_lora(model, rank=4, alpha=8, target_modules=TARGETS.get(name, "all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.1)
    return model


ROWS = [{"prompt": "how are you", "completion": "fine thanks"}, {"prompt": "hello", "completion": "hi how are you"},
        {"prompt": "the cat", "completion": "sat on a mat and the dog ran to the park"},
        {"prompt": "a dog ran to", "completion": "the park"}]


def chat(row: dict) -> dict:
    return {"messages": [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": row["completion"]}]}


def prompt_batch() -> dict[str, torch.Tensor]:
    """Right-padded prompt + completion rows (chat template), prompts masked out of the labels."""
    tokenizer = lm_tokenizer()
    split = tokenize_lm(ROWS, tokenizer, 32, "prompt-completion", use_chat_template=True)
    batch = collate_lm(split, list(range(len(ROWS))), tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any() and (batch["labels"][:, 1:] == IGNORE).sum() > 8
    return batch


def training_recipe():
    """A causal-LM recipe for `prepare_model`, which reads only its task and train section."""
    return recipe_from_dict(lm_recipe(Path("unused"), {"train": Path("unused.jsonl")}, Path("unused")))


def own_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                 use_cache=False).loss


# ---------------------------------------------------------------- the probe and the loss


def installed(names: list[str]) -> list:
    """`names` as test parameters, each skipped where the installed transformers lacks the
    architecture (CI also runs the oldest transformers that pyproject.toml allows)."""
    return [pytest.param(name, marks=pytest.mark.skipif(name not in CONFIG_MAPPING,
                                                        reason=f"transformers {transformers.__version__} has no {name}"))
            for name in names]


@pytest.mark.parametrize("name", installed(list(ARCHITECTURES)))
def test_probe_picks_the_path_that_gives_the_models_logits(name):
    path = loss_path(tiny_model(name))
    expected = ARCHITECTURES[name][1]
    if expected == FORWARD:
        assert path.body is None and path.note.startswith("LM loss from the model's forward ("), path.note
    else:
        assert path.body is not None and path.transform == expected, path.note
        assert path.note == "chunked LM-head loss" + (f" with the model's {expected.describe()}" if expected else "")


@pytest.mark.parametrize("name", installed(list(ARCHITECTURES)))
def test_lm_loss_is_the_models_own_loss_in_training_and_evaluation(name):
    """lm_loss / targets, with training's speed-ups on (fp32), against the loss and LoRA gradients
    of the untouched model's own forward, on a padded batch with masked prompts; in train mode
    (dropout 0) and in eval mode."""
    model = with_lora(name)
    reference = copy.deepcopy(model)
    prepare_model(model, training_recipe(), torch.device("cpu"), torch.float32)
    batch = prompt_batch()
    count = count_targets(batch)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == [n for n, p in reference.named_parameters() if p.requires_grad] and names

    model.train()
    reference.train()
    ours = lm_loss(model, batch) / count
    ours.backward()
    theirs = own_loss(reference, batch)
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    grads = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-4, atol=1e-6, msg=n)

    model.eval()
    reference.eval()
    with torch.inference_mode():
        torch.testing.assert_close(lm_loss(model, batch) / count, own_loss(reference, batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "granite", "minicpm3"])
def test_packed_blocks_score_each_example_as_alone_on_either_path(name):
    """A packed block (position ids restarting per example, a 4-D mask) gives each example the loss
    it has alone: on the chunked path, with a logit transform, and on the model's forward."""
    model, tokenizer = with_lora(name), lm_tokenizer()
    packed = pack(tokenize_lm(ROWS, tokenizer, 32, "prompt-completion", use_chat_template=True), 64)
    alone = pack(tokenize_lm(ROWS, tokenizer, 32, "prompt-completion", use_chat_template=True), 16)
    assert len(packed) == 1 and len(alone) == len(ROWS)  # one block of all four; one block each
    block = collate_lm(packed, [0], tokenizer.pad_token_id)
    assert block["attention_mask"].dim() == 4 and "position_ids" in block
    with torch.inference_mode():
        separate = [own_loss(model, batch) * count_targets(batch)
                    for batch in (collate_lm(alone, [i], tokenizer.pad_token_id) for i in range(len(ROWS)))]
        torch.testing.assert_close(lm_loss(model, block), sum(separate), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gemma2", "granite", "cohere"])
def test_bf16_training_settings_keep_the_chunked_path_and_the_models_loss(name):
    """prepare_model under bf16 (frozen weights stored in bf16, fused norms) probes first, in fp32."""
    model = with_lora(name)
    notes = prepare_model(model, training_recipe(), torch.device("cpu"), torch.bfloat16)
    expected = ARCHITECTURES[name][1]
    assert notes[0] == "chunked LM-head loss" + (f" with the model's {expected.describe()}" if expected else "")
    batch = prompt_batch()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = lm_loss(model, batch) / count_targets(batch)
        theirs = own_loss(model, batch)
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)


def test_a_model_the_probe_cannot_run_falls_back_to_its_forward():
    """A body that is not where base_model_prefix says must not crash the loss."""
    model = with_lora("llama")
    model.base_model_prefix = "missing"
    batch = prompt_batch()
    path = loss_path(model)
    assert path.body is None and path.note.startswith("LM loss from the model's forward (the probe failed with ")
    with torch.inference_mode():
        torch.testing.assert_close(lm_loss(model, batch) / count_targets(batch), own_loss(model, batch))


# ---------------------------------------------------------------- train, eval, merge, generate


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> dict[str, Path]:
    """Chat splits (loss on the assistant turn only) of ROWS drawn at random."""
    root = tmp_path_factory.mktemp("arch-data")
    files = {}
    for split, seed, n in (("train", 1, 8), ("validation", 2, 5), ("test", 3, 6)):
        rng = random.Random(seed)
        files[split] = write_jsonl(root / f"{split}.jsonl", [chat(rng.choice(ROWS)) for _ in range(n)])
    return files


@torch.inference_mode()
def own_mean_loss(model, file: Path) -> float:
    """Mean next-token loss over the labelled tokens of a chat split, from the model's own forward,
    one example at a time (no padding)."""
    rows = [json.loads(line) for line in file.read_text().splitlines()]
    split = tokenize_lm(rows, lm_tokenizer(), 32, "chat")
    total = count = 0
    for ids, labels in zip(split.input_ids, split.labels):
        n = sum(label != IGNORE for label in labels[1:])
        total += model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]), use_cache=False).loss.item() * n
        count += n
    return total / count


@pytest.mark.parametrize("name", installed(END_TO_END))
def test_run_eval_merge_and_generate_agree_with_the_models_forward(name, arch_dir, chat_data, tmp_path, run_cli,
                                                                    monkeypatch):
    # Not under test, and most of a tiny run's time: the plot, and the heap trim after loading.
    monkeypatch.setattr("lorafit.train.plot_training", lambda run_dir: None)
    monkeypatch.setattr("lorafit.train.release_free_memory", lambda: None)
    out = tmp_path / "run"
    recipe = lm_recipe(arch_dir(name), chat_data, out, model={"dropout": 0.0},
                       lora={"target_modules": TARGETS.get(name, "all-linear")},
                       data={"messages_column": "messages", "eval_split": "validation", "test_split": "test"},
                       optim={"lr": 5e-2},
                       train={"max_steps": 2, "eval_batch_size": 4, "log_every": 2, "precision": "fp32"})
    result = run_cli("train", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 0, result.output
    note = "chunked LM-head loss" if ARCHITECTURES[name][1] != FORWARD else "LM loss from the model's forward"
    assert note in result.stdout
    logged = {m["split"]: m["loss"] for m in read_metrics(out) if "split" in m}

    # The logged eval and test losses are the adapter model's own (transformers + PEFT).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(arch_dir(name)),
                                                   out / "adapter").eval()
    assert logged["eval"] == pytest.approx(own_mean_loss(reference, chat_data["validation"]), rel=1e-5)
    assert logged["test"] == pytest.approx(own_mean_loss(reference, chat_data["test"]), rel=1e-5)

    # lorafit eval reproduces the logged test loss.
    result = run_cli("eval", out, "-o", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval.json").read_text())["loss"] == pytest.approx(logged["test"], rel=1e-6)

    # The merged model, loaded by plain transformers, gives the adapter model's logits.
    merged = tmp_path / "merged"
    result = run_cli("merge", out / "adapter", "-o", merged)
    assert result.exit_code == 0, result.output
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = torch.tensor([lm_tokenizer()("the cat sat on a mat and the dog")["input_ids"]])
    with torch.inference_mode():
        torch.testing.assert_close(plain(input_ids=ids, use_cache=False).logits,
                                   reference(input_ids=ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)
    if name in NO_GENERATE:
        return

    # lorafit generate (greedy) continues a prompt as transformers' generate does on the merged model.
    result = run_cli("generate", out, "--prompt", "hello", "--max-new-tokens", "5", "--temperature", "0")
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompt = torch.tensor([prompt_ids(tokenizer, "hello", True)])
    with torch.inference_mode():
        new = plain.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=eos_ids(plain, tokenizer))
    assert result.stdout.strip() == tokenizer.decode(new[0, prompt.shape[1]:], skip_special_tokens=True).strip()
