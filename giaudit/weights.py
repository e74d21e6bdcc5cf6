"""`giaudit weights fetch`: put published model weights where giaudit's loaders read them.

Audits and reports never download anything (reproducibility, air-gapped
users); this module is the one place that does, and only when a user runs
``giaudit weights fetch NAME... | all``. Each name in `REGISTRY` is one file:

- ``lpips-alexnet``: torchvision's ImageNet AlexNet, the trunk of LPIPS, into
  ``$TORCH_HOME/hub/checkpoints/`` (`giaudit.metrics.lpips.checkpoints_dir`).
- ``deepface-age``, ``-gender``, ``-race``, ``-vggface``, ``-facenet``: deepface's
  models for the engine deepface runs on (``.h5`` for tensorflow, ``.pth`` for
  pytorch, ``.onnx`` for onnx; `--engine` overrides), into
  ``$DEEPFACE_HOME/.deepface/weights/``
  (`giaudit.metrics.faces.deepface_backend.weights_dir`).

Integrity: every file is checked against a pinned SHA-256 before it takes its
final name. Where the hash comes from is recorded in `WeightFile.hash_source`.
Where no hash is published (deepface's pytorch and onnx files), the entry says
so (``sha256=None``) and fetching it needs ``--allow-unpinned`` (its SHA-256 is
then printed, not checked) or ``--sha256 HEX``.

Atomicity and resuming: a download goes to ``<file>.part`` beside the target;
an interrupted transfer leaves the ``.part`` and the next attempt (up to
`RETRIES` in one run, or the same command later) asks for the rest with an
HTTP Range request. When the bytes are complete they are fsynced, hashed and
renamed over the target; a hash mismatch deletes the ``.part`` and names the
expected and the actual hash, so a partial or corrupted file never looks
complete. ``--from DIR`` copies from a local folder (no network);
``--from URL`` downloads from a mirror (``URL/<file name>``).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from giaudit.errors import ConfigError, GiauditError
from giaudit.metrics.faces.base import FaceBackendUnavailable
from giaudit.metrics.faces.deepface_backend import FETCH_NAMES, engine_in_use, weights_dir
from giaudit.metrics.lpips import ALEXNET_FILE, checkpoints_dir

RETRIES = 3                 # attempts per source in one run before giving up (the .part is kept)
TIMEOUT_S = 60.0
_CHUNK = 1 << 20
USER_AGENT = "giaudit-weights-fetch"


class FetchError(GiauditError):
    """A weight file could not be fetched or failed its hash check; the message names the file and what to do."""


@dataclass(frozen=True)
class WeightFile:
    """One published weight file and where its loader reads it."""

    name: str                        # the `giaudit weights fetch` name
    file: str                        # file name the loader looks for
    home: str                        # "torch" ($TORCH_HOME/hub/checkpoints) | "deepface" ($DEEPFACE_HOME/...)
    urls: tuple[str, ...]            # canonical location first, then the publisher's mirrors
    sha256: str | None               # pinned hash; None: no published hash (see hash_source)
    hash_source: str                 # where the pinned hash comes from, or why there is none
    size: int | None = None          # bytes, when published
    engine: str | None = None        # deepface engine the file is for
    what: str = ""                   # one line for listings

    def dest_dir(self) -> Path:
        """The folder the loader reads (resolved now, from the environment)."""
        return checkpoints_dir() if self.home == "torch" else weights_dir()


_DF_RELEASE = "https://github.com/serengil/deepface_models/releases/download/v1.0/"
_DF_MIRROR = "https://huggingface.co/serengil/deepface/resolve/main/"
DEEPFACE_SUFFIX = {"tensorflow": ".h5", "pytorch": ".pth", "onnx": ".onnx"}
ENGINE_ALIASES = {"tf": "tensorflow", "tensorflow": "tensorflow", "pytorch": "pytorch", "torch": "pytorch",
                  "onnx": "onnx"}

# SHA-256 of deepface's tensorflow (.h5) files, as deepface itself listed them (the `weight_hashes` table
# of deepface/commons/functions.py in its early releases); the same values appear in third-party
# manifests that download these release files. No hash is published for the .pth and .onnx files.
_DF_H5_SHA256 = {
    "age_model_weights": "0aeff75734bfe794113756d2bfd0ac823d51e9422c8961125b570871d3c2b114",
    "gender_model_weights": "45513ce5678549112d25ab85b1926fb65986507d49c674a3d04b2ba70dba2eb5",
    "race_model_single_batch": "eb22b28b1f6dfce65b64040af4e86003a5edccb169a1a338470dde270b6f5e54",
    "vgg_face_weights": "759266b9614d0fd5d65b97bf716818b746cc77ab5944c7bffc937c6ba9455d8c",
    "facenet_weights": "90659cc97bfda5999120f95d8e122f4d262cca11715a21e59ba024bcce816d5c",
}
_DF_WHAT = {
    "age_model_weights": "deepface age regressor",
    "gender_model_weights": "deepface gender classifier",
    "race_model_single_batch": "deepface race classifier",
    "vgg_face_weights": "deepface VGG-Face identity model (the deepface backend's default)",
    "facenet_weights": "deepface FaceNet-128 identity model",
}

LPIPS_ALEXNET = WeightFile(
    name="lpips-alexnet", file=ALEXNET_FILE, home="torch",
    urls=(f"https://download.pytorch.org/models/{ALEXNET_FILE}",),
    sha256="7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02", size=244_408_911,
    hash_source="torchvision's published file; its name embeds the hash prefix 7be5be79 (torch.hub checks it)",
    what="torchvision ImageNet AlexNet, the LPIPS trunk")


def deepface_file(name: str, engine: str | None = None) -> WeightFile:
    """The registry entry of a deepface model for one engine (default: the engine deepface runs on)."""
    stem = next((s for s, n in FETCH_NAMES.items() if n == name), None)
    if stem is None:
        raise ConfigError(f"weights: {name!r} is not a deepface model; known: {', '.join(FETCH_NAMES.values())}")
    engine = _engine(engine)
    file = stem + DEEPFACE_SUFFIX[engine]
    pinned = _DF_H5_SHA256.get(stem) if engine == "tensorflow" else None
    source = ("deepface's own weight_hashes table (early releases)" if pinned else
              f"none published: deepface ships no hash for its {engine} files; fetch with --allow-unpinned "
              "(the SHA-256 is printed) or --sha256 HEX")
    return WeightFile(name=name, file=file, home="deepface", urls=(_DF_RELEASE + file, _DF_MIRROR + file),
                      sha256=pinned, hash_source=source, engine=engine, what=f"{_DF_WHAT[stem]} ({engine})")


def names() -> list[str]:
    return [LPIPS_ALEXNET.name, *FETCH_NAMES.values()]


def _engine(engine: str | None) -> str:
    if engine is None:
        try:
            return engine_in_use()
        except FaceBackendUnavailable as exc:
            raise ConfigError(f"weights: cannot tell which deepface engine to fetch for ({exc}); "
                              "pass --engine tensorflow|pytorch|onnx") from None
    key = ENGINE_ALIASES.get(engine.strip().lower())
    if key is None:
        raise ConfigError(f"--engine: {engine!r} unknown; use tensorflow, pytorch or onnx")
    return key


def resolve(requested: Iterable[str], *, engine: str | None = None) -> tuple[list[WeightFile], list[str]]:
    """Registry entries for names, in order, without duplicates, and notes on what ``all`` left out.

    ``all`` means every name; its deepface files are left out (with a note) when deepface is not
    installed and no engine is given. Naming a deepface file explicitly needs the engine.
    """
    req = list(requested)
    if not req:
        raise ConfigError(f"weights fetch: name at least one of: {', '.join(names())}, all")
    for name in req:
        if name != "all" and name not in names():
            raise ConfigError(f"weights: unknown name {name!r}; known: {', '.join(names())}, all")
    notes: list[str] = []
    wanted = list(dict.fromkeys(names() if "all" in req else req))
    if "all" in req and engine is None and any(n in FETCH_NAMES.values() for n in wanted):
        try:
            engine = engine_in_use()
        except FaceBackendUnavailable as exc:
            notes.append(f"deepface weights left out ({exc}; or pass --engine)")
            wanted = [n for n in wanted if n not in FETCH_NAMES.values()]
    out = [LPIPS_ALEXNET if n == LPIPS_ALEXNET.name else deepface_file(n, _engine(engine)) for n in wanted]
    return out, notes


# --------------------------------------------------------------------------- hashing and atomic files
def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _finish(part: Path, target: Path, expected: str | None, origin: str) -> str:
    """Hash the complete .part; rename it over ``target`` when it matches, else delete it and raise."""
    actual = sha256_of(part)
    if expected is not None and actual != expected.lower():
        part.unlink(missing_ok=True)
        raise FetchError(f"{target.name} from {origin}: SHA-256 mismatch: expected {expected.lower()}, got {actual}; "
                         "the file was discarded (nothing written)")
    os.replace(part, target)
    _fsync_dir(target.parent)
    return actual


# --------------------------------------------------------------------------- transfers
class _Short(Exception):
    """The server closed the transfer before the announced length."""


def _download(url: str, part: Path, log: Callable[[str], None]) -> None:
    """Append the rest of ``url`` to ``part`` (Range request when ``part`` has bytes); raise when cut short."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)  # http(s) only: the caller checks
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:   # nothing left to send: the .part is complete (the hash decides)
            return
        raise
    with resp:
        mode = "wb"
        if have and resp.status == 206:
            crange = resp.headers.get("Content-Range", "")
            if not crange.startswith(f"bytes {have}-"):
                part.unlink()   # the body is some other range: start over on the next attempt
                raise _Short(f"server answered Range bytes={have}- with Content-Range {crange!r}")
            mode = "ab"
            log(f"  resuming {part.name} at {have} bytes")
        elif have:
            log(f"  {url} ignores Range requests; starting {part.name} again")
            have = 0
        length = resp.headers.get("Content-Length")
        expected_total = have + int(length) if length is not None else None
        with part.open(mode) as fh:
            try:
                while chunk := resp.read(_CHUNK):
                    fh.write(chunk)
            finally:
                fh.flush()
                os.fsync(fh.fileno())
    got = part.stat().st_size
    if expected_total is not None and got < expected_total:
        raise _Short(f"connection closed at {got} of {expected_total} bytes")


