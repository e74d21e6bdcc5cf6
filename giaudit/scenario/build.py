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

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, cast

import torch

from giaudit.data import ImageDataset, load_dataset, split_indices
from giaudit.scenario.capture import CaptureScenario
from giaudit.scenario.client import Scenario, pretrain
from giaudit.scenario.diffusion import DiffusionScenario, diffusion_global_model
from giaudit.scenario.models import MODELS, build_model
from giaudit.scenario.sections import DataSection, ScenarioSection
from giaudit.training import stable_seed
from giaudit.types import ClientProtocol, ThreatModel

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
    """The record's scenario column, e.g. ``mnist5k32-lenet_relu-fedsgd-b1`` or ``capture-client-0``."""
    if scenario.capture:
        return f"capture-{Path(scenario.capture).name}"
    return f"{data.source}{data.size}-{scenario.model}-{scenario.protocol}-b{scenario.batch_size}"


def _split(data: DataSection, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(client pool, held-out) indices of the seed's split."""
    split_gen = torch.Generator().manual_seed(stable_seed("split", seed))
    return split_indices(n, data.holdout, split_gen, data.pool_every)


def build_scenario(data: DataSection, scenario: ScenarioSection, threat: ThreatModel,
                   seed: int) -> tuple[AnyScenario, ImageDataset]:
    """The global model (initialised, optionally pretrained) and the client's pool; plus the held-out split."""
    images = load_data(data)
    pool_idx, held_idx = _split(data, len(images), seed)
    pool, held = images.subset(pool_idx), images.subset(held_idx)
    s = scenario
    gen = torch.Generator().manual_seed(stable_seed("model", seed))
    name = cast(Literal["fedsgd", "fedavg"], s.protocol)  # one of the two: ScenarioSection checked it
    protocol = ClientProtocol(name, s.local_steps, float(s.local_lr), s.local_batch_size)
    if MODELS[s.model].diffusion:
        unet, schedule = diffusion_global_model(images.spec, s.diffusion_prior, s.width, s.pretrain_steps, gen)
        return DiffusionScenario(unet, schedule, pool, protocol, s.batch_size, threat, s.client_data), held
    model = build_model(s.model, channels=images.spec.channels, num_classes=images.spec.num_classes,
                        size=images.spec.height, width=s.width, generator=gen)
    pretrain(model, pool, s.pretrain_steps, gen)
    model.train(s.bn_mode == "train")
    return Scenario(model, pool, protocol, s.batch_size, threat, s.client_data), held


def cell_scenario(data: DataSection, scenario: ScenarioSection, threat: ThreatModel, seed: int,
                  base: Path) -> AnyScenario | CaptureScenario:
    """The simulated client of the sections, or the captured real update when `scenario.capture` is set
    (`base`: the config's folder, searched first for the capture's model factory)."""
    if scenario.capture is not None and scenario.model_factory is not None:
        return CaptureScenario.build(scenario.capture, scenario.model_factory, threat, bn_mode=scenario.bn_mode,
                                     base=base)
    return build_scenario(data, scenario, threat, seed)[0]


def training_data(data: DataSection, scenario: ScenarioSection, threat: ThreatModel,
                  seed: int) -> tuple[AnyScenario, ImageDataset, ImageDataset]:
    """The scenario, the federation's training data (every image not held out: the audited client's pool and
    the other clients' data) and the held-out split the accuracy is measured on."""
    built, held = build_scenario(data, scenario, threat, seed)
    images = load_data(data)
    _pool, held_idx = _split(data, len(images), seed)
    mask = torch.ones(len(images), dtype=torch.bool)
    mask[held_idx] = False
    return built, images.subset(torch.nonzero(mask).flatten()), held


def client_pool(data: DataSection, seed: int) -> ImageDataset:
    """The audited client's pool of one seed (what its private batches are drawn from), without the model."""
    images = load_data(data)
    pool_idx, _held = _split(data, len(images), seed)
    return images.subset(pool_idx)
