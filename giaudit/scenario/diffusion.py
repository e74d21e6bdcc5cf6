"""The federated diffusion scenario (`scenario.model = "ddpm_unet"`).

The global model is a DDPM noise predictor (a `diffusers.UNet2DModel`, untrained or a pretrained DDPM
prior). The client draws its batch, its timesteps `t` and its noise `eps` from the scenario's generator and
shares the gradient (FedSGD) or weight delta (FedAvg) of the DDPM loss, computed by
`giaudit.fl_diffusion.diffusion_update`, the same function every attack's trial uses.

Threat model: `threat.diffusion_noise = true` means the server fixed `t` and `eps` (it sent them with the
model), so the observation carries them; otherwise they are private to the client and the observation has
only the public noise schedule. The record's `granted` capabilities say which.

Defenses that only transform the shared update (noise, clipping of the update, sparsification, secure
aggregation) apply unchanged; defenses that change how a classifier computes its update (DP-SGD,
label disguise) are refused with a clear error.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from giaudit.data import ImageDataset
from giaudit.defenses.base import Chain, Defense, default_compute
from giaudit.device import to_model
from giaudit.errors import ConfigError
from giaudit.fl_diffusion import diffusion_update, draw
from giaudit.priors.ddpm import DDPMConfig, build_unet, load_ddpm, make_scheduler
from giaudit.scenario.client import configure_client
from giaudit.threat import observe
from giaudit.types import ClientProtocol, DataSpec, DiffusionInfo, GroundTruth, Observation, SharedUpdate, ThreatModel


@dataclass
class DiffusionScenario:
    model: nn.Module              # the global noise predictor
    alphas_cumprod: torch.Tensor  # its noise schedule
    pool: ImageDataset            # the client's private data pool
    protocol: ClientProtocol
    batch_size: int
    threat: ThreatModel
    client_data: str = "iid"      # how the private batch is drawn (configure_client)

    def simulate(self, defenses: Chain | Defense | None = None,
                 generator: torch.Generator | None = None) -> tuple[Observation, GroundTruth]:
        gen, defense, step = configure_client(self.pool, self.model, self.protocol, self.batch_size, defenses,
                                              generator, self.client_data)
        if step.compute is not default_compute or step.context.get("model", self.model) is not self.model:
            raise ConfigError(f"defenses: {defense.describe()} changes how a classifier computes its update; "
                              "on scenario.model = 'ddpm_unet' only defenses that transform the shared update "
                              "(noise, clipping, sparsification, quantisation) apply")
        idx = step.sampler(self.pool.labels, step.batch_size, gen)
        batch = self.pool.subset(idx)
        d = draw(len(idx), batch.images.shape[1:], int(self.alphas_cumprod.numel()), gen)
        device = self.alphas_cumprod.device
        meta = batch.meta or tuple({} for _ in range(len(idx)))
        meta = tuple({**m, "diffusion_t": int(t)} for m, t in zip(meta, d.timesteps))
        truth = GroundTruth(batch.images.clone(), batch.labels.clone(), meta)
        client_model = copy.deepcopy(self.model)
        # Drawn on the CPU, computed on the model's device.
        t_dev, noise_dev = d.timesteps.to(device), to_model(d.noise, client_model)
        tensors = diffusion_update(client_model, to_model(batch.images, client_model), t_dev, noise_dev,
                                   self.alphas_cumprod, step.protocol)
        kind: Literal["gradient", "delta"] = "gradient" if step.protocol.name == "fedsgd" else "delta"
        update = defense.transform(SharedUpdate(tuple(t.detach() for t in tensors), kind), gen)
        info = DiffusionInfo(self.alphas_cumprod.clone(), t_dev.clone(), noise_dev.clone())
        obs = observe(model=copy.deepcopy(self.model), update=update, data_spec=self.pool.spec,
                      threat=self.threat, batch_size=step.batch_size, protocol=step.protocol,
                      labels=batch.labels.to(device), bn_statistics=None, disclosed=defense.disclosures(update),
                      diffusion=info)
        return obs, truth


def diffusion_global_model(spec: DataSpec, prior: str | None, width: int | None, pretrain_steps: int,
                           generator: torch.Generator) -> tuple[nn.Module, torch.Tensor]:
    """The global noise predictor: a pretrained DDPM prior (`scenario.diffusion_prior`) or a fresh UNet."""
    if pretrain_steps:
        raise ConfigError("scenario.pretrain_steps: not used with scenario.model = 'ddpm_unet'; set "
                          "scenario.diffusion_prior to a trained DDPM (e.g. 'mnist32_ddpm') instead")
    if prior is not None:
        p = load_ddpm(prior)
        if (p.config.channels, p.config.size, p.config.size) != spec.shape:
            raise ConfigError(f"scenario.diffusion_prior: {p.name} makes {p.config.channels}x{p.config.size}x"
                              f"{p.config.size} images, the data are {'x'.join(map(str, spec.shape))}; "
                              "set data.size / data.channels to match")
        return p.unet, p.alphas_cumprod
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    config = DDPMConfig(size=spec.height, channels=spec.channels,
                        block_out_channels=(width or 32, 2 * (width or 32), 2 * (width or 32)))
    return build_unet(config, seed), make_scheduler(config).alphas_cumprod.float()
