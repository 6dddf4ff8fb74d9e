"""Causal language modelling: examples -> token ids with loss masks, packing, and the loss.

Three formats, picked by the columns a recipe names:
- raw text (`text_column`): loss on every token;
- prompt + completion (`prompt_column`, `completion_column`): loss on the completion only;
- chat (`messages_column`, lists of {role, content}): the tokenizer's chat template, loss on
  assistant turns only.
Labels use -100 where no loss is taken. The label at position t is the token at t; the model's
prediction for it comes from position t-1 (the shift happens in `lm_loss`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F

from lorafit.cache import cache_key, load_tokens, save_tokens, tokenizer_fingerprint
from lorafit.data import padded_width
from lorafit.errors import LorafitError
from lorafit.fast import LogitTransform, head_cross_entropy, probe_failed

T = TypeVar("T")

IGNORE = -100


@dataclass
class LMSplit:
    """Tokenized examples; with packing, `segments[i]` gives the lengths of the examples in block i."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    segments: list[list[int]] | None = None
    dropped: int = 0  # examples with nothing left to learn after truncation
    references: list[str] = field(default_factory=list)  # completions, for exact-match scoring

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def _ids(encoded) -> list[int]:
    """apply_chat_template returns a list or a BatchEncoding depending on the transformers version."""
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, prompt: str, use_chat_template: bool) -> list[int]:
    """The tokens a completion follows: the chat template's user turn + assistant header, or the raw prompt."""
    if use_chat_template:
        return _ids(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True))
    return tokenizer(prompt)["input_ids"]


def encode_text(tokenizer, text: str, max_length: int) -> tuple[list[int], list[int]]:
    ids = (tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])[:max_length]
    return ids, list(ids)


def encode_prompt_completion(tokenizer, prompt: str, completion: str, max_length: int,
                             use_chat_template: bool) -> tuple[list[int], list[int]]:
    """Loss on the completion (and the end-of-turn token) only. Long prompts lose their start."""
    head = prompt_ids(tokenizer, prompt, use_chat_template)
    tail = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    tail = tail[:max_length - 1]
    head = head[-(max_length - len(tail)):]
    return head + tail, [IGNORE] * len(head) + tail


def encode_chat(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """Render with the chat template; loss on the tokens of each assistant turn."""
    if not has_chat_template(tokenizer):
        raise LorafitError("data.messages_column: the tokenizer has no chat template to render messages with")
    ids = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _ids(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True))
        through = _ids(tokenizer.apply_chat_template(messages[: i + 1], tokenize=True))
        if ids[: len(through)] != through or through[: len(before)] != before:
            raise LorafitError("data.messages_column: the chat template does not render conversations as growing "
                               "prefixes, so assistant turns cannot be located for the loss mask")
        labels[len(before):len(through)] = ids[len(before):len(through)]
    return ids[:max_length], labels[:max_length]


def pack(split: LMSplit, max_length: int) -> LMSplit:
    """Concatenate examples into blocks of at most `max_length` tokens, in order, never splitting one.

    The first label of every example is masked: in a block it would be predicted from the end of
    the previous example. Attention never crosses examples (see `collate_lm`).
    """
    blocks_ids: list[list[int]] = []
    blocks_labels: list[list[int]] = []
    segments: list[list[int]] = []
    for ids, labels in zip(split.input_ids, split.labels):
        labels = [IGNORE] + labels[1:]
        if not blocks_ids or len(blocks_ids[-1]) + len(ids) > max_length:
            blocks_ids.append([])
            blocks_labels.append([])
            segments.append([])
        blocks_ids[-1] += ids
        blocks_labels[-1] += labels
        segments[-1].append(len(ids))
    return LMSplit(blocks_ids, blocks_labels, segments, split.dropped, split.references)


