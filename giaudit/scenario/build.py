"""Config sections -> the audited client: its data, its global model and its step.

`build_scenario` turns the ``[data]`` and ``[scenario]`` sections and the
threat model into the simulated client of one seed: the classifier client
`Scenario` (FedSGD or FedAvg) or the federated DDPM client
`DiffusionScenario`, its pool drawn by `giaudit.data.split_indices` (every
``pool_every``-th image, so a prior trained with the same holdout never saw
it) and its global model initialised (and optionally pretrained) from the
seed. `cell_scenario` is what an audit cell attacks: that simulation, or the
captured real update of ``scenario.capture`` (`CaptureScenario`).
`training_data` is the federation's side of the same split (every image not
held out), for the federated trainings of utility and checkpoints.

Every draw comes from generators seeded by `giaudit.training.stable_seed`
(the split, the model), so a seed builds the same client in any process.
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from giaudit.data import ImageDataset, load_dataset, split_indices
from giaudit.device import CPU, Runtime, moved
from giaudit.errors import ConfigError
from giaudit.fl import normalise_inputs
from giaudit.scenario.capture import CaptureScenario
from giaudit.scenario.client import Scenario, pretrain
from giaudit.scenario.diffusion import DiffusionScenario, diffusion_global_model
from giaudit.scenario.factory import call_factory
from giaudit.scenario.models import build_model, seeded_init
from giaudit.scenario.sections import DataSection, ScenarioSection
from giaudit.scenario.state import load_weights
from giaudit.training import stable_seed
from giaudit.types import ClientProtocol, DataSpec, ThreatModel

# The classifier client (FedSGD / FedAvg) or the federated DDPM client: both simulate().
AnyScenario = Scenario | DiffusionScenario


@lru_cache(maxsize=4)
def load_data(data: DataSection) -> ImageDataset:
    """The images of ``[data]`` (cached per process: cells of one run share them)."""
    kwargs: dict[str, Any] = {"size": data.size}
    if data.channels is not None:
        kwargs["channels"] = data.channels
    if data.source in ("folder", "lfw_subset") and data.limit is not None:
        kwargs["limit"] = data.limit
    if data.source == "folder":
        kwargs.update(path=data.path, label_parser=data.label_parser, label_field=data.label_field)
    return load_dataset(data.source, **kwargs)


def preload(data: DataSection, scenario: ScenarioSection) -> None:
    """Load the dataset once in the driver, so forked local workers share it instead of each reading it."""
    if scenario.capture is None:
        load_data(data)


def scenario_name(data: DataSection, scenario: ScenarioSection) -> str:
    """The record's scenario column, e.g. ``mnist5k32-lenet_relu-fedsgd-b1``, ``folder48-task.make_model-...``
    (a factory, its ':' made a '.') or ``capture-client-0``."""
    if scenario.capture:
        return f"capture-{Path(scenario.capture).name}"
    model = scenario.model.replace(":", ".")
    return f"{data.source}{data.size}-{model}-{scenario.protocol}-b{scenario.batch_size}"


def data_spec(images: ImageDataset, scenario: ScenarioSection) -> DataSpec:
    """The data's form as the model sees it: `scenario.num_classes` when set (checked to cover the labels)."""
    spec = images.spec
    if scenario.num_classes is None:
        return spec
    if scenario.num_classes < spec.num_classes:
        raise ConfigError(f"scenario.num_classes: {scenario.num_classes} classes, but the data has labels up to "
                          f"{spec.num_classes - 1}; set at least {spec.num_classes}")
    return dataclasses.replace(spec, num_classes=scenario.num_classes)


def model_provenance(scenario: ScenarioSection, sha256: str | None) -> dict[str, Any]:
    """What the records say about the audited model: its factory and arguments (or built-in name) and the
    SHA-256 of the weights file it was loaded from."""
    out: dict[str, Any] = {}
    factory = scenario.factory
    if factory is not None:
        out["factory"] = factory[1]
        out["args"] = dict(scenario.model_args or {})
    else:
        out["name"] = scenario.model
    if scenario.weights is not None:
        out["weights"] = scenario.weights
        out["weights_sha256"] = sha256
    return out


