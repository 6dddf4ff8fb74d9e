"""Heads that the base checkpoint does not provide: trained in full, saved, and restored on every load.

A real pretrained checkpoint holds the base model only, so transformers builds the task head of a
...ForSequenceClassification at random. Every module with such random weights must be trained in
full and saved with the adapter (or the adapter gives different predictions on every load), and
the adapter's `modules_to_save` must select exactly those modules under PEFT's rule (a plain
string ending: `classifier` also takes DistilBERT's `pre_classifier`), or PEFT refuses it.

Each base here is saved the way a pretrained checkpoint is: the weights under the model's
`base_model_prefix` only, no head. `ARCHITECTURES` is every sequence-classification architecture
of transformers 5.24 whose head spans more than one module, or is not named `classifier` /
`score`, as `python scripts/head_architectures.py` lists them (models built from their default
configs on the meta device; the head is every parameter outside `base_model_prefix`, grouped by
owning module):
bart, big_bird, bigbird_pegasus, camembert, convbert, data2vec-text, deberta, deberta-v2,
distilbert, electra, esm, esmc, eurobert, flaubert, funnel, ibert, jina_embeddings_v3,
layoutlmv2, layoutlmv3, lilt, longformer, mbart, modernbert, modernbert-decoder, modernvbert,
mpnet, mra, mt5, mvp, nystromformer, plbart, reformer, roberta, roberta-prelayernorm, roformer,
t5, t5gemma, t5gemma2, umt5, xlm, xlm-roberta, xlm-roberta-xl, xlnet, xmod, yoso.
Left out: layoutlmv2 (needs the detectron2 library, not installed) and ibert (its layers are
I-BERT's QuantLinear, which LoRA does not wrap, so there is nothing to adapt). `PLAIN` adds
single-module heads (BERT, GPT-2, Llama) and BERT saved without its pooler, as a masked-LM
checkpoint is, whose sequence classifier reads the pooler.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tokenizer, read_metrics, toy_recipe, write_recipe
from safetensors.torch import load_file, save_file
from transformers import CONFIG_MAPPING, AutoModelForSequenceClassification

from lorafit.adapter import WEIGHTS_FILE, AdapterSpec, load_adapter_model, save_adapter
from lorafit.errors import LorafitError
from lorafit.lora import is_inside
from lorafit.models import ModelSource, load_model
from lorafit.recipe import LoraConfig
from lorafit.train import add_recipe_lora

peft = pytest.importorskip("peft")

TASK = "sequence-classification"
LABELS = ["a", "b", "c"]

ARCHITECTURES = [
    "bart", "big_bird", "bigbird_pegasus", "camembert", "convbert", "data2vec-text", "deberta", "deberta-v2",
    "distilbert", "electra", "esm", "esmc", "eurobert", "flaubert", "funnel", "jina_embeddings_v3", "layoutlmv3",
    "lilt", "longformer", "mbart", "modernbert", "modernbert-decoder", "modernvbert", "mpnet", "mra", "mt5", "mvp",
    "nystromformer", "plbart", "reformer", "roberta", "roberta-prelayernorm", "roformer", "t5", "t5gemma", "t5gemma2",
    "umt5", "xlm", "xlm-roberta", "xlm-roberta-xl", "xlnet", "xmod", "yoso",
]
PLAIN = ["bert", "gpt2", "llama", "bert-without-pooler"]

# Tiny sizes, set wherever a config (or one of its sub-configs) has the attribute.
TINY = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "dim": 32, "embed_dim": 32, "embedding_size": 32,
    "num_hidden_layers": 1, "n_layer": 1, "n_layers": 1, "num_layers": 1, "encoder_layers": 1, "decoder_layers": 1,
    "num_decoder_layers": 1, "num_attention_heads": 2, "n_head": 2, "n_heads": 2, "encoder_attention_heads": 2,
    "decoder_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "d_kv": 16, "intermediate_size": 64,
    "ffn_dim": 64, "hidden_dim": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "d_ff": 64, "n_inner": 64,
    "vocab_size": 64, "max_position_embeddings": 64, "n_positions": 64, "pooler_hidden_size": 32,
    "cross_attention_hidden_size": 32,
    # The toy tokenizer's ids (conftest.VOCAB): [PAD] 0, [CLS] 2, [SEP] 3, [EOS] 4.
    "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 4, "decoder_start_token_id": 2, "sep_token_id": 3,
    "cls_token_id": 2,
}
# What an architecture needs besides TINY to be built small, and to take a batch of 8 tokens.
EXTRA = {
    "funnel": {"block_sizes": [1, 1], "block_repeats": [1, 1]},
    "layoutlmv3": {"coordinate_size": 4, "shape_size": 8, "visual_embed": False},  # 4·4 + 2·8 = hidden
    "lilt": {"hidden_size": 48},  # six layout embeddings of hidden/6 each
    "reformer": {"attn_layers": ["local"], "axial_pos_embds_dim": [16, 16], "axial_pos_shape": [2, 4],
                 "max_position_embeddings": 8, "local_attn_chunk_length": 8, "attention_head_size": 16,
                 "feed_forward_size": 64},
    "longformer": {"attention_window": 8},  # else every batch is padded to the default window of 512
    "t5": {"decoder_start_token_id": 0},
    "xlnet": {"d_head": 16},
    "xmod": {"default_language": "en_XX"},
}

# What the plan lists as "not in checkpoint" for a few: the largest modules whose weights all are absent.
NOT_IN_CHECKPOINT = {
    "distilbert": ["pre_classifier", "classifier"], "deberta-v2": ["pooler", "classifier"],
    "roberta": ["classifier"], "bart": ["classification_head"], "modernbert": ["head", "classifier"],
    "xlnet": ["sequence_summary", "logits_proj"], "bert-without-pooler": ["bert.pooler", "classifier"],
    "gpt2": ["score"],
}


def shrink(config, extra: dict) -> None:
    """Set the TINY sizes wherever `config` (or a sub-config) has them, then `extra`; cut `layer_types`
    to the number of layers."""
    for key, value in TINY.items():
        if hasattr(config, key):
            try:
                setattr(config, key, value)
            except NotImplementedError:  # a size the config derives from others (Funnel's, XLNet's)
                pass
    for key, value in extra.items():
        setattr(config, key, value)
    if isinstance(getattr(config, "layer_types", None), list) and hasattr(config, "num_hidden_layers"):
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    for name in getattr(config, "sub_configs", {}):
        if getattr(config, name, None) is not None:
            shrink(getattr(config, name), {})


def tiny_config(model_type: str):
    config = CONFIG_MAPPING[model_type]()
    shrink(config, EXTRA.get(model_type, {}))
    config.num_labels = len(LABELS)
    return config


def without_head(model, drop: tuple[str, ...] = ()) -> list[str]:
    """The state-dict keys of a pretrained checkpoint for `model`: its base model's only (less those
    starting with `drop`), no task head."""
    prefix = model.base_model_prefix + "."
    return [k for k in model.state_dict() if k.startswith(prefix) and not k.startswith(drop)]


def save_tiny_base(directory: Path, kind: str) -> tuple[Path, set[str]]:
    """A tiny `kind` saved as a pretrained checkpoint is (`without_head`), with the toy tokenizer;
    and the names of the parameters it lacks. "bert-without-pooler" also leaves out BERT's pooler."""
    model_type, _, variant = kind.partition("-without-")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config(model_type))
    kept = without_head(model, drop=("bert.pooler.",) if variant == "pooler" else ())
    state = model.state_dict()
    model.save_pretrained(directory, state_dict={k: state[k] for k in kept})
    make_tokenizer().save_pretrained(directory)
    return directory, {n for n, _ in model.named_parameters() if n not in kept}


