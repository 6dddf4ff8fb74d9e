"""model.task: seq2seq: data, tokens, the loss against the model's own on many architectures,
BLEU/chrF evaluation, PEFT adapters both ways, and the CLI end to end on tiny models."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl

from lorafit.errors import LorafitError
from lorafit.recipe import DataConfig, ModelConfig, Recipe, TrainConfig

NUMBERS = {"one": "eins", "two": "zwei", "three": "drei", "four": "vier", "five": "fünf", "six": "sechs",
           "seven": "sieben", "eight": "acht", "nine": "neun", "ten": "zehn"}
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
VOCAB = SPECIALS + ["translate", ":"] + list(NUMBERS) + list(NUMBERS.values())
PAD, BOS, EOS = 0, 2, 3


def make_tokenizer():
    """Word-level, [EOS] after every text (source and target alike)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", EOS)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")


def tiny_config(kind: str):
    import transformers as T

    ids = {"vocab_size": len(VOCAB), "pad_token_id": PAD, "eos_token_id": EOS, "bos_token_id": BOS,
           "decoder_start_token_id": BOS}
    # init_std 0.3: weights large enough for a tiny model's output to depend on its source (at BART's
    # 0.02 it says the same whatever it reads, and tests of translations could not fail)
    bart_like = {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
                 "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
                 "max_position_embeddings": 64, "init_std": 0.3, **ids}
    t5_like = {"d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2, **ids}
    configs = {
        "t5": lambda: T.T5Config(**t5_like),  # tied embeddings: the decoder output is scaled by d_model^-0.5
        "t5-untied": lambda: T.T5Config(**t5_like, tie_word_embeddings=False, feed_forward_proj="gated-gelu"),
        "bart": lambda: T.BartConfig(**bart_like),
        "marian": lambda: T.MarianConfig(**bart_like),
        "mbart": lambda: T.MBartConfig(**bart_like),  # its own shift: the last token goes first
        "m2m100": lambda: T.M2M100Config(**bart_like),  # no prepare_decoder_input_ids_from_labels
        "pegasus": lambda: T.PegasusConfig(**bart_like),
        "prophetnet": lambda: T.ProphetNetConfig(
            hidden_size=16, encoder_ffn_dim=32, decoder_ffn_dim=32, num_encoder_layers=1, num_decoder_layers=1,
            num_encoder_attention_heads=2, num_decoder_attention_heads=2, ngram=2, max_position_embeddings=64, **ids),
    }
    return configs[kind]()


def tiny_model(kind: str):
    """A tiny random seq2seq LM (fixed seed); a nonzero final_logits_bias where the model has one, so
    that leaving it out shows."""
    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(tiny_config(kind))
    if hasattr(model, "final_logits_bias"):
        model.final_logits_bias.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def s2s_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("s2s-models")
    dirs = {}
    for kind in ("t5", "bart", "marian"):
        tiny_model(kind).save_pretrained(root / kind)
        make_tokenizer().save_pretrained(root / kind)
        dirs[kind] = root / kind
    return dirs


def pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.choices(list(NUMBERS), k=rng.randint(1, 4))
        rows.append({"en": " ".join(words), "de": " ".join(NUMBERS[w] for w in words)})
    return rows


def lora_model(kind: str):
    """`tiny_model` with LoRA on every Linear, its B factors random so that the LoRA branch shows."""
    from lorafit.lora import add_lora

    model = tiny_model(kind)
    add_lora(model, 4, 8, "all-linear")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.1)
    return model


