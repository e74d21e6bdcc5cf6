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
from giaudit.device import Runtime, check_device_name, check_dtype_name, resolve
from giaudit.errors import ConfigError, ParamError
from giaudit.io import read_toml
from giaudit.metrics import registry
from giaudit.registry import build_from, check_number, check_value, options
from giaudit.scenario.sections import CAPTURE_DATA_KEYS, CAPTURE_KEYS, DataSection, ScenarioSection, canonical
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
    # A malicious server (SoK classes F-H); unset (None) like diffusion_noise, for the same reason.
    modifies_model: bool | None = None
    # A malicious server that chooses which clients take part (SoK class H); unset (None) likewise.
    selects_clients: bool | None = None

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


@dataclass(frozen=True, kw_only=True)
class RunSection:
    """``[run]``: where the audit computes (`giaudit.device`). Unset: the CPU in float32, and the section stays
    out of the canonical config (so configs that do not set it keep their hashes)."""

    device: str | None = None   # auto | cpu | cuda | cuda:N | mps
    dtype: str | None = None    # float32 (default) | float64
    gpus_per_task: float | None = None  # ray engine on CUDA: the GPU share each task asks for (default 1)
    # Cells of one attack solved as one stacked problem (giaudit.attacks.batched): "auto", N, or 1 (off, default).
    batch_cells: int | str | None = None

    def __post_init__(self) -> None:
        if self.device is not None:
            check_device_name(self.device)
        if self.dtype is not None:
            check_dtype_name(self.dtype)
        check_number("gpus_per_task", self.gpus_per_task, low=0.0, strict_low=True)
        b = self.batch_cells
        if b is not None and b != "auto" and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ParamError("batch_cells", f"{b!r}: use \"auto\", or a whole number of cells >= 1 (1: off)")

    @property
    def gpu_share(self) -> float:
        """The GPUs (or fraction of one) a Ray task asks for on CUDA: `gpus_per_task`, 1 when unset."""
        return 1.0 if self.gpus_per_task is None else self.gpus_per_task

    def runtime(self) -> Runtime:
        """The resolved device and dtype; raises naming run.device when the device is not on this machine."""
        return resolve(self.device, self.dtype)


SECTIONS: dict[str, type] = {"data": DataSection, "scenario": ScenarioSection, "threat": ThreatSection,
                             "output": OutputSection, "run": RunSection, "bounds": BoundsSection}
BUDGET_KEYS = tuple(options(Budget))
TOP_KEYS = {"name", "seeds", "data", "scenario", "threat", "defenses", "attacks", "output", "run", "bounds"}


def _section(src: str, name: str, table: Any) -> Any:
    if table is None:
        table = {}
    if not isinstance(table, Mapping):
        raise ConfigError(f"{src}: [{name}] must be a table")
    return build_from(SECTIONS[name], table, f"{src}: {name}")


TUNE_KEY = "tune"


@dataclass(frozen=True)
class TuneSettings:
    """``attacks.NAME.tune``: tune the attack's options on `clients` clients the server simulates from its own
    held-out data, over `trials` Optuna trials, for the attack's success on them (`metric`, a registered metric
    whose leak direction says which way is better). `params`: the options tuned (default: the attack's search
    space less the options the table sets itself)."""

    trials: int
    clients: int
    params: tuple[str, ...]
    metric: str = "psnr_db"