def toy_batch() -> dict[str, torch.Tensor]:
    """4 rows of 8 tokens, one padded; each row's last real token is [EOS] (BART and T5 pool there)."""
    ids = torch.randint(5, 33, (4, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[:, -1] = 4
    ids[1, 5], ids[1, 6:], mask[1, 6:] = 4, 0, 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(**toy_batch()).logits


def train_adapter(base: Path, out: Path, target_modules: list[str] | str = "all-linear"):
    """Load `base` as lorafit does, add LoRA as a recipe would, take two AdamW steps, save the adapter.
    Returns (the trained model, its plan, the head's weights as loaded)."""
    model, not_loaded = load_model(ModelSource(str(base), str(base)), TASK, make_tokenizer(), LABELS)
    plan = add_recipe_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=target_modules), TASK,
                           not_loaded)
    at_load = {n: p.detach().clone() for n, p in model.named_parameters() if is_inside(n, plan.modules_to_save)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        F.cross_entropy(model(**toy_batch()).logits, torch.tensor([0, 1, 2, 1])).backward()
        optimizer.step()
        optimizer.zero_grad()
    spec = AdapterSpec(str(base), TASK, 4, 8.0, 0.0, target_modules, plan.modules_to_save, labels=LABELS)
    save_adapter(out, model, plan, spec)
    return model, plan, at_load


def load_with_peft(base: Path, adapter: Path, caplog) -> torch.nn.Module:
    """PEFT's own loading onto a fresh base; any warning, or any log line at WARNING or above, fails."""
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(LABELS))
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(model, adapter)
    # PEFT reads transformers' deprecated `is_gradient_checkpointing` alias: a FutureWarning about PEFT itself.
    assert [str(w.message) for w in caught if not issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
    assert [r.getMessage() for r in caplog.records] == []
    return peft_model


@pytest.mark.parametrize("kind", [pytest.param(a, marks=pytest.mark.slow) for a in ARCHITECTURES] + PLAIN)
def test_head_the_checkpoint_lacks_is_trained_saved_and_restored(kind, tmp_path, caplog):
    base, lacking = save_tiny_base(tmp_path / "base", kind)
    trained, plan, at_load = train_adapter(base, tmp_path / "adapter")

    # Every parameter the checkpoint lacks lies in a module trained in full, named in the plan, and moved.
    assert lacking and all(is_inside(n, plan.not_in_checkpoint) for n in lacking)
    assert plan.not_in_checkpoint == NOT_IN_CHECKPOINT.get(kind, plan.not_in_checkpoint)
    assert all(is_inside(m, plan.modules_to_save) for m in plan.not_in_checkpoint)
    params = dict(trained.named_parameters())
    assert all(params[n].requires_grad and not torch.equal(params[n], at_load[n]) for n in lacking)
    assert not any(is_inside(t, plan.not_in_checkpoint) for t in plan.targets)  # no LoRA on random weights

    # ...and is saved under PEFT's names.
    weights = load_file(tmp_path / "adapter" / WEIGHTS_FILE)
    assert all(f"base_model.model.{n}" in weights for n in lacking)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == plan.modules_to_save

    # lorafit on a fresh base (new random head at each load) gives the trained model's logits exactly;
    # PEFT loads the adapter with no warning and gives the same logits.
    expected = logits(trained)
    ours, _, _ = load_adapter_model(tmp_path / "adapter")
    assert torch.equal(logits(ours), expected)
    torch.testing.assert_close(logits(load_with_peft(base, tmp_path / "adapter", caplog)), expected, atol=1e-5,
                               rtol=0)


# ---------------------------------------------------------------- DistilBERT end to end


@pytest.fixture(scope="module")
def distilbert_base(tmp_path_factory) -> Path:
    base, _ = save_tiny_base(tmp_path_factory.mktemp("distilbert"), "distilbert")
    return base


def cli(run_cli, *args):
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    return result


def test_eval_and_merge_reproduce_the_logged_test_metrics(distilbert_base, toy_data, tmp_path, run_cli):
    """Before the fix, `pre_classifier` stayed random and unsaved: every `lorafit eval` scored differently."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", toy_recipe(distilbert_base, toy_data, run,
                                                          train={"epochs": 2, "eval_every": None, "save_every": None}))
    shown = " ".join(cli(run_cli, "train", recipe).stdout.split())
    assert "trained in full pre_classifier, classifier" in shown
    assert "not in checkpoint pre_classifier, classifier (random at load: trained in full, saved with the adapter)" \
        in shown
    assert "kept out of LoRA pre_classifier (inside modules trained in full)" in shown

    logged = [m for m in read_metrics(run) if m.get("split") == "test"][-1]
    keys = ("accuracy", "macro_f1", "loss")
    for _ in range(2):
        cli(run_cli, "eval", run)
        report = json.loads((run / "eval-test.json").read_text())
        assert {k: report[k] for k in keys} == {k: logged[k] for k in keys}

    cli(run_cli, "merge", run / "adapter", "-o", tmp_path / "merged")
    cli(run_cli, "eval", tmp_path / "merged", "--recipe", recipe, "-o", tmp_path / "merged.json")
    report = json.loads((tmp_path / "merged.json").read_text())
    assert (report["accuracy"], report["macro_f1"]) == (logged["accuracy"], logged["macro_f1"])
    assert report["loss"] == pytest.approx(logged["loss"], abs=1e-4)  # merged weights round differently in bf16


def test_target_naming_a_module_the_checkpoint_lacks(distilbert_base, tmp_path):
    """LoRA on random weights is pointless, and the module trains in full anyway: a target pattern
    that selects nothing else is refused (one that selects other layers too loses only those, below)."""
    with pytest.raises(LorafitError) as err:
        train_adapter(distilbert_base, tmp_path / "a", target_modules=["q_lin", "pre_classifier"])
    assert str(err.value) == ("lora.target_modules: 'pre_classifier' selects only layers inside modules that are "
                              "trained in full (pre_classifier: the task head, or weights the checkpoint lacks); "
                              "remove it from lora.target_modules")


def test_target_pattern_that_also_selects_a_head_layer(tmp_path, caplog):
    base, _ = save_tiny_base(tmp_path / "base", "roberta")
    _, plan, _ = train_adapter(base, tmp_path / "adapter", target_modules=["query", "dense"])
    assert plan.skipped_targets == ["classifier.dense"]
    assert "classifier.dense" not in plan.targets and "roberta.encoder.layer.0.output.dense" in plan.targets
    assert not any("classifier.dense.lora" in k for k in load_file(tmp_path / "adapter" / WEIGHTS_FILE))
    load_with_peft(base, tmp_path / "adapter", caplog)


def test_module_peft_wraps_by_its_name_is_saved_though_the_checkpoint_has_it(tmp_path, caplog):
    """A fine-tuned DistilBERT checkpoint holds pre_classifier; PEFT's head name `classifier` still
    wraps it, so the adapter saves it, and PEFT loads the adapter."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config("distilbert"))
    model.save_pretrained(tmp_path / "finetuned")
    make_tokenizer().save_pretrained(tmp_path / "finetuned")
    trained, plan, _ = train_adapter(tmp_path / "finetuned", tmp_path / "adapter")
    assert plan.not_in_checkpoint == []
    assert plan.modules_to_save == ["pre_classifier", "classifier"] and plan.skipped_targets == ["pre_classifier"]
    assert {"base_model.model.pre_classifier.weight", "base_model.model.pre_classifier.bias"} \
        <= set(load_file(tmp_path / "adapter" / WEIGHTS_FILE))
    torch.testing.assert_close(logits(load_with_peft(tmp_path / "finetuned", tmp_path / "adapter", caplog)),
                               logits(trained), atol=1e-5, rtol=0)


def test_adapter_without_the_modules_the_checkpoint_lacks_is_refused(distilbert_base, tmp_path):
    train_adapter(distilbert_base, tmp_path / "adapter")
    # As lorafit wrote it before: pre_classifier neither listed nor saved. PEFT's `classifier` still
    # takes pre_classifier, so its tensors are missing.
    weights = {k: v for k, v in load_file(tmp_path / "adapter" / WEIGHTS_FILE).items() if ".pre_classifier." not in k}
    save_file(weights, tmp_path / "adapter" / WEIGHTS_FILE)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["modules_to_save"] = ["classifier"]
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LorafitError, match=r"adapter does not fit the model: keys 2 missing "
                                           r"\(e.g. base_model.model.pre_classifier.bias\)"):
        load_adapter_model(tmp_path / "adapter")


