"""TOML -> validated `AuditSpec`, with errors that name the key.

Every section has a fixed set of keys with types and defaults; an unknown
key, a wrong type or a missing file raises `ConfigError` with one line that
names the file and the key and says what to do. The CLI prints that line and
exits 2. Defense tables are validated by the defense registry, attack tables
by the attack's own constructor signature.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import tomllib

from giaudit.errors import ConfigError

_NONE = object()  # "no default": optional key without a value

# section -> key -> (types, default). `_NONE` means optional and absent by default.
SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], Any]]] = {
    "data": {
        "source": ((str,), "mnist5k"),
        "size": ((int,), 32),
        "channels": ((int,), _NONE),
        "path": ((str,), _NONE),
        "label_parser": ((str,), "subfolder"),
        "label_field": ((str,), "gender"),
        "limit": ((int,), _NONE),
        "holdout": ((float, int), 0.2),
        "pool_every": ((int,), 5),
    },
    "scenario": {
        "model": ((str,), "lenet_relu"),
        "width": ((int,), _NONE),
        "pretrain_steps": ((int,), 0),
        "bn_mode": ((str,), "train"),
        "protocol": ((str,), "fedsgd"),
        "batch_size": ((int,), 1),
        "local_steps": ((int,), 1),
        "local_lr": ((float, int), 0.1),
        "local_batch_size": ((int,), _NONE),
    },
    "threat": {
        "batch_size": ((bool,), True),
        "training_details": ((bool,), True),
        "surrogate_data": ((bool,), True),
        "bn_statistics": ((bool,), False),
        "true_labels": ((bool,), False),
    },
    "output": {
        "dir": ((str,), _NONE),
        "lpips": ((bool,), True),
        "semantic": ((str, bool), False),
        "policy": ((str,), _NONE),
    },
}
BUDGET_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {
    "iterations": ((int,), 1000),
    "restarts": ((int,), 1),
    "workers": ((int,), _NONE),
    "patience": ((int,), _NONE),
}
TOP_KEYS = {"name", "seeds", "data", "scenario", "threat", "defenses", "attacks", "output"}


def _type_name(types: tuple[type, ...]) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _check_type(where: str, value: Any, types: tuple[type, ...]) -> Any:
    # bool is an int subclass in Python: `size = true` must not pass as an integer.
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(types)}, got {value!r}")
    return float(value) if float in types and isinstance(value, int) and not isinstance(value, bool) else value


def _section(src: str, name: str, table: Any) -> dict[str, Any]:
    if table is None:
        table = {}
    if not isinstance(table, Mapping):
        raise ConfigError(f"{src}: [{name}] must be a table")
    schema = SCHEMA[name]
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in schema:
            raise ConfigError(f"{src}: {name}.{key}: unknown key; known keys: {', '.join(schema)}")
        out[key] = _check_type(f"{src}: {name}.{key}", value, schema[key][0])
    for key, (_, default) in schema.items():
        if key not in out and default is not _NONE:
            out[key] = default
    return out


@dataclass(frozen=True)
class AuditSpec:
    name: str
    seeds: tuple[int, ...]
    data: Mapping[str, Any]
    scenario: Mapping[str, Any]
    threat: Mapping[str, Any]
    defenses: tuple[Mapping[str, Any], ...]
    attacks: Mapping[str, Mapping[str, Any]]
    output: Mapping[str, Any]
    source: str = "<config>"

    @property
    def raw(self) -> dict[str, Any]:
        """The canonical config (defaults filled in): what the config hash is taken over."""
        return {
            "name": self.name, "seeds": list(self.seeds), "data": dict(self.data), "scenario": dict(self.scenario),
            "threat": dict(self.threat), "defenses": [dict(d) for d in self.defenses],
            "attacks": {k: dict(v) for k, v in self.attacks.items()},
            "output": {k: v for k, v in self.output.items() if k != "dir"},
        }

    def replace(self, **changes: Any) -> "AuditSpec":
        raw = self.raw
        raw["output"] = dict(self.output)
        for key, value in changes.items():
            if key not in TOP_KEYS:
                raise ConfigError(f"AuditSpec.replace: unknown field {key!r}")
            raw[key] = list(value) if key in ("defenses", "seeds") else value
        return parse_config(raw, self.source)

    def budget_and_options(self, attack: str) -> tuple[dict[str, Any], dict[str, Any]]:
        table = dict(self.attacks[attack])
        budget = {k: table.pop(k) for k in list(table) if k in BUDGET_KEYS}
        return budget, table


def parse_config(config: Mapping[str, Any], source: str = "<config>") -> AuditSpec:
    if not isinstance(config, Mapping):
        raise ConfigError(f"{source}: the config must be a TOML table")
    for key in config:
        if key not in TOP_KEYS:
            raise ConfigError(f"{source}: {key}: unknown top-level key; known: {', '.join(sorted(TOP_KEYS))}")
    name = _check_type(f"{source}: name", config.get("name", Path(source).stem or "audit"), (str,))
    seeds = config.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{source}: seeds: expected a non-empty list of integers, got {seeds!r}")
    data = _section(source, "data", config.get("data"))
    scenario = _section(source, "scenario", config.get("scenario"))
    threat = _section(source, "threat", config.get("threat"))
    output = _section(source, "output", config.get("output"))
    _validate_values(source, data, scenario, output)

    defenses = config.get("defenses", [])
    if not isinstance(defenses, list) or not all(isinstance(d, Mapping) for d in defenses):
        raise ConfigError(f"{source}: defenses: expected an array of tables ([[defenses]] with a name key)")
    if defenses:
        from giaudit.defenses.registry import build_chain

        build_chain([dict(d) for d in defenses], where=f"{source}: defenses")  # validates names and parameters

    attacks_in = config.get("attacks")
    if attacks_in is None:
        attacks_in = {"ig": {}}
    if not isinstance(attacks_in, Mapping) or not attacks_in:
        raise ConfigError(f"{source}: attacks: expected tables like [attacks.ig]")
    attacks = {name_: _attack_table(source, name_, table) for name_, table in attacks_in.items()}
    return AuditSpec(name, tuple(seeds), data, scenario, threat, tuple(dict(d) for d in defenses), attacks,
                     output, source)


def _attack_table(source: str, name: str, table: Any) -> dict[str, Any]:
    from giaudit.attacks import ATTACKS, attack_options

    if name not in ATTACKS:
        raise ConfigError(f"{source}: attacks.{name}: unknown attack; known: {', '.join(sorted(ATTACKS))}")
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: attacks.{name}: must be a table")
    options = attack_options(name)
    out: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{source}: attacks.{name}.{key}"
        if key in BUDGET_KEYS:
            out[key] = _check_type(where, value, BUDGET_KEYS[key][0])
            if out[key] < (0 if key == "patience" else 1):
                raise ConfigError(f"{where}: must be >= 1")
        elif key in options:
            default = options[key]
            if default is not None and default is not inspect.Parameter.empty:
                types: tuple[type, ...] = (float, int) if isinstance(default, float) else (type(default),)
                out[key] = _check_type(where, value, types)
            else:
                out[key] = value
        else:
            known = list(BUDGET_KEYS) + list(options)
            raise ConfigError(f"{where}: unknown option; {name} takes: {', '.join(known)}")
    for key, (_, default) in BUDGET_KEYS.items():
        if key not in out and default is not _NONE:
            out[key] = default
    return out


def _validate_values(source: str, data: dict[str, Any], scenario: dict[str, Any], output: dict[str, Any]) -> None:
    from giaudit.scenario.data import LABEL_PARSERS, SOURCES
    from giaudit.scenario.models import MODELS

    def bad(key: str, msg: str) -> None:
        raise ConfigError(f"{source}: {key}: {msg}")

    if data["source"] not in SOURCES:
        bad("data.source", f"unknown source {data['source']!r}; known: {', '.join(SOURCES)}")
    if data["source"] == "folder":
        if "path" not in data:
            bad("data.path", "required when data.source = 'folder'")
        path = Path(os.path.expanduser(data["path"]))
        if not path.is_absolute() and source not in ("<config>",):
            path = Path(source).resolve().parent / path
        if not path.is_dir():
            bad("data.path", f"folder {path} does not exist; point it at an image folder")
        data["path"] = str(path)
    elif "path" in data:
        bad("data.path", f"only used with data.source = 'folder' (source is {data['source']!r})")
    if data["label_parser"] not in LABEL_PARSERS:
        bad("data.label_parser", f"unknown parser {data['label_parser']!r}; known: {', '.join(LABEL_PARSERS)}")
    if not 4 <= data["size"] <= 256:
        bad("data.size", "must be between 4 and 256 pixels")
    if "channels" in data and data["channels"] not in (1, 3):
        bad("data.channels", "must be 1 or 3")
    if not 0.0 <= data["holdout"] < 1.0:
        bad("data.holdout", "must be in [0, 1)")
    if data["pool_every"] < 1:
        bad("data.pool_every", "must be >= 1")
    if scenario["model"] not in MODELS:
        bad("scenario.model", f"unknown model {scenario['model']!r}; known: {', '.join(sorted(MODELS))}")
    if scenario["bn_mode"] not in ("train", "eval"):
        bad("scenario.bn_mode", "must be 'train' or 'eval'")
    if scenario["protocol"] not in ("fedsgd", "fedavg"):
        bad("scenario.protocol", "must be 'fedsgd' or 'fedavg'")
    for key in ("batch_size", "local_steps"):
        if scenario[key] < 1:
            bad(f"scenario.{key}", "must be >= 1")
    if scenario.get("local_batch_size", 1) < 1:
        bad("scenario.local_batch_size", "must be >= 1")
    if scenario["pretrain_steps"] < 0:
        bad("scenario.pretrain_steps", "must be >= 0")
    sem = output["semantic"]
    if sem is True or (isinstance(sem, str) and sem not in ("offline", "deepface")):
        bad("output.semantic", "must be false, 'offline' or 'deepface'")
    if "policy" in output:
        p = Path(os.path.expanduser(output["policy"]))
        if not p.is_absolute() and source != "<config>":
            p = Path(source).resolve().parent / p
        if not p.is_file():
            bad("output.policy", f"file {p} does not exist")
        output["policy"] = str(p)


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


def load_config(path: str | os.PathLike[str]) -> AuditSpec:
    raw = read_toml(path, "config file", "pass a TOML file (see examples/)")
    return parse_config(raw, str(path))


def demo_config_path() -> Path:
    return Path(__file__).resolve().parent / "assets" / "demo.toml"
