"""deepface face analyzer: the predictors Li et al. 2023 (user-level gradient inversion) used for Table 1b (DeepFace).

Detection, gender, age, race and identity through the deepface package
(``pip install deepface`` plus an engine: ``DEEPFACE_BACKEND_ENGINE`` = tf,
pytorch or onnx). Weights are read from ``$DEEPFACE_HOME/.deepface/weights/``
(deepface's own layout, e.g. ``gender_model_weights.pth``,
``age_model_weights.pth``, ``race_model_single_batch.pth``,
``vgg_face_weights.pth`` for the pytorch engine; `weights_dir` resolves the
folder). giaudit never lets deepface download: while the adapter runs,
deepface's downloader is replaced by a check that raises
`FaceBackendUnavailable` naming the missing file and the
``giaudit weights fetch`` command that puts it there (`FETCH_NAMES`).

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from giaudit.errors import ConfigError
from giaudit.metrics.faces.base import CAPABILITIES, FaceAnalysis, FaceAnalyzer, FaceBackendUnavailable

INSTALL_HINT = "pip install --no-deps deepface && pip install 'giaudit[deepface]'"

#: deepface weight files (stem; the suffix depends on the engine) -> the `giaudit weights fetch` name.
FETCH_NAMES = {
    "age_model_weights": "deepface-age",
    "gender_model_weights": "deepface-gender",
    "race_model_single_batch": "deepface-race",
    "vgg_face_weights": "deepface-vggface",
    "facenet_weights": "deepface-facenet",
}

RACE_TO_UTK = {"white": 0, "black": 1, "asian": 2, "indian": 3, "middle eastern": 4, "latino hispanic": 4}
ENGINES = ("tf", "tensorflow", "pytorch", "onnx")


def weights_dir(home: str | os.PathLike[str] | None = None) -> Path:
    """``<home>/.deepface/weights``: deepface's layout, home defaulting to $DEEPFACE_HOME, else the user's home."""
    if home is None:
        home = os.environ.get("DEEPFACE_HOME", os.path.expanduser("~"))  # as deepface's folder_utils
    return Path(home).expanduser() / ".deepface" / "weights"


def engine_in_use() -> str:
    """The engine deepface runs on in this process ("tensorflow", "pytorch" or "onnx"): deepface's own choice
    (DEEPFACE_BACKEND_ENGINE, else the first installed of tensorflow, torch, onnxruntime).

    Raises FaceBackendUnavailable when deepface is not installed or the enforced engine is not.
    """
    if importlib.util.find_spec("deepface") is None:
        raise FaceBackendUnavailable(f"the deepface package is not installed: run `{INSTALL_HINT}`")
    from deepface.commons import backend_utils

    try:
        return str(backend_utils.get_backend_engine())
    except ValueError as exc:
        raise FaceBackendUnavailable(f"deepface: {exc}") from exc


def fetch_hint(file_name: str) -> str:
    """The command that puts a deepface weight file where deepface reads it."""
    name = FETCH_NAMES.get(Path(file_name).stem)
    return f"`giaudit weights fetch {name}`" if name else "deepface's release page"


class DeepFaceAnalyzer(FaceAnalyzer):
    """deepface adapter. ``home`` overrides $DEEPFACE_HOME; ``engine`` sets DEEPFACE_BACKEND_ENGINE."""

    name = "deepface"
    provides = frozenset(CAPABILITIES)
    identity_metric = "cosine"

    def __init__(self, *, model_name: str = "VGG-Face", detector_backend: str = "opencv",
                 home: str | os.PathLike[str] | None = None, engine: str | None = None,
                 working_size: int = 160, actions: tuple[str, ...] = ("gender", "age", "race")) -> None:
        if importlib.util.find_spec("deepface") is None:
            raise FaceBackendUnavailable(f"output.semantic = 'deepface' needs the deepface package: run "
                                         f"`{INSTALL_HINT}` (torch is its engine), then `giaudit weights fetch` its "
                                         "weights; or use semantic = 'offline'")
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
            from deepface.modules import verification

            self.engine_in_use = engine_in_use()
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
            target = weights_dir() / file_name
            if target.is_file():
                return str(target)
            raise FaceBackendUnavailable(
                f"{target}: deepface weight file missing; audits never download: run {fetch_hint(file_name)} "
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

    def _analyze_frames(self, frames: list[np.ndarray], want: frozenset[str]) -> list[FaceAnalysis]:
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