def random_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(4, len(VOCAB), (3, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, 5:], attention_mask[1, 5:] = PAD, 0
    labels = torch.randint(4, len(VOCAB), (3, 6), generator=generator)
    labels[2, 4:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------- the loss


CHUNKED = {"t5": "decoder output × 0.25", "t5-untied": None, "bart": "+ final_logits_bias",
           "marian": "+ final_logits_bias", "mbart": "+ final_logits_bias", "m2m100": None,
           "pegasus": "+ final_logits_bias"}


@pytest.mark.parametrize("kind", [*CHUNKED, "prophetnet"])
def test_loss_and_lora_gradients_equal_the_models_own(kind):
    """The summed loss is the model's own `labels=` loss times the number of target tokens, and so are
    the LoRA gradients: by the chunked head on every architecture whose probe passes (T5's scaled
    decoder output, BART's logit bias, mBART's own shift, M2M100 without a shift method), by the
    forward itself where the loss is something else (ProphetNet adds n-gram streams)."""
    from lorafit.tasks.seq2seq import loss_path, seq2seq_loss

    model = lora_model(kind)
    path = loss_path(model)
    if kind in CHUNKED:
        assert path.note == "chunked seq2seq LM-head loss" + (f" ({CHUNKED[kind]})" if CHUNKED[kind] else "")
    else:
        assert not path.chunked and "not the mean cross-entropy" in path.note
    batch = random_batch()
    ours = seq2seq_loss(model, batch)
    ours.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    reference = model(**batch).loss * (batch["labels"] != -100).sum()
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_probe_declines_logits_it_cannot_reproduce_and_the_forward_gives_the_loss():
    """A forward that rescales the head's logits in a way no config key names keeps the loss in the
    model's forward, which then still gives the model's own loss."""
    import torch.nn.functional as F
    from transformers import BartForConditionalGeneration

    from lorafit.tasks.seq2seq import loss_path, seq2seq_loss

    class HalvedLogits(BartForConditionalGeneration):
        def forward(self, labels=None, **kwargs):
            out = super().forward(**kwargs, decoder_input_ids=self.prepare_decoder_input_ids_from_labels(labels))
            out.logits = out.logits / 2
            out.loss = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
            return out

    torch.manual_seed(0)
    model = HalvedLogits(tiny_config("bart")).eval()
    assert loss_path(model).note == ("seq2seq loss from the model's forward (it changes the head's logits in a way "
                                     "the chunked loss does not reproduce)")
    batch = random_batch()
    torch.testing.assert_close(seq2seq_loss(model, batch), model(**batch).loss * (batch["labels"] != -100).sum())


def test_encoder_decoder_model_with_its_own_decoder_head_takes_the_forward_with_a_plain_reason():
    """A warm-started EncoderDecoderModel (BERT2BERT) puts the LM head inside its decoder, whose output is
    logits: the probe says so, rather than failing on the decoder's missing hidden state, and the
    forward gives the model's own loss."""
    from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel

    from lorafit.tasks.seq2seq import loss_path, seq2seq_loss

    def bert(**decoder):
        return BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, pad_token_id=PAD, **decoder)

    torch.manual_seed(0)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(bert(), bert(is_decoder=True, add_cross_attention=True))
    config.update({"decoder_start_token_id": BOS, "pad_token_id": PAD})
    model = EncoderDecoderModel(config=config).eval()
    assert loss_path(model).note == ("seq2seq loss from the model's forward (its decoder carries its own LM head, "
                                     "as a warm-started EncoderDecoderModel's does)")
    batch = random_batch()
    torch.testing.assert_close(seq2seq_loss(model, batch), model(**batch).loss * (batch["labels"] != -100).sum())


@pytest.mark.parametrize("cross_attention", ["self", "random"])
def test_bert2bert_script_saves_what_a_pretrained_checkpoint_would(cross_attention, tiny_models, tmp_path,
                                                                   monkeypatch):
    """scripts/minilm_bert2bert.py on a tiny BERT: the encoder's weights, the decoder's first layer, and
    (with `self`) each cross-attention block as a copy of its layer's self-attention; lorafit then finds
    only the LM head's transform (and, with `random`, the cross-attention) not in the checkpoint."""
    import runpy
    import sys

    from safetensors.torch import load_file
    from transformers import AutoModelForSeq2SeqLM

    from lorafit.models import modules_not_loaded

    out = tmp_path / "b2b"
    script = Path(__file__).parents[1] / "scripts" / "minilm_bert2bert.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(out), "--model", str(tiny_models["bert"]),
                                      "--decoder-layers", "1", "--cross-attention", cross_attention])
    runpy.run_path(str(script), run_name="__main__")
    saved = load_file(out / "model.safetensors")
    body = load_file(tiny_models["bert"] / "model.safetensors")
    assert torch.equal(saved["encoder.encoder.layer.1.attention.self.query.weight"],
                       body["bert.encoder.layer.1.attention.self.query.weight"])
    assert torch.equal(saved["decoder.bert.encoder.layer.0.attention.self.value.weight"],
                       body["bert.encoder.layer.0.attention.self.value.weight"])
    assert not any(name.startswith("decoder.bert.encoder.layer.1.") for name in saved)  # one decoder layer
    crossed = sorted(name for name in saved if ".crossattention." in name)
    if cross_attention == "self":
        assert crossed
        for name in crossed:
            torch.testing.assert_close(saved[name], saved[name.replace(".crossattention.", ".attention.")],
                                       rtol=0, atol=0)
    else:
        assert crossed == []
    model, info = AutoModelForSeq2SeqLM.from_pretrained(out, output_loading_info=True)
    expected = ["decoder.bert.encoder.layer.0.crossattention"] if cross_attention == "random" else []
    assert modules_not_loaded(model, info["missing_keys"]) == expected + ["decoder.cls.predictions.transform"]


