"""Batch padding: length-grouped batches cut it, and rounding it up to a multiple
(train.pad_to_multiple_of) adds pad tokens without changing the math."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
from conftest import lm_tokenizer, make_tokenizer, tiny_config, tiny_lm

from lorafit.data import TextSplit, batch_order, padded_width
from lorafit.tasks.classification import collate, tokenize
from lorafit.lm import collate_lm, count_targets, lm_loss, pack, tokenize_lm
from lorafit.recipe import TrainConfig
from lorafit.train import pad_multiple


def test_padded_width_rounds_up_but_never_past_the_cap():
    assert padded_width([3, 17, 5]) == 17
    assert padded_width([3, 17, 5], 16) == 32
    assert padded_width([16], 16) == 16
    assert padded_width([17], 16, cap=24) == 24  # the model's limit wins over the rounding
    assert padded_width([30], 16, cap=24) == 30  # never shorter than the longest row


def test_default_multiple_is_64_on_gpus_and_1_on_cpus():
    assert pad_multiple(TrainConfig(), torch.device("cpu")) == 1
    assert pad_multiple(TrainConfig(), torch.device("cuda")) == 64
    assert pad_multiple(TrainConfig(pad_to_multiple_of=8), torch.device("cpu")) == 8


def test_classification_logits_do_not_change_with_extra_padding():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = tiny_config("bert")
    config.num_labels = 3
    model = AutoModelForSequenceClassification.from_config(config).eval()
    texts = ["the cat sat on a mat", "a dog ran", "the dog sat on the cat and the mat"]
    split = tokenize(TextSplit(texts, [0, 1, 2]), make_tokenizer(), 64)
    plain, rounded = collate(split, [0, 1, 2], 0), collate(split, [0, 1, 2], 0, multiple=16)
    assert plain["input_ids"].shape[1] == max(split.lengths) and rounded["input_ids"].shape[1] == 16
    with torch.no_grad():
        a = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits
        b = model(input_ids=rounded["input_ids"], attention_mask=rounded["attention_mask"]).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("packed", [False, True])
def test_lm_loss_does_not_change_with_extra_padding(kind, packed):
    model, tokenizer = tiny_lm(kind), lm_tokenizer()
    rows = [{"text": "the cat sat on a mat"}, {"text": "a dog ran to the park and the cat sat"}, {"text": "hi"}]
    split = tokenize_lm(rows, tokenizer, 16, "text")
    if packed:
        split = pack(split, 16)
    indices = list(range(len(split)))
    plain = collate_lm(split, indices, tokenizer.pad_token_id)
    rounded = collate_lm(split, indices, tokenizer.pad_token_id, multiple=32)
    assert rounded["input_ids"].shape[1] == 32 > plain["input_ids"].shape[1]
    assert count_targets(plain) == count_targets(rounded)
    with torch.no_grad():
        assert lm_loss(model, rounded).item() == pytest.approx(lm_loss(model, plain).item(), abs=1e-5)


def test_evaluation_pads_to_the_device_default_and_scores_the_same(monkeypatch):
    """Evaluation rounds padding like training does (64 on GPUs); forced here on the CPU."""
    import lorafit.tasks.classification as evaluate_module
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = tiny_config("bert")
    config.num_labels = 3
    model = AutoModelForSequenceClassification.from_config(config).eval()
    texts = ["the cat sat on a mat", "a dog ran", "the dog sat on the cat and the mat", "cat"]
    split = tokenize(TextSplit(texts, [0, 1, 2, 0]), make_tokenizer(), 64)
    plain = evaluate_module.predict(model, split, 2, 0)
    widths = []
    original = evaluate_module.collate

    def recording_collate(*args, **kwargs):
        batch = original(*args, **kwargs)
        widths.append(batch["input_ids"].shape[1])
        return batch

    monkeypatch.setattr(evaluate_module, "default_pad_multiple", lambda device: 8)
    monkeypatch.setattr(evaluate_module, "collate", recording_collate)
    rounded = evaluate_module.predict(model, split, 2, 0)
    longest = max(split.lengths)
    assert sorted(split.lengths) == [2, 4, 7, 10]
    assert widths == [longest, 8]  # [10, 7] would round to 16 but the longest caps it; [4, 2] rounds up to 8
    torch.testing.assert_close(plain.probs, rounded.probs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_right_padded_lm_batches_score_like_each_row_alone(kind):
    """lm_loss drops the padding mask of right-padded batches; every row must still score as it
    does with no padding at all."""
    from lorafit.lm import right_padded

    model, tokenizer = tiny_lm(kind), lm_tokenizer()
    rows = [{"text": "the cat sat on a mat"}, {"text": "a dog ran to the park and the cat sat"}, {"text": "hi"}]
    split = tokenize_lm(rows, tokenizer, 16, "text")
    batch = collate_lm(split, [0, 1, 2], tokenizer.pad_token_id)
    assert right_padded(batch["attention_mask"]) and not bool(batch["attention_mask"].all())
    assert not right_padded(batch["attention_mask"].flip(1)) and not right_padded(None)
    with torch.no_grad():
        alone = sum(lm_loss(model, collate_lm(split, [i], tokenizer.pad_token_id)).item() for i in range(3))
        assert lm_loss(model, batch).item() == pytest.approx(alone, abs=1e-5)


def test_evaluation_batches_go_longest_first_and_cover_every_example_once():
    from lorafit.data import eval_order

    lengths = [5, 17, 3, 17, 9, 12, 1, 8, 30, 2]
    batches = eval_order(lengths, 3)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    widths = [max(lengths[i] for i in batch) for batch in batches]
    assert widths == sorted(widths, reverse=True) and widths[0] == 30
    assert [len(b) for b in batches] == [3, 3, 3, 1]


def padding_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    """Pad tokens over all tokens when each batch is padded to its longest example."""
    real = sum(lengths[i] for batch in batches for i in batch)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return 1 - real / padded


def test_length_grouped_batches_have_little_padding_and_keep_every_example():
    # Newsgroups-like lengths: long-tailed, truncated at 256 tokens (the median is ~85).
    lengths = np.clip(np.random.default_rng(0).lognormal(4.5, 0.8, 3000).astype(int), 8, 256).tolist()
    orders = {}
    for epoch in range(3):
        grouped = batch_order(lengths, 16, seed=0, epoch=epoch, group_by_length=True)
        shuffled = batch_order(lengths, 16, seed=0, epoch=epoch, group_by_length=False)
        for batches in (grouped, shuffled):
            # Each epoch uses every example exactly once, in batches of 16 but one (3000 = 187 × 16 + 8).
            assert sorted(i for batch in batches for i in batch) == list(range(3000))
            assert sorted(len(batch) for batch in batches) == [8] + [16] * 187
        grouped_padding, shuffled_padding = padding_fraction(grouped, lengths), padding_fraction(shuffled, lengths)
        assert grouped_padding < 0.03, epoch  # 1.6-1.7% here
        assert shuffled_padding > 0.5 and grouped_padding < shuffled_padding / 10, epoch  # ~56% shuffled
        assert batch_order(lengths, 16, seed=0, epoch=epoch, group_by_length=True) == grouped  # (seed, epoch) decide
        orders[epoch] = grouped
    # Sorting within windows of 64 batches, not the whole split, keeps batches random: few pairs of
    # examples share a batch again the next epoch (18% here; 49% if the whole split were sorted).
    mates = [{(i, j) for batch in orders[epoch] for i in batch for j in batch if i < j} for epoch in (0, 1)]
    assert len(mates[0] & mates[1]) / len(mates[0]) < 0.3
    # The sorted batches are shuffled again: long and short ones alternate at random through the epoch
    # (the next batch is longer about half the time; never, within a window, without that shuffle).
    longest = [max(lengths[i] for i in batch) for batch in orders[0]]
    assert 0.3 < np.mean([b > a for a, b in pairwise(longest)]) < 0.7
