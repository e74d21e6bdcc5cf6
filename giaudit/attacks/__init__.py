"""The fixed set of gradient-inversion attacks, one paper per file.

`ATTACKS` maps a config name to its class; `build_attack` validates options.
"""
from __future__ import annotations

import inspect
from typing import Any

from giaudit.attacks.base import Attack, Budget, Reconstruction
from giaudit.attacks.dlg import DLG
from giaudit.attacks.gias import GIAS, GIASLatent
from giaudit.attacks.giml import GIML
from giaudit.attacks.ggl import GGL
from giaudit.attacks.ig import InvertingGradients
from giaudit.errors import ConfigError

ATTACKS: dict[str, type[Attack]] = {"dlg": DLG, "ig": InvertingGradients}
ATTACKS.update({"gias": GIAS, "gias_z": GIASLatent, "giml": GIML, "ggl": GGL})


def attack_options(name: str) -> dict[str, Any]:
    """Option names and defaults an attack accepts (its keyword-only constructor arguments)."""
    sig = inspect.signature(ATTACKS[name].__init__)
    return {k: p.default for k, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_attack(name: str, **options: Any) -> Attack:
    if name not in ATTACKS:
        raise ConfigError(f"attack.name: unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}")
    known = attack_options(name)
    for key in options:
        if key not in known:
            raise ConfigError(f"attacks.{name}.{key}: unknown option; {name} takes: {', '.join(known)}")
    return ATTACKS[name](**options)


__all__ = ["ATTACKS", "Attack", "Budget", "Reconstruction", "build_attack", "attack_options"]