# ---------------------------------------------------------------- data and tokens


@pytest.fixture(scope="session")
def number_data(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """The number-word pairs in both layouts: columns {en, de}, and hub-style {"translation": {en, de}}."""
    root = tmp_path_factory.mktemp("s2s-data")
    splits = {"train": pairs(48, 1), "validation": pairs(8, 2), "test": pairs(8, 3)}
    return {
        "columns": {name: write_jsonl(root / f"{name}.jsonl", rows) for name, rows in splits.items()},
        "translation": {name: write_jsonl(root / f"{name}-translation.jsonl", [{"translation": r} for r in rows])
                        for name, rows in splits.items()},
    }


def data_config(files: dict[str, Path], **keys) -> DataConfig:
    return DataConfig(path="json", data_files={k: str(v) for k, v in files.items()}, eval_split="validation",
                      test_split="test", max_length=16, **keys)


def test_both_layouts_give_the_same_pairs(number_data):
    from lorafit.tasks.seq2seq import Seq2Seq

    task = Seq2Seq()
    by_columns = task.load_data(data_config(number_data["columns"], source_column="en", target_column="de"), 0)
    by_langs = task.load_data(data_config(number_data["translation"], source_lang="en", target_lang="de"), 0)
    expected = [{"source": r["en"], "target": r["de"]} for r in pairs(48, 1)]
    assert by_columns.train == by_langs.train == expected
    assert by_columns.test == by_langs.test == [{"source": r["en"], "target": r["de"]} for r in pairs(8, 3)]
    assert task.load_split(data_config(number_data["columns"], source_column="en", target_column="de"), "test",
                           None, max_samples=3) == expected[:0] + by_columns.test[:3]


def test_data_errors_name_the_key(number_data, tmp_path):
    from lorafit.tasks.seq2seq import Seq2Seq

    task = Seq2Seq()
    with pytest.raises(LorafitError) as err:
        task.load_data(data_config(number_data["columns"], source_column="en", target_column="fr"), 0)
    assert str(err.value) == ("data.target_column: column 'fr' not found in split 'train'; columns are "
                              "['en', 'de']")
    with pytest.raises(LorafitError) as err:
        task.load_data(data_config(number_data["translation"], source_lang="en", target_lang="fr"), 0)
    assert str(err.value) == ("data.target_lang: 'fr' is not a language of row 0 of split 'train'; its "
                              "'translation' column holds ['de', 'en']")
    with pytest.raises(LorafitError) as err:
        task.load_data(data_config(number_data["columns"], source_lang="en", target_lang="de"), 0)
    assert str(err.value).startswith("data.source_lang: column 'translation' not found in split 'train'")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"en": "one", "de": "eins"}, {"en": "two", "de": None}])
    with pytest.raises(LorafitError) as err:
        task.load_data(data_config({"train": bad, "validation": bad, "test": bad}, source_column="en",
                                   target_column="de"), 0)
    assert str(err.value) == "data.target_column: row 1 of split 'train' is None, not a string"


def recipe_problems(**data) -> list[str]:
    from lorafit.tasks.seq2seq import Seq2Seq

    recipe = Recipe(name="r", model=ModelConfig(name="m", task="seq2seq"), data=DataConfig(**data))
    return Seq2Seq().check_recipe(recipe)


def test_recipe_checks():
    assert recipe_problems(target_column="de") == []
    assert recipe_problems(source_lang="en", target_lang="de") == []
    assert recipe_problems() == ["data.target_column: missing: a seq2seq recipe needs the column of target texts "
                                 "(or data.source_lang and data.target_lang for a translation column)"]
    assert recipe_problems(source_lang="en") == ["data.source_lang / data.target_lang: give both (the languages of "
                                                 "a translation column) or neither"]
    assert recipe_problems(source_lang="en", target_lang="de", target_column="de") == [
        "data.target_column: the target is data.target_lang of the translation column; remove data.target_column, "
        "or data.source_lang and data.target_lang"]


