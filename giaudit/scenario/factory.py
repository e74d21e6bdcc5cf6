"""A user's own model: ``"package.module:factory"`` called with keyword arguments.

One mechanism for the simulated client (``scenario.model``) and for a
captured deployment (``scenario.model_factory``); ``scenario.model_args`` is
the table of keyword arguments passed to the factory. The module is looked up
on ``sys.path`` first (an installed package), then in the working directory,
then in the config file's folder; the folder it was found in is appended to
``sys.path`` so that the module's own imports of its siblings work.

Every failure is one line naming the config key: the reference is malformed,
the module cannot be imported (or raises while it is imported), it has no
such attribute, the factory cannot take the given arguments (one is missing
or unknown), the factory raises, or what it returns is not an ``nn.Module``.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from giaudit.errors import ConfigError

# "package.module:factory" (the factory may be an attribute path, e.g. "models:Net.build").
_REF = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def is_factory_ref(name: str) -> bool:
    """True when `name` names a user factory (``module:function``) rather than a built-in model."""
    return ":" in name


def check_ref(key: str, ref: str) -> None:
    """Raise unless `ref` has the ``package.module:factory`` form."""
    if not _REF.match(ref):
        raise ConfigError(f"{key}: expected 'package.module:factory', got {ref!r}")


def _found_in(folder: Path, top: str) -> bool:
    return importlib.machinery.PathFinder.find_spec(top, [str(folder)]) is not None


def _import(key: str, module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError:
        raise
    except Exception as exc:  # the user's module raised while it was imported
        raise ConfigError(f"{key}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from None


def import_user_module(key: str, module_name: str, base: Path | None) -> ModuleType:
    """`module_name` from sys.path, else the working directory, else `base` (the config's folder)."""
    top = module_name.split(".")[0]
    try:
        return _import(key, module_name)
    except ModuleNotFoundError as exc:
        # A module the user's module imports is missing: say so, do not look elsewhere for the module itself.
        if exc.name is None or not (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(f"{key}: importing {module_name!r} failed: {exc}") from None
    searched = [Path.cwd()] + ([Path(base)] if base is not None else [])
    for folder in searched:
        if not _found_in(folder, top):
            continue
        if str(folder) not in sys.path:
            sys.path.append(str(folder))
        importlib.invalidate_caches()
        try:
            return _import(key, module_name)
        except ModuleNotFoundError as exc:
            raise ConfigError(f"{key}: importing {module_name!r} from {folder} failed: {exc}") from None
    where = ", ".join(str(f) for f in searched)
    raise ConfigError(f"{key}: no module {module_name!r} on sys.path, in the working directory or the config's "
                      f"folder ({where})")


def load_factory(key: str, ref: str, base: Path | None = None) -> Callable[..., Any]:
    """The callable `ref` (``package.module:factory``) names; errors name `key`."""
    check_ref(key, ref)
    module_name, _, attr = ref.partition(":")
    obj: Any = import_user_module(key, module_name, base)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}: {ref} is a {type(obj).__name__}, not a callable that builds the model")
    return obj


def call_factory(key: str, ref: str, args: Mapping[str, Any] | None, base: Path | None = None,
                 args_key: str = "scenario.model_args") -> nn.Module:
    """`ref` called with the keyword arguments `args`; the model it returns (checked to be an nn.Module)."""
    fn = load_factory(key, ref, base)
    kwargs = dict(args or {})
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: let the call say what is wrong
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as exc:
            given = ", ".join(kwargs) or "none"
            raise ConfigError(f"{args_key}: {ref} cannot be called with these arguments ({exc}; given: "
                              f"{given})") from None
    try:
        model = fn(**kwargs)
    except Exception as exc:
        raise ConfigError(f"{key}: {ref}({_call_args(kwargs)}) raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{key}: {ref} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _call_args(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
