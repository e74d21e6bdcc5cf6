"""The ``[data]`` and ``[scenario]`` sections of an audit config: what the simulated client is.

Each section is a keyword-only frozen dataclass: its fields, type hints and
defaults are the config keys, and `giaudit.registry.build_from` checks a TOML
table against it (as it does attack and defense tables); `__post_init__`
checks the values and raises `ParamError` naming the key. A field left None
is an optional key that is absent from the canonical config (`canonical`):
the config hash is taken over that form, so adding an optional field never
changes the hashes of configs that do not set it.

They live beside the scenario they describe (`giaudit.scenario.build` turns
them into one) so that the scenario layer reads them typed without importing
the config parser above it; `giaudit.config` re-exports both.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from giaudit.data import LABEL_PARSERS, SOURCES
from giaudit.defenses import build_chain
from giaudit.errors import ParamError
from giaudit.registry import check_choice, check_number
from giaudit.scenario.models import MODELS


def canonical(section: Any) -> dict[str, Any]:
    """A section as the config's canonical table: every field in declaration order, the unset (None) ones left
    out. The config hash is taken over this form."""
    return {k: v for k, v in dataclasses.asdict(section).items() if v is not None}


@dataclass(frozen=True, kw_only=True)
class DataSection:
    source: str = "mnist5k"
    size: int = 32
    channels: int | None = None
    path: str | None = None
    label_parser: str = "subfolder"
    label_field: str = "gender"
    limit: int | None = None
    holdout: float = 0.2
    pool_every: int = 5

    def __post_init__(self) -> None:
        check_choice("source", self.source, SOURCES)
        check_choice("label_parser", self.label_parser, LABEL_PARSERS)
        check_number("size", self.size, low=4, high=256)
        if self.channels is not None and self.channels not in (1, 3):
            raise ParamError("channels", "must be 1 or 3")
        check_number("holdout", self.holdout, low=0.0)
        if self.holdout >= 1.0:
            raise ParamError("holdout", "must be in [0, 1)")
        check_number("pool_every", self.pool_every, low=1)
        check_number("limit", self.limit, low=1)
        if self.source == "folder" and self.path is None:
            raise ParamError("path", "required when data.source = 'folder'")
        if self.source != "folder" and self.path is not None:
            raise ParamError("path", f"only used with data.source = 'folder' (source is {self.source!r})")

    @property
    def has_identities(self) -> bool:
        """The labels are people (an image folder with one subfolder per person, as ORL): re-identification is
        against identities rather than against single photos."""
        return self.source == "folder" and self.label_parser == "subfolder"


# The scenario keys a capture audit uses; every other scenario key and all of [data] describe a simulation.
CAPTURE_KEYS = frozenset({"capture", "model_factory", "bn_mode", "deployment_defenses"})


@dataclass(frozen=True, kw_only=True)
class ScenarioSection:
    model: str = "lenet_relu"
    width: int | None = None
    pretrain_steps: int = 0
    bn_mode: str = "train"
    protocol: str = "fedsgd"
    batch_size: int = 1
    local_steps: int = 1
    local_lr: float = 0.1
    local_batch_size: int | None = None
    clients_per_seed: int | None = None   # private batches attacked per seed (unset: 1, see `clients`)
    checkpoints: list[int] | None = None  # rounds of the federated training whose update is attacked
    diffusion_prior: str | None = None   # ddpm_unet only: a trained DDPM (name or path) as the global model
    capture: str | None = None        # a captured real update (giaudit.integrations.flower) instead of a simulation
    model_factory: str | None = None  # with capture: "module:function" building the deployed model
    # with capture: the deployment's own defenses, as giaudit defense tables, when the capture did not record them
    deployment_defenses: list[dict[str, Any]] | None = None
    client_data: str = "iid"          # iid, or one_label: a client's batch shares one label (one user's images)

    def __post_init__(self) -> None:
        if (self.capture is None) != (self.model_factory is None):
            raise ParamError("model_factory" if self.capture else "capture",
                             "capture and model_factory go together (a captured update and its model)")
        if self.capture is not None:
            # One captured update is one client at one round: nothing to draw per seed, no training to replay.
            if self.clients_per_seed not in (None, 1):
                raise ParamError("clients_per_seed", "a capture holds one client's update; remove "
                                 "scenario.clients_per_seed (or set it to 1) when scenario.capture is set")
            if self.checkpoints is not None:
                raise ParamError("checkpoints", "a capture is one round of a real training; remove "
                                 "scenario.checkpoints when scenario.capture is set (capture each round instead)")
            if self.client_data != "iid":
                raise ParamError("client_data", "a capture holds the batch the real client used; remove "
                                 "scenario.client_data when scenario.capture is set")
            if self.deployment_defenses is not None:
                if not isinstance(self.deployment_defenses, list) or not all(
                        isinstance(t, dict) for t in self.deployment_defenses):
                    raise ParamError("deployment_defenses", "expected an array of defense tables, e.g. "
                                     "[{ name = \"clip\", max_norm = 1.0 }] ([] for none)")
                build_chain(self.deployment_defenses, where="scenario.deployment_defenses")
            if self.diffusion_prior is not None:
                raise ParamError("diffusion_prior", "the captured model comes from scenario.model_factory; "
                                 "remove scenario.diffusion_prior when scenario.capture is set")
        elif self.deployment_defenses is not None:
            raise ParamError("deployment_defenses", "only a capture has a deployment's own defenses; simulate "
                             "defenses with [[defenses]]")
        check_choice("model", self.model, sorted(MODELS))
        check_choice("client_data", self.client_data, ("iid", "one_label"))
        check_number("clients_per_seed", self.clients_per_seed, low=1)
        if self.checkpoints is not None:
            if not self.checkpoints or not all(type(r) is int and r >= 0 for r in self.checkpoints):
                raise ParamError("checkpoints", "expected a non-empty list of rounds >= 0, e.g. [0, 50, 200]")
            if list(self.checkpoints) != sorted(set(self.checkpoints)):
                raise ParamError("checkpoints", "rounds must be increasing and distinct")
        if self.diffusion_prior is not None and not MODELS[self.model].diffusion:
            raise ParamError("diffusion_prior", "only used with a diffusion model: scenario.model = "
                             + " or ".join(repr(n) for n, e in MODELS.items() if e.diffusion))
        check_choice("bn_mode", self.bn_mode, ("train", "eval"))
        check_choice("protocol", self.protocol, ("fedsgd", "fedavg"))
        check_number("batch_size", self.batch_size, low=1)
        check_number("local_steps", self.local_steps, low=1)
        check_number("local_batch_size", self.local_batch_size, low=1)
        check_number("width", self.width, low=1)
        check_number("pretrain_steps", self.pretrain_steps, low=0)
        check_number("local_lr", self.local_lr, low=0.0, strict_low=True)

    @property
    def clients(self) -> int:
        """The private batches attacked per seed: `clients_per_seed`, 1 when unset."""
        return 1 if self.clients_per_seed is None else self.clients_per_seed

    @property
    def rounds(self) -> list[int | None]:
        """The training rounds whose update is attacked; [None] (no `checkpoints`): the scenario's own (initial
        or pretrained) model."""
        return [None] if not self.checkpoints else list(self.checkpoints)
