"""Causal LM: loss masks, packing, chat templates, and a tiny model that learns a sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import lm_recipe, lm_tokenizer, read_metrics, tiny_lm, write_jsonl, write_recipe
from rich.console import Console
from transformers import AutoModelForCausalLM

from lorafit.adapter import load_adapter_model
from lorafit.lm import IGNORE, collate_lm, count_targets, encode_chat, lm_loss, pack, tokenize_lm
from lorafit.recipe import recipe_from_dict
from lorafit.train import train


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_masked_prompt_tokens_give_zero_loss_and_gradient(kind):
    model, tokenizer = tiny_lm(kind), lm_tokenizer()
    split = tokenize_lm([{"prompt": "the cat sat on", "completion": "a mat"},
                         {"prompt": "how are you", "completion": "fine thanks and you"}],
                        tokenizer, 32, "prompt-completion", use_chat_template=False)
    batch = collate_lm(split, [0, 1], tokenizer.pad_token_id)
    # The completion (and its end token) is all that carries labels.
    assert [t for t in batch["labels"][0].tolist() if t != IGNORE] == tokenizer("a mat [EOS]")["input_ids"]

    ours = lm_loss(model, batch)
    ours.backward()
    our_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits.retain_grad()
    full = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    full.backward()
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=1e-5)
    for ours_g, p in zip(our_grads, model.parameters()):
        torch.testing.assert_close(ours_g, p.grad, atol=1e-5, rtol=1e-4)
    # No gradient reaches the logits of positions whose next token is a masked prompt token (or padding).
    masked = torch.cat([batch["labels"][:, 1:] == IGNORE, torch.ones(2, 1, dtype=torch.bool)], dim=1)
    assert logits.grad[masked].abs().max() == 0
    assert logits.grad[~masked].abs().max() > 0


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_and_unpacked_give_the_same_per_example_loss(kind):
    model, tokenizer = tiny_lm(kind), lm_tokenizer()
    texts = [{"text": "the cat sat on a mat"}, {"text": "a dog ran to the park and the cat sat"}, {"text": "hi"}]
    plain = tokenize_lm(texts, tokenizer, 64, "text")
    packed = pack(plain, 64)
    assert len(packed) == 1 and packed.segments == [plain.lengths]

    with torch.no_grad():
        alone = [lm_loss(model, collate_lm(plain, [i], tokenizer.pad_token_id)).item() for i in range(3)]
        block = collate_lm(packed, [0], tokenizer.pad_token_id)
        assert count_targets(block) == sum(count_targets(collate_lm(plain, [i], 0)) for i in range(3))
        starts = [0, plain.lengths[0], plain.lengths[0] + plain.lengths[1], sum(plain.lengths)]
        for i in range(3):
            only_i = dict(block, labels=block["labels"].clone())
            only_i["labels"][0, : starts[i]] = IGNORE
            only_i["labels"][0, starts[i + 1]:] = IGNORE
            assert lm_loss(model, only_i).item() == pytest.approx(alone[i], abs=1e-5)


def test_chat_masking_covers_assistant_turns_only():
    tokenizer = lm_tokenizer()
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi how are you"},
                {"role": "user", "content": "fine thanks"}, {"role": "assistant", "content": "the cat sat"}]
    ids, labels = encode_chat(tokenizer, messages, 64)
    learned = tokenizer.decode([t for t in labels if t != IGNORE])
    assert learned == "hi how are you [EOS] the cat sat [EOS]"
    words = tokenizer.convert_ids_to_tokens(ids)
    assert words[:4] == ["user", ":", "hello", "[EOS]"]
    assert all(label == IGNORE for label, word in zip(labels, words) if word in ("user", "hello", "fine", "thanks"))


def test_packing_blocks_never_exceed_max_length():
    tokenizer = lm_tokenizer()
    texts = [{"text": " ".join(["the cat"] * n)} for n in (1, 3, 5, 2, 7, 1)]
    plain = tokenize_lm(texts, tokenizer, 16, "text")
    packed = pack(plain, 16)
    assert all(len(ids) <= 16 for ids in packed.input_ids)
    assert sum(sum(seg) for seg in packed.segments) == sum(plain.lengths)
    assert packed.input_ids[0][: plain.lengths[0]] == plain.input_ids[0]


def test_tiny_llama_learns_a_sentence_and_generates_it(lm_model_dirs, tmp_path, run_cli):
    sentence = "the cat sat on a mat and the dog ran to the park"
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": sentence}] * 16)
    out = tmp_path / "run"
    recipe = {
        "name": "memorize", "seed": 0,
        "model": {"name": str(lm_model_dirs["llama"]), "task": "causal-lm"},
        # A tiny random model's frozen output head caps how confident its logits can get; train it too.
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear",
                 "modules_to_save": ["lm_head"]},
        "data": {"path": "json", "data_files": {"train": str(data)}, "eval_split": "train", "test_split": None,
                 "max_length": 32},
        "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "scheduler": "constant"},
        "train": {"max_steps": 300, "batch_size": 4, "log_every": 10, "eval_every": None, "save_every": None,
                  "output_dir": str(out)},
    }
    result = run_cli("train", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 0, result.output
    metrics = read_metrics(out)
    evals = [m for m in metrics if m.get("split") == "eval"]
    assert set(evals[-1]) == {"step", "split", "loss", "perplexity", "tokens"}
    assert evals[-1]["perplexity"] < 1.5
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and "lm_head" not in config["target_modules"]
    assert config["modules_to_save"] == ["lm_head"]

    model, tokenizer, _ = load_adapter_model(out / "adapter")
    prompt = tokenizer("the cat", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(generated[0], skip_special_tokens=True) == sentence


# ---------------------------------------------------------------- through train(), against the model's own loss


def turn_tokens(tokenizer, role: str, content: str, learn: bool) -> tuple[list[int], list[bool]]:
    """One message as CHAT_TEMPLATE renders it, "role : content [EOS] ", and which of its tokens carry
    a label: the content and its end token when `learn`, never the role header."""
    head = tokenizer(f"{role} :", add_special_tokens=False)["input_ids"]
    body = tokenizer(f"{content} [EOS]", add_special_tokens=False)["input_ids"]
    return head + body, [False] * len(head) + [learn] * len(body)


def prompt_completion_tokens(tokenizer, prompt: str, completion: str,
                             chat: bool = True) -> tuple[list[int], list[bool]]:
    """The prompt (a user turn and the assistant header with `chat`, else the bare prompt), then the
    completion and its end token, which alone carry labels."""
    if chat:
        user, _ = turn_tokens(tokenizer, "user", prompt, False)
        head = user + tokenizer("assistant :", add_special_tokens=False)["input_ids"]
    else:
        head = tokenizer(prompt)["input_ids"]
    tail = tokenizer(f"{completion} [EOS]", add_special_tokens=False)["input_ids"]
    return head + tail, [False] * len(head) + [True] * len(tail)


@torch.inference_mode()
def mean_target_loss(model, sequences: list[tuple[list[int], list[bool]]]) -> tuple[float, int]:
    """Each sequence alone through the model's own forward (no packing, no padding, default positions):
    the mean next-token loss over the tokens marked True, and their number."""
    nll, count = 0.0, 0
    for ids, learn in sequences:
        log_probs = model.eval()(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        nll -= sum(log_probs[t - 1, ids[t]].item() for t in range(1, len(ids)) if learn[t])
        count += sum(learn[1:])
    return nll / count, count


PACKED_ROWS = [{"prompt": p, "completion": c} for p, c in (
    ("how are you", "fine thanks"), ("hello", "hi"), ("the cat sat on", "a mat"), ("a dog", "ran to the park"),
    ("hi how are you", "fine and you"), ("the dog ran", "to a cat"))]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_training_loss_equals_the_unpacked_loss(kind, lm_model_dirs, tmp_path, run_cli):
    rows = PACKED_ROWS * 2
    data = {"train": write_jsonl(tmp_path / "train.jsonl", rows),
            "eval": write_jsonl(tmp_path / "eval.jsonl", PACKED_ROWS[:2])}
    out = tmp_path / "run"
    recipe = lm_recipe(lm_model_dirs[kind], data, out, optim={"lr": 2e-2},
                       data={"prompt_column": "prompt", "completion_column": "completion", "eval_split": "eval",
                             "packing": True},
                       # One batch holds every block, so each step's loss is the mean over all training examples.
                       train={"max_steps": 3, "batch_size": 8, "precision": "fp32", "log_every": 1, "save_every": 1})
    result = run_cli("train", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 0, result.output
    # Rendered with the chat template, each example is 8-13 tokens: 2 or 3 fit in a 32-token block.
    assert "packed 12 training examples into 5 blocks" in result.stdout

    tokenizer = lm_tokenizer()
    sequences = [prompt_completion_tokens(tokenizer, row["prompt"], row["completion"]) for row in rows]
    losses = {m["step"]: m["loss"] for m in read_metrics(out) if "split" not in m}
    assert sorted(losses) == [1, 2, 3]
    # Step 1 runs the base model (lora_B starts at zero); step k runs the adapter step k-1 wrote.
    models = {1: AutoModelForCausalLM.from_pretrained(lm_model_dirs[kind])}
    models.update({k: load_adapter_model(out / "checkpoints" / f"step-{k - 1}")[0] for k in (2, 3)})
    for step, model in models.items():
        assert losses[step] == pytest.approx(mean_target_loss(model, sequences)[0], abs=1e-5), step
    assert losses[3] < losses[1] - 0.1  # the adapter moved: steps 2 and 3 test more than the base model


def final_eval(out: Path) -> dict:
    return [m for m in read_metrics(out) if m.get("split") == "eval"][-1]


CHATS = [
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi how are you"}],
    [{"role": "system", "content": "the cat"}, {"role": "user", "content": "how are you"},
     {"role": "assistant", "content": "fine thanks"}, {"role": "user", "content": "and you"},
     {"role": "assistant", "content": "the dog sat on a mat"}],
    [{"role": "user", "content": "the cat sat on"}, {"role": "assistant", "content": "a mat"}],
]


def test_chat_training_scores_the_assistant_turns(lm_model_dirs, tmp_path):
    data = {"train": write_jsonl(tmp_path / "train.jsonl", [{"messages": m} for m in CHATS] * 4),
            "eval": write_jsonl(tmp_path / "eval.jsonl", [{"messages": m} for m in CHATS])}
    out = tmp_path / "run"
    raw = lm_recipe(lm_model_dirs["llama"], data, out, data={"messages_column": "messages", "eval_split": "eval"},
                    train={"max_steps": 3, "precision": "fp32"})
    train(recipe_from_dict(raw), console=Console(quiet=True))

    tokenizer = lm_tokenizer()
    sequences = []
    for messages in CHATS:
        turns = [turn_tokens(tokenizer, m["role"], m["content"], m["role"] == "assistant") for m in messages]
        sequences.append(([t for ids, _ in turns for t in ids], [x for _, learn in turns for x in learn]))
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        assert sequences[-1][0] == tokenizer(rendered)["input_ids"]  # the hand rendering is the template's
    loss, count = mean_target_loss(load_adapter_model(out / "adapter")[0], sequences)
    logged = final_eval(out)
    assert logged["tokens"] == count == 18  # "hi how are you [EOS]", "fine thanks [EOS]", ...
    assert logged["loss"] == pytest.approx(loss, abs=1e-5)


TEMPLATE_ROWS = [{"name": "cat", "reply": "sat on a mat"}, {"name": "dog", "reply": "ran to the park"},
                 {"name": "the cat", "reply": "fine thanks"}]


@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "plain"])
def test_prompt_template_builds_the_prompt_in_training(chat, lm_model_dirs, tmp_path):
    data = {"train": write_jsonl(tmp_path / "train.jsonl", TEMPLATE_ROWS * 4),
            "eval": write_jsonl(tmp_path / "eval.jsonl", TEMPLATE_ROWS)}
    out = tmp_path / "run"
    raw = lm_recipe(lm_model_dirs["gpt2"], data, out,
                    data={"prompt_column": "name", "completion_column": "reply", "eval_split": "eval",
                          "prompt_template": "hello {name} how are you", "use_chat_template": chat},
                    train={"max_steps": 3, "precision": "fp32"})
    train(recipe_from_dict(raw), console=Console(quiet=True))

    tokenizer = lm_tokenizer()
    sequences = [prompt_completion_tokens(tokenizer, f"hello {row['name']} how are you", row["reply"], chat)
                 for row in TEMPLATE_ROWS]
    loss, count = mean_target_loss(load_adapter_model(out / "adapter")[0], sequences)
    logged = final_eval(out)
    assert logged["tokens"] == count == 13
    assert logged["loss"] == pytest.approx(loss, abs=1e-5)
