"""Sequence to sequence (translation, summarization): a source text in, a target text out, through
`AutoModelForSeq2SeqLM` (T5, BART, Marian, mBART, M2M100/NLLB, Pegasus, encoder-decoder pairs).

Data: a source and a target column (`data.source_column`, `data.target_column`), or the layout of
hub translation datasets, rows {"translation": {"en": ..., "de": ...}} with `data.source_lang` and
`data.target_lang`. `data.source_prefix` goes before every source (T5's "translate English to
German: "), in training, evaluation and generation alike.

The loss is the cross-entropy of the target tokens, summed: the model's own `labels=` loss times
the number of target tokens. Where a probe proves it equal (`probe_loss_path`), it runs the encoder
and the decoder, then the LM head only at the target positions, a chunk at a time
(`fast.head_cross_entropy`), so the (batch × target length × vocabulary) logits never exist.

Evaluation scores loss and perplexity, and BLEU and chrF (sacrebleu, on detokenized text) of the
model's greedy (or beam-search) translations against the references.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lorafit.cache import cache_key, load_tokens, save_tokens, tokenizer_fingerprint
from lorafit.data import eval_order, get_split, hold_out, open_hf, padded_width, split_source
from lorafit.distributed import merge_items
from lorafit.errors import LorafitError
from lorafit.fast import LogitTransform, head_cross_entropy
from lorafit.lm import IGNORE, logit_transforms, probed_once, run_head_probe
from lorafit.tasks.base import Task, TaskData

TRANSLATION_COLUMN = "translation"  # the column of hub translation datasets: {language: text}
SAMPLES_SHOWN = 3  # translations the terminal table shows; the JSON report holds them all


# ---------------------------------------------------------------- data


def _text(value: Any, key: str, row: int, split: str) -> str:
    if not isinstance(value, str):
        raise LorafitError(f"data.{key}: row {row} of split {split!r} is {value!r}, not a string")
    return value


def pairs_from_rows(rows: list[dict], cfg, split: str) -> list[dict]:
    """{"source", "target"} per row: from the source and target columns, or from the languages
    `cfg.source_lang`/`cfg.target_lang` of the rows' translation column. Raises `LorafitError`
    naming the key for a missing column or language and for a value that is not a string."""
    pairs = []
    for i, row in enumerate(rows):
        if cfg.source_lang:
            translation = row[TRANSLATION_COLUMN]
            for key in ("source_lang", "target_lang"):
                lang = getattr(cfg, key)
                if not isinstance(translation, dict) or lang not in translation:
                    found = sorted(translation) if isinstance(translation, dict) else translation
                    raise LorafitError(f"data.{key}: {lang!r} is not a language of row {i} of split {split!r}; "
                                       f"its {TRANSLATION_COLUMN!r} column holds {found!r}")
            source = _text(translation[cfg.source_lang], "source_lang", i, split)
            target = _text(translation[cfg.target_lang], "target_lang", i, split)
        else:
            source = _text(row[cfg.source_column], "source_column", i, split)
            target = _text(row[cfg.target_column], "target_column", i, split)
        pairs.append({"source": source, "target": target})
    if not pairs:
        raise LorafitError(f"data: split {split!r} is empty: {split_source(cfg, split)} has no rows")
    return pairs


def read_pairs(cfg, splits: list[str]) -> dict[str, list[dict]]:
    """The named splits of the dataset `cfg` names, as source/target pairs."""
    dataset = open_hf(cfg)
    columns = ({"source_lang": TRANSLATION_COLUMN} if cfg.source_lang
               else {"source_column": cfg.source_column, "target_column": cfg.target_column})
    return {split: pairs_from_rows(get_split(dataset, split, columns).to_list(), cfg, split)
            for split in dict.fromkeys(splits)}


# ---------------------------------------------------------------- tokens and batches


@dataclass
class Seq2SeqSplit:
    """Tokenized pairs: source ids, target ids (the labels), and the texts they came from."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    sources: list[str]
    references: list[str]
    max_target_length: int
    """Targets were truncated to this many tokens; generation in evaluation stops there too."""
    tokenizer: Any = field(default=None, repr=False)
    """The tokenizer that made the split: evaluation decodes generated tokens with it."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        """Source plus target tokens: what a row costs (encoder and decoder), so batches grouped by it
        pad little on either side."""
        return [len(s) + len(t) for s, t in zip(self.input_ids, self.labels)]


def target_length(cfg, max_length: int) -> int:
    return cfg.max_target_length or max_length


def tokenize_pairs(pairs: list[dict], tokenizer, cfg, max_length: int, cache: bool = False) -> Seq2SeqSplit:
    """Source ids (`cfg.source_prefix` + source, truncated to `max_length`) and target ids (the
    tokenizer's target side, `text_target=`, truncated to `data.max_target_length`, else
    `max_length`). With `cache`, read from or stored in the tokenization cache (`lorafit.cache`)."""
    limit = target_length(cfg, max_length)
    sources = [p["source"] for p in pairs]
    references = [p["target"] for p in pairs]
    key = None
    if cache:
        params = {"kind": "seq2seq", "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": max_length,
                  "max_target_length": limit, "source_prefix": cfg.source_prefix}
        key = cache_key(params, (json.dumps(p, sort_keys=True) for p in pairs))
        entry = load_tokens(key, ["input_ids", "labels"])
        if entry is not None:
            return Seq2SeqSplit(entry[0]["input_ids"], entry[0]["labels"], sources, references, limit, tokenizer)
    input_ids = tokenizer([cfg.source_prefix + s for s in sources], truncation=True, max_length=max_length)["input_ids"]
    labels = tokenizer(text_target=references, truncation=True, max_length=limit)["input_ids"]
    if key is not None:
        save_tokens(key, {"input_ids": input_ids, "labels": labels}, {})
    return Seq2SeqSplit(input_ids, labels, sources, references, limit, tokenizer)


def pad_rows(rows: list[list[int]], value: int, multiple: int = 1, cap: int | None = None) -> torch.Tensor:
    """Rows right-padded with `value` to the longest, rounded up to `multiple` (at most `cap`)."""
    out = torch.full((len(rows), padded_width([len(r) for r in rows], multiple, cap)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate_pairs(split: Seq2SeqSplit, indices: list[int], pad_id: int, multiple: int = 1,
                  cap: int | None = None) -> dict[str, torch.Tensor]:
    """input_ids (pad_id) and attention_mask of the sources, labels (-100) of the targets, each padded
    to its own longest row. No decoder inputs: the model makes them from the labels (see `decoder_inputs`)."""
    sources = [split.input_ids[i] for i in indices]
    input_ids = pad_rows(sources, pad_id, multiple, cap)
    attention_mask = pad_rows([[1] * len(s) for s in sources], 0, multiple, cap)
    labels = pad_rows([split.labels[i] for i in indices], IGNORE, multiple, cap)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------- the loss


def shift_right(labels: torch.Tensor, start: int, pad: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: `start`, then the labels but the last, -100 read as `pad`."""
    shifted = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], dim=1)
    return shifted.masked_fill(shifted == IGNORE, pad)


