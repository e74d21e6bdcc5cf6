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
