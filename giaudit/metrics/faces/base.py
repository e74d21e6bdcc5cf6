"""The face-analyzer interface shared by the offline and deepface backends.

Semantic leakage (Li et al. 2023, "Exploring User-level Gradient Inversion with a Diffusion Prior", Table 1b): a
reconstruction leaks when a face detector finds a face in it, when a face
recognizer says it is the same person as the original, and when attribute
predictors read the same gender, race and age from it. Threat model: the
analyzer plays the curious server's post-processing step; it only ever sees
the reconstructions (and, to score them, the originals the auditor holds).

An analyzer turns a batch of images (float N,C,H,W in [0, 1], grey or RGB,
typically 32 to 64 px) into one `FaceAnalysis` per image. Images are converted
to 8-bit RGB and upsampled to the analyzer's working size first (dlib's HOG
detector looks for faces of about 80 px and larger), see `to_rgb_uint8`.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from giaudit.errors import ConfigError, DataError

#: What an analyzer may provide; `FaceAnalyzer.provides` is a subset.
CAPABILITIES = ("detection", "identity", "gender", "age", "race")

#: Analyses an analyzer keeps (a few KB each: an embedding and a few fields), oldest dropped first.
MEMO_SIZE = 4096

#: Race codes follow UTKFace's file names (giaudit.data.UTK_RACES).
RACES = ("white", "black", "asian", "indian", "others")

#: Gender codes follow UTKFace: 0 = male, 1 = female.
GENDERS = ("male", "female")


class FaceBackendUnavailable(ConfigError):
    """A face backend's packages or weight files are missing; the message says what to install."""


@dataclass(frozen=True)
class FaceAnalysis:
    """What one analyzer read from one image.

    When no face is detected the attributes are still read from the whole
    frame (giaudit's images are face crops, so the frame is the face box);
    ``detected`` tells the two cases apart.
    """

    detected: bool
    box: tuple[int, int, int, int] | None = None  # left, top, right, bottom at the working size
    embedding: np.ndarray | None = None           # identity embedding (backend-specific space)
    gender: int | None = None                     # 0 male, 1 female
    gender_confidence: float | None = None        # probability of the predicted gender
    age: float | None = None                      # years
    race: int | None = None                       # index into RACES


class FaceAnalyzer(ABC):
    """One face-analysis backend.

    Subclasses set ``name``, ``provides`` (a subset of CAPABILITIES),
    ``working_size`` (the square side, in pixels, images are upsampled to) and
    ``identity_threshold`` with ``identity_metric`` (the backend's own
    verification rule: a pair is the same person when its distance is below
    the threshold).
    """

    name: str = "abstract"
    provides: frozenset[str] = frozenset()
    working_size: int = 128
    identity_metric: str = "euclidean"   # "euclidean" | "cosine" (cosine distance = 1 - cosine similarity)
    identity_threshold: float = 0.6

    def analyze(self, images: np.ndarray, *, what: Collection[str] = CAPABILITIES) -> list[FaceAnalysis]:
        """One FaceAnalysis per image; ``what`` limits the work to some capabilities.

        Analyses are memoised by frame content and ``what``: an audit scores the same originals against every
        attack's reconstructions, and identical frames within a batch are analysed once.
        """
        frames = self.rgb_images(images)
        want = frozenset(what)
        memo: dict[tuple[bytes, frozenset[str]], FaceAnalysis] = self.__dict__.setdefault("_memo", {})
        keys = [(hashlib.blake2b(f.tobytes(), digest_size=16, key=repr(f.shape).encode()).digest(), want)
                for f in frames]
        todo = {k: f for k, f in zip(keys, frames) if k not in memo}
        if todo:
            fresh = self._analyze_frames(list(todo.values()), want)
            if len(fresh) != len(todo):
                raise DataError(f"analyzer {self.name} returned {len(fresh)} results for {len(todo)} images")
            while memo and len(memo) + len(todo) > MEMO_SIZE:
                memo.pop(next(iter(memo)))
            memo.update(zip(todo, fresh))
        return [memo[k] for k in keys]

    @abstractmethod
    def _analyze_frames(self, frames: list[np.ndarray], want: frozenset[str]) -> list[FaceAnalysis]:
        """One FaceAnalysis per H,W,3 uint8 RGB frame (from `rgb_images`), limited to the capabilities ``want``."""

    def rgb_images(self, images: np.ndarray) -> list[np.ndarray]:
        """Validate a float N,C,H,W batch and return it as the H,W,3 uint8 RGB frames the backend is fed.

        Every backend starts from this: the frames are upsampled to ``working_size`` by
        `to_rgb_uint8` (bicubic), so all of them see the images the same way.
        """
        return [to_rgb_uint8(image, self.working_size) for image in check_images(images)]

    def describe(self) -> str:
        """One line naming the models and the image size they are fed."""
        return f"{self.name}: images upsampled (bicubic) to {self.working_size}x{self.working_size} RGB"

    # -- identity ------------------------------------------------------------------------
    def identity_distance(self, a: np.ndarray, b: np.ndarray) -> float:
        if self.identity_metric == "cosine":
            return 1.0 - cosine_similarity(a, b)
        return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))

    def same_identity(self, a: np.ndarray, b: np.ndarray) -> bool:
        return self.identity_distance(a, b) < self.identity_threshold


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(a @ b / (na * nb))


def check_images(images: np.ndarray, what: str = "images") -> np.ndarray:
    """Validate a float N,C,H,W batch (C = 1 or 3) and return it as float32."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise DataError(f"{what}: expected N,C,H,W images with 1 or 3 channels, got shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{what}: expected float images in [0, 1], got dtype {arr.dtype}")
    return arr.astype(np.float32, copy=False)


def to_rgb_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """One C,H,W float image in [0, 1] -> H,W,3 uint8 RGB of side ``size``.

    Grey images are repeated over three channels. Upsampling is bicubic
    (PIL), which keeps edges sharper than bilinear for the HOG detector; the
    image is never downsampled below its size unless it is larger.
    """
    from PIL import Image

    x = np.nan_to_num(np.asarray(image, np.float32), nan=0.0)
    u8 = (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)
    if u8.shape[2] == 1:
        u8 = np.repeat(u8, 3, axis=2)
    if u8.shape[0] != size or u8.shape[1] != size:
        u8 = np.asarray(Image.fromarray(u8).resize((size, size), Image.Resampling.BICUBIC))
    return np.ascontiguousarray(u8)
