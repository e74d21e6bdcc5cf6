"""What the attacker may see, and the check that an attack gets only that.

`observe()` is the single place an `Observation` is built: optional fields are
filled only when the threat model grants the matching capability. Attacks
declare `requires`; `check()` raises, naming what is missing, when the threat
model does not grant it (LeakPro's habit).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor, nn

from giaudit.errors import ThreatModelError
from giaudit.types import (
    Capability,
    ClientProtocol,
    DataSpec,
    DiffusionInfo,
    Disclosure,
    Observation,
    SharedUpdate,
    ThreatModel,
)


def threat_model(*, batch_size: bool = True, training_details: bool = True, surrogate_data: bool = False,
                 bn_statistics: bool = False, true_labels: bool = False,
                 diffusion_noise: bool = False) -> ThreatModel:
    flags = {
        Capability.BATCH_SIZE: batch_size,
        Capability.TRAINING_DETAILS: training_details,
        Capability.SURROGATE_DATA: surrogate_data,
        Capability.BN_STATISTICS: bn_statistics,
        Capability.TRUE_LABELS: true_labels,
        Capability.DIFFUSION_NOISE: diffusion_noise,
    }
    return ThreatModel(frozenset(c for c, on in flags.items() if on))


def observe(*, model: nn.Module, update: SharedUpdate, data_spec: DataSpec, threat: ThreatModel,
            batch_size: int, protocol: ClientProtocol, labels: Tensor | None,
            bn_statistics: tuple[tuple[Tensor, Tensor], ...] | None,
            disclosed: Sequence[Disclosure] = (), diffusion: DiffusionInfo | None = None) -> Observation:
    """Build the attacker's view; withheld extras are None."""
    g = threat.granted
    if diffusion is not None and Capability.DIFFUSION_NOISE not in g:
        diffusion = DiffusionInfo(diffusion.alphas_cumprod)
    return Observation(
        model=model,
        update=update,
        data_spec=data_spec,
        threat=threat,
        batch_size=batch_size if Capability.BATCH_SIZE in g else None,
        protocol=protocol if Capability.TRAINING_DETAILS in g else None,
        labels=labels.clone() if (labels is not None and Capability.TRUE_LABELS in g) else None,
        bn_statistics=bn_statistics if Capability.BN_STATISTICS in g else None,
        disclosed=tuple(disclosed),
        diffusion=diffusion,
    )


def check(attack_name: str, requires: Iterable[Capability], threat: ThreatModel) -> None:
    missing = [c.value for c in requires if c not in threat.granted]
    if missing:
        raise ThreatModelError(
            f"attack {attack_name!r} needs {', '.join(missing)}, which the threat model does not grant; "
            f"set threat.{missing[0]} = true or choose another attack")