def test_adapter_that_leaves_a_random_module_random_is_refused(tmp_path):
    base, _ = save_tiny_base(tmp_path / "base", "bart")
    train_adapter(base, tmp_path / "adapter")
    weights = {k: v for k, v in load_file(tmp_path / "adapter" / WEIGHTS_FILE).items() if "classification_head" not in k}
    save_file(weights, tmp_path / "adapter" / WEIGHTS_FILE)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["modules_to_save"] = None
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LorafitError) as err:
        load_adapter_model(tmp_path / "adapter")
    assert str(err.value) == (f"{tmp_path / 'adapter'}: adapter does not fit the base model: the base checkpoint "
                              f"lacks classification_head (random at every load) and the adapter does not save it; "
                              f"train the adapter again, or pass --base with a checkpoint that has it")


# ---------------------------------------------------------------- causal LMs


def test_causal_lm_tied_head_is_loaded_and_an_absent_untied_head_is_not(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64))
    gpt2.save_pretrained(tmp_path / "gpt2")  # lm_head is tied to wte: the file holds wte only
    llama = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                                          tie_word_embeddings=False))
    llama.save_pretrained(tmp_path / "llama", state_dict={k: v for k, v in llama.state_dict().items()
                                                          if not k.startswith("lm_head.")})
    not_loaded = {}
    for kind in ("gpt2", "llama"):
        make_tokenizer().save_pretrained(tmp_path / kind)
        _, not_loaded[kind] = load_model(ModelSource(kind, str(tmp_path / kind)), "causal-lm", make_tokenizer())
    assert not_loaded == {"gpt2": [], "llama": ["lm_head"]}
