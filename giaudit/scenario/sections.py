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
from giaudit.scenario.factory import check_ref, is_factory_ref
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
    # The deployment's input normalisation, per channel: the model sees (x - mean) / std as the first operation
    # of its forward, while attacks, priors and metrics work on images in [0, 1].
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_choice("source", self.source, SOURCES)
        check_choice("label_parser", self.label_parser, LABEL_PARSERS)
        check_number("size", self.size, low=4, high=256)
        self._check_normalisation()
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

    def _check_normalisation(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ParamError("mean" if self.mean is None else "std", "data.mean and data.std go together (one "
                             "value per channel each)")
        if self.mean is None or self.std is None:
            return
        for key, values in (("mean", self.mean), ("std", self.std)):
            if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ParamError(key, f"expected a list of numbers, one per channel, got {list(values)!r}")
            for v in values:
                check_number(key, float(v))
        if len(self.mean) != len(self.std):
            raise ParamError("std", f"has {len(self.std)} values, data.mean has {len(self.mean)}: one per channel "
                             "each")
        if any(float(v) <= 0 for v in self.std):
            raise ParamError("std", f"every value must be > 0, got {list(self.std)!r}")
        if self.channels is not None and len(self.mean) != self.channels:
            raise ParamError("mean", f"has {len(self.mean)} values, but data.channels = {self.channels}: one per "
                             "channel")
        # Stored as tuples of floats (the section is hashable: loaded datasets are cached by it).
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(mean, std) per channel when the config sets them, else None."""
        return None if self.mean is None or self.std is None else (self.mean, self.std)

    @property
    def has_identities(self) -> bool:
        """The labels are people (an image folder with one subfolder per person, as ORL): re-identification is
        against identities rather than against single photos."""
        return self.source == "folder" and self.label_parser == "subfolder"


# The scenario keys a capture audit uses; every other scenario key and all of [data] describe a simulation.
CAPTURE_KEYS = frozenset({"capture", "model_factory", "model_args", "bn_mode", "deployment_defenses"})
# The [data] keys a capture audit uses: the deployment's input normalisation, when its factory lacks it.
CAPTURE_DATA_KEYS = frozenset({"mean", "std"})


@dataclass(frozen=True, kw_only=True)
class ScenarioSection:
    model: str = "lenet_relu"           # a built-in model, or "package.module:factory" (your own model)
    model_args: dict[str, Any] | None = None  # keyword arguments of the factory (scenario.model or model_factory)
    weights: str | None = None        # the global model's state: a .safetensors file or a torch state dict
    num_classes: int | None = None    # the model's classes (default: the data's, largest label + 1)
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
        if is_factory_ref(self.model):
            check_ref("scenario.model", self.model)
        else:
            check_choice("model", self.model, sorted(MODELS))
        if self.model_factory is not None:
            check_ref("scenario.model_factory", self.model_factory)
        if self.model_args is not None and self.factory is None:
            raise ParamError("model_args", f"keyword arguments of a factory: set scenario.model = "
                             f"\"package.module:factory\" (scenario.model is the built-in {self.model!r})")
        if self.factory is not None and self.width is not None:
            raise ParamError("width", "sets the size of a built-in model; pass your factory's arguments in "
                             "scenario.model_args")
        if self.weights is not None:
            if self.capture is not None:
                raise ParamError("weights", "a capture holds the global weights the client received; remove "
                                 "scenario.weights when scenario.capture is set")
            if self.pretrain_steps:
                raise ParamError("pretrain_steps", "scenario.weights is the state the audit attacks; remove "
                                 "scenario.pretrain_steps (or the weights)")
        check_number("num_classes", self.num_classes, low=2)
        if self.capture is not None and self.num_classes is not None:
            raise ParamError("num_classes", "a capture names its classes (capture.json's data.num_classes); remove "
                             "scenario.num_classes when scenario.capture is set")
        if self.diffusion and self.weights is not None:
            raise ParamError("weights", "not used with the diffusion client; start from a trained DDPM with "
                             "scenario.diffusion_prior")
        if self.diffusion and self.num_classes is not None:
            raise ParamError("num_classes", "a DDPM has no classes; remove it with scenario.model = 'ddpm_unet'")
        check_choice("client_data", self.client_data, ("iid", "one_label"))
        check_number("clients_per_seed", self.clients_per_seed, low=1)
        if self.checkpoints is not None:
            if not self.checkpoints or not all(type(r) is int and r >= 0 for r in self.checkpoints):
                raise ParamError("checkpoints", "expected a non-empty list of rounds >= 0, e.g. [0, 50, 200]")
            if list(self.checkpoints) != sorted(set(self.checkpoints)):
                raise ParamError("checkpoints", "rounds must be increasing and distinct")
        if self.diffusion_prior is not None and not self.diffusion:
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
    def factory(self) -> tuple[str, str] | None:
        """(config key, "module:factory") of the user's model factory, None for a built-in model."""
        if self.model_factory is not None:
            return "scenario.model_factory", self.model_factory
        if is_factory_ref(self.model):
            return "scenario.model", self.model
        return None

    @property
    def diffusion(self) -> bool:
        """The federated model is the built-in DDPM noise predictor (the diffusion client)."""
        return self.factory is None and MODELS[self.model].diffusion

    @property
    def clients(self) -> int:
        """The private batches attacked per seed: `clients_per_seed`, 1 when unset."""
        return 1 if self.clients_per_seed is None else self.clients_per_seed

    @property
    def rounds(self) -> list[int | None]:
        """The training rounds whose update is attacked; [None] (no `checkpoints`): the scenario's own (initial
        or pretrained) model."""
        return [None] if not self.checkpoints else list(self.checkpoints)
