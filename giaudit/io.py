"""Files: TOML input and atomic output, one floor below everything that reads or writes them.

`read_toml` turns a missing or malformed file into one `ConfigError` line
naming it; `atomic_write_bytes` / `atomic_write_text` write to a temporary
file in the same folder, fsync it and `os.replace` it into place, so a crash
never leaves a half-written file behind. `config_as_text` writes a config
back as TOML that parses to the same config (JSON when TOML cannot hold it).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from giaudit.errors import ConfigError


def read_toml(path: str | os.PathLike[str], what: str, hint: str) -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file is a one-line ConfigError naming it.

    `what` names the file's role ("config file", "policy file") and `hint` says what to pass instead.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {what} not found; {hint}")
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None


def umask() -> int:
    """The process's file-creation mask (read from /proc where it can be, which changes nothing)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, with the mode a plain ``open(path, "wb")`` would give (0666 less the
    umask; a temporary file alone would be 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_output_dir(path: str | os.PathLike[str], what: str, need_bytes: int = 0) -> Path:
    """Refuse, in one `ConfigError` line naming `path` (`what` is its role: "--out", "run folder"), a folder that
    cannot be written before anything is: a file in its place or above it, no write permission where it is (or
    would be) created, less free space than `need_bytes` (an estimate of what will be written). Nothing is
    created."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{what} {p}: is a file, not a folder; pass a folder")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {p}: {existing} is a file, not a folder")
    try:  # a real try (permissions, a read-only mount, root's rights): a file created and removed at once
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {p}: {existing} is not writable ({exc.strerror or exc}); pass a folder you can "
                          "write") from None
    if (p / "results.json").exists() and not os.access(p / "results.json", os.R_OK):
        raise ConfigError(f"{what} {p}: {p / 'results.json'} is not readable")
    free = shutil.disk_usage(existing).free
    if need_bytes > free:
        raise ConfigError(f"{what} {p}: {free / 2**20:.0f} MiB free on its disk, about {need_bytes / 2**20:.0f} MiB "
                          "needed for the planned records; free some space or pass another folder")
    return p


# ---- writing TOML (the report's config block: a config that parses back to itself) ------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k, ensure_ascii=False)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        # JSON string escapes (\" \\ \n \uXXXX ...) are all valid TOML basic-string escapes.
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{_toml_key(str(k))} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise ValueError(f"cannot write {type(v).__name__} as TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, Mapping) for x in v)


def _toml_table(mapping: Mapping[str, Any], prefix: str, out: list[str]) -> None:
    scalars = [(k, v) for k, v in mapping.items() if not isinstance(v, Mapping) and not _is_table_array(v)]
    for k, v in scalars:
        out.append(f"{_toml_key(str(k))} = {_toml_value(v)}")
    for k, v in mapping.items():
        name = f"{prefix}.{_toml_key(str(k))}" if prefix else _toml_key(str(k))
        if isinstance(v, Mapping):
            if out:
                out.append("")
            out.append(f"[{name}]")
            _toml_table(v, name, out)
        elif _is_table_array(v):
            for item in v:
                if out:
                    out.append("")
                out.append(f"[[{name}]]")
                # Nested tables inside an array element are written inline to keep this simple.
                for ik, iv in item.items():
                    out.append(f"{_toml_key(str(ik))} = {_toml_value(iv)}")


def _plain(v: Any) -> Any:
    """Tuples to lists, recursively, so a TOML round trip can be compared with ==."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def config_as_text(config: Mapping[str, Any]) -> tuple[str, str]:
    """(text, language): TOML that parses back to the same config, else JSON."""
    try:
        lines: list[str] = []
        _toml_table(config, "", lines)
        text = "\n".join(lines) + "\n"
        if tomllib.loads(text) == _plain(config):
            return text, "toml"
    except (ValueError, TypeError, tomllib.TOMLDecodeError):
        pass
    # TOML has no null and no heterogeneous nesting we could not express: JSON always works.
    return json.dumps(config, indent=2, sort_keys=False, default=str, ensure_ascii=False) + "\n", "json"
