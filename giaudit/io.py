"""Files: TOML input and atomic output, one floor below everything that reads or writes them.

`read_toml` turns a missing or malformed file into one `ConfigError` line
naming it; `atomic_write_bytes` / `atomic_write_text` write to a temporary
file in the same folder, fsync it and `os.replace` it into place, so a crash
never leaves a half-written file behind.
"""
from __future__ import annotations

import os
import tempfile
import tomllib
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
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
