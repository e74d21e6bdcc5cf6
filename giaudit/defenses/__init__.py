"""Defenses placed in front of any attack (one per file; `Chain` composes them)."""
from giaudit.defenses.base import Chain, ClientStep, Defense

__all__ = ["Chain", "ClientStep", "Defense"]
