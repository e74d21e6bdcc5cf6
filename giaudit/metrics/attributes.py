"""Attribute inference for any label: what can the server read off a reconstruction?

Face backends ship gender and age models only (no race model works offline),
and a user auditing digits, medical images or their own labels gets nothing
from them. Here the auditor trains a small classifier for any label of their
data (`giaudit attribute train --data FOLDER --label race --out DIR`) on
images that exclude the audited client pool (index % pool_every != 0, the
same convention as `giaudit prior train`), so the classifier never saw the
images it is later asked about. It is saved as ``DIR/classifier.safetensors``
+ ``DIR/classifier.json`` (architecture, classes, input size, held-out
accuracy and the majority-class rate).

An audit with ``output.attributes = { race = "DIR" }`` then reports, per
attribute: the classifier's accuracy on the reconstructions
(``attribute_race_accuracy``), the same classifier on the originals (the
reference, ``reference_attribute_race_accuracy``: the most an attacker with
this classifier could get) and chance (``attribute_race_chance``: the
majority-class rate of its training data). Leakage is accuracy above chance;
a reconstruction at the reference leaks the attribute as well as the photo.

Threat model: the server's post-processing with a classifier trained on
surrogate data of the same distribution (SoK class D knowledge, but used only
to *measure*: the attack itself never sees it).
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from giaudit.data import ImageDataset, load_dataset
from giaudit.errors import ConfigError, DataError
from giaudit.io import atomic_write_text

FORMAT = "giaudit-attribute-classifier/1"
WEIGHTS, CONFIG = "classifier.safetensors", "classifier.json"
UTK_FIELDS = ("gender", "race", "age")
UTK_CLASSES = {"gender": ["male", "female"], "race": ["white", "black", "asian", "indian", "others"],
               "age": [f"{10 * d}-{10 * d + 9}" for d in range(9)] + ["90+"]}


class AttributeNet(nn.Module):
    """Three conv blocks (conv-BN-ReLU-pool), global average pooling, dropout, a linear head."""

    def __init__(self, *, channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        w = width
        layers: list[nn.Module] = []
        c = channels
        for out in (w, 2 * w, 4 * w):
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


@dataclass
class AttributeClassifier:
    """A trained classifier and its JSON description (see the module docstring)."""

    model: AttributeNet
    config: dict[str, Any]

    @property
    def label(self) -> str:
        return str(self.config["label"])

    @property
    def chance(self) -> float:
        return float(self.config["majority_accuracy"])

    @classmethod
    def load(cls, folder: str | Path) -> AttributeClassifier:
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg_path = folder / CONFIG
        if not cfg_path.is_file():
            raise DataError(f"{folder}: no {CONFIG}; train one with `giaudit attribute train --out {folder}`")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{cfg_path}: unreadable classifier description ({exc})") from exc
        if cfg.get("format") != FORMAT:
            raise DataError(f"{cfg_path}: not a giaudit attribute classifier (format {cfg.get('format')!r})")
        model = AttributeNet(channels=int(cfg["channels"]), num_classes=int(cfg["num_classes"]),
                             width=int(cfg["width"]))
        try:
            model.load_state_dict(load_file(str(folder / WEIGHTS)))
        except (OSError, RuntimeError) as exc:
            raise DataError(f"{folder / WEIGHTS}: cannot load the classifier weights ({exc})") from exc
        model.eval()
        return cls(model, cfg)

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor, batch: int = 256) -> np.ndarray:
        """Class index per image (N,C,H,W floats in [0, 1]; resized and converted to the classifier's input)."""
        x = torch.as_tensor(np.asarray(images, np.float32))
        x = fit_input(x, int(self.config["size"]), int(self.config["channels"]))
        self.model.eval()
        out = [self.model(x[i:i + batch]).argmax(1) for i in range(0, x.shape[0], batch)]
        return torch.cat(out).numpy() if out else np.zeros(0, np.int64)

    def truth(self, meta: Mapping[str, Any] | None, label: int) -> int | None:
        """The true class of one original: the data label, or the attribute parsed from its file name."""
        if self.label == "label":
            return int(label)
        if not meta or meta.get(self.label) is None:
            return None
        v = int(meta[self.label])
        return min(v // 10, 9) if self.label == "age" else v


def fit_input(x: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    x = torch.nan_to_num(x.float(), nan=0.0).clamp(0.0, 1.0)
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x[:, :1].expand(-1, channels, -1, -1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > size)
    return x.contiguous()


def score_attributes(original: np.ndarray, reconstruction: np.ndarray, metas: Sequence[Mapping[str, Any] | None],
                     labels: Sequence[int], classifiers: Mapping[str, AttributeClassifier]
                     ) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, float], list[str]]:
    """Accuracy of each classifier on the reconstructions, on the originals (reference) and chance.

    Row i of ``original`` and ``reconstruction`` is matched pair i; ``metas[i]`` / ``labels[i]`` describe
    original i. Returns (aggregate, per-pair rows, reference, notes).
    """
    n = len(original)
    aggregate: dict[str, float] = {}
    reference: dict[str, float] = {}
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    notes: list[str] = []
    for name, clf in classifiers.items():
        truth = [clf.truth(metas[i] if i < len(metas) else None, labels[i]) for i in range(n)]
        keep = [i for i, t in enumerate(truth) if t is not None]
        if not keep:
            notes.append(f"attribute {name}: no original carries the label {clf.label!r}; not scored")
            continue
        pred_r = clf.predict(reconstruction[keep])
        pred_o = clf.predict(original[keep])
        t = np.asarray([truth[i] for i in keep])
        aggregate[f"attribute_{name}_accuracy"] = float(np.mean(pred_r == t))
        aggregate[f"attribute_{name}_chance"] = clf.chance
        reference[f"attribute_{name}_accuracy"] = float(np.mean(pred_o == t))
        classes = clf.config.get("classes") or []
        for k, i in enumerate(keep):
            rows[i][f"attribute_{name}_true"] = _class_name(classes, int(t[k]))
            rows[i][f"attribute_{name}_pred"] = _class_name(classes, int(pred_r[k]))
        notes.append(f"attribute {name}: classifier {clf.config.get('source_dir', '')} "
                     f"(held-out accuracy {clf.config['heldout_accuracy']:.2f}, majority class "
                     f"{clf.chance:.2f}, {clf.config['size']} px)")
    return aggregate, rows, reference, notes


def _class_name(classes: Sequence[str], k: int) -> str | int:
    return classes[k] if 0 <= k < len(classes) else k


# --------------------------------------------------------------------------- training

def _load_training_data(data: str, label: str, size: int, channels: int | None,
                        limit: int | None) -> tuple[ImageDataset, list[str]]:
    """The dataset with `label` as its class, and the class names."""
    path = Path(data).expanduser()
    if data in ("mnist5k", "digits", "lfw_subset"):
        if label != "label":
            raise ConfigError(f"--label: {data} has only its class label; use --label label")
        ds = load_dataset(data, size=size, channels=channels)
        names = [str(k) for k in range(ds.spec.num_classes)] if data != "lfw_subset" else ["not a face", "face"]
        return ds, names
    if not path.is_dir():
        raise ConfigError(f"--data: {data} is neither a built-in source (mnist5k, digits, lfw_subset) nor a folder")
    has_subfolders = any(p.is_dir() for p in path.iterdir())
    if has_subfolders:
        if label not in ("label", "subfolder"):
            raise ConfigError(f"--label: {path} holds one subfolder per class; use --label label")
        ds = load_dataset("folder", path=str(path), size=size, channels=channels, label_parser="subfolder",
                          limit=limit)
        names = list(dict.fromkeys(str(m.get("class_name")) for m in ds.meta))
        return ds, names
    if label not in UTK_FIELDS:
        raise ConfigError(f"--label: {label!r} unknown for UTKFace-style names (AGE_GENDER_RACE_*.jpg); "
                          f"use one of {', '.join(UTK_FIELDS)}")
    ds = load_dataset("folder", path=str(path), size=size, channels=channels, label_parser="utkface",
                      label_field=label, limit=limit)
    return ds, UTK_CLASSES[label]


def train_attribute_classifier(data: str, label: str, out: str | Path, *, size: int = 32,
                               channels: int | None = None, epochs: int = 30, width: int = 32,
                               pool_every: int = 5, heldout: float = 0.2, seed: int = 0, lr: float = 2e-3,
                               batch_size: int = 64, flip: bool | None = None, limit: int | None = None,
                               log: Any = None) -> dict[str, Any]:
    """Train, evaluate on a held-out split, save; return the JSON description."""
    if epochs < 1 or width < 1 or pool_every < 1 or not 0.0 < heldout < 1.0:
        raise ConfigError("attribute train: epochs, width and pool_every must be >= 1, 0 < heldout < 1")
    start = time.perf_counter()
    ds, classes = _load_training_data(data, label, size, channels, limit)
    idx = torch.arange(len(ds))
    usable = idx[idx % pool_every != 0] if pool_every > 1 else idx
    gen = torch.Generator().manual_seed(seed)
    usable = usable[torch.randperm(usable.numel(), generator=gen)]
    n_test = max(1, int(round(heldout * usable.numel())))
    test_idx, train_idx = usable[:n_test], usable[n_test:]
    if train_idx.numel() < 2:
        raise DataError(f"--data: only {usable.numel()} images outside the audited pool; need more to train")
    x_train, y_train = ds.images[train_idx], ds.labels[train_idx]
    x_test, y_test = ds.images[test_idx], ds.labels[test_idx]
    k = ds.spec.num_classes
    if flip is None:
        flip = not data.startswith(("mnist", "digits"))  # a mirrored face is the same face; a mirrored 7 is not
    torch.manual_seed(seed)
    model = AttributeNet(channels=ds.spec.channels, num_classes=k, width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    counts = torch.bincount(y_train, minlength=k).float()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(x_train.shape[0], generator=gen)
        total = 0.0
        for s in range(steps_per_epoch):
            b = perm[s * batch_size:(s + 1) * batch_size]
            xb, yb = x_train[b], y_train[b]
            if flip:
                mask = torch.rand(xb.shape[0], generator=gen) < 0.5
                xb = torch.where(mask[:, None, None, None], xb.flip(-1), xb)
            shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=(shift[0], shift[1]), dims=(2, 3))
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * xb.shape[0]
        if log is not None:
            log(f"epoch {epoch + 1}/{epochs}: loss {total / x_train.shape[0]:.3f}")
    clf_cfg = {"format": FORMAT, "attribute": label, "label": label if label != "subfolder" else "label",
               "classes": classes, "num_classes": k, "size": int(ds.spec.height), "channels": int(ds.spec.channels),
               "width": width, "data": str(data), "excluded": f"the audited pool (index % {pool_every} == 0)"
               if pool_every > 1 else "nothing (pool_every = 1)", "pool_every": pool_every,
               "n_train": int(train_idx.numel()), "n_heldout": int(test_idx.numel()), "epochs": epochs, "seed": seed}
    clf = AttributeClassifier(model.eval(), clf_cfg)
    acc = float(np.mean(clf.predict(x_test) == y_test.numpy()))
    majority = float(counts.max() / counts.sum())
    clf_cfg.update(heldout_accuracy=acc, majority_accuracy=majority, chance_uniform=1.0 / k,
                   train_s=time.perf_counter() - start)
    save_classifier(clf, out)
    return clf_cfg


def save_classifier(clf: AttributeClassifier, out: str | Path) -> None:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in clf.model.state_dict().items()}, str(tmp))
    tmp.replace(out / WEIGHTS)
    atomic_write_text(out / CONFIG, json.dumps(clf.config, indent=2) + "\n")


__all__ = ["AttributeClassifier", "AttributeNet", "score_attributes", "train_attribute_classifier",
           "save_classifier", "fit_input", "FORMAT"]