_TRANSIENT = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, _Short)


def _from_urls(entry: WeightFile, urls: Iterable[str], part: Path, log: Callable[[str], None]) -> str:
    """Download into ``part`` from the first URL that works; return the URL used."""
    failures = []
    for url in urls:
        for attempt in range(1, RETRIES + 1):
            try:
                _download(url, part, log)
                return url
            except urllib.error.HTTPError as exc:
                failures.append(f"{url}: HTTP {exc.code} {exc.reason}")
                break           # a definite answer: try the next source
            except _TRANSIENT as exc:
                have = part.stat().st_size if part.exists() else 0
                reason = getattr(exc, "reason", None) or exc
                if attempt < RETRIES:
                    log(f"  {url}: interrupted at {have} bytes ({reason}); retrying with Range")
                    continue
                failures.append(f"{url}: interrupted at {have} bytes ({reason})")
    kept = (f"; {part} holds {part.stat().st_size} bytes: run the same command again to resume"
            if part.exists() and part.stat().st_size else "")
    raise FetchError(f"{entry.name}: could not download {entry.file}: {'; '.join(failures)}{kept}")


def _copy(src: Path, part: Path) -> None:
    part.unlink(missing_ok=True)
    with src.open("rb") as fin, part.open("wb") as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)
        fout.flush()
        os.fsync(fout.fileno())


