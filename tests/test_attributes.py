"""Attribute classifiers (`giaudit attribute train`) and their use in an audit: the mechanism, on fast data.

The UTKFace figures (race >= 0.60, gender >= 0.85 held out) are a benchmark:
benchmarks/attributes_utkface.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from giaudit.cli import main
from giaudit.config import parse_config
from giaudit.errors import ConfigError
from giaudit.metrics import is_metric
from giaudit.metrics.attributes import AttributeClassifier, score_attributes


@pytest.fixture(scope="module")
def digit_clf(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clf") / "digit"
    torch.set_num_threads(1)
    assert main(["attribute", "train", "--data", "digits", "--label", "label", "--out", str(out), "--size", "16",
                 "--epochs", "3", "--width", "8", "--quiet"]) == 0
    return out


def test_train_saves_weights_and_description(digit_clf: Path) -> None:
    cfg = json.loads((digit_clf / "classifier.json").read_text())
    assert (digit_clf / "classifier.safetensors").is_file()
    assert cfg["label"] == "label" and cfg["num_classes"] == 10 and cfg["pool_every"] == 5
    assert "index % 5 == 0" in cfg["excluded"]
    # 1 797 digits, the fifth that is the audited pool left out, 20 % of the rest held out.
    assert cfg["n_train"] + cfg["n_heldout"] == 1797 - 360 and cfg["n_heldout"] == round(0.2 * 1437)
    assert cfg["heldout_accuracy"] > 0.5 > cfg["majority_accuracy"]


def test_scores_reconstructions_against_originals_and_chance(digit_clf: Path) -> None:
    from giaudit.data import load_digits

    clf = AttributeClassifier.load(digit_clf)
    ds = load_digits(size=32)
    idx = np.arange(0, 200, 5)  # pool images: the classifier never saw them
    x, y = ds.images[idx].numpy(), ds.labels[idx].tolist()
    same, rows, ref, notes = score_attributes(x, x, [], y, {"digit": clf})
    assert same["attribute_digit_accuracy"] == ref["attribute_digit_accuracy"] > 0.5
    assert same["attribute_digit_chance"] == clf.chance
    assert rows[0]["attribute_digit_true"] == str(y[0]) and "held-out accuracy" in notes[0]
    noise = np.random.default_rng(0).random(x.shape).astype(np.float32)
    leak, _, ref2, _ = score_attributes(x, noise, [], y, {"digit": clf})
    assert leak["attribute_digit_accuracy"] < 0.35 and ref2 == ref
    assert is_metric("attribute_digit_accuracy") and is_metric("reference_attribute_digit_accuracy")
    assert is_metric("reid_rank1") and not is_metric("attribute_digit")


def test_config_names_the_missing_classifier(tmp_path: Path, digit_clf: Path) -> None:
    cfg = {"output": {"attributes": {"race": str(tmp_path / "nowhere")}}}
    with pytest.raises(ConfigError, match=r"output.attributes.race: .*`giaudit attribute train"):
        parse_config(cfg, str(tmp_path / "a.toml"))
    spec = parse_config({"output": {"attributes": {"digit": str(digit_clf)}}}, str(tmp_path / "a.toml"))
    assert (spec.output.attributes or {})["digit"] == str(digit_clf)


def test_cli_rejects_a_bad_label(tmp_path: Path, capsys) -> None:
    assert main(["attribute", "train", "--data", "digits", "--label", "race", "--out", str(tmp_path)]) == 2
    assert "--label" in capsys.readouterr().err
