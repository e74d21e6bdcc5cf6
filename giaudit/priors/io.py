"""Save and load generative priors: safetensors weights plus a JSON config.

A checkpoint is either a folder holding ``generator.safetensors`` and
``config.json`` (what ``giaudit prior train --out DIR`` writes), or a
``NAME.safetensors`` file with a ``NAME.json`` beside it (the flat layout of
the priors shipped in ``giaudit/priors/assets/``). Nothing is unpickled: the
weights are safetensors and the config is JSON, so loading a checkpoint from an
untrusted source cannot run code.

The JSON holds the architecture (``generator``) and where the prior came from
(``training``: data source, image size, steps, seed, loss, ...), which the
attacks copy into their parameters so a report says which prior each attack
used.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from giaudit.errors import ConfigError, DataError
from giaudit.priors.generator import Generator, GeneratorConfig, build_generator

ASSETS = Path(__file__).resolve().parent / "assets"
FORMAT = "giaudit-prior/1"


@dataclass
class Prior:
    """A generator and the record of how it was made."""

    generator: Generator
    training: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    @property
    def config(self) -> GeneratorConfig:
        return self.generator.config

    def describe(self) -> dict[str, Any]:
        """Short provenance for attack parameters and reports."""
        t = self.training
        return {"prior": self.name or "unnamed", "prior_data": t.get("data", "none (untrained)"),
                "prior_size": self.config.size, "prior_latent_dim": self.config.latent_dim,
                "prior_steps": int(t.get("steps", 0)), "prior_loss": t.get("loss", "none")}


def untrained_prior(config: GeneratorConfig, seed: int = 0) -> Prior:
    """A randomly initialised generator (GIML's start, and the "no prior" control)."""
    gen = build_generator(config, torch.Generator().manual_seed(seed))
    return Prior(gen, {"data": "none (untrained)", "steps": 0, "seed": seed, "loss": "none"},
                 name=f"untrained{config.size}")


def _paths(path: Path) -> tuple[Path, Path]:
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / "generator.safetensors", path / "config.json"


def save_prior(prior: Prior, out: str | os.PathLike[str]) -> Path:
    """Write the checkpoint; `out` is a folder, or a ``.safetensors`` file for the flat layout.

    Returns the path to give `load_prior`.
    """
    out = Path(out)
    weights, cfg = _paths(out)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in prior.generator.state_dict().items()}
    save_file(state, str(weights), metadata={"format": FORMAT})
    doc = {"format": FORMAT, "name": prior.name, "generator": prior.config.to_dict(),
           "training": prior.training}
    tmp = cfg.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, cfg)
    return out


def shipped_priors() -> dict[str, Path]:
    """Names of the priors inside the package, mapped to their weight files."""
    if not ASSETS.is_dir():
        return {}
    return {p.stem: p for p in sorted(ASSETS.glob("*.safetensors")) if p.with_suffix(".json").is_file()}


def resolve(name_or_path: str | os.PathLike[str], where: str = "prior") -> Path:
    """A shipped prior's name ("mnist32") or a checkpoint path -> the path to load."""
    shipped = shipped_priors()
    if isinstance(name_or_path, str) and name_or_path in shipped:
        return shipped[name_or_path]
    p = Path(name_or_path).expanduser()
    weights, cfg = _paths(p)
    if not weights.is_file() or not cfg.is_file():
        known = ", ".join(shipped) or "none"
        raise ConfigError(f"{where}: {str(name_or_path)!r} is neither a shipped prior ({known}) nor a checkpoint "
                          f"({weights.name} + {cfg.name} not found at {p}); train one with "
                          "`giaudit prior train --data ... --out DIR`")
    return p


def load_prior(name_or_path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Prior:
    """Load a prior by shipped name or path; the generator is returned in eval mode."""
    path = resolve(name_or_path)
    weights, cfg_path = _paths(path)
    try:
        doc = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{cfg_path}: unreadable prior config ({exc}); re-save the prior") from exc
    if not isinstance(doc, Mapping) or doc.get("format") != FORMAT or "generator" not in doc:
        raise DataError(f"{cfg_path}: not a giaudit prior config (expected format {FORMAT!r})")
    config = GeneratorConfig.from_dict(doc["generator"], where=str(cfg_path))
    gen = Generator(config)
    try:
        state = load_file(str(weights), device=str(device))
        gen.load_state_dict(state, strict=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise DataError(f"{weights}: weights do not match the config in {cfg_path.name} ({exc})") from exc
    gen.to(device).eval()
    name = doc.get("name") or (path.stem if path.suffix == ".safetensors" else path.name)
    return Prior(gen, dict(doc.get("training", {})), name=str(name))


def as_prior(spec: "str | os.PathLike[str] | Prior") -> Prior:
    """Attacks accept a shipped name, a path, or a `Prior` object (Python API)."""
    if isinstance(spec, Prior):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise ConfigError(f"attack.prior: expected a prior name or path, got {type(spec).__name__}")
    return load_prior(spec)
