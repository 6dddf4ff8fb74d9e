"""Text from a trained causal LM (`lorafit generate`, exact match in `lorafit eval`), streamed as it is produced.

Prompts are rendered as training renders the prompt of prompt + completion data
(`lm.prompt_ids`): a user turn plus the assistant header of the chat template when the recipe's
`data.use_chat_template` is on (the default) and the tokenizer has a template, else the raw
prompt. Generation runs on training's device and precision (`train.precision` through
`resolve_precision`/`autocast_for`). Temperature 0 means greedy decoding; otherwise tokens are
sampled from the temperature-scaled distribution cut to its top-p nucleus (no top-k cut).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from transformers import TextStreamer

from lorafit.device import autocast_for, pick_device, resolve_precision
from lorafit.errors import LorafitError
from lorafit.lm import has_chat_template, prompt_ids
from lorafit.models import model_max_length
from lorafit.recipe import DataConfig


class CallbackStreamer(TextStreamer):
    """transformers' `TextStreamer` (decoded text in word-sized pieces, prompt skipped), handing each
    piece to `on_text` instead of printing it."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise LorafitError(f"--max-new-tokens {max_new_tokens}: use a positive number of tokens")
    if temperature < 0:
        raise LorafitError(f"--temperature {temperature:g}: use 0 (greedy) or a positive number such as 0.7")
    if not 0 < top_p <= 1:
        raise LorafitError(f"--top-p {top_p:g}: use a probability in (0, 1], e.g. 0.9")


def sampling_options(temperature: float, top_p: float) -> dict:
    """`generate` keyword arguments: greedy for temperature 0, else temperature + top-p sampling.

    Every option is given, so a `generation_config.json` shipped with the model (e.g. top_k=50 or
    do_sample=True) cannot change what the user asked for.
    """
    if temperature == 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}


def eos_ids(model, tokenizer) -> list[int]:
    """Tokens that end a generation: the tokenizer's end token (training appends it after every
    completion) and any the model's generation config adds (e.g. an end-of-turn token)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = getattr(model.generation_config, "eos_token_id", None)
    for token in configured if isinstance(configured, list) else [configured]:
        if token is not None and token not in ids:
            ids.append(token)
    return ids


def fit_context(prompt: list[int], max_new_tokens: int, limit: int | None) -> tuple[list[int], int]:
    """Fit a prompt and its continuation into the model's `limit` positions.

    A prompt too long to leave room for min(max_new_tokens, limit // 2) new tokens loses its start
    (as training truncates long prompts); generation stops at the end of the context.
    Returns (prompt, max_new_tokens).
    """
    if limit is None:
        return prompt, max_new_tokens
    room = min(max_new_tokens, limit // 2)
    prompt = prompt[-(limit - room):]
    return prompt, min(max_new_tokens, limit - len(prompt))


def cut_at_eos(tokens: list[int], eos: list[int]) -> list[int]:
    """The tokens before the first end token (finished rows of a batch continue with padding)."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i]
    return tokens


@torch.inference_mode()
def generate_ids(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, device: torch.device | str = "cpu", autocast=nullcontext,
                 streamer: TextStreamer | None = None) -> list[list[int]]:
    """Continue each prompt (token ids); returns the new tokens of each, cut before the end token.

    Prompts are left-padded into one batch (position ids follow the attention mask, so padding
    does not shift them). `streamer` needs a single prompt.
    """
    eos = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    was_training = model.training
    model.eval()
    with autocast():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos,
                             streamer=streamer, **sampling_options(temperature, top_p))
    model.train(was_training)
    return [cut_at_eos(row, eos) for row in out[:, width:].tolist()]


def renders_chat(lm) -> bool:
    """Whether prompts to the loaded model `lm` are rendered with the chat template: the recipe's
    `data.use_chat_template` (default true) and the tokenizer has one, as training renders prompt +
    completion data."""
    wanted = lm.recipe.data.use_chat_template if lm.recipe else DataConfig().use_chat_template
    return wanted and has_chat_template(lm.tokenizer)


def generate_text(lm, prompt: str, max_new_tokens: int = 128, temperature: float = 0.7,
                  top_p: float = 0.9, use_chat_template: bool | None = None,
                  on_text: Callable[[str], None] | None = None) -> str:
    """Generate a continuation of `prompt` with a loaded causal LM and return it as text.

    Args:
        lm: a causal LM from `inference.load_trained`.
        prompt: the user's text, rendered as training renders prompts (see the module docstring).
        max_new_tokens: at most this many tokens (fewer when the model's context ends sooner).
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_p: sample from the smallest set of tokens whose probability reaches `top_p`.
        use_chat_template: override the recipe's `data.use_chat_template` (None keeps it).
        on_text: called with each piece of decoded text as it is produced (prompt excluded).

    Returns:
        The generated text, special tokens removed; the pieces given to `on_text` add up to it.

    Raises:
        LorafitError: out-of-range options, or a prompt that renders to no tokens.
    """
    check_sampling(max_new_tokens, temperature, top_p)
    chat = renders_chat(lm) if use_chat_template is None else use_chat_template
    if chat and not has_chat_template(lm.tokenizer):
        raise LorafitError(f"--chat-template: the tokenizer of {lm.path} has no chat template; "
                           f"pass --no-chat-template")
    ids = prompt_ids(lm.tokenizer, prompt, chat)
    if not ids:
        raise LorafitError("--prompt: the prompt is empty after tokenizing; give some text")
    ids, max_new_tokens = fit_context(ids, max_new_tokens, model_max_length(lm.model))
    device = pick_device()
    dtype = resolve_precision(lm.train_config.precision, device)
    lm.model.to(device)
    streamer = CallbackStreamer(lm.tokenizer, on_text) if on_text else None
    (new,) = generate_ids(lm.model, lm.tokenizer, [ids], max_new_tokens, temperature, top_p, device,
                          autocast_for(device, dtype), streamer)
    return lm.tokenizer.decode(new, skip_special_tokens=True)
