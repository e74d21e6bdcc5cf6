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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from giaudit.errors import DataError, ParamError
from giaudit.io import atomic_write_bytes, atomic_write_text
from giaudit.priors.base import LOADERS, ImagePrior, register_format
from giaudit.priors.generator import Generator, GeneratorConfig, build_generator

ASSETS = Path(__file__).resolve().parent / "assets"
FORMAT = "giaudit-prior/1"


@dataclass
class Prior:
    """A GAN prior: a generator and the record of how it was made (an `ImagePrior`)."""

    generator: Generator
    training: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    kind: str = "gan"

    @property
    def config(self) -> GeneratorConfig:
        return self.generator.config

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config.channels, self.config.size, self.config.size)

    def to_document(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        state = {k: v.detach().contiguous().clone() for k, v in self.generator.state_dict().items()}
        return state, {"format": FORMAT, "name": self.name, "generator": self.config.to_dict(),
                       "training": self.training}

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


def save_prior(prior: ImagePrior, out: str | os.PathLike[str]) -> Path:
    """Write the checkpoint of any prior kind; `out` is a folder, or a ``.safetensors`` file (flat layout).

    Both files are written atomically. Returns the path to give `load_prior`.
    """
    out = Path(out)
    weights, cfg = _paths(out)
    state, doc = prior.to_document()
    atomic_write_bytes(weights, save(state, metadata={"format": str(doc["format"])}))
    atomic_write_text(cfg, json.dumps(doc, indent=2, sort_keys=True) + "\n")
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
        raise ParamError(where, f"{str(name_or_path)!r} is neither a shipped prior ({known}) nor a checkpoint "
                         f"({weights.name} + {cfg.name} not found at {p}); train one with "
                         "`giaudit prior train --data ... --out DIR`")
    return p


def load_prior(name_or_path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
               where: str = "prior") -> ImagePrior:
    """Load a prior by shipped name or path; the generator is returned in eval mode."""
    path = resolve(name_or_path, where)
    weights, cfg_path = _paths(path)
    try:
        doc = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{cfg_path}: unreadable prior config ({exc}); re-save the prior") from exc
    fmt = doc.get("format") if isinstance(doc, Mapping) else None
    if fmt not in LOADERS:
        raise DataError(f"{cfg_path}: not a giaudit prior config (format {fmt!r}; known: {', '.join(LOADERS)})")
    try:
        state = load_file(str(weights), device=str(device))
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
        raise DataError(f"{weights}: not a readable safetensors file ({exc}); re-save or re-train the prior") from exc
    if not doc.get("name"):
        doc = {**doc, "name": path.stem if path.suffix == ".safetensors" else path.name}
    with torch.device("cpu"):  # the prior's modules are built on the CPU; attacks move them where they compute
        return LOADERS[fmt](doc, state, str(weights))


def _load_gan(doc: Mapping[str, Any], state: dict[str, torch.Tensor], where: str) -> Prior:
    if "generator" not in doc:
        raise DataError(f"{where}: its config has no generator section")
    config = GeneratorConfig.from_dict(doc["generator"], where=where)
    gen = Generator(config)
    try:
        gen.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DataError(f"{where}: weights do not match the generator config ({exc})") from exc
    return Prior(gen.eval(), dict(doc.get("training", {})), name=str(doc["name"]))


register_format(FORMAT, _load_gan)


def as_prior(spec: str | os.PathLike[str] | ImagePrior, where: str = "prior") -> ImagePrior:
    """Attacks accept a shipped name, a path, or a prior object (Python API); `where` names the key."""
    if not isinstance(spec, (str, os.PathLike)) and hasattr(spec, "to_document"):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise ParamError(where, f"expected a prior name or path, got {type(spec).__name__}")
    return load_prior(spec, where=where)
