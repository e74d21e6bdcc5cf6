"""giaudit: what can a curious server reconstruct from the updates federated clients share?

The flow is one-way: scenario -> defenses -> attack -> metrics -> report -> verdict.

Python API (imported on first use, so ``import giaudit`` stays light):

- `audit(config, *, out=None, engine=None, show_progress=False)`: run an audit config (an `AuditSpec`, a
  TOML path or a dict) and get an `AuditResult` (records, a pandas table, the policy verdict);
- `attack_update(...)`: run one attack on one update.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from giaudit.version import __version__

__all__ = ["audit", "attack_update", "AuditResult", "__version__"]

if TYPE_CHECKING:
    from giaudit.api import AuditResult, audit
    from giaudit.attacks.direct import attack_update

_LAZY = {"audit": "giaudit.api", "AuditResult": "giaudit.api", "attack_update": "giaudit.attacks.direct"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'giaudit' has no attribute {name!r}")