def decoder_inputs(model, labels: torch.Tensor) -> torch.Tensor:
    """The decoder inputs the model's forward makes from `labels`: its own
    `prepare_decoder_input_ids_from_labels` (mBART moves the language token to the front), else
    `shift_right` with the config's decoder start and pad tokens (M2M100, Blenderbot)."""
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is not None:
        return prepare(labels=labels)
    config = model.config
    if config.decoder_start_token_id is None or config.pad_token_id is None:
        raise ValueError("the config names no decoder_start_token_id or pad_token_id")
    return shift_right(labels, config.decoder_start_token_id, config.pad_token_id)


def decoder_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden state (B, T, H) for `labels` under teacher forcing: the encoder on
    the sources, then the decoder on `decoder_inputs`, attending to the encoder's output."""
    encoded = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return model.get_decoder()(input_ids=decoder_inputs(model, labels), encoder_hidden_states=encoded,
                               encoder_attention_mask=attention_mask, use_cache=False).last_hidden_state


@dataclass(frozen=True)
class Seq2SeqLossPath:
    """How `seq2seq_loss` computes the loss, as `probe_loss_path` proved it on a probe.

    `chunked`: from `decoder_hidden`, times `hidden_scale` (None: 1), through the output embedding,
    plus the buffer named `logit_bias` (None: none), then `transform` (None: none); these give the
    model's own logits. Otherwise the model's forward with `labels=` gives the loss.
    """

    chunked: bool
    hidden_scale: float | None = None
    logit_bias: str | None = None
    transform: LogitTransform | None = None
    note: str = ""


