"""TOML -> validated `AuditSpec`, with errors that name the key.

Every section has a fixed set of keys with types and defaults; an unknown
key, a wrong type or a missing file raises `ConfigError` with one line that
names the file and the key and says what to do. The CLI prints that line and
exits 2. Sections, attack tables (options and budget) and defense tables all
go through the one validator of `giaudit.registry` (keyword-only constructors
are the schema); attacks and defenses are built while the config is parsed,
so a bad option fails before any data is loaded.

The spec keeps what was validated, typed: the section objects
(`DataSection`, `ScenarioSection`, `ThreatSection`, `OutputSection`), one
`AttackConfig` per attack table and the defense tables. `AuditSpec.raw` is
the canonical config (defaults filled in, unset optional keys left out) that
config hashes are taken over; it is the only place the spec becomes a dict.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from giaudit.attacks import ATTACKS, Attack, Budget, build_attack
from giaudit.bounds import BoundsSection
from giaudit.defenses import build_chain
from giaudit.errors import ConfigError, ParamError
from giaudit.io import read_toml
from giaudit.registry import build_from, check_number, check_value, options
from giaudit.scenario.sections import DataSection, ScenarioSection, canonical
from giaudit.threat import threat_model
from giaudit.types import CAPABILITIES, Capability, ThreatModel

# Each section is a keyword-only dataclass: its fields, hints and defaults are the keys, and
# the registry's one validator checks a TOML table against it (as it does attack and defense
# tables). A field left None is absent from the canonical section (an optional key). The
# [data] and [scenario] sections live in giaudit.scenario.sections, beside the scenario they build.


def _granted(cap: Capability) -> bool:
    return CAPABILITIES[cap].default


@dataclass(frozen=True, kw_only=True)
class ThreatSection:
    """``[threat]``: one flag per row of `giaudit.types.CAPABILITIES`, defaulting to that row's default."""

    batch_size: bool = _granted(Capability.BATCH_SIZE)
    training_details: bool = _granted(Capability.TRAINING_DETAILS)
    surrogate_data: bool = _granted(Capability.SURROGATE_DATA)
    bn_statistics: bool = _granted(Capability.BN_STATISTICS)
    true_labels: bool = _granted(Capability.TRUE_LABELS)
    # Unset (None) is the table's default; kept out of the canonical config while unset, so configs written
    # before the diffusion scenario keep their hashes.
    diffusion_noise: bool | None = None

    def model(self) -> ThreatModel:
        """The threat model these flags grant."""
        return threat_model(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


# Re-identification gallery size when output.reid_gallery is unset.
REID_GALLERY = 100


@dataclass(frozen=True, kw_only=True)
class OutputSection:
    dir: str | None = None
    lpips: bool = True
    semantic: str | bool = False
    policy: str | None = None
    attributes: dict[str, str] | None = None  # attribute name -> folder of `giaudit attribute train`
    reid_gallery: int | None = None           # re-identification gallery size N without identities

    def __post_init__(self) -> None:
        if self.semantic is True or (isinstance(self.semantic, str) and self.semantic not in ("offline", "deepface")):
            raise ParamError("semantic", "must be false, 'offline' or 'deepface'")
        check_number("reid_gallery", self.reid_gallery, low=2)
        for name, folder in (self.attributes or {}).items():
            if not isinstance(folder, str) or not name.replace("_", "").isalnum():
                raise ParamError(f"attributes.{name}", "expected NAME = \"folder of giaudit attribute train\"")

    @property
    def gallery_size(self) -> int:
        """The re-identification gallery size N: `reid_gallery`, `REID_GALLERY` when unset."""
        return REID_GALLERY if self.reid_gallery is None else self.reid_gallery


SECTIONS: dict[str, type] = {"data": DataSection, "scenario": ScenarioSection, "threat": ThreatSection,
                             "output": OutputSection, "bounds": BoundsSection}
BUDGET_KEYS = tuple(options(Budget))
TOP_KEYS = {"name", "seeds", "data", "scenario", "threat", "defenses", "attacks", "output", "bounds"}


def _section(src: str, name: str, table: Any) -> Any:
    if table is None:
        table = {}
    if not isinstance(table, Mapping):
        raise ConfigError(f"{src}: [{name}] must be a table")
    return build_from(SECTIONS[name], table, f"{src}: {name}")


@dataclass(frozen=True)
class AttackConfig:
    """One validated ``[attacks.NAME]`` table.

    `table` is its canonical form: the config's keys in their order, the budget's values as validated, and
    ``iterations`` and ``restarts`` filled in when the config left them to the defaults (so the run's record
    says how long the attack ran)."""

    name: str
    table: Mapping[str, Any]

    @property
    def budget(self) -> Budget:
        return Budget(**{k: v for k, v in self.table.items() if k in BUDGET_KEYS})

    @property
    def options(self) -> dict[str, Any]:
        """The attack's constructor options (the table without its budget keys)."""
        return {k: v for k, v in self.table.items() if k not in BUDGET_KEYS}

    def option(self, key: str) -> Any:
        """The value of option `key`: the table's, else the attack's default (None when it takes no such option)."""
        known = ATTACKS.options(self.name)
        return self.options.get(key, known[key].default if key in known else None)

    def build(self) -> Attack:
        return build_attack(self.name, **self.options)


def _table(value: Any) -> Any:
    """A replacement for `AuditSpec.replace`: section objects and attack configs become their canonical tables."""
    if isinstance(value, AttackConfig):
        return dict(value.table)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return canonical(value)
    if isinstance(value, Mapping):
        return {k: _table(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class AuditSpec:
    name: str
    seeds: tuple[int, ...]
    data: DataSection
    scenario: ScenarioSection
    threat: ThreatSection
    defenses: tuple[Mapping[str, Any], ...]   # validated [[defenses]] tables (giaudit.defenses.build_chain)
    attacks: Mapping[str, AttackConfig]
    output: OutputSection
    source: str = "<config>"
    bounds: BoundsSection | None = None   # [bounds] as given; None when the config has none (kept out of raw)

    @property
    def raw(self) -> dict[str, Any]:
        """The canonical config (defaults filled in): what the config hash is taken over."""
        return {
            "name": self.name, "seeds": list(self.seeds), "data": canonical(self.data),
            "scenario": canonical(self.scenario), "threat": canonical(self.threat),
            "defenses": [dict(d) for d in self.defenses],
            "attacks": {k: dict(v.table) for k, v in self.attacks.items()},
            "output": {k: v for k, v in canonical(self.output).items() if k != "dir"},
            **({"bounds": canonical(self.bounds)} if self.bounds is not None else {}),
        }

    @property
    def run_dir(self) -> Path:
        """Where `giaudit audit` writes the run when no folder is passed: ``output.dir``, else reports/<name>."""
        return Path(self.output.dir or f"reports/{self.name}")

    @property
    def base(self) -> Path:
        """The config file's folder (relative paths of the config were resolved against it)."""
        return Path(self.source).resolve().parent

    def replace(self, **changes: Any) -> AuditSpec:
        """The spec with top-level keys replaced, validated again. A value is a table (as in TOML) or, for a
        section, its object (``output=dataclasses.replace(spec.output, lpips=False)``); ``attacks`` maps
        names to tables or `AttackConfig`."""
        raw = self.raw
        raw["output"] = canonical(self.output)
        for key, value in changes.items():
            if key not in TOP_KEYS:
                raise ConfigError(f"AuditSpec.replace: unknown field {key!r}")
            raw[key] = list(value) if key in ("defenses", "seeds") else _table(value)
        return parse_config(raw, self.source)


def parse_config(config: Mapping[str, Any], source: str = "<config>") -> AuditSpec:
    if not isinstance(config, Mapping):
        raise ConfigError(f"{source}: the config must be a TOML table")
    for key in config:
        if key not in TOP_KEYS:
            raise ConfigError(f"{source}: {key}: unknown top-level key; known: {', '.join(sorted(TOP_KEYS))}")
    name = check_value(f"{source}: name", config.get("name", Path(source).stem or "audit"), str)
    seeds = config.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not (isinstance(seeds, list) and seeds and all(type(s) is int for s in seeds)):
        raise ConfigError(f"{source}: seeds: expected a non-empty list of integers, got {seeds!r}")
    if any(not 0 <= s < 2**63 for s in seeds):
        raise ConfigError(f"{source}: seeds: every seed must be an integer in [0, 2^63), got {seeds!r}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(f"{source}: seeds: seed {repeated[0]} is listed twice (it would run the same cells again)")
    _check_name(source, name)
    data: DataSection = _section(source, "data", config.get("data"))
    scenario: ScenarioSection = _section(source, "scenario", config.get("scenario"))
    threat: ThreatSection = _section(source, "threat", config.get("threat"))
    output: OutputSection = _section(source, "output", config.get("output"))
    data, output = _resolve_paths(source, data, output)
    if scenario.capture is not None:
        scenario = dataclasses.replace(scenario, capture=str(_resolve(source, scenario.capture)))

    defenses = config.get("defenses", [])
    if not isinstance(defenses, list) or not all(isinstance(d, Mapping) for d in defenses):
        raise ConfigError(f"{source}: defenses: expected an array of tables ([[defenses]] with a name key)")
    if defenses:
        build_chain([dict(d) for d in defenses], where=f"{source}: defenses")  # validates names and parameters

    attacks_in = config.get("attacks")
    if attacks_in is None:
        attacks_in = {"ig": {}}
    if not isinstance(attacks_in, Mapping) or not attacks_in:
        raise ConfigError(f"{source}: attacks: expected tables like [attacks.ig]")
    attacks = {name_: AttackConfig(name_, _attack_table(source, name_, table)) for name_, table in attacks_in.items()}
    bounds: BoundsSection | None = _section(source, "bounds", config["bounds"]) if "bounds" in config else None
    return AuditSpec(name, tuple(seeds), data, scenario, threat, tuple(dict(d) for d in defenses), attacks,
                     output, source, bounds)


def _check_name(source: str, name: str) -> None:
    """The run's name is one folder name under the output root: not empty, no path separator, not . or .."""
    if not name.strip() or name in (".", "..") or any(sep in name for sep in ("/", "\\", "\0")):
        raise ConfigError(f"{source}: name: {name!r} must be one folder name (no '/', '\\', '..' and not "
                          "empty): the run is written to reports/<name>")


def _attack_table(source: str, name: str, table: Any) -> dict[str, Any]:
    """The attack's table, validated by building the attack and its budget now (before any data loads)."""
    where = f"{source}: attacks.{name}"
    cls = ATTACKS.get(name, where)
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: must be a table")
    budget = {k: v for k, v in table.items() if k in BUDGET_KEYS}
    options_ = {k: v for k, v in table.items() if k not in BUDGET_KEYS}
    for key in options_:
        if key not in ATTACKS.options(name):
            known = list(BUDGET_KEYS) + list(ATTACKS.options(name))
            raise ConfigError(f"{where}.{key}: unknown option; {name} takes: {', '.join(known)}")
    built = build_from(Budget, budget, where)
    if built.halving is not None and not cls.pausable():
        pausable = ", ".join(n for n in ATTACKS.names() if ATTACKS[n].pausable())
        raise ConfigError(f"{where}.halving: {name} cannot pause its restarts, so they cannot be halved; "
                          f"remove the key (attacks that can: {pausable})")
    ATTACKS.build(name, options_, where)
    out = dict(table)
    out.update({k: getattr(built, k) for k in budget})
    # The run's record says how long the attack ran even when the config left it to the defaults.
    out.setdefault("iterations", built.iterations)
    out.setdefault("restarts", built.restarts)
    return out


def _resolve(source: str, value: str) -> Path:
    """A path from the config, relative to the config file's folder."""
    path = Path(os.path.expanduser(value))
    if not path.is_absolute() and source != "<config>":
        path = Path(source).resolve().parent / path
    return path


def _resolve_paths(source: str, data: DataSection, output: OutputSection) -> tuple[DataSection, OutputSection]:
    """The sections with their paths resolved against the config's folder, each checked to exist."""
    if data.path is not None:
        path = _resolve(source, data.path)
        if not path.is_dir():
            raise ConfigError(f"{source}: data.path: folder {path} does not exist; point it at an image folder")
        data = dataclasses.replace(data, path=str(path))
    if output.attributes is not None:
        resolved = {}
        for name, folder in output.attributes.items():
            p = SHIPPED_CLASSIFIERS[folder]() if folder in SHIPPED_CLASSIFIERS else _resolve(source, folder)
            if not (p / "classifier.json").is_file():
                raise ConfigError(f"{source}: output.attributes.{name}: {p} holds no classifier.json; train one "
                                  f"with `giaudit attribute train --data DATA --label {name} --out {folder}`")
            resolved[name] = str(p)
        output = dataclasses.replace(output, attributes=resolved)
    if output.policy is not None:
        p = _resolve(source, output.policy)
        if not p.is_file():
            raise ConfigError(f"{source}: output.policy: file {p} does not exist")
        output = dataclasses.replace(output, policy=str(p))
    return data, output


def load_config(path: str | os.PathLike[str]) -> AuditSpec:
    raw = read_toml(path, "config file", "pass a TOML file (see examples/)")
    return parse_config(raw, str(path))


def demo_config_path() -> Path:
    return Path(__file__).resolve().parent / "assets" / "demo.toml"


def shipped_digit_classifier() -> Path:
    """The digit classifier shipped with the package (`giaudit attribute train --data mnist5k --label label
    --size 16 --width 16 --epochs 4`: trained on the digits outside the demo's client pool)."""
    return demo_config_path().parent / "digit_classifier"


# output.attributes NAME = "mnist5k-digit": a shipped classifier by name instead of a folder.
SHIPPED_CLASSIFIERS = {"mnist5k-digit": shipped_digit_classifier}
