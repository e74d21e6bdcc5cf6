"""The defense registry: TOML tables -> validated defense objects -> a `Chain`.

A defense registers itself with `@register("name")`; its keyword-only
constructor arguments *are* its config keys (Opacus's habit of keyword-only
arguments and decorator registries). `build_chain` checks each table before
anything runs: the name must be registered (the error lists the known ones),
every key must be a constructor argument of the right type, and the
constructor's own checks (sigma >= 0, epsilon needs delta, ...) raise errors
that name the field, e.g. ``defenses[1].sigma: must be >= 0``. Checks that
need the model (k larger than a layer) run when the scenario configures the
client step and name the same field.

Preset files (the inputs of ``giaudit compare``) hold a ``label`` and the same
``[[defenses]]`` tables as an audit config; `load_defense_file` reads them.
"""
from __future__ import annotations

import importlib
import inspect
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence, TypeVar, Union

import torch

from giaudit.defenses.base import Chain, ClientStep, Defense
from giaudit.errors import ConfigError
from giaudit.types import SharedUpdate

# Modules holding the built-in defenses; imported on first use so that each
# module can import `register` from here without an import cycle.
BUILTIN_MODULES = ("dpsgd", "noise", "clip", "sparsify", "quantize", "large_batch", "label_disguise", "secure_agg")

DEFENSES: dict[str, type["RegisteredDefense"]] = {}

D = TypeVar("D", bound=type)


class ParamError(ConfigError):
    """Raised by a defense constructor about one of its parameters; `build_chain` adds the table's path."""

    def __init__(self, field: str, message: str) -> None:
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


class RegisteredDefense(Defense):
    """A defense built from a config table.

    Subclasses set `name` (through `@register`) and take their parameters as
    keyword-only constructor arguments. Class flags used by the chain checks
    and by the utility measurement:

    - `changes_step`: configure() changes how the client computes its update
      (batch, targets, compute); secure aggregation must come after these.
    - `aggregation_only`: the defense changes only what the server can see of
      one client, not the model training (secure aggregation); the utility
      measurement leaves it out.
    """

    changes_step: typing.ClassVar[bool] = False
    aggregation_only: typing.ClassVar[bool] = False
    where: str = "defenses"  # set by build_chain to e.g. "defenses[1]"

    def fail(self, field: str, message: str) -> ConfigError:
        """A ConfigError naming this defense's field, for checks that run after construction."""
        return ConfigError(f"{self.where}.{field}: {message}")

    def params(self) -> dict[str, Any]:
        """The constructor arguments (the config table without `name`)."""
        return {k: getattr(self, k) for k in option_names(type(self))}

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params().items() if v is not None)
        return f"{self.name}({args})"


def register(name: str) -> Callable[[D], D]:
    """Class decorator: make a defense available under `name` in configs."""

    def deco(cls: D) -> D:
        if name in DEFENSES and DEFENSES[name] is not cls:
            raise ValueError(f"defense name {name!r} registered twice")
        cls.name = name  # type: ignore[attr-defined]
        DEFENSES[name] = cls  # type: ignore[assignment]
        return cls

    return deco


def _load_builtins() -> None:
    for mod in BUILTIN_MODULES:
        importlib.import_module(f"giaudit.defenses.{mod}")


def known_defenses() -> list[str]:
    _load_builtins()
    return sorted(DEFENSES)


