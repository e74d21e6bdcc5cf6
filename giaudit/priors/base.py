"""The prior protocol: what every generative image prior offers, GAN or diffusion.

GIAS, GIML and GGL (GAN priors) and the diffusion attacks (DDPM priors) hold
a prior; the report and `giaudit doctor` only need what this protocol names:
its kind, its name, the image shape it makes, its provenance (`describe`) and
its serialised form (`to_document`: safetensors tensors plus a JSON document
whose ``format`` key says which loader reads it back). `giaudit.priors.io`
saves and loads any prior through it; a new kind registers its loader with
`register_format`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from torch import Tensor


class ImagePrior(Protocol):
    kind: str      # "gan" | "ddpm"
    name: str
    training: dict[str, Any]

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    def describe(self) -> dict[str, Any]: ...

    def to_document(self) -> tuple[dict[str, Tensor], dict[str, Any]]: ...


# format -> loader(document, tensors, where) -> prior; `where` names the file for errors.
Loader = Callable[[Mapping[str, Any], dict[str, Tensor], str], ImagePrior]
LOADERS: dict[str, Loader] = {}


def register_format(fmt: str, loader: Loader) -> None:
    if fmt in LOADERS and LOADERS[fmt] is not loader:
        raise ValueError(f"prior format {fmt!r} registered twice")
    LOADERS[fmt] = loader