def global_model(data: DataSection, scenario: ScenarioSection, spec: DataSpec, generator: torch.Generator,
                 base: Path | None = None) -> tuple[nn.Module, str | None]:
    """The classifier the federation trains: the built-in `scenario.model` or the user's factory, initialised
    from `generator` on the CPU, with `scenario.weights` loaded and `data.mean` / `data.std` as the first
    operation of its forward. Returns it and the weights file's SHA-256 (None without weights).

    The model is checked once on a zero batch: its output must be one logit per class."""
    s = scenario
    factory = s.factory
    if factory is not None:
        key, ref = factory
        model = seeded_init(lambda: call_factory(key, ref, s.model_args, base), generator)
        where = f"the model from {ref}"
    else:
        model = build_model(s.model, channels=spec.channels, num_classes=spec.num_classes, size=spec.height,
                            width=s.width, generator=generator)
        where = f"scenario.model {s.model!r}"
    digest = load_weights(model, s.weights) if s.weights is not None else None
    if data.normalisation is not None:
        mean, std = data.normalisation
        if len(mean) != spec.channels:
            raise ConfigError(f"data.mean: {len(mean)} values, but the images have {spec.channels} channels: one "
                              "per channel")
        normalise_inputs(model, mean, std)
    _check_logits(model, spec, where, factory is not None)
    return model, digest


def _check_logits(model: nn.Module, spec: DataSpec, where: str, own: bool) -> None:
    """One forward of a zero image in eval mode (BatchNorm's running statistics are not moved)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros((1, *spec.shape), device="cpu"))
    except Exception as exc:
        hint = " (check scenario.model_args and data.size / data.channels)" if own else ""
        raise ConfigError(f"scenario.model: {where} fails on a batch of {spec.channels}x{spec.height}x{spec.width} "
                          f"images{hint}: {type(exc).__name__}: {exc}") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, spec.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"scenario.num_classes: {where} outputs {shape} for one image, but the data has "
                          f"{spec.num_classes} classes (expected (1, {spec.num_classes})); set scenario.num_classes "
                          "or the factory's arguments")


def _split(data: DataSection, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(client pool, held-out) indices of the seed's split."""
    split_gen = torch.Generator(device="cpu").manual_seed(stable_seed("split", seed))
    return split_indices(n, data.holdout, split_gen, data.pool_every)


def build_scenario(data: DataSection, scenario: ScenarioSection, threat: ThreatModel,
                   seed: int, *, base: Path | None = None,
                   runtime: Runtime = CPU) -> tuple[AnyScenario, ImageDataset]:
    """The global model (initialised or loaded from `scenario.weights` on the CPU, then moved to the runtime's
    device and dtype, optionally pretrained there) and the client's pool; plus the held-out split. `base`: the
    config's folder, searched last for a model factory."""
    images = load_data(data)
    spec = data_spec(images, scenario)
    if spec is not images.spec:
        images = dataclasses.replace(images, spec=spec)
    pool_idx, held_idx = _split(data, len(images), seed)
    pool, held = images.subset(pool_idx), images.subset(held_idx)
    s = scenario
    gen = torch.Generator().manual_seed(stable_seed("model", seed))
    name = cast(Literal["fedsgd", "fedavg"], s.protocol)  # one of the two: ScenarioSection checked it
    protocol = ClientProtocol(name, s.local_steps, float(s.local_lr), s.local_batch_size)
    if s.diffusion:
        unet, schedule = diffusion_global_model(images.spec, s.diffusion_prior, s.width, s.pretrain_steps, gen)
        unet, schedule = moved(unet, runtime.device, runtime.dtype), schedule.to(runtime.device, runtime.dtype)
        return DiffusionScenario(unet, schedule, pool, protocol, s.batch_size, threat, s.client_data), held
    model, _digest = global_model(data, s, spec, gen, base)
    model = model.to(runtime.device, runtime.dtype)
    pretrain(model, pool, s.pretrain_steps, gen)
    model.train(s.bn_mode == "train")
    return Scenario(model, pool, protocol, s.batch_size, threat, s.client_data), held


