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
from dataclasses import dataclass, field

import torch

from lorafit.cache import cache_key, load_tokens, save_tokens, tokenizer_fingerprint
from lorafit.data import padded_width
from lorafit.errors import LorafitError
from lorafit.fast import head_cross_entropy

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


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions.

    Runs the transformer body, then the LM head only at the positions that have a target, a chunk
    of them at a time, so the (batch × length × vocabulary) logits are never materialized
    (49k-vocabulary models would spend most of their time and memory there).
    """
    body = model.get_submodule(model.base_model_prefix)
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if right_padded(kwargs.get("attention_mask")):
        # In a causal model a real token never sees the pad tokens that follow it, and its position
        # is the same either way, so the padding mask changes nothing that the loss reads. Without
        # it, attention runs its plain causal kernel: no (B, 1, T, T) mask built, saved or applied.
        del kwargs["attention_mask"]
    hidden = body(**kwargs, use_cache=False).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    rows = hidden[:, :-1][keep]  # (N, H), N = labelled positions
    return head_cross_entropy(rows, model.get_output_embeddings(), targets[keep])


def tokenize_lm(examples: list[dict], tokenizer, max_length: int, fmt: str, use_chat_template: bool = True,
                packing: bool = False, cache: bool = False) -> LMSplit:
    """Token ids and loss labels for examples from `data.load_lm_data`; examples with nothing left to
    learn after truncation are dropped (and counted).

    With `cache`, the split (packed, if `packing`) is read from the tokenization cache
    (`lorafit.cache`) when the same tokenizer and settings have tokenized the same examples before,
    and stored there otherwise.
    """
    chat = use_chat_template and has_chat_template(tokenizer)
    key = None
    if cache:
        params = {"kind": "causal-lm", "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": max_length,
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
