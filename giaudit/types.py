"""Frozen dataclasses that cross stage boundaries, and the capability table of the threat model.

The flow is one-way:
scenario -> defenses -> Observation -> attack -> Reconstruction -> evaluate.
Ground truth is split off where the batch is drawn and travels in its own
object (`GroundTruth`) that no attack receives: `Observation` has no field that
could hold it.
"""
from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class DataSpec:
    """What the attacker knows about the data's form (never its content)."""

    channels: int
    height: int
    width: int
    num_classes: int
    value_range: tuple[float, float] = (0.0, 1.0)
    name: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


@dataclass(frozen=True)
class SharedUpdate:
    """What leaves the client after its defenses.

    `kind == "gradient"`: FedSGD, the mean-loss gradient over the batch.
    `kind == "delta"`: FedAvg, the weight difference w_after - w_before.
    `tensors` follow `model.parameters()` order (entries may be None-free zeros
    for parameters a defense removed).
    """

    tensors: tuple[Tensor, ...]
    kind: Literal["gradient", "delta"] = "gradient"

    def flat(self) -> Tensor:
        return torch.cat([t.reshape(-1) for t in self.tensors])


class Capability(str, enum.Enum):
    """Extras beyond (model, update, data form) that a threat model can grant (rows of `CAPABILITIES`)."""

    BATCH_SIZE = "batch_size"
    TRAINING_DETAILS = "training_details"
    SURROGATE_DATA = "surrogate_data"
    BN_STATISTICS = "bn_statistics"
    TRUE_LABELS = "true_labels"
    DIFFUSION_NOISE = "diffusion_noise"
    MODIFIES_MODEL = "modifies_model"
    SELECTS_CLIENTS = "selects_clients"


@dataclass(frozen=True)
class CapabilityInfo:
    """One row of the capability table: everything giaudit says about a capability, once.

    `sok_class`: the letter of Carletti et al.'s SoK ("SoK: Gradient Inversion Attacks in Federated
    Learning", USENIX Security 2025) that granting it reaches ("" for extras outside that table); the letter of
    a threat model is the highest of its capabilities'. `default`: granted unless the config says otherwise
    (`[threat]`, `threat_model()`). `text`: what it means for a reader of the report. `oracle`: the report's
    bold line when it is granted and used, for extras no real server has (None: a realistic capability).
    `active`: a malicious server's capability (it departs from the protocol); the letters it reaches are the
    malicious classes (`ACTIVE_CLASSES`), the others an honest-but-curious server's.
    """

    capability: Capability
    sok_class: str
    default: bool
    text: str
    oracle: str | None = None
    active: bool = False
    # The letters granting this capability reaches together with another granted one, e.g. a server that
    # modifies the model and holds surrogate data is class G rather than F.
    combined: tuple[tuple[Capability, str], ...] = ()


CAPABILITIES: dict[Capability, CapabilityInfo] = {row.capability: row for row in (
    CapabilityInfo(Capability.BATCH_SIZE, "B", True, "basic knowledge: architecture, loss and batch size"),
    CapabilityInfo(Capability.TRAINING_DETAILS, "C", True,
                   "training details: learning rate, local steps, mini-batch size"),
    CapabilityInfo(Capability.SURROGATE_DATA, "D", True,
                   "surrogate data from the same distribution (e.g. a trained prior)"),
    CapabilityInfo(Capability.TRUE_LABELS, "", False, "the true labels of the private batch",
                   oracle="true labels given to the attacker"),
    CapabilityInfo(Capability.BN_STATISTICS, "E", False, "the client's batch-norm statistics",
                   oracle="client batch-norm statistics given to the attacker"),
    CapabilityInfo(Capability.DIFFUSION_NOISE, "", False,
                   "the diffusion client's timesteps and noise, fixed by the server"),
    CapabilityInfo(Capability.MODIFIES_MODEL, "F", False,
                   "a malicious server: it changes the global model it sends to the clients", active=True,
                   combined=((Capability.SURROGATE_DATA, "G"),)),
    CapabilityInfo(Capability.SELECTS_CLIENTS, "H", False,
                   "a malicious server that chooses which clients take part: it runs a round again without the "
                   "audited client", active=True),
)}

# The label of a run with no defense (an empty chain): what the shared update is without any protection.
NO_DEFENSE = "none"
# The label of an audited deployment whose own defenses nobody declared: not known to be undefended.
UNDECLARED_DEFENSE = "not declared"

# Names of the SoK classes (Carletti et al., the table of attacker capabilities): A-E passive, F-H active.
SOK_CLASSES = {
    "A": "eavesdropper",
    "B": "informed eavesdropper",
    "C": "parameter-aware eavesdropper",
    "D": "data-enhanced eavesdropper",
    "E": "statistics-informed eavesdropper",
    "F": "active manipulator",
    "G": "active manipulator",
    "H": "active manipulator",
}
# The letters a malicious server's capabilities reach (from the capability table); the others are an
# honest-but-curious server's.
ACTIVE_CLASSES = frozenset(
    [row.sok_class for row in CAPABILITIES.values() if row.active]
    + [letter for row in CAPABILITIES.values() if row.active for _other, letter in row.combined])


def class_span(active: bool) -> str:
    """The SoK letters of one kind of server as a range: "A-E" (honest-but-curious), "F-H" (malicious)."""
    letters = sorted(c for c in SOK_CLASSES if (c in ACTIVE_CLASSES) == active)
    return f"{letters[0]}-{letters[-1]}" if len(letters) > 1 else "".join(letters)


