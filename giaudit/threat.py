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
    CAPABILITIES,
    Capability,
    ClientProtocol,
    DataSpec,
    DiffusionInfo,
    Disclosure,
    Observation,
    SharedUpdate,
    ThreatModel,
)


def threat_model(**granted: bool | None) -> ThreatModel:
    """A threat model from capability flags by name (``true_labels=True``); a flag not given, or None, takes
    the capability's default from `giaudit.types.CAPABILITIES`."""
    known = {c.value: c for c in Capability}
    unknown = sorted(set(granted) - set(known))
    if unknown:
        raise TypeError(f"threat_model: unknown capability {unknown[0]!r}; known: {', '.join(known)}")
    flags = {c: CAPABILITIES[c].default if granted.get(c.value) is None else bool(granted[c.value])
             for c in Capability}
    return ThreatModel(frozenset(c for c, on in flags.items() if on))


def observe(*, model: nn.Module, update: SharedUpdate, data_spec: DataSpec, threat: ThreatModel,
            batch_size: int, protocol: ClientProtocol, labels: Tensor | None,
            bn_statistics: tuple[tuple[Tensor, Tensor], ...] | None,
            disclosed: Sequence[Disclosure] = (), diffusion: DiffusionInfo | None = None,
            without_client: SharedUpdate | None = None) -> Observation:
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
        without_client=without_client if Capability.SELECTS_CLIENTS in g else None,
    )


def check(attack_name: str, requires: Iterable[Capability], threat: ThreatModel) -> None:
    missing = [c.value for c in requires if c not in threat.granted]
    if missing:
        raise ThreatModelError(
            f"attack {attack_name!r} needs {', '.join(missing)}, which the threat model does not grant; "
            f"set threat.{missing[0]} = true or choose another attack")