@dataclass
class FetchResult:
    entry: WeightFile
    path: Path
    sha256: str
    action: str                     # "fetched" | "present"
    origin: str = ""
    verified: bool = True
    notes: list[str] = field(default_factory=list)


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def fetch(entry: WeightFile, *, source: str | os.PathLike[str] | None = None,
          dest: str | os.PathLike[str] | None = None, sha256: str | None = None, allow_unpinned: bool = False,
          log: Callable[[str], None] = lambda _m: None) -> FetchResult:
    """Put ``entry``'s file in ``dest`` (default: the folder its loader reads), verified and atomically.

    ``source``: None (the entry's published URLs), an http(s) mirror base (``URL/<file>``) or a local folder
    holding the file (no network). ``sha256`` overrides the pinned hash (tests, private mirrors).
    A file already present with the right hash is left alone; one with another hash is replaced.
    """
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ConfigError(f"--sha256: {sha256!r} is not a SHA-256 (64 hex digits)")
        entry = replace(entry, sha256=sha256, size=None, hash_source="given on the command line")
    if entry.sha256 is None and not allow_unpinned:
        raise ConfigError(f"{entry.name}: {entry.file} has no pinned SHA-256 ({entry.hash_source})")
    folder = Path(dest).expanduser() if dest is not None else entry.dest_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / entry.file
    part = folder / (entry.file + ".part")
    notes: list[str] = []
    if target.is_file():
        if entry.sha256 is None:
            return FetchResult(entry, target, sha256_of(target), "present", verified=False)
        have = sha256_of(target)
        if have == entry.sha256:
            return FetchResult(entry, target, have, "present")
        notes.append(f"replaced {target}: its SHA-256 {have} is not the pinned {entry.sha256}")

    if source is not None and not _is_url(str(source)):
        src_dir = Path(source).expanduser()
        if not src_dir.is_dir():
            raise ConfigError(f"--from: {src_dir} is neither a folder nor an http(s) URL")
        src = src_dir / entry.file
        if not src.is_file():
            raise FetchError(f"{entry.name}: {src} not found (--from {src_dir} must hold {entry.file})")
        if src.resolve() == target.resolve():
            raise ConfigError(f"--from: {src_dir} is the destination folder itself")
        log(f"{entry.name}: copying {src} -> {target}")
        _copy(src, part)
        origin = str(src)
    else:
        urls = (f"{str(source).rstrip('/')}/{entry.file}",) if source is not None else entry.urls
        if part.exists():
            log(f"{entry.name}: found {part} ({part.stat().st_size} bytes), resuming")
        log(f"{entry.name}: downloading {urls[0]} -> {target}")
        origin = _from_urls(entry, urls, part, log)
    actual = _finish(part, target, entry.sha256, origin)
    return FetchResult(entry, target, actual, "fetched", origin=origin, verified=entry.sha256 is not None,
                       notes=notes)


