"""TOML -> validated `AuditSpec`, with errors that name the key.

Every section has a fixed set of keys with types and defaults; an unknown
key, a wrong type or a missing file raises `ConfigError` with one line that
names the file and the key and says what to do. The CLI prints that line and
exits 2. Sections, attack tables (options and budget) and defense tables all
go through the one validator of `giaudit.registry` (keyword-only constructors
are the schema); attacks and defenses are built while the config is parsed,
so a bad option fails before any data is loaded.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from giaudit.attacks import ATTACKS, Budget
from giaudit.data import LABEL_PARSERS, SOURCES
from giaudit.defenses import build_chain
from giaudit.errors import ConfigError, ParamError
from giaudit.io import read_toml
from giaudit.registry import build_from, check_choice, check_number, check_value, options
from giaudit.scenario.models import MODELS
from giaudit.threat import threat_model
from giaudit.types import CAPABILITIES, Capability, ThreatModel

# Each section is a keyword-only dataclass: its fields, hints and defaults are the keys, and
# the registry's one validator checks a TOML table against it (as it does attack and defense
# tables). A field left None is absent from the parsed section (an optional key).


@dataclass(frozen=True, kw_only=True)
class DataSection:
    source: str = "mnist5k"
    size: int = 32
    channels: int | None = None
    path: str | None = None
    label_parser: str = "subfolder"
    label_field: str = "gender"
    limit: int | None = None
    holdout: float = 0.2
    pool_every: int = 5

    def __post_init__(self) -> None:
        check_choice("source", self.source, SOURCES)
        check_choice("label_parser", self.label_parser, LABEL_PARSERS)
        check_number("size", self.size, low=4, high=256)
        if self.channels is not None and self.channels not in (1, 3):
            raise ParamError("channels", "must be 1 or 3")
        check_number("holdout", self.holdout, low=0.0)
        if self.holdout >= 1.0:
            raise ParamError("holdout", "must be in [0, 1)")
        check_number("pool_every", self.pool_every, low=1)
        check_number("limit", self.limit, low=1)
        if self.source == "folder" and self.path is None:
            raise ParamError("path", "required when data.source = 'folder'")
        if self.source != "folder" and self.path is not None:
            raise ParamError("path", f"only used with data.source = 'folder' (source is {self.source!r})")


@dataclass(frozen=True, kw_only=True)
class ScenarioSection:
    model: str = "lenet_relu"
    width: int | None = None
    pretrain_steps: int = 0
    bn_mode: str = "train"
    protocol: str = "fedsgd"
    batch_size: int = 1
    local_steps: int = 1
    local_lr: float = 0.1
    local_batch_size: int | None = None
    clients_per_seed: int | None = None   # private batches attacked per seed (default 1; compare: 8)
    checkpoints: list[int] | None = None  # rounds of the federated training whose update is attacked
    diffusion_prior: str | None = None   # ddpm_unet only: a trained DDPM (name or path) as the global model
    capture: str | None = None        # a captured real update (giaudit.integrations.flower) instead of a simulation
    model_factory: str | None = None  # with capture: "module:function" building the deployed model
    client_data: str = "iid"          # iid, or one_label: a client's batch shares one label (one user's images)

    def __post_init__(self) -> None:
        if (self.capture is None) != (self.model_factory is None):
            raise ParamError("model_factory" if self.capture else "capture",
                             "capture and model_factory go together (a captured update and its model)")
        if self.capture is not None:
            # One captured update is one client at one round: nothing to draw per seed, no training to replay.
            if self.clients_per_seed not in (None, 1):
                raise ParamError("clients_per_seed", "a capture holds one client's update; remove "
                                 "scenario.clients_per_seed (or set it to 1) when scenario.capture is set")
            if self.checkpoints is not None:
                raise ParamError("checkpoints", "a capture is one round of a real training; remove "
                                 "scenario.checkpoints when scenario.capture is set (capture each round instead)")
            if self.client_data != "iid":
                raise ParamError("client_data", "a capture holds the batch the real client used; remove "
                                 "scenario.client_data when scenario.capture is set")
            if self.diffusion_prior is not None:
                raise ParamError("diffusion_prior", "the captured model comes from scenario.model_factory; "
                                 "remove scenario.diffusion_prior when scenario.capture is set")
        check_choice("model", self.model, sorted(MODELS))
        check_choice("client_data", self.client_data, ("iid", "one_label"))
        check_number("clients_per_seed", self.clients_per_seed, low=1)
        if self.checkpoints is not None:
            if not self.checkpoints or not all(type(r) is int and r >= 0 for r in self.checkpoints):
                raise ParamError("checkpoints", "expected a non-empty list of rounds >= 0, e.g. [0, 50, 200]")
            if list(self.checkpoints) != sorted(set(self.checkpoints)):
                raise ParamError("checkpoints", "rounds must be increasing and distinct")
        if self.diffusion_prior is not None and self.model != "ddpm_unet":
            raise ParamError("diffusion_prior", "only used with scenario.model = 'ddpm_unet'")
        check_choice("bn_mode", self.bn_mode, ("train", "eval"))
        check_choice("protocol", self.protocol, ("fedsgd", "fedavg"))
        for key in ("batch_size", "local_steps", "local_batch_size", "width"):
            check_number(key, getattr(self, key), low=1)
        check_number("pretrain_steps", self.pretrain_steps, low=0)
        check_number("local_lr", self.local_lr, low=0.0, strict_low=True)


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


@dataclass(frozen=True, kw_only=True)
class OutputSection:
    dir: str | None = None
    lpips: bool = True
    semantic: str | bool = False
    policy: str | None = None
    attributes: dict[str, str] | None = None  # attribute name -> folder of `giaudit attribute train`
    reid_gallery: int | None = None           # re-identification gallery size N without identities (100)

    def __post_init__(self) -> None:
        if self.semantic is True or (isinstance(self.semantic, str) and self.semantic not in ("offline", "deepface")):
            raise ParamError("semantic", "must be false, 'offline' or 'deepface'")
        check_number("reid_gallery", self.reid_gallery, low=2)
        for name, folder in (self.attributes or {}).items():
            if not isinstance(folder, str) or not name.replace("_", "").isalnum():
                raise ParamError(f"attributes.{name}", "expected NAME = \"folder of giaudit attribute train\"")


SECTIONS: dict[str, type] = {"data": DataSection, "scenario": ScenarioSection, "threat": ThreatSection,
                             "output": OutputSection}
BUDGET_KEYS = tuple(options(Budget))
TOP_KEYS = {"name", "seeds", "data", "scenario", "threat", "defenses", "attacks", "output"}


def _section(src: str, name: str, table: Any) -> dict[str, Any]:
    if table is None:
        table = {}
    if not isinstance(table, Mapping):
        raise ConfigError(f"{src}: [{name}] must be a table")
    built = build_from(SECTIONS[name], table, f"{src}: {name}")
    return {k: v for k, v in dataclasses.asdict(built).items() if v is not None}


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

    def replace(self, **changes: Any) -> AuditSpec:
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
    name = check_value(f"{source}: name", config.get("name", Path(source).stem or "audit"), str)
    seeds = config.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not (isinstance(seeds, list) and seeds and all(type(s) is int for s in seeds)):
        raise ConfigError(f"{source}: seeds: expected a non-empty list of integers, got {seeds!r}")
    data = _section(source, "data", config.get("data"))
    scenario = _section(source, "scenario", config.get("scenario"))
    threat = _section(source, "threat", config.get("threat"))
    output = _section(source, "output", config.get("output"))
    _resolve_paths(source, data, output)
    if "capture" in scenario:
        scenario["capture"] = str(_resolve(source, scenario["capture"]))

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
    attacks = {name_: _attack_table(source, name_, table) for name_, table in attacks_in.items()}
    return AuditSpec(name, tuple(seeds), data, scenario, threat, tuple(dict(d) for d in defenses), attacks,
                     output, source)


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


def _resolve_paths(source: str, data: dict[str, Any], output: dict[str, Any]) -> None:
    if "path" in data:
        path = _resolve(source, data["path"])
        if not path.is_dir():
            raise ConfigError(f"{source}: data.path: folder {path} does not exist; point it at an image folder")
        data["path"] = str(path)
    for name, folder in (output.get("attributes") or {}).items():
        p = SHIPPED_CLASSIFIERS[folder]() if folder in SHIPPED_CLASSIFIERS else _resolve(source, folder)
        if not (p / "classifier.json").is_file():
            raise ConfigError(f"{source}: output.attributes.{name}: {p} holds no classifier.json; train one with "
                              f"`giaudit attribute train --data DATA --label {name} --out {folder}`")
        output["attributes"] = {**output["attributes"], name: str(p)}
    if "policy" in output:
        p = _resolve(source, output["policy"])
        if not p.is_file():
            raise ConfigError(f"{source}: output.policy: file {p} does not exist")
        output["policy"] = str(p)


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