def test_tokens_prefix_truncation_lengths_and_batches():
    """Sources get the prefix and the source length limit, targets the tokenizer's target side and
    data.max_target_length; a row's length is source plus target; batches pad sources with the pad
    id (mask 0) and targets with -100, each to its own longest row."""
    from lorafit.tasks.seq2seq import Seq2Seq

    task, tokenizer = Seq2Seq(), make_tokenizer()
    examples = [{"source": "one two three four five", "target": "eins zwei drei vier fünf"},
                {"source": "six", "target": "sechs"}]
    cfg = DataConfig(source_prefix="translate : ", max_target_length=4, cache=False)
    split = task.tokenize(examples, tokenizer, cfg, max_length=5)
    ids = tokenizer.convert_tokens_to_ids
    assert split.input_ids == [ids(["translate", ":", "one", "two"]) + [EOS], ids(["translate", ":", "six"]) + [EOS]]
    assert split.labels == [ids(["eins", "zwei", "drei"]) + [EOS], ids(["sechs"]) + [EOS]]
    assert split.lengths == [9, 6] and split.references == ["eins zwei drei vier fünf", "sechs"]
    batch = task.collate(split, [1, 0], pad_id=PAD)
    assert batch["input_ids"].tolist() == [split.input_ids[1] + [PAD], split.input_ids[0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1] * 5]
    assert batch["labels"].tolist() == [split.labels[1] + [-100, -100], split.labels[0]]
    assert task.count_targets(batch) == 6
    # max_target_length unset: targets share data.max_length
    assert task.tokenize(examples, tokenizer, DataConfig(cache=False), max_length=3).labels[0] == \
        ids(["eins", "zwei"]) + [EOS]


# ---------------------------------------------------------------- evaluation


def test_evaluate_scores_greedy_translations_with_sacrebleu():
    """Loss and perplexity are the model's own over the target tokens; BLEU and chrF are sacrebleu's
    on the model's greedy translations (HF generate, decoded): 100 against references equal to them,
    and sacrebleu's figures against others."""
    import math

    import sacrebleu

    from lorafit.tasks.seq2seq import Seq2Seq

    task, tokenizer, model = Seq2Seq(), make_tokenizer(), tiny_model("bart")
    examples = [{"source": r["en"], "target": r["de"]} for r in pairs(6, 4)]
    split = task.tokenize(examples, tokenizer, DataConfig(cache=False, max_target_length=6), max_length=8)
    inputs = tokenizer([e["source"] for e in examples], return_tensors="pt", padding=True)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False, num_beams=1)
    greedy = [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    assert any(greedy)  # the random model says something

    metrics = task.evaluate(model, split, batch_size=4, pad_id=PAD)
    batch = task.collate(split, list(range(len(split))), PAD)
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5) and metrics["tokens"] == task.count_targets(batch)
    assert metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(greedy, [[e["target"] for e in examples]]).score)
    assert metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(greedy, [[e["target"] for e in examples]]).score)
    split.references = greedy
    metrics = task.evaluate(model, split, batch_size=4, pad_id=PAD)
    assert metrics["bleu"] == pytest.approx(100.0) and metrics["chrf"] == pytest.approx(100.0)


# ---------------------------------------------------------------- training, PEFT both ways, the CLI


def s2s_recipe(model_dir: Path, files: dict[str, Path], output_dir: Path, **sections) -> dict:
    recipe = {
        "name": "s2s", "seed": 0,
        "model": {"name": str(model_dir), "task": "seq2seq"},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"path": "json", "data_files": {k: str(v) for k, v in files.items()}, "source_column": "en",
                 "target_column": "de", "source_prefix": "translate : ", "eval_split": "validation",
                 "test_split": "test", "max_length": 16, "max_target_length": 8},
        "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "scheduler": "constant"},
        "train": {"max_steps": 6, "batch_size": 8, "precision": "fp32", "log_every": 2, "eval_every": 3,
                  "save_every": None, "output_dir": str(output_dir)},
    }
    for section, values in sections.items():
        recipe[section].update(values)
    return recipe


@pytest.fixture(scope="module")
def s2s_runs(s2s_models, number_data, tmp_path_factory) -> dict[str, Path]:
    """Six fp32 training steps per architecture, so that lora_B is no longer zero."""
    from rich.console import Console

    from lorafit.recipe import recipe_from_dict
    from lorafit.train import train

    runs = {}
    for kind, model_dir in s2s_models.items():
        out = tmp_path_factory.mktemp(f"s2s-run-{kind}")
        train(recipe_from_dict(s2s_recipe(model_dir, number_data["columns"], out)), console=Console(quiet=True),
              overwrite=True)
        runs[kind] = out
    return runs