def fetch_main(requested: list[str], *, source: str | None = None, dest: str | None = None,
               engine: str | None = None, sha256: str | None = None, allow_unpinned: bool = False,
               out: Callable[[str], None] = print) -> int:
    """The CLI's `giaudit weights fetch`: resolve every name first, then fetch each; 0 when all are in place.

    Explicitly named files without a pinned hash are refused up front unless ``allow_unpinned`` (or a
    ``sha256`` is given); ``all`` skips them with a note instead.
    """
    entries, notes = resolve(requested, engine=engine)
    if sha256 is not None and len(entries) != 1:
        raise ConfigError("--sha256: give exactly one weight name with it")
    unpinned = [e for e in entries if e.sha256 is None] if sha256 is None and not allow_unpinned else []
    if unpinned:
        flag = ("pass --allow-unpinned to fetch them unverified (their SHA-256 is printed), "
                "or --engine tensorflow for the pinned .h5 files")
        listed = ", ".join(e.name for e in unpinned)
        if "all" not in requested:
            raise ConfigError(f"{listed}: no published SHA-256 for deepface's {unpinned[0].engine} files; {flag}")
        notes.append(f"skipped {listed}: no published SHA-256 for deepface's {unpinned[0].engine} files; {flag}")
        entries = [e for e in entries if e.sha256 is not None]
    for entry in entries:
        res = fetch(entry, source=source, dest=dest, sha256=sha256, allow_unpinned=allow_unpinned,
                    log=lambda m: print(m, file=sys.stderr))
        for note in res.notes:
            out(f"{entry.name}: {note}")
        check = "sha256 verified" if res.verified else "sha256 NOT verified (no pinned hash)"
        verb = "already present" if res.action == "present" else "fetched"
        out(f"{entry.name}: {verb}: {res.path} ({check}: {res.sha256})")
    for note in notes:
        out(note)
    return 0


def list_main(*, engine: str | None = None, out: Callable[[str], None] = print) -> int:
    """`giaudit weights list`: every name, its file, destination and hash source."""
    eng: str | None = engine
    try:
        eng = _engine(engine)
    except ConfigError:
        if engine is not None:      # a misspelt --engine is the user's error; "deepface absent" is not
            raise
        eng = None
    for name in names():
        entry = LPIPS_ALEXNET if name == LPIPS_ALEXNET.name else (deepface_file(name, eng) if eng else None)
        if entry is None:
            out(f"{name:18} (deepface not installed: pass --engine to see its file)")
            continue
        pin = entry.sha256[:16] + "..." if entry.sha256 else "UNPINNED"
        out(f"{name:18} {entry.file:36} {pin:19} -> {entry.dest_dir()}  {entry.what}")
    return 0