def option_names(cls: type) -> list[str]:
    sig = inspect.signature(cls.__init__)
    return [k for k, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _options(cls: type) -> dict[str, tuple[Any, Any]]:
    """name -> (type hint, default) of the keyword-only constructor arguments."""
    sig = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__)
    return {k: (hints.get(k, Any), p.default) for k, p in sig.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _type_ok(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        # bool is an int subclass: `k = true` must not pass as a count.
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _accepts(hint: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(hint)
    return typing.get_args(hint) if origin in (Union, types.UnionType) else (hint,)


def _coerce(value: Any, hint: Any) -> Any:
    """TOML integers are fine where only a float is expected (`sigma = 1`)."""
    accepted = _accepts(hint)
    if isinstance(value, int) and not isinstance(value, bool) and float in accepted and int not in accepted:
        return float(value)
    return value


def _hint_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_hint_name(h) for h in typing.get_args(hint) if h is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(hint, str(hint))


def build_defense(table: Mapping[str, Any], where: str = "defenses[0]") -> RegisteredDefense:
    """One validated defense from one config table (`name` + parameters)."""
    _load_builtins()
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table with a `name` key, got {type(table).__name__}")
    name = table.get("name")
    if name is None:
        raise ConfigError(f"{where}.name: missing; known defenses: {', '.join(sorted(DEFENSES))}")
    if not isinstance(name, str) or name not in DEFENSES:
        raise ConfigError(f"{where}.name: unknown defense {name!r}; known: {', '.join(sorted(DEFENSES))}")
    cls = DEFENSES[name]
    opts = _options(cls)
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key == "name":
            continue
        if key not in opts:
            raise ConfigError(f"{where}.{key}: unknown parameter of {name}; it takes: "
                              f"{', '.join(opts) or '(no parameters)'}")
        hint, _ = opts[key]
        if not _type_ok(value, hint):
            raise ConfigError(f"{where}.{key}: expected {_hint_name(hint)}, got {value!r}")
        kwargs[key] = _coerce(value, hint)
    for key, (_, default) in opts.items():
        if default is inspect.Parameter.empty and key not in kwargs:
            raise ConfigError(f"{where}.{key}: required by {name}")
    try:
        defense = cls(**kwargs)
    except ParamError as exc:
        raise ConfigError(f"{where}.{exc.field}: {exc.message}") from None
    defense.where = where
    return defense


class DefenseChain(Chain):
    """A `Chain` that also discloses the order of its defenses (`disclosed["defenses"]`).

    Adaptive attacks replay the deterministic parts in that order (clip then
    sparsify differs from sparsify then clip)."""

    def disclose(self, update: SharedUpdate) -> Mapping[str, Any]:
        out = dict(super().disclose(update))
        out["defenses"] = [d.name for d in self.defenses]
        return out


def build_chain(tables: Sequence[Mapping[str, Any]], where: str = "defenses") -> DefenseChain:
    """Validate every table and compose the defenses in order."""
    if isinstance(tables, Mapping) or not isinstance(tables, Sequence):
        raise ConfigError(f"{where}: expected an array of tables ([[defenses]] with a name key)")
    defenses = [build_defense(t, f"{where}[{i}]") for i, t in enumerate(tables)]
    for i, d in enumerate(defenses):
        if d.aggregation_only:
            later = [f"{e.where} ({e.name})" for e in defenses[i + 1:] if e.changes_step]
            if later:
                raise ConfigError(f"{d.where}: {d.name} must come after the defenses that change how the client "
                                  f"computes its update ({', '.join(later)}): move it later in the chain")
    return DefenseChain(defenses)


def load_defense_file(path: str | os.PathLike[str]) -> tuple[str, list[dict[str, Any]]]:
    """Read a preset: ``label = "noise-0.01"`` and ``[[defenses]]`` tables (none: no defense)."""
    from giaudit.config import read_toml

    p = Path(path)
    raw = read_toml(p, "defense preset", "pass TOML files such as defenses/*.toml")
    unknown = set(raw) - {"label", "defenses", "description"}
    if unknown:
        raise ConfigError(f"{p}: {sorted(unknown)[0]}: unknown key; a preset has label, description and "
                          "[[defenses]] tables")
    label = raw.get("label", p.stem)
    if not isinstance(label, str) or not label.strip():
        raise ConfigError(f"{p}: label: expected a non-empty string")
    tables = raw.get("defenses", [])
    if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
        raise ConfigError(f"{p}: defenses: expected an array of tables ([[defenses]] with a name key)")
    tables = [dict(t) for t in tables]
    build_chain(tables, where=f"{p}: defenses")  # validate now, before any run starts
    return label, tables


# --- helpers shared by the defense modules ------------------------------------------------------


def check_finite(field: str, value: float | None, *, low: float | None = None, high: float | None = None,
                 strict_low: bool = False, allow_inf: bool = False) -> None:
    """Raise ParamError unless `value` lies in the range."""
    if value is None:
        return
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ParamError(field, f"must be a finite number, got {value}")
    if low is not None and (value <= low if strict_low else value < low):
        raise ParamError(field, f"must be {'>' if strict_low else '>='} {low:g}")
    if high is not None and value > high:
        raise ParamError(field, f"must be <= {high:g}")


class RngTap:
    """Hands a defense a generator derived from the scenario's, for randomness inside `compute`.

    `ClientStep.compute` takes no generator, but `ClientStep.sampler` does and
    the scenario calls it first. The wrapped sampler draws the batch exactly as
    before and *then* draws one seed from the same generator, so the batch is
    the one an undefended client would draw and everything stays reproducible
    from the scenario's seed.
    """

    def __init__(self, step: ClientStep) -> None:
        self.inner = step.sampler
        self.seed: int | None = None

    def sampler(self, labels: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        idx = self.inner(labels, batch_size, generator)
        self.seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return idx

    def generator(self) -> torch.Generator:
        if self.seed is None:
            raise RuntimeError("the client step's sampler must be called before its compute (it seeds the defense)")
        return torch.Generator().manual_seed(self.seed)
