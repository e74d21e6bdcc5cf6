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

import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from giaudit.defenses.base import Chain, ClientStep, Defense
from giaudit.errors import ConfigError
from giaudit.io import read_toml
from giaudit.registry import Configurable, Registry


class RegisteredDefense(Configurable, Defense):
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

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params().items() if v is not None)
        return f"{self.name}({args})"

    @classmethod
    def over_rounds(cls, table: Mapping[str, Any], rounds: int) -> dict[str, Any]:
        """This defense's table for a training of `rounds` rounds (a defense that accounts for the length of
        the training, DP-SGD, takes it; the others are unchanged)."""
        return dict(table)

    @classmethod
    def as_trained(cls, table: Mapping[str, Any], spent: Mapping[str, Any]) -> dict[str, Any]:
        """This defense's table fixed to what its training used (`spent`, from `Defense.spent`), so an audited
        update carries exactly the training's parameters; unchanged for a defense that spends nothing."""
        return dict(table)


DEFENSES: Registry[RegisteredDefense] = Registry("defense")
register = DEFENSES.register


def build_defense(table: Mapping[str, Any], where: str = "defenses[0]") -> RegisteredDefense:
    """One validated defense from one config table (`name` + parameters)."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table with a `name` key, got {type(table).__name__}")
    if "name" not in table:
        raise ConfigError(f"{where}.name: missing; known defenses: {', '.join(DEFENSES.names())}")
    DEFENSES.get(table["name"], f"{where}.name")
    defense = DEFENSES.build(table["name"], {k: v for k, v in table.items() if k != "name"}, where)
    defense.where = where
    return defense


def build_chain(tables: Sequence[Mapping[str, Any]], where: str = "defenses") -> Chain:
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
    return Chain(defenses)


def load_defense_file(path: str | os.PathLike[str]) -> tuple[str, list[dict[str, Any]]]:
    """Read a preset: ``label = "noise-0.01"`` and ``[[defenses]]`` tables (none: no defense)."""
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
        self.seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        return idx

    def generator(self) -> torch.Generator:
        if self.seed is None:
            raise RuntimeError("the client step's sampler must be called before its compute (it seeds the defense)")
        return torch.Generator().manual_seed(self.seed)
