"""Defenses placed in front of any attack (one per file; `Chain` composes them).

Importing this package registers every built-in defense. `build_chain(tables)`
turns ``[[defenses]]`` config tables into a validated chain; `DEFENSES.names()`
lists the registered names. Each defense discloses under its own place in the
chain and, when a server could replay it, provides its own replay rule
(folded by `giaudit.replay` for adaptive attacks, which never import this
package).
"""
from giaudit.defenses import (  # noqa: F401 (registers)
    clip,
    dpsgd,
    label_disguise,
    large_batch,
    model_validation,
    noise,
    quantize,
    secure_agg,
    sparsify,
)
from giaudit.defenses.base import Chain, ClientStep, Defense
from giaudit.defenses.registry import DEFENSES, build_chain, build_defense, load_defense_file

__all__ = ["Chain", "ClientStep", "Defense", "DEFENSES", "build_chain", "build_defense", "load_defense_file"]
