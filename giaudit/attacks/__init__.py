"""The fixed set of gradient-inversion attacks, one paper per file.

Importing this package registers every attack in `ATTACKS` (decorator
registration, as for defenses); `build_attack` validates options through the
one registry validator, naming the full key (``attacks.ig.lr: must be > 0``).
`attack_update` runs one of them on a (model, update) pair held outside an
audit config (`giaudit.attacks.direct`).
"""
from __future__ import annotations

from typing import Any

from giaudit.attacks import (  # noqa: F401 (registers the attacks)
    differencing,
    diffula,
    dlg,
    fishing,
    ggl,
    gias,
    gidm,
    gidm_plus,
    giml,
    ig,
    imprint,
    trap_weights,
)
from giaudit.attacks.base import ATTACKS, Attack, Budget, Reconstruction
from giaudit.attacks.direct import UpdateReconstruction, attack_update


def build_attack(name: str, **options: Any) -> Attack:
    """One validated attack; errors name ``attacks.<name>.<option>``."""
    return ATTACKS.build(name, options, f"attacks.{name}")


__all__ = ["ATTACKS", "Attack", "Budget", "Reconstruction", "UpdateReconstruction", "attack_update", "build_attack"]
