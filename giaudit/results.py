"""The results store: one record per (scenario, defense, attack, seed).

A run folder holds
- ``results.json``: run metadata plus every record (nested, complete);
- ``results.parquet`` (or ``results.csv`` when pyarrow is missing): the same
  records flattened to one row each (scalars only), for pandas;
- ``images/<record_id>.npz``: the matched originals and reconstructions
  (``original``, ``reconstruction``, both N,C,H,W float32, already in matched
  order, row i of one paired with row i of the other);
- while a run is writing, ``records/<record_id>.json``: each record added
  since results.json was last rewritten, one file each. Adding a record costs
  the same at the 10th and the 10 000th cell (rewriting results.json with
  every record made a sweep's driver quadratic: 108 ms per record at 256
  records on this project's CPU); results.json and the table are rewritten
  at most every `FLUSH_EVERY_S` seconds and when the run ends, which folds
  these files in and removes them. Whoever opens the folder (a resume, the
  report) reads results.json and these files together, so a run killed
  between two rewrites loses no record.

Every file is written atomically (temporary file + ``os.replace``), so a
crash never leaves a half-written file, and a sweep that is run again skips
the records already present with the same config hash (resume).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from giaudit.errors import DataError
from giaudit.io import atomic_write_bytes, atomic_write_text
from giaudit.types import NO_DEFENSE

if TYPE_CHECKING:
    import pandas as pd

# A tuned record's `tuning` key holding the same attack at its defaults on the same audited clients.
UNTUNED = "untuned"

# 2: `disclosed` holds one table per defense, keyed "<position>:<name>".
SCHEMA_VERSION = 2

# The folder of records added since results.json was last rewritten (one file each), and how often at most
# `ResultsStore.add` rewrites results.json and the table while a run goes on.
JOURNAL = "records"
FLUSH_EVERY_S = 10.0


@dataclass(frozen=True)
class AuditRecord:
    record_id: str                 # f"{scenario}__{defense}__{attack}__s{seed}"
    config_hash: str               # hash of the canonical config that produced it
    scenario: str
    defense: str
    attack: str
    seed: int
    threat: Mapping[str, Any]      # {"sok_class": "B", "granted": [...], "oracles": [...]}
    attack_params: Mapping[str, Any]
    label_source: str              # how the attack got its labels ("oracle", "idlg", ...)
    metrics: Mapping[str, float]   # aggregates, e.g. psnr_db_mean, psnr_db_worst, label_accuracy
    per_image: tuple[Mapping[str, Any], ...]  # one dict per matched pair, most leaked first
    timings: Mapping[str, float]   # attack_s, total_s, iterations
    trace: Mapping[str, Any]       # losses (matching loss per iteration), restart_losses, best_restart
    disclosed: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()    # e.g. "LPIPS unavailable: ..."
    images_file: str | None = None  # relative to the run folder
    # Leakage over training: {"round": r, "held_out_accuracy": a} when the attacked update was taken at
    # round r of the federated training (scenario.checkpoints); empty for an audit of the scenario's model.
    training: Mapping[str, Any] = field(default_factory=dict)
    # The attack's options tuned on clients the server simulated from its own data (attacks.NAME.tune): the
    # options, the tune metric on those clients with them and with the defaults, trials, clients, time, key.
    tuning: Mapping[str, Any] = field(default_factory=dict)
    # Why no update was attacked: a defense made the client refuse the model a malicious server sent
    # (model_validation). A blocked record has no metrics, and nothing leaked; None: the client took part.
    blocked: str | None = None

    @property
    def active(self) -> bool:
        """The record's attack was a malicious server's (it changed the model the clients computed on)."""
        return bool(self.threat.get("active"))
    # The audited model: {"name": built-in} or {"factory": "module:function", "args": {...}}, plus "weights" and
    # "weights_sha256" when its state was loaded from scenario.weights (empty in records written before).
    model: Mapping[str, Any] = field(default_factory=dict)
    # What computed it: {"device": "cpu", "dtype": "float32", "torch": "2.13.0"} (empty in records written before).
    runtime: Mapping[str, Any] = field(default_factory=dict)

    @property
    def undefended(self) -> bool:
        """The record audited the update with no defense (an empty chain)."""
        return undefended(self.defense)


def undefended(label: str) -> bool:
    """A defense label that stands for no defense (the empty chain's label, or none at all)."""
    return label in (NO_DEFENSE, "")


def config_hash(config: Mapping[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def disclosed_value(record: AuditRecord, key: str) -> Any:
    """The first value of `key` any defense of the record's chain disclosed (e.g. "epsilon"), else None."""
    for params in record.disclosed.values():
        if params.get(key) is not None:
            return params[key]
    return None


def images_file(record_id: str) -> str:
    """Where a record's images live, relative to the run folder."""
    return f"images/{record_id}.npz"


def images_npz(original: np.ndarray, reconstruction: np.ndarray) -> bytes:
    """The matched originals and reconstructions as the bytes of an .npz (a worker returns them to the driver)."""
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, original=original.astype(np.float32), reconstruction=reconstruction.astype(np.float32))
    return buf.getvalue()


def save_images(run_dir: Path, record_id: str, original: np.ndarray, reconstruction: np.ndarray) -> str:
    rel = images_file(record_id)
    atomic_write_bytes(run_dir / rel, images_npz(original, reconstruction))
    return rel


def load_images(run_dir: Path, record: AuditRecord) -> tuple[np.ndarray, np.ndarray] | None:
    if not record.images_file:
        return None
    with np.load(Path(run_dir) / record.images_file) as z:
        return z["original"], z["reconstruction"]


def flatten(record: AuditRecord) -> dict[str, Any]:
    """One table row: identifiers, threat class, aggregate metrics and timings."""
    row: dict[str, Any] = {
        "record_id": record.record_id, "config_hash": record.config_hash, "scenario": record.scenario,
        "defense": record.defense, "attack": record.attack, "seed": record.seed,
        "sok_class": record.threat.get("sok_class"), "oracles": "; ".join(record.threat.get("oracles", [])),
        "label_source": record.label_source,
    }
    if record.training:
        row.update({"round": record.training.get("round"), "model_accuracy": record.training.get("held_out_accuracy")})
    if record.blocked:
        row["blocked"] = record.blocked
    if "factory" in record.model:
        row["model_factory"] = record.model["factory"]
    if "weights_sha256" in record.model:
        row["weights_sha256"] = record.model["weights_sha256"]
    row.update({k: record.runtime[k] for k in ("device", "dtype") if k in record.runtime})
    row.update({k: v for k, v in record.metrics.items()})
    row.update({f"time_{k}": v for k, v in record.timings.items()})
    untuned = record.tuning.get(UNTUNED) if record.tuning else None
    if isinstance(untuned, Mapping):  # a tuned attack: the same attack at its defaults on the same clients
        row.update({f"{UNTUNED}_{k}": v for k, v in (untuned.get("metrics") or {}).items()})
    for where, params in record.disclosed.items():
        for k, v in params.items():
            if isinstance(v, (int, float, str, bool)):
                row[f"disclosed_{where}_{k}"] = v
    return row


@dataclass
class ResultsStore:
    """Reads and writes one run folder."""

    run_dir: Path
    meta: dict[str, Any] = field(default_factory=dict)
    records: list[AuditRecord] = field(default_factory=list)
    # Record ids that results.json held more than once (a file edited or concatenated by hand): each cell is
    # read once, its first record kept; readers say so.
    duplicates: tuple[str, ...] = ()

    # When this store last rewrote results.json (never yet: its first `add` does, which writes the run's meta).
    _flushed: float = field(default=-math.inf, repr=False, compare=False)

    @classmethod
    def open(cls, run_dir: str | os.PathLike[str]) -> ResultsStore:
        """Open a run folder, loading earlier records if there are any (for resume): results.json's, and those
        added since it was last rewritten (``records/``), which replace a record of the same id."""
        run_dir = Path(run_dir)
        store = cls(run_dir)
        path = run_dir / "results.json"
        # The record files first: a writer folds them into results.json before it removes them, so whatever
        # goes from there between the two reads is in the results.json read second.
        newer = _read_journal(run_dir)
        records: list[AuditRecord] = []
        if path.is_file():
            store.meta, records = _read(path)
        records, store.duplicates = unique_cells(records)
        if newer:
            ids = {r.record_id for r in newer}
            records = [r for r in records if r.record_id not in ids] + newer
        store.records = records
        return store

    def has(self, record_id: str, chash: str) -> bool:
        return any(r.record_id == record_id and r.config_hash == chash for r in self.records)

    def add(self, record: AuditRecord) -> None:
        """Add (or replace) a record: its own file under ``records/`` at once (atomic; the cost does not grow with
        the run), results.json and the table at this store's first record (with the run's meta) and then at most
        every `FLUSH_EVERY_S` seconds (`flush` writes them now).

        Several processes may add records to one run folder (two drivers on the same sweep): each writes its own
        record files, and `flush`, under an exclusive lock on ``.results.lock``, merges in the records another
        process wrote, so no writer drops another's records.
        """
        self.records = [r for r in self.records if r.record_id != record.record_id] + [record]
        with _locked(self.run_dir):
            (self.run_dir / JOURNAL).mkdir(exist_ok=True)
            # Named so that file-name order is the order records were added (a later one replaces an earlier).
            name = f"{time.time_ns():020d}-{os.getpid()}-{record.record_id}.json"
            atomic_write_text(self.run_dir / JOURNAL / name,
                              json.dumps(asdict(record), default=_json_default))
        if time.monotonic() - self._flushed >= FLUSH_EVERY_S:
            self.flush()

    def unfolded(self) -> bool:
        """Records are on disk under ``records/`` that results.json does not hold yet (a run stopped early)."""
        return bool(_journal_files(self.run_dir))

    def flush(self) -> None:
        """Rewrite results.json and the table with every record, this process's and those other processes wrote
        since this store was read, then remove the record files folded in."""
        with _locked(self.run_dir):
            path = self.run_dir / "results.json"
            known = {r.record_id for r in self.records}
            on_disk: list[AuditRecord] = []
            if path.is_file():
                _meta, on_disk = _read(path)
                on_disk, _repeated = unique_cells(on_disk)
            journal = _journal_files(self.run_dir)
            others = _read_journal(self.run_dir, journal)
            ids = {r.record_id for r in others}
            on_disk = [r for r in on_disk if r.record_id not in ids] + others
            self.records += [r for r in on_disk if r.record_id not in known]
            payload = {"schema": SCHEMA_VERSION, "meta": self.meta, "records": [asdict(r) for r in self.records]}
            atomic_write_text(path, json.dumps(payload, indent=1, default=_json_default))
            write_frame(self.run_dir, results_frame(self.records))
            for f in journal:  # every one of them is in results.json now
                f.unlink(missing_ok=True)
        self._flushed = time.monotonic()


def _journal_files(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / JOURNAL
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def _read_journal(run_dir: Path, files: Sequence[Path] | None = None) -> list[AuditRecord]:
    """The records of ``records/`` in the order they were added, each cell once (its latest record)."""
    out: dict[str, AuditRecord] = {}
    for f in _journal_files(run_dir) if files is None else files:
        try:
            record = _record(json.loads(f.read_text()))
        except FileNotFoundError:  # folded into results.json by another writer since the listing
            continue
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{f}: not a giaudit record ({exc}); delete it to compute that cell again") from exc
        out.pop(record.record_id, None)
        out[record.record_id] = record
    return list(out.values())


@contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".results.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def results_frame(records: Sequence[AuditRecord]) -> pd.DataFrame:
    """The records as the table of ``results.parquet``: one row per record (`flatten`)."""
    import pandas as pd

    return pd.DataFrame([flatten(r) for r in records])


def write_table(run_dir: Path, rows: list[dict[str, Any]], stem: str = "results") -> Path:
    """Write rows as Parquet (CSV when pyarrow is unavailable), atomically."""
    import pandas as pd

    return write_frame(run_dir, pd.DataFrame(rows), stem)


def write_frame(run_dir: Path, df: pd.DataFrame, stem: str = "results") -> Path:
    """Write a table as Parquet (CSV when pyarrow is unavailable), atomically."""
    import io

    try:
        import pyarrow  # noqa: F401

        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        path = Path(run_dir) / f"{stem}.parquet"
        atomic_write_bytes(path, buf.getvalue())
    except ImportError:
        path = Path(run_dir) / f"{stem}.csv"
        atomic_write_text(path, df.to_csv(index=False))
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def unique_cells(records: Sequence[AuditRecord]) -> tuple[list[AuditRecord], tuple[str, ...]]:
    """The records with each cell (record id) once, its first record kept, and the ids that were repeated."""
    seen: set[str] = set()
    kept, repeated = [], []
    for r in records:
        if r.record_id in seen:
            repeated.append(r.record_id)
            continue
        seen.add(r.record_id)
        kept.append(r)
    return kept, tuple(repeated)


def _record(r: dict[str, Any]) -> AuditRecord:
    return AuditRecord(**{**r, "per_image": tuple(r["per_image"]), "notes": tuple(r["notes"])})


def _read(path: Path) -> tuple[dict[str, Any], list[AuditRecord]]:
    try:
        payload = json.loads(path.read_text())
        if not isinstance(payload, dict):
            raise TypeError("the top level is not an object")
        schema = payload.get("schema")
        if schema != SCHEMA_VERSION:
            raise DataError(f"{path}: written with results schema {schema}, this giaudit reads schema "
                            f"{SCHEMA_VERSION}; run the audit again into a new folder")
        records = [_record(r) for r in payload["records"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a giaudit results file ({exc}); run `giaudit audit` to produce one") from exc
    return payload.get("meta", {}), records


def load_results(path: str | os.PathLike[str]) -> ResultsStore:
    """Open results from a run folder or its results.json."""
    p = Path(path)
    if p.is_file() and p.name.endswith(".json"):
        p = p.parent
    if not (p / "results.json").is_file():
        raise DataError(f"{path}: no results.json there; pass a run folder written by `giaudit audit`")
    return ResultsStore.open(p)