def surrogate_scenario(data: DataSection, audited: AnyScenario, seed: int) -> AnyScenario:
    """The audited scenario (its global model, protocol, batch size, threat) with the server's own data in
    place of the client's pool: the seed's held-out split, which no audited client draws from (SoK class D,
    surrogate data). A server tunes its attack on clients simulated from it."""
    return dataclasses.replace(audited, pool=server_data(data, seed))


def cell_scenario(data: DataSection, scenario: ScenarioSection, threat: ThreatModel, seed: int,
                  base: Path, runtime: Runtime = CPU) -> AnyScenario | CaptureScenario:
    """The simulated client of the sections, or the captured real update when `scenario.capture` is set
    (`base`: the config's folder, searched last for a model factory), its model on the runtime's device."""
    if scenario.capture is not None and scenario.model_factory is not None:
        return CaptureScenario.build(scenario.capture, scenario.model_factory, threat, bn_mode=scenario.bn_mode,
                                     base=base, factory_args=scenario.model_args, normalisation=data.normalisation,
                                     runtime=runtime, declared=scenario.deployment_defenses)
    return build_scenario(data, scenario, threat, seed, base=base, runtime=runtime)[0]


def server_data(data: DataSection, seed: int) -> ImageDataset:
    """The images a server holds besides the federation's: the seed's held-out split (never the audited
    client's pool). A malicious server estimates its modification on them (surrogate data)."""
    images = load_data(data)
    _pool, held_idx = _split(data, len(images), seed)
    return images.subset(held_idx)


def check_scenario(data: DataSection, scenario: ScenarioSection, threat: ThreatModel, base: Path | None) -> None:
    """Build what the cells will build, once, before anything is computed or written: the capture with its
    factory, or the data and the global model (factory and its arguments, weights, normalisation, the number
    of classes). Raises the error a cell would raise, naming its key."""
    if scenario.capture is not None and scenario.model_factory is not None:
        CaptureScenario.build(scenario.capture, scenario.model_factory, threat, bn_mode=scenario.bn_mode, base=base,
                              factory_args=scenario.model_args, normalisation=data.normalisation,
                              declared=scenario.deployment_defenses)
        return
    if scenario.diffusion:
        if data.normalisation is not None:
            raise ConfigError("data.mean: the diffusion client's UNet takes images in [0, 1] as its DDPM loss "
                              "defines them; remove data.mean and data.std with scenario.model = 'ddpm_unet'")
        return
    spec = data_spec(load_data(data), scenario)
    global_model(data, scenario, spec, torch.Generator().manual_seed(0), base)


def training_data(data: DataSection, scenario: ScenarioSection, threat: ThreatModel, seed: int, *,
                  base: Path | None = None,
                  runtime: Runtime = CPU) -> tuple[AnyScenario, ImageDataset, ImageDataset]:
    """The scenario (its model on the runtime's device), the federation's training data (every image not held
    out: the audited client's pool and the other clients' data) and the held-out split the accuracy is
    measured on."""
    built, held = build_scenario(data, scenario, threat, seed, base=base, runtime=runtime)
    images = load_data(data)
    _pool, held_idx = _split(data, len(images), seed)
    mask = torch.ones(len(images), dtype=torch.bool, device="cpu")
    mask[held_idx] = False
    return built, images.subset(torch.nonzero(mask).flatten()), held


def client_pool(data: DataSection, seed: int) -> ImageDataset:
    """The audited client's pool of one seed (what its private batches are drawn from), without the model."""
    images = load_data(data)
    pool_idx, _held = _split(data, len(images), seed)
    return images.subset(pool_idx)