def teacher_forced_logits(model) -> torch.Tensor:
    """Logits at every target position of a fixed batch (decoder inputs from the labels)."""
    batch = random_batch()
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("kind", ["t5", "bart", "marian"])
def test_peft_loads_our_adapter_with_same_logits(kind, s2s_models, s2s_runs):
    import warnings

    from safetensors.torch import load_file
    from transformers import AutoModelForSeq2SeqLM

    from lorafit.adapter import CONFIG_FILE, WEIGHTS_FILE, load_adapter_model

    peft = pytest.importorskip("peft")
    adapter = s2s_runs[kind] / "adapter"
    assert json.loads((adapter / CONFIG_FILE).read_text())["task_type"] == "SEQ_2_SEQ_LM"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(s2s_models[kind]), adapter)
    messages = [str(w.message).lower() for w in caught]
    assert not [m for m in messages if "missing" in m or "unexpected" in m or "unknown" in m], messages
    assert type(theirs).__name__ == "PeftModelForSeq2SeqLM"
    ours, _, spec = load_adapter_model(adapter)
    assert spec.task == "seq2seq"
    torch.testing.assert_close(teacher_forced_logits(theirs), teacher_forced_logits(ours), atol=1e-5, rtol=0)
    lora_b = [v for k, v in load_file(adapter / WEIGHTS_FILE).items() if k.endswith("lora_B.weight")]
    assert lora_b and all(b.abs().sum() > 0 for b in lora_b)


PEFT_TARGETS = {"t5": ["q", "v", "wo"], "bart": ["q_proj", "v_proj", "fc2"], "marian": ["k_proj", "out_proj", "fc1"]}