def tune_settings(attack: str, raw: Any, options_: Mapping[str, Any], where: str) -> TuneSettings:
    """Validate a ``tune`` table against the attack's search space; errors name `where`.tune.<key>."""
    where = f"{where}.{TUNE_KEY}"
    space = ATTACKS[attack].search_space
    if not space:
        tunable = ", ".join(n for n in ATTACKS.names() if ATTACKS[n].search_space)
        raise ConfigError(f"{where}: {attack} has no options to tune (attacks that have: {tunable})")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a table, e.g. {{ trials = 20, clients = 4 }}")
    unknown = set(raw) - {"trials", "clients", "params", "metric"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key; tune takes trials, clients, params, metric")
    values = {}
    for key, default in (("trials", 20), ("clients", 4)):
        v = raw.get(key, default)
        if type(v) is not int or not 1 <= v <= 100_000:
            raise ConfigError(f"{where}.{key}: expected an integer >= 1, got {v!r}")
        values[key] = v
    params = raw.get("params")
    if params is None:
        params = [k for k in space if k not in options_]
    if not isinstance(params, list) or not params or not all(isinstance(k, str) for k in params):
        raise ConfigError(f"{where}.params: expected a non-empty list of option names from "
                          f"{', '.join(space)} (every option of the search space is set in the table)")
    bad = [k for k in params if k not in space]
    if bad:
        raise ConfigError(f"{where}.params: {bad[0]!r} is not in {attack}'s search space ({', '.join(space)})")
    metric = raw.get("metric", "psnr_db")
    found = registry.parse(metric) if isinstance(metric, str) else None
    if found is None or found.metric.leak is None or not found.metric.per_image:
        raise ConfigError(f"{where}.metric: expected a per-image metric with a leak direction (psnr_db, ssim, "
                          f"mse, ...), got {metric!r}")
    return TuneSettings(values["trials"], values["clients"], tuple(params), found.metric.name)


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
        """The attack's constructor options (the table without its budget keys and its tuning)."""
        return {k: v for k, v in self.table.items() if k not in BUDGET_KEYS and k != TUNE_KEY}

    @property
    def tune(self) -> TuneSettings | None:
        """The table's ``tune`` settings (validated while the config was parsed), None when not tuned."""
        raw = self.table.get(TUNE_KEY)
        return None if raw is None else tune_settings(self.name, raw, self.options, f"attacks.{self.name}")

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
    run: RunSection = RunSection()
    bounds: BoundsSection | None = None   # [bounds] as given; None when the config has none (kept out of raw)

    @property
    def raw(self) -> dict[str, Any]:
        """The canonical config (defaults filled in): what the config hash is taken over. ``run`` is in it only
        when the config sets a key of it."""
        run = canonical(self.run)
        return {
            "name": self.name, "seeds": list(self.seeds), "data": canonical(self.data),
            "scenario": canonical(self.scenario), "threat": canonical(self.threat),
            "defenses": [dict(d) for d in self.defenses],
            "attacks": {k: dict(v.table) for k, v in self.attacks.items()},
            "output": {k: v for k, v in canonical(self.output).items() if k != "dir"},
            **({"run": run} if run else {}),
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
    run: RunSection = _section(source, "run", config.get("run"))
    data, output = _resolve_paths(source, data, output)
    if scenario.capture is not None:
        _check_capture_keys(source, data, scenario)
        scenario = dataclasses.replace(scenario, capture=str(_resolve(source, scenario.capture)))
    if scenario.weights is not None:
        weights = _resolve(source, scenario.weights)
        if not weights.is_file():
            raise ConfigError(f"{source}: scenario.weights: file {weights} does not exist; point it at a "
                              ".safetensors file or a torch state dict (relative paths: to the config's folder)")
        scenario = dataclasses.replace(scenario, weights=str(weights))

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
    for name_, cfg in attacks.items():
        if cfg.tune is None:
            continue
        if scenario.capture is not None:
            raise ConfigError(f"{source}: attacks.{name_}.tune: tuning simulates clients from the server's own "
                              "data, and a capture audit has none; remove the key")
        if not threat.model().has(Capability.SURROGATE_DATA):
            raise ConfigError(f"{source}: attacks.{name_}.tune: tuning simulates clients from the server's own "
                              "data (surrogate data, SoK class D); set threat.surrogate_data = true or remove it")
    bounds: BoundsSection | None = _section(source, "bounds", config["bounds"]) if "bounds" in config else None
    return AuditSpec(name, tuple(seeds), data, scenario, threat, tuple(dict(d) for d in defenses), attacks,
                     output, source, run, bounds)


def _check_capture_keys(source: str, data: DataSection, scenario: ScenarioSection) -> None:
    """A capture holds its own data, model state and training details: a [data] or simulation key set beside
    `scenario.capture` would be silently ignored, so it is refused, naming it."""
    for f in dataclasses.fields(DataSection):
        if f.name not in CAPTURE_DATA_KEYS and getattr(data, f.name) != _default(f):
            raise ConfigError(f"{source}: data.{f.name}: a capture holds its own data (shape, classes, batch); "
                              "remove [data] when scenario.capture is set")
    for f in dataclasses.fields(ScenarioSection):
        if f.name not in CAPTURE_KEYS and getattr(scenario, f.name) != _default(f):
            raise ConfigError(f"{source}: scenario.{f.name}: not used by a capture audit (the capture holds the "
                              "model state and the training details the client used); remove it when "
                              "scenario.capture is set")


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


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
    options_ = {k: v for k, v in table.items() if k not in BUDGET_KEYS and k != TUNE_KEY}
    for key in options_:
        if key not in ATTACKS.options(name):
            known = list(BUDGET_KEYS) + list(ATTACKS.options(name))
            raise ConfigError(f"{where}.{key}: unknown option; {name} takes: {', '.join(known)}")
    if TUNE_KEY in table:
        tune_settings(name, table[TUNE_KEY], options_, where)
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