def server_kind(active: bool) -> str:
    """How reports name the server of a record: "malicious" (it changed the model, F-H) or
    "honest-but-curious" (A-E)."""
    return "malicious" if active else "honest-but-curious"


def a_server(active: bool) -> str:
    """`server_kind` in a sentence: "a malicious server", "an honest-but-curious server"."""
    return f"{'a' if active else 'an'} {server_kind(active)} server"


@dataclass(frozen=True)
class ClientProtocol:
    """How the client turned its batch into an update (known to class C attackers)."""

    name: Literal["fedsgd", "fedavg"] = "fedsgd"
    local_steps: int = 1
    local_lr: float = 0.1
    local_batch_size: int | None = None  # None: full batch each step
    # The sample indices of every local SGD step in the order the client took them (all epochs), when the
    # deployment recorded them (a shuffling DataLoader); None: `local_steps` epochs of ordered mini-batches.
    order: tuple[tuple[int, ...], ...] | None = None


@dataclass(frozen=True)
class ThreatModel:
    granted: frozenset[Capability]

    def has(self, cap: Capability) -> bool:
        return cap in self.granted

    @property
    def oracles(self) -> tuple[str, ...]:
        """The report's oracle lines for the granted extras no real server has, in table order."""
        return tuple(row.oracle for c, row in CAPABILITIES.items() if c in self.granted and row.oracle)

    @property
    def sok_class(self) -> str:
        """Letter of Carletti et al.'s SoK for the granted capabilities: the highest any of them reaches."""
        letters = [CAPABILITIES[c].sok_class for c in self.granted]
        letters += [letter for c in self.granted for other, letter in CAPABILITIES[c].combined if other in self.granted]
        return max(letters, default="") or "A"

    @property
    def active(self) -> bool:
        """The server may depart from the protocol (SoK classes F-H: it changes the model it sends, or chooses
        which clients take part): a malicious rather than a curious one."""
        return any(CAPABILITIES[c].active for c in self.granted)


ReplayFn = Callable[[Sequence[Tensor]], tuple[Tensor, ...]]


class ReplayRule(Protocol):
    """How a server that knows one defense replays its deterministic part on a trial update.

    `build` decides everything from what the attacker sees (the observed update,
    the batch size, the update kind) once per observation and returns a pure
    tensor function (differentiable, vmap-safe), or None when nothing can be
    replayed (a random mask hidden by noise, DP-SGD beyond one FedSGD sample).
    """

    def build(self, observed: tuple[Tensor, ...], batch_size: int | None,
              kind: str) -> tuple[str, ReplayFn] | None: ...


@dataclass(frozen=True)
class Disclosure:
    """What the server knows of one defense, under its own place in the chain.

    `params` are plain JSON values (results and reports store them); `replay`
    is the defense's own replay rule when a server could replay it. `stage`
    orders replays: "compute" ones (DP-SGD's per-sample clip, inside the
    client's step) come before the "transform" ones, which follow chain order.
    """

    position: int
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    replay: ReplayRule | None = field(default=None, compare=False)
    stage: Literal["compute", "transform"] = "transform"

    @property
    def key(self) -> str:
        return f"{self.position}:{self.name}"


def disclosed_values(disclosures: Sequence[Disclosure]) -> dict[str, dict[str, Any]]:
    """The plain-data form records store: {"0:clip": {"clip_norm": 0.5}, "2:clip": {...}}."""
    return {d.key: dict(d.params) for d in disclosures}


@dataclass(frozen=True)
class DiffusionInfo:
    """The diffusion scenario's public schedule, and the client's t and eps when the server fixed them."""

    alphas_cumprod: Tensor                 # T, the model's noise schedule (public: part of the model)
    timesteps: Tensor | None = None        # N, only with Capability.DIFFUSION_NOISE
    noise: Tensor | None = None            # N,C,H,W, only with Capability.DIFFUSION_NOISE

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())


@dataclass(frozen=True)
class Observation:
    """Everything the attacker may use, nothing more.

    Optional fields are filled only when the threat model grants them; the
    scenario enforces that (see `giaudit.threat.observe`).
    """

    model: nn.Module
    update: SharedUpdate
    data_spec: DataSpec
    threat: ThreatModel
    batch_size: int | None = None
    protocol: ClientProtocol | None = None
    labels: Tensor | None = None           # only with Capability.TRUE_LABELS
    bn_statistics: tuple[tuple[Tensor, Tensor], ...] | None = None  # (mean, var) per BN layer
    disclosed: tuple[Disclosure, ...] = ()
    diffusion: DiffusionInfo | None = None  # set by the diffusion scenario (scenario.model = "ddpm_unet")
    # The same round run again without the audited client (the same other clients, the same model, every
    # defense as usual): only with Capability.SELECTS_CLIENTS.
    without_client: SharedUpdate | None = None


@dataclass(frozen=True)
class GroundTruth:
    """The private batch. Reaches only `giaudit.metrics.evaluate`."""

    images: Tensor  # N,C,H,W in data_spec.value_range
    labels: Tensor  # N
    meta: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class Trace:
    losses: tuple[float, ...]          # best restart's matching loss per iteration
    restart_losses: tuple[float, ...]  # final attack loss of each restart
    best_restart: int
    iterations: int
    wall_s: float
    stopped_early: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reconstruction:
    images: Tensor           # N,C,H,W, in the data range
    labels: Tensor           # labels the attack used
    label_source: str        # "oracle", "idlg", "yin", "count", "optimised"
    trace: Trace