@pytest.mark.parametrize("kind", ["t5", "bart", "marian"])
def test_we_load_a_peft_adapter_with_same_logits(kind, s2s_models, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    from lorafit.adapter import load_adapter_model

    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(task_type=peft.TaskType.SEQ_2_SEQ_LM, r=4, lora_alpha=8,
                             target_modules=PEFT_TARGETS[kind])
    theirs = peft.get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(s2s_models[kind]), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    theirs.save_pretrained(tmp_path / "peft")
    ours, _, spec = load_adapter_model(tmp_path / "peft")
    assert spec.task == "seq2seq"
    expected = teacher_forced_logits(theirs)
    torch.testing.assert_close(teacher_forced_logits(ours), expected, atol=1e-5, rtol=0)
    assert (expected - teacher_forced_logits(AutoModelForSeq2SeqLM.from_pretrained(s2s_models[kind]))).abs().max() > 1e-3


def adapter_translations(run_dir: Path, sources: list[str], num_beams: int = 1) -> list[str]:
    """What HF generate makes of each source, one at a time, on the run's adapter model (built by
    lorafit, run by transformers)."""
    from lorafit.adapter import load_adapter_model

    model, tokenizer, _ = load_adapter_model(run_dir / "adapter")
    translations = []
    for source in sources:
        with torch.no_grad():
            out = model.generate(**tokenizer(source, return_tensors="pt"), max_new_tokens=8, do_sample=False,
                                 num_beams=num_beams)
        translations.append(tokenizer.decode(out[0], skip_special_tokens=True).strip())
    return translations


def test_cli_train_eval_generate_merge(s2s_models, number_data, tmp_path, run_cli):
    """train logs BLEU and chrF with its evaluations; eval writes a report of sacrebleu's BLEU and
    chrF over the translations it lists beside their references (greedy, then beam search);
    generate translates a text with the recipe's source prefix as HF generate does on the adapter
    model; the merged model translates as the adapter does."""
    import sacrebleu

    from conftest import read_metrics, write_recipe

    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "s2s.yaml", s2s_recipe(s2s_models["bart"], number_data["columns"], run))
    assert run_cli("train", recipe).exit_code == 0
    evals = [r for r in read_metrics(run) if r.get("split") == "eval"]
    assert evals and all({"loss", "perplexity", "bleu", "chrf"} <= set(r) for r in evals), evals

    reports = {}
    for beams in (1, 2):
        out = tmp_path / f"eval-{beams}.json"
        result = run_cli("eval", run, "--num-beams", beams, "--output", out)
        assert result.exit_code == 0, result.output
        reports[beams] = report = json.loads(out.read_text())
        samples = report["samples"]
        assert report["num_beams"] == beams and report["examples"] == len(samples) == 8
        assert [s["source"] for s in samples] == [r["en"] for r in pairs(8, 3)]
        assert [s["reference"] for s in samples] == [r["de"] for r in pairs(8, 3)]
        hypotheses, references = [s["translation"] for s in samples], [[s["reference"] for s in samples]]
        assert len(set(hypotheses)) > 1  # the model's output depends on its source
        assert report["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, references).score)
        assert report["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, references).score)
        assert hypotheses == adapter_translations(run, ["translate : " + s["source"] for s in samples], beams)
    # beam search changes some translations, so passing --num-beams on shows
    assert [s["translation"] for s in reports[1]["samples"]] != [s["translation"] for s in reports[2]["samples"]]

    result = run_cli("generate", run, "--prompt", "one two three", "--temperature", 0, "--max-new-tokens", 8)
    assert result.exit_code == 0, result.output
    translation, unprefixed = adapter_translations(run, ["translate : one two three", "one two three"])
    assert translation != unprefixed  # so leaving out the prefix shows
    assert translation and result.stdout.strip().endswith(translation)

    merged = tmp_path / "merged"
    result = run_cli("merge", run,  # a run directory: its adapter/
                     "--output", merged)
    assert result.exit_code == 0, result.output
    result = run_cli("generate", merged, "--prompt", "one two three", "--temperature", 0, "--max-new-tokens", 8)
    assert result.exit_code == 0 and result.stdout.strip().endswith(translation)
    out = tmp_path / "eval-merged.json"
    assert run_cli("eval", merged, "--recipe", recipe, "--output", out).exit_code == 0
    assert [s["translation"] for s in json.loads(out.read_text())["samples"]] == \
        [s["translation"] for s in reports[1]["samples"]]


def test_merge_probe_runs_the_decoder_on_targets(s2s_runs, tmp_path, monkeypatch):
    """The merge's probe batch holds targets (labels, -100 where padded) that the model turns into
    decoder inputs, and its logits are the model's at the target positions; so a merge that gets
    only the decoder's cross-attention wrong is caught and nothing is written."""
    import lorafit.merge
    from lorafit.adapter import load_adapter_model
    from lorafit.lora import lora_layers, merge_lora
    from lorafit.tasks.seq2seq import Seq2Seq

    task = Seq2Seq()
    model, tokenizer, _ = load_adapter_model(s2s_runs["bart"] / "adapter")
    batch = task.probe_batch(tokenizer, 16)
    lengths = (batch["labels"] != -100).sum(1)
    assert len(set(lengths.tolist())) > 1 and (batch["labels"][batch["labels"] != -100] >= 0).all()
    with torch.no_grad():
        expected = model(**batch).logits[batch["labels"] != -100]
    torch.testing.assert_close(task.probe_logits(model, batch), expected)

    def merge_but_cross_attention(model):
        with torch.no_grad():
            for name, layer in lora_layers(model).items():
                if ".encoder_attn." in name:
                    layer.lora_B.weight.zero_()
        return merge_lora(model)

    monkeypatch.setattr(lorafit.merge, "merge_lora", merge_but_cross_attention)
    with pytest.raises(LorafitError, match="merged model differs from the adapter in fp32"):
        lorafit.merge.merge_adapter(s2s_runs["bart"] / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_seq2seq_keys_and_beams_belong_to_seq2seq():
    """Another task's recipe setting a seq2seq data key, or --num-beams given for a task that does not
    search beams (or below 1), is a one-line error naming the key or option."""
    from lorafit.inference import check_num_beams
    from lorafit.recipe import RecipeError, recipe_from_dict
    from lorafit.tasks import get_task

    raw = {"name": "r", "model": {"name": "m", "task": "causal-lm"}, "data": {"target_column": "de",
                                                                            "source_prefix": "x: "}}
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(raw)
    assert err.value.problems == ["data.target_column: only for model.task: seq2seq",
                                  "data.source_prefix: only for model.task: seq2seq"]
    check_num_beams(get_task("seq2seq"), 4)
    with pytest.raises(LorafitError, match=r"^--num-beams 4: causal-lm models do not decode by beam search \(only "
                                           r"seq2seq\); leave out --num-beams$"):
        check_num_beams(get_task("causal-lm"), 4)
    with pytest.raises(LorafitError, match=r"^--num-beams 0: use 1 \(greedy\) or more"):
        check_num_beams(get_task("seq2seq"), 0)
