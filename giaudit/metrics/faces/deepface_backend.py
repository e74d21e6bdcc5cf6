"""deepface face analyzer: the predictors seed 003 used for Table 1b (DeepFace).

Detection, gender, age, race and identity through the deepface package
(``pip install deepface`` plus an engine: ``DEEPFACE_BACKEND_ENGINE`` = tf,
pytorch or onnx). Weights are read from ``$DEEPFACE_HOME/.deepface/weights/``
(deepface's own layout, e.g. ``gender_model_weights.pth``,
``age_model_weights.pth``, ``race_model_single_batch.pth``,
``vgg_face_weights.pth`` for the pytorch engine). giaudit never lets deepface
download: while the adapter runs, deepface's downloader is replaced by a
check that raises `FaceBackendUnavailable` naming the missing file.

Threat model: post-processing of the server's reconstructions, as for the
offline backend. Images are upsampled bicubically to ``working_size`` (160 px
by default) and passed as BGR uint8, as deepface expects; deepface then crops
the face and resizes it to each model's input (224x224 for the demography
models). Identity uses deepface's pre-tuned threshold for
(model_name, cosine). deepface's race labels map onto UTKFace's codes:
white 0, black 1, asian 2, indian 3, middle eastern and latino hispanic 4
(UTKFace "others").
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from giaudit.errors import ConfigError
from giaudit.metrics.faces.base import CAPABILITIES, FaceAnalysis, FaceAnalyzer, FaceBackendUnavailable

RACE_TO_UTK = {"white": 0, "black": 1, "asian": 2, "indian": 3, "middle eastern": 4, "latino hispanic": 4}
ENGINES = ("tf", "tensorflow", "pytorch", "onnx")


class DeepFaceAnalyzer(FaceAnalyzer):
    """deepface adapter. ``home`` overrides $DEEPFACE_HOME; ``engine`` sets DEEPFACE_BACKEND_ENGINE."""

    name = "deepface"
    provides = frozenset(CAPABILITIES)
    identity_metric = "cosine"

    def __init__(self, *, model_name: str = "VGG-Face", detector_backend: str = "opencv",
                 home: str | os.PathLike[str] | None = None, engine: str | None = None,
                 working_size: int = 160, actions: tuple[str, ...] = ("gender", "age", "race")) -> None:
        if importlib.util.find_spec("deepface") is None:
            raise FaceBackendUnavailable("output.semantic = 'deepface' needs the deepface package: "
                                         "pip install deepface "
                                         "(and torch, tensorflow or onnxruntime as its engine), with its weight files "
                                         "in $DEEPFACE_HOME/.deepface/weights/; or use semantic = 'offline'")
        if engine is not None and engine not in ENGINES:
            raise ConfigError(f"faces.engine: {engine!r} unknown; use one of {', '.join(ENGINES)}")
        bad = [a for a in actions if a not in ("gender", "age", "race")]
        if bad:
            raise ConfigError(f"faces.actions: {bad} unknown; use gender, age, race")
        self.home = str(Path(home).expanduser()) if home is not None else None
        self.engine = "tensorflow" if engine == "tf" else engine
        self.model_name = model_name
        self.detector_backend = detector_backend
        self.working_size = int(working_size)
        self.actions = tuple(actions)
        self.provides = frozenset({"detection", "identity", *self.actions})
        with self._env():
            from deepface.commons import backend_utils
            from deepface.modules import verification

            try:
                self.engine_in_use = backend_utils.get_backend_engine()
            except ValueError as exc:
                raise FaceBackendUnavailable(f"deepface: {exc}") from exc
            if self.engine and self.engine_in_use != self.engine:
                raise ConfigError(f"faces.engine: deepface already runs on {self.engine_in_use} in this process; "
                                  f"cannot switch to {self.engine}")
            try:
                self.identity_threshold = float(verification.find_threshold(model_name, "cosine"))
            except ValueError as exc:
                raise ConfigError(f"faces.model_name: {exc}") from exc

    def describe(self) -> str:
        return (f"deepface ({self.engine_in_use} engine, detector {self.detector_backend}, identity {self.model_name} "
                f"[cosine distance < {self.identity_threshold}], {', '.join(self.actions)} models); images upsampled "
                f"bicubic to {self.working_size}x{self.working_size} RGB, deepface resizes faces to 224x224")

    @contextlib.contextmanager
    def _env(self) -> Iterator[None]:
        """Point deepface at our home/engine and forbid downloads while it runs."""
        saved = {k: os.environ.get(k) for k in ("DEEPFACE_HOME", "DEEPFACE_BACKEND_ENGINE")}
        if self.home is not None:
            os.environ["DEEPFACE_HOME"] = self.home
        if self.engine is not None:
            os.environ["DEEPFACE_BACKEND_ENGINE"] = self.engine
        from deepface.commons import weight_utils

        real = weight_utils.download_weights_if_necessary

        def no_download(file_name: str, source_url: Any = None, compress_type: Any = None) -> str:
            from deepface.commons import folder_utils

            target = Path(folder_utils.get_deepface_home()) / ".deepface" / "weights" / file_name
            if target.is_file():
                return str(target)
            raise FaceBackendUnavailable(
                f"{target}: deepface weight file missing; giaudit never downloads it: place the file there "
                "(DEEPFACE_HOME sets the folder) or use semantic = 'offline'")

        weight_utils.download_weights_if_necessary = no_download
        try:
            yield
        finally:
            weight_utils.download_weights_if_necessary = real
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    @staticmethod
    def _largest(objs: list[dict[str, Any]], region_key: str) -> dict[str, Any]:
        def area(o: dict[str, Any]) -> float:
            r = o.get(region_key) or {}
            return float(r.get("w", 0)) * float(r.get("h", 0))
        detected = [o for o in objs if float(o.get("face_confidence") or 0.0) > 0.0]
        return max(detected or objs, key=area)

    def analyze(self, images: np.ndarray, *, what: Collection[str] = CAPABILITIES) -> list[FaceAnalysis]:
        frames = self.rgb_images(images)
        want = set(what)
        actions = [a for a in self.actions if a in want]
        out: list[FaceAnalysis] = []
        with self._env():
            from deepface import DeepFace

            for rgb in frames:
                bgr = np.ascontiguousarray(rgb[:, :, ::-1])
                row: dict[str, Any] = {"detected": False}
                detected_by: list[bool] = []
                if actions:
                    objs = DeepFace.analyze(bgr, actions=actions, enforce_detection=False,
                                            detector_backend=self.detector_backend, silent=True)
                    o = self._largest(list(objs), "region")
                    detected_by.append(float(o.get("face_confidence") or 0.0) > 0.0)
                    reg = o.get("region") or {}
                    if reg:
                        row["box"] = (int(reg["x"]), int(reg["y"]), int(reg["x"] + reg["w"] - 1),
                                      int(reg["y"] + reg["h"] - 1))
                    if "gender" in o:
                        pw = float(o["gender"]["Woman"]) / 100.0
                        row["gender"] = 1 if o["dominant_gender"] == "Woman" else 0
                        row["gender_confidence"] = pw if row["gender"] == 1 else 1.0 - pw
                    if "age" in o:
                        row["age"] = float(o["age"])
                    if "dominant_race" in o:
                        row["race"] = RACE_TO_UTK[o["dominant_race"]]
                if "identity" in want:
                    objs = DeepFace.represent(bgr, model_name=self.model_name, enforce_detection=False,
                                              detector_backend=self.detector_backend)
                    o = self._largest(list(objs), "facial_area")
                    detected_by.append(float(o.get("face_confidence") or 0.0) > 0.0)
                    row["embedding"] = np.asarray(o["embedding"], np.float32)
                if not detected_by:
                    faces = DeepFace.extract_faces(bgr, detector_backend=self.detector_backend,
                                                   enforce_detection=False)
                    detected_by.append(any(float(f.get("confidence") or 0.0) > 0.0 for f in faces))
                row["detected"] = any(detected_by)
                if not row["detected"]:
                    row.pop("box", None)
                out.append(FaceAnalysis(**row))
        return out
