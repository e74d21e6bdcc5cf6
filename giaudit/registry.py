"""One registry and one validator for everything a config names: attacks and defenses.

A class registers itself with a decorator (Opacus's habit:
``@ATTACKS.register("ig")``); its keyword-only constructor arguments, with
their type hints and defaults, *are* its config keys. `Registry.build`
validates a table against them before anything runs: an unknown name lists
the known ones, an unknown key lists the accepted ones, a wrong type says
what was expected, and a constructor's own value checks (`ParamError`) come
back with the full key, e.g. ``attacks.ig.lr: must be > 0``.

`Configurable` gives every registered class `params()` from its constructor:
the arguments it was built with, defaults filled in, as plain data.
"""
from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar, Union

from giaudit.errors import ConfigError, ParamError

T = TypeVar("T")


@dataclass(frozen=True)
class Option:
    name: str
    hint: Any
    default: Any  # inspect.Parameter.empty when required

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


def options(cls: type) -> dict[str, Option]:
    """The keyword-only constructor arguments of `cls` (its config keys), with hints and defaults."""
    init = cls.__init__  # type: ignore[misc]
    sig = inspect.signature(init)
    hints = typing.get_type_hints(init)
    return {k: Option(k, hints.get(k, Any), p.default) for k, p in sig.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _plain(value: Any) -> Any:
    """A JSON-friendly form of a constructor argument (objects passed in code become their name)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return getattr(value, "name", None) or type(value).__name__


class Configurable:
    """Base of registered classes: records the constructor's keyword arguments for `params()`."""

    name: typing.ClassVar[str] = ""
    _config: dict[str, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = super().__new__(cls)
        defaults = {k: o.default for k, o in options(cls).items() if not o.required}
        obj._config = {**defaults, **kwargs}
        return obj

    def params(self) -> dict[str, Any]:
        """The constructor arguments this object was built with (defaults filled in), as plain data."""
        return {k: _plain(v) for k, v in self._config.items()}


def type_ok(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(type_ok(value, h) for h in typing.get_args(hint))
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
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin in (dict, typing.Mapping) or hint is dict:
        return isinstance(value, Mapping)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _accepts(hint: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(hint)
    return typing.get_args(hint) if origin in (Union, types.UnionType) else (hint,)


def coerce(value: Any, hint: Any) -> Any:
    """TOML integers are fine where only a float is expected (`sigma = 1`)."""
    accepted = _accepts(hint)
    if isinstance(value, int) and not isinstance(value, bool) and float in accepted and int not in accepted:
        return float(value)
    return value


def hint_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(hint_name(h) for h in typing.get_args(hint) if h is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_value(where: str, value: Any, hint: Any) -> Any:
    """`value` coerced to `hint`, or a ConfigError naming `where` and what was expected."""
    if not type_ok(value, hint):
        raise ConfigError(f"{where}: expected {hint_name(hint)}, got {value!r}")
    return coerce(value, hint)


def check_number(field: str, value: float | None, *, low: float | None = None, high: float | None = None,
                 strict_low: bool = False, allow_inf: bool = False) -> None:
    """Raise ParamError unless `value` is a number in the range (None passes: an optional argument)."""
    if value is None:
        return
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ParamError(field, f"must be a finite number, got {value}")
    if low is not None and (value <= low if strict_low else value < low):
        raise ParamError(field, f"must be {'>' if strict_low else '>='} {low:g}")
    if high is not None and value > high:
        raise ParamError(field, f"must be <= {high:g}")


def check_choice(field: str, value: str, choices: typing.Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ParamError(field, f"unknown {field} {value!r}; known: {', '.join(choices)}")


def build_from(cls: Callable[..., T], table: Mapping[str, Any], where: str, *, what: str = "") -> T:
    """Validate `table` against the keyword-only constructor of `cls` and call it; errors name `where`.key.

    The one validator: attacks, defenses, budgets and config sections all go through it.
    """
    opts = options(cls)  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in opts:
            raise ConfigError(f"{where}.{key}: unknown {'option of ' + what if what else 'key'}; known: "
                              f"{', '.join(opts) or '(none)'}")
        kwargs[key] = check_value(f"{where}.{key}", value, opts[key].hint)
    for key, opt in opts.items():
        if opt.required and key not in kwargs:
            raise ConfigError(f"{where}.{key}: required{' by ' + what if what else ''}")
    try:
        return cls(**kwargs)
    except ParamError as exc:
        raise ConfigError(f"{where}.{exc.field}: {exc.message}") from None


class Registry(Generic[T]):
    """Name -> class for one kind of component (`kind` is "attack" or "defense")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: make the class available under `name` in configs."""

        def deco(cls: type[T]) -> type[T]:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} name {name!r} registered twice")
            cls.name = name  # type: ignore[attr-defined]
            self._classes[name] = cls
            return cls

        return deco

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __getitem__(self, name: str) -> type[T]:
        return self._classes[name]

    def get(self, name: Any, where: str) -> type[T]:
        if not isinstance(name, str) or name not in self._classes:
            raise ConfigError(f"{where}: unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._classes[name]

    def options(self, name: str) -> dict[str, Option]:
        return options(self._classes[name])

    def build(self, name: Any, table: Mapping[str, Any], where: str) -> T:
        """Validate `table` against the constructor of `name` and build it; errors name `where`.key."""
        return build_from(self.get(name, where), table, where, what=str(name))