def _fallback(reason: str) -> Seq2SeqLossPath:
    return Seq2SeqLossPath(False, note=f"seq2seq loss from the model's forward ({reason})")


def _logit_bias_buffers(model, vocab: int) -> list[str]:
    """Buffers holding one number per vocabulary entry (BART's and Marian's `final_logits_bias`):
    what a forward might add to its head's logits."""
    return [name for name, buffer in model.named_buffers() if buffer.is_floating_point() and buffer.numel() == vocab
            and buffer.dim() <= 2]


@torch.no_grad()
def probe_loss_path(model) -> Seq2SeqLossPath:
    """Find out whether the loss can skip the model's forward, on random sources and targets in eval mode.

    Runs the model's forward once with `labels=`, recording the tokens its decoder receives and
    what its output embedding receives, and putting random logits Z in place of what the output
    embedding returns; then `decoder_hidden` on the same batch. The chunked path is taken only if
    the decoder received `decoder_inputs(labels)`, the output embedding ran once, on the decoder's
    last hidden state times a constant (T5 scales it by d_model^-0.5 when its embeddings are tied),
    the forward's logits are Z, or Z plus a logit-bias buffer, optionally through one of
    `lm.logit_transforms`, bit for bit, and the forward's loss is the mean cross-entropy of those
    logits (not a loss with extra terms, such as a mixture of experts' router losses). Otherwise
    the loss comes from the model's forward. Autocast is off; the global RNG is untouched.
    """
    decoder_head = getattr(model.get_decoder(), "get_output_embeddings", None)
    if decoder_head is not None and decoder_head() is not None:
        return _fallback("its decoder carries its own LM head, as a warm-started EncoderDecoderModel's does")
    decoder_ids: list[torch.Tensor] = []

    def record_decoder_ids(module, args, kwargs):
        decoder_ids.append(kwargs.get("input_ids", args[0] if args else None))

    def run(generator: torch.Generator, device: torch.device):
        vocab = model.get_output_embeddings().weight.shape[0]
        input_ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (2, 6), generator=generator)
        input_ids = input_ids.to(device)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, 4:] = 0  # a shorter source, padded
        labels = torch.randint(0, vocab, (2, 5), generator=generator).to(device)
        labels[1, 3:] = IGNORE  # a shorter target, padded
        hook = model.get_decoder().register_forward_pre_hook(record_decoder_ids, with_kwargs=True)
        try:
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
        finally:
            hook.remove()
        expected_ids = decoder_inputs(model, labels)
        return vocab, labels, out, expected_ids, decoder_hidden(model, input_ids, attention_mask, labels)

    probed = run_head_probe(model, run)
    if isinstance(probed, str):
        return _fallback(probed)
    swap, (vocab, labels, out, expected_ids, hidden) = probed
    seen, replaced = swap.seen, swap.replaced
    if len(decoder_ids) != 1 or not torch.equal(decoder_ids[0], expected_ids):
        return _fallback("its decoder does not read the labels shifted right as its inputs")
    if len(seen) != 1:
        return _fallback(f"its output embedding ran {len(seen)} times in one forward")
    logits, target = out.logits, labels
    keep = target != IGNORE
    if out.loss is None or not torch.allclose(out.loss, F.cross_entropy(logits[keep].float(), target[keep]),
                                              rtol=1e-5, atol=1e-6):
        return _fallback("its loss is not the mean cross-entropy of its logits")
    seen_hidden = seen[0]
    if seen_hidden.shape != hidden.shape:
        return _fallback("its head does not read the decoder's last hidden state")
    scale = (seen_hidden * hidden).sum().item() / max((hidden * hidden).sum().item(), 1e-30)
    hidden_scale = None if torch.equal(seen_hidden, hidden) else scale
    if hidden_scale is not None and not torch.allclose(seen_hidden, hidden * hidden_scale, rtol=1e-5, atol=1e-6):
        return _fallback("its head reads the decoder's last hidden state changed in a way the chunked loss "
                         "does not reproduce")
    for bias_name in [*_logit_bias_buffers(model, vocab), None]:
        biased = replaced[0] if bias_name is None else replaced[0] + model.get_buffer(bias_name).reshape(-1)
        for transform in [None, *logit_transforms(model.config)]:
            expected = biased if transform is None else transform(biased)
            if expected.shape == logits.shape and torch.equal(expected.to(logits.dtype), logits):
                parts = [f"decoder output × {hidden_scale:.6g}" if hidden_scale is not None else None,
                         f"+ {bias_name}" if bias_name else None, transform.describe() if transform else None]
                how = ", ".join(p for p in parts if p)
                return Seq2SeqLossPath(True, hidden_scale, bias_name, transform,
                                       "chunked seq2seq LM-head loss" + (f" ({how})" if how else ""))
    return _fallback("it changes the head's logits in a way the chunked loss does not reproduce")


