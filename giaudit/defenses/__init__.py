"""Defenses placed in front of any attack (one per file; `Chain` composes them).

`build_chain(tables)` turns ``[[defenses]]`` config tables into a validated
chain; `known_defenses()` lists the registered names; `adapt_trial` (in
`giaudit.defenses.adaptive`) lets an attack replay a disclosed defense.
"""
from giaudit.defenses.base import Chain, ClientStep, Defense
from giaudit.defenses.registry import DEFENSES, build_chain, known_defenses, load_defense_file

__all__ = ["Chain", "ClientStep", "Defense", "DEFENSES", "build_chain", "known_defenses", "load_defense_file"]