def collate_lm(split: LMSplit, indices: list[int], pad_id: int, multiple: int = 1,
               cap: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad input_ids (pad_id) and labels (-100) to the longest row, rounded up to `multiple`
    (at most `cap`). Packed blocks get position ids that restart at each example and a (B, 1, T, T)
    boolean mask: causal, and only within an example."""
    rows = [split.input_ids[i] for i in indices]
    width = padded_width([len(r) for r in rows], multiple, cap)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(split.input_ids[i])
        input_ids[row, :n] = torch.tensor(split.input_ids[i])
        labels[row, :n] = torch.tensor(split.labels[i])
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if split.segments is not None:
        segment_ids = torch.full((len(rows), width), -1, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(indices):
            start = 0
            for k, n in enumerate(split.segments[i]):
                segment_ids[row, start:start + n] = k
                position_ids[row, start:start + n] = torch.arange(n)
                start += n
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] >= 0)
        batch["attention_mask"] = (causal & same)[:, None]
        batch["position_ids"] = position_ids
        batch["token_mask"] = attention_mask  # which positions hold real tokens (for counting)
    return batch


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def right_padded(mask: torch.Tensor | None) -> bool:
    """Whether a 2-D attention mask has every row's real tokens first and its padding after."""
    return mask is not None and mask.dim() == 2 and bool((mask[:, 1:] <= mask[:, :-1]).all())


@dataclass(frozen=True)
class LossPath:
    """How `lm_loss` computes a causal LM's loss, as `probe_loss_path` proved it on a probe.

    With a `body`, the loss is taken from `body(...).last_hidden_state`, the output embedding and
    `transform` (what the model's forward does to the head's output; None: nothing), which give
    the model's own logits. Without one, the model's own forward computes all the logits.
    """

    body: torch.nn.Module | None = field(repr=False)
    transform: LogitTransform | None
    note: str  # for the training log: which path, and why


# Random logits put in place of the head's output while probing: large enough that soft-capping
# (a cap of 30 bends a logit of 10 by 0.3) and any scale other than 1 show at once.
PROBE_LOGIT_STD = 10.0


def logit_transforms(config) -> list[LogitTransform]:
    """What a forward might do to its head's output: each positive number the config keeps under a
    key that names logits or the LM head (logit_scale, logits_scaling, final_logit_softcapping,
    logits_soft_cap, lm_head_multiplier, ...) as a scale, a divisor or a soft cap. Candidates only:
    the same key means a divisor in one model (Granite) and a scale in another (HyperCLOVAX), so
    `probe_loss_path` keeps the one that gives the model's own logits, if any."""
    values = sorted({float(v) for k, v in config.to_dict().items()
                     if ("logit" in k or "lm_head" in k) and isinstance(v, (int, float)) and not isinstance(v, bool)
                     and v > 0})
    return [LogitTransform(**{kind: v}) for v in values for kind in ("scale", "divisor", "softcap")]


class LogitSwap:
    """A forward hook for an output embedding, for the loss-path probes: keeps what the head reads
    (`seen`, one entry per call) and returns random logits in place of what it computes (`replaced`,
    std PROBE_LOGIT_STD, drawn from `generator`)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator
        self.seen: list[torch.Tensor] = []
        self.replaced: list[torch.Tensor] = []

    def __call__(self, module, args, output):
        self.seen.append(args[0])
        self.replaced.append((torch.randn(output.shape, generator=self.generator) * PROBE_LOGIT_STD).to(output))
        return self.replaced[-1]


def run_head_probe(model, run: Callable[[torch.Generator, torch.device], T]) -> tuple[LogitSwap, T] | str:
    """The frame of the loss-path probes (`probe_loss_path` here and in `tasks.seq2seq`): `run(generator,
    device)` runs the model on random inputs that it draws from `generator` (seeded 0), in eval mode with
    autocast off and a `LogitSwap` (drawing from the same generator) on the output embedding. The global
    RNG is untouched and the model's mode restored. Returns the swap, holding what the head read and
    returned in each call, and what `run` returned; or, when there is nothing to prove, the reason for
    the note: the model has no output embedding, or `run` raised."""
    head = model.get_output_embeddings()
    if head is None:
        return "no output embedding"
    generator = torch.Generator().manual_seed(0)
    swap = LogitSwap(generator)
    was_training = model.training
    model.eval()
    hook = head.register_forward_hook(swap)
    try:
        device = next(model.parameters()).device
        with torch.autocast(device.type, enabled=False):
            result = run(generator, device)
    except Exception as err:  # whatever the model, training goes on, by its own forward
        return f"the {probe_failed(err)}"
    finally:
        hook.remove()
        model.train(was_training)
    return swap, result


def probed_once(model, attribute: str, probe):
    """`probe(model)`, computed on first use and kept on the model as `attribute`."""
    result = getattr(model, attribute, None)
    if result is None:
        result = probe(model)
        setattr(model, attribute, result)
    return result


def _fallback(reason: str) -> LossPath:
    return LossPath(None, None, f"LM loss from the model's forward ({reason})")


@torch.no_grad()
def probe_loss_path(model) -> LossPath:
    """Find out whether the loss can skip the model's forward, on random tokens in eval mode.

    Runs the model's forward once, recording what its output embedding receives and putting
    random logits Z in place of what it returns, then the body
    (`model.get_submodule(model.base_model_prefix)`) alone. The fast path is taken only if the
    head is called once, on the body's `last_hidden_state`, and the forward's logits are Z as it
    is or one of `logit_transforms` of Z, bit for bit. Otherwise (logits rescaled some other way,
    the head's input changed, vocabulary entries masked, a body that is not found or takes other
    inputs) the loss comes from the model's forward. Autocast is off; the global RNG is untouched.
    """

    def run(generator: torch.Generator, device: torch.device):
        inputs = {"input_ids": torch.randint(0, model.config.vocab_size, (2, 8), generator=generator).to(device)}
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        logits = model(**inputs, use_cache=False).logits
        body = model.get_submodule(model.base_model_prefix)
        return logits, body, body(**inputs, use_cache=False).last_hidden_state

    probed = run_head_probe(model, run)
    if isinstance(probed, str):
        return _fallback(probed)
    swap, (logits, body, hidden) = probed
    seen, replaced = swap.seen, swap.replaced
    if len(seen) != 1:
        return _fallback(f"its output embedding ran {len(seen)} times in one forward")
    if seen[0].shape != hidden.shape or not torch.allclose(seen[0], hidden, rtol=1e-5, atol=1e-6):
        return _fallback("its head does not read the body's last hidden state as it is")
    for transform in [None, *logit_transforms(model.config)]:
        expected = replaced[0] if transform is None else transform(replaced[0])
        if expected.shape == logits.shape and torch.equal(expected.to(logits.dtype), logits):
            if transform is None:
                return LossPath(body, None, "chunked LM-head loss")
            return LossPath(body, transform, f"chunked LM-head loss with the model's {transform.describe()}")
    return _fallback("it changes the head's logits in a way the chunked loss does not reproduce")


def loss_path(model) -> LossPath:
    """The model's `LossPath`, probed on first use and kept on the model."""
    return probed_once(model, "_lorafit_loss_path", probe_loss_path)


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions, of the logits the model's own
    forward gives (`model(**batch, labels=...).loss` times the number of targets).

    Where `loss_path` proved it equal, runs the transformer body, then the LM head (and the
    model's scaling or soft-capping of its logits) only at the positions that have a target, a
    chunk of them at a time, so the (batch × length × vocabulary) logits are never materialized
    (49k-vocabulary models would spend most of their time and memory there). Otherwise the model's
    forward computes all the logits.
    """
    path = loss_path(model)
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if right_padded(kwargs.get("attention_mask")):
        # In a causal model a real token never sees the pad tokens that follow it, and its position
        # is the same either way, so the padding mask changes nothing that the loss reads. Without
        # it, attention runs its plain causal kernel: no (B, 1, T, T) mask built, saved or applied.
        del kwargs["attention_mask"]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    if path.body is None:
        logits = model(**kwargs, use_cache=False).logits  # (B, T, V)
        return F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum")
    hidden = path.body(**kwargs, use_cache=False).last_hidden_state  # (B, T, H)
    rows = hidden[:, :-1][keep]  # (N, H), N = labelled positions
    return head_cross_entropy(rows, model.get_output_embeddings(), targets[keep], transform=path.transform)


def tokenize_lm(examples: list[dict], tokenizer, max_length: int, fmt: str, use_chat_template: bool = True,
                packing: bool = False, cache: bool = False) -> LMSplit:
    """Token ids and loss labels for examples from `tasks.causal_lm.load_lm_data`; examples with nothing left to
    learn after truncation are dropped (and counted).

    With `cache`, the split (packed, if `packing`) is read from the tokenization cache
    (`lorafit.cache`) when the same tokenizer and settings have tokenized the same examples before,
    and stored there otherwise.
    """
    chat = use_chat_template and has_chat_template(tokenizer)
    key = None
    if cache:
        params = {"kind": "lm", "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": max_length,
                  "format": fmt, "chat_template": chat, "packing": packing}
        key = cache_key(params, (json.dumps(example, sort_keys=True) for example in examples))
        names = ["input_ids", "labels", "segments"] if packing else ["input_ids", "labels"]
        entry = load_tokens(key, names, ["dropped", "references"])
        if entry is not None:
            lists, meta = entry
            return LMSplit(lists["input_ids"], lists["labels"], lists.get("segments"), meta["dropped"],
                           meta["references"])
    input_ids, labels, references, dropped = [], [], [], 0
    for example in examples:
        if fmt == "chat":
            ids, labs = encode_chat(tokenizer, example["messages"], max_length)
        elif fmt == "prompt-completion":
            ids, labs = encode_prompt_completion(tokenizer, example["prompt"], example["completion"], max_length, chat)
        else:
            ids, labs = encode_text(tokenizer, example["text"], max_length)
        if all(label == IGNORE for label in labs[1:]):
            dropped += 1
            continue
        input_ids.append(ids)
        labels.append(labs)
        references.append(example.get("completion", ""))
    split = LMSplit(input_ids, labels, None, dropped, references)
    if packing:
        split = pack(split, max_length)
    if key is not None:
        lists = {"input_ids": split.input_ids, "labels": split.labels}
        if split.segments is not None:
            lists["segments"] = split.segments
        save_tokens(key, lists, {"dropped": split.dropped, "references": split.references})
    return split