def loss_path(model) -> Seq2SeqLossPath:
    """The model's `Seq2SeqLossPath`, probed on first use and kept on the model."""
    return probed_once(model, "_lorafit_seq2seq_loss_path", probe_loss_path)


def seq2seq_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over the target tokens of `batch`: `model(input_ids, attention_mask,
    labels=labels).loss` times their number.

    Where `loss_path` proved it equal, runs the encoder and the decoder, then the LM head (with
    the model's scaling, logit bias and logit transform) only at the target positions, a chunk at
    a time. Otherwise the model's own forward computes it.
    """
    path = loss_path(model)
    labels = batch["labels"]
    keep = labels != IGNORE
    if not path.chunked:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    use_cache=False)
        return out.loss * keep.sum()
    hidden = decoder_hidden(model, batch["input_ids"], batch["attention_mask"], labels)  # (B, T, H)
    rows = hidden[keep]  # (N, H), N = target tokens
    if path.hidden_scale is not None:
        rows = rows * path.hidden_scale
    bias = None if path.logit_bias is None else model.get_buffer(path.logit_bias)
    return head_cross_entropy(rows, model.get_output_embeddings(), labels[keep], transform=path.transform,
                              logit_bias=bias)


# ---------------------------------------------------------------- generation and scores


@torch.inference_mode()
def translate_ids(model, sources: list[list[int]], pad_id: int, max_new_tokens: int, num_beams: int = 1,
                  device: torch.device | str = "cpu", autocast: Callable = nullcontext, streamer=None,
                  **sampling) -> list[list[int]]:
    """The model's output tokens for each source (token ids), by HF `generate`: greedy, or beam
    search with `num_beams` > 1, or the `sampling` options (`generate.sampling_options`). Each
    output starts after the decoder's start token; decoding with skip_special_tokens drops the rest."""
    input_ids = pad_rows(sources, pad_id).to(device)
    attention_mask = pad_rows([[1] * len(s) for s in sources], 0).to(device)
    options = sampling or {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    was_training = model.training
    model.eval()
    with autocast():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             num_beams=num_beams, pad_token_id=pad_id, streamer=streamer, **options)
    model.train(was_training)
    return out[:, 1:].tolist()


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """sacrebleu's corpus BLEU (13a tokenization) and chrF of `hypotheses` against one reference each."""
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
            "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score}


@torch.inference_mode()
def score_pairs(model, split: Seq2SeqSplit, indices: list[int], batch_size: int, pad_id: int,
                device: torch.device | str = "cpu", autocast: Callable = nullcontext, num_beams: int = 1,
                on_batch: Callable[[int], None] | None = None) -> tuple[float, int, list[str]]:
    """The summed loss over the target tokens of the examples `indices` of `split`, how many tokens
    that is, and the model's translations of them (greedy, or beam search with `num_beams`, at most
    `split.max_target_length` new tokens), in `indices` order. Batches are length-sorted, as
    training's evaluation runs them; `on_batch(n)` reports progress."""
    from lorafit.data import default_pad_multiple

    was_training = model.training
    model.eval()
    total_loss, total_targets = 0.0, 0
    translations = [""] * len(indices)
    multiple, cap = default_pad_multiple(device), max(split.lengths, default=0)
    for rows in eval_order([split.lengths[i] for i in indices], batch_size):
        chosen = [indices[r] for r in rows]
        batch = {k: v.to(device) for k, v in collate_pairs(split, chosen, pad_id, multiple, cap).items()}
        with autocast():
            total_loss += seq2seq_loss(model, batch).item()
        total_targets += int((batch["labels"] != IGNORE).sum())
        outputs = translate_ids(model, [split.input_ids[i] for i in chosen], pad_id, split.max_target_length,
                                num_beams, device, autocast)
        for r, ids in zip(rows, outputs):
            translations[r] = split.tokenizer.decode(ids, skip_special_tokens=True).strip()
        if on_batch:
            on_batch(len(rows))
    model.train(was_training)
    return total_loss, total_targets, translations


def seq2seq_metrics(total_loss: float, total_targets: int, translations: list[str],
                    references: list[str]) -> dict[str, float]:
    """Loss (per target token), perplexity, target tokens, and BLEU and chrF of `translations`."""
    loss = total_loss / max(total_targets, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": total_targets,
            **corpus_scores(translations, references)}


def score_split(model, split: Seq2SeqSplit, batch_size: int, pad_id: int, device: torch.device | str = "cpu",
                autocast: Callable = nullcontext, num_beams: int = 1,
                on_batch: Callable[[int], None] | None = None) -> tuple[dict[str, float], list[str]]:
    """`seq2seq_metrics` of the whole `split` (`score_pairs`), and the translations, in the split's order."""
    total_loss, total_targets, translations = score_pairs(model, split, list(range(len(split))), batch_size, pad_id,
                                                          device, autocast, num_beams, on_batch)
    return seq2seq_metrics(total_loss, total_targets, translations, split.references), translations


# ---------------------------------------------------------------- the task


class Seq2Seq(Task):
    name = "seq2seq"
    peft_task_type = "SEQ_2_SEQ_LM"
    auto_class = "AutoModelForSeq2SeqLM"
    generates = True
    beam_search = True
    default_temperature = 0.0  # translations are decoded greedily unless asked otherwise
    data_keys = ("source_column", "target_column", "source_lang", "target_lang", "source_prefix",
                 "max_target_length")
    eval_metrics = ("bleu", "chrf")

    def claims(self, config: dict) -> bool:
        """An encoder-decoder whose architecture generates (not T5's or BART's classifier heads)."""
        heads = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
        return bool(config.get("is_encoder_decoder")) and not any(
            a.endswith(heads) for a in config.get("architectures") or [])

    def check_recipe(self, recipe) -> list[str]:
        data, problems = recipe.data, []
        if (data.source_lang is None) != (data.target_lang is None):
            problems.append("data.source_lang / data.target_lang: give both (the languages of a translation "
                            "column) or neither")
        elif data.source_lang is not None and data.target_column is not None:
            problems.append("data.target_column: the target is data.target_lang of the translation column; "
                            "remove data.target_column, or data.source_lang and data.target_lang")
        elif data.source_lang is None and data.target_column is None:
            problems.append("data.target_column: missing: a seq2seq recipe needs the column of target texts "
                            "(or data.source_lang and data.target_lang for a translation column)")
        return problems

    def load_data(self, cfg, seed: int) -> TaskData:
        """The recipe's splits as source/target pairs; without an eval split, `eval_fraction` of
        train held out (seeded); `max_train_samples` and `max_eval_samples` cut them."""
        pairs = read_pairs(cfg, [s for s in (cfg.train_split, cfg.eval_split, cfg.test_split) if s])
        train = pairs[cfg.train_split]
        if cfg.eval_split:
            eval_ = pairs[cfg.eval_split]
        else:
            keep, held = hold_out(len(train), cfg.eval_fraction, seed)
            train, eval_ = [train[i] for i in keep], [train[i] for i in held]
        test = pairs[cfg.test_split] if cfg.test_split else None
        if cfg.max_train_samples:
            train = train[:cfg.max_train_samples]
        if cfg.max_eval_samples:
            eval_ = eval_[:cfg.max_eval_samples]
            test = test[:cfg.max_eval_samples] if test is not None else None
        return TaskData(train, eval_, test)

    def load_split(self, cfg, split: str, labels: list[str] | None, max_samples: int | None = None) -> list[dict]:
        pairs = read_pairs(cfg, [split])[split]
        return pairs[:max_samples] if max_samples else pairs

    def tokenize(self, examples: list[dict], tokenizer, cfg, max_length: int, train: bool = False) -> Seq2SeqSplit:
        return tokenize_pairs(examples, tokenizer, cfg, max_length, cache=cfg.cache)

    def collate(self, split: Seq2SeqSplit, indices: list[int], pad_id: int, multiple: int = 1,
                cap: int | None = None) -> dict[str, torch.Tensor]:
        return collate_pairs(split, indices, pad_id, multiple, cap)

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def prepare(self, model) -> list[str]:
        return [loss_path(model).note]

    def loss(self, model, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
        return seq2seq_loss(model, batch)

    def evaluate(self, model, split: Seq2SeqSplit, batch_size: int, pad_id: int, device: torch.device | str = "cpu",
                 autocast: Callable = nullcontext, on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
        """Loss, perplexity, target tokens scored, and BLEU and chrF of greedy translations of the whole
        split (which `data.max_eval_samples` bounds)."""
        metrics, _ = score_split(model, split, batch_size, pad_id, device, autocast, on_batch=on_batch)
        return metrics

    def evaluate_share(self, model, split: Seq2SeqSplit, indices: list[int], batch_size: int, pad_id: int,
                       device: torch.device | str = "cpu", autocast: Callable = nullcontext) -> tuple:
        """The share's summed loss and target count, and its greedy translations with their indices
        (sacrebleu's corpus scores need every translation of the split, not per-share scores)."""
        total_loss, total_targets, translations = score_pairs(model, split, indices, batch_size, pad_id, device,
                                                              autocast)
        return total_loss, total_targets, indices, translations

    def reduce_eval(self, split: Seq2SeqSplit, shares: list[tuple]) -> dict[str, float]:
        translations = merge_items([(indices, texts) for _, _, indices, texts in shares], len(split))
        return seq2seq_metrics(sum(loss for loss, _, _, _ in shares), sum(tokens for _, tokens, _, _ in shares),
                               translations, split.references)

    def probe_batch(self, tokenizer, max_length: int) -> dict[str, torch.Tensor]:
        """The merge probe texts as sources, and the same texts in reverse order as targets (labels,
        -100 where padded): the model builds its decoder inputs from them, so the decoder, its
        cross-attention and the head are all checked."""
        from lorafit.merge import PROBE_TEXTS

        sources = tokenizer(PROBE_TEXTS, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        targets = tokenizer(text_target=PROBE_TEXTS[::-1], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt")
        labels = targets["input_ids"].masked_fill(targets["attention_mask"] == 0, IGNORE)
        return {"input_ids": sources["input_ids"], "attention_mask": sources["attention_mask"], "labels": labels}

    @torch.inference_mode()
    def probe_logits(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """fp32 logits at the probe targets' positions (padding left out)."""
        logits = model(**batch, use_cache=False).logits.float()
        return logits[batch["labels"] != IGNORE]

    # ------------------------------------------------------------ inference

    def eval_report(self, trained, examples: list[dict], split: str, batch_size: int, device: torch.device,
                    autocast: Callable, console, num_beams: int = 1) -> dict:
        """Loss, perplexity, BLEU and chrF on `examples`, tokenized as training did (the recipe's
        source prefix and target length), translated greedily or by beam search (`num_beams`); and
        every translation beside its source and reference ("samples")."""
        from lorafit.inference import progress_bar

        cfg = data_settings(trained)
        tokens = tokenize_pairs(examples, trained.tokenizer, cfg, trained.max_length)
        with progress_bar(console, f"eval {split}", len(tokens)) as advance:
            metrics, translations = score_split(trained.model, tokens, batch_size, trained.tokenizer.pad_token_id,
                                                device, autocast, num_beams, advance)
        samples = [{"source": e["source"], "reference": e["target"], "translation": t}
                   for e, t in zip(examples, translations)]
        return {"examples": len(examples), "source_prefix": cfg.source_prefix,
                "max_target_length": tokens.max_target_length, "num_beams": num_beams, **metrics, "samples": samples}

    def report_table(self, report: dict):
        from rich.table import Table

        decoding = "greedy" if report["num_beams"] == 1 else f"beam search, {report['num_beams']} beams"
        table = Table(title=f"{report.get('split', 'eval')} ({report['examples']} examples, {decoding})",
                      show_header=False)
        for key, label in (("bleu", "BLEU"), ("chrf", "chrF"), ("loss", "loss"), ("perplexity", "perplexity")):
            table.add_row(label, f"{report[key]:.4f}" if key in ("loss", "perplexity") else f"{report[key]:.2f}")
        table.add_row("target tokens scored", str(report["tokens"]))
        for sample in report["samples"][:SAMPLES_SHOWN]:
            table.add_row("source / reference", f"{sample['source']}\n{sample['reference']}")
            table.add_row("translation", sample["translation"])
        return table

    def generate(self, trained, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 num_beams: int = 1, on_text: Callable[[str], None] | None = None, **options) -> str:
        """The model's output for the source text `prompt` (with the recipe's source prefix, truncated
        as training truncated sources): greedy for temperature 0, else sampled; beam search with
        `num_beams` > 1. Streamed to `on_text` piece by piece, or whole once beam search ends."""
        from lorafit.device import autocast_for, pick_device, resolve_precision
        from lorafit.generate import CallbackStreamer, check_sampling, sampling_options

        check_sampling(max_new_tokens, temperature, top_p)
        if options.get("use_chat_template") is not None:
            raise LorafitError("--chat-template: seq2seq models read the source text as it is (with "
                               "data.source_prefix); leave out --chat-template")
        cfg, tokenizer = data_settings(trained), trained.tokenizer
        ids = tokenizer(cfg.source_prefix + prompt, truncation=True, max_length=trained.max_length)["input_ids"]
        device = pick_device()
        dtype = resolve_precision(trained.train_config.precision, device)
        trained.model.to(device)
        stream = on_text is not None and num_beams == 1  # transformers streams one hypothesis only
        streamer = CallbackStreamer(tokenizer, on_text) if stream else None
        (out,) = translate_ids(trained.model, [ids], tokenizer.pad_token_id, max_new_tokens, num_beams, device,
                               autocast_for(device, dtype), streamer, **sampling_options(temperature, top_p))
        text = tokenizer.decode(out, skip_special_tokens=True).strip()
        if on_text is not None and not stream:
            on_text(text)
        return text


def data_settings(trained):
    """The data section a trained model's inputs are prepared by: its recipe's, else the defaults
    (no source prefix)."""
    from lorafit.recipe import DataConfig

    return trained.recipe.data if trained.recipe else DataConfig()
