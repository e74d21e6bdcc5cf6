"""Diffusion (DDPM) priors on `diffusers`: build, train, sample, save, load.

A DDPM prior is a small `diffusers.UNet2DModel` noise predictor `eps_phi(x_t, t)`
with the linear beta schedule of Ho et al. 2020 (T = 1000, beta 1e-4 .. 0.02,
the `diffusers.DDPMScheduler` defaults). It serves two roles:

- the federated model of the diffusion scenario (`scenario.model = "ddpm_unet"`,
  attacked by GIDM / GIDM+), and
- the surrogate-data prior of DiffULA's score-distillation term and of GIDM's
  sampler when the global model is untrained (SoK class D).

Images are in giaudit's data range [0, 1]; the model works in [-1, 1]
(`to_model` / `from_model`).

Double backward (every gradient-matching attack on a diffusion model needs
it) fails through diffusers' default scaled-dot-product attention on CPU
("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward
is not implemented"). `build_unet` therefore gives every attention module the
classic `AttnProcessor` (UNet2DModel has no `set_attn_processor`, so it is set
per module), and `load_ddpm` does the same.

Checkpoints go through the prior protocol (`giaudit.priors.base`, `giaudit.priors.io`): a folder with
``generator.safetensors`` + ``config.json``, or a flat ``NAME.safetensors`` + ``NAME.json``; no pickles.
The JSON holds ``"format": "giaudit-ddpm/1"``, the architecture (``unet``)
and the training record (``training``).

The shipped prior ``giaudit/priors/assets/mnist32_ddpm`` (11 720 steps) is reproduced by two commands:
``giaudit prior train --kind ddpm --data mnist5k --out mnist32_ddpm.safetensors --steps 5720 --minutes 1000
--seed 0 --threads 1 --batch-size 32`` (lr 5e-4, constant after 200 warm-up steps, EMA 0.999, holdout_mod 5:
the audit pool, every 5th image, is never seen), then ``giaudit prior train --kind ddpm --data mnist5k
--resume mnist32_ddpm.safetensors --out mnist32_ddpm.safetensors --steps 6000 --minutes 1000 --seed 0
--threads 1 --batch-size 32 --lr 2.5e-4`` (fresh AdamW at half the lr). On a loaded 2-core CPU the two took
100 and 76 minutes (0.75-1.05 s a step). Its samples are digits a held-out classifier labels with confidence
>= 0.9 for 0.789 of 256 (`benchmarks/ddpm_quality.py`; 0.586 after 1 817 steps, 0.719 after 5 720, 0.785
after 9 352: the aim of 0.8 is within the measure's noise, +-0.025 on 256 samples, but not reached). Training
writes an atomic checkpoint (EMA weights) every ``--checkpoint-minutes``, so
a usable prior exists whenever the run is stopped.
"""
from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from giaudit.device import generator_device, placement
from giaudit.errors import ConfigError, DataError, ParamError
from giaudit.priors.base import register_format
from giaudit.priors.io import load_prior, save_prior, shipped_priors
from giaudit.priors.train import _threads, save_grid, training_images

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DModel

# diffusers is imported where a UNet or scheduler is built, not here: importing it costs ~3 s (it loads
# torch._dynamo), and every attack and CLI command imports this module through the attack registry.

FORMAT = "giaudit-ddpm/1"
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class DDPMConfig:
    """Everything needed to rebuild the UNet and its noise schedule (stored as JSON)."""

    size: int = 32
    channels: int = 1
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention: bool = True            # self-attention in the UNet's mid block
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if self.channels not in (1, 3):
            raise ConfigError(f"ddpm.channels: {self.channels}; use 1 (grey) or 3 (RGB)")
        if not self.block_out_channels or any(c < 1 or c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(f"ddpm.block_out_channels: {self.block_out_channels}; each must be a positive "
                              f"multiple of norm_num_groups ({self.norm_num_groups})")
        down = 2 ** (len(self.block_out_channels) - 1)
        if self.size < 8 or self.size % down:
            raise ConfigError(f"ddpm.size: {self.size} px must be >= 8 and divisible by {down} "
                              f"({len(self.block_out_channels)} resolution levels)")
        if self.layers_per_block < 1 or self.num_train_timesteps < 2:
            raise ConfigError("ddpm.layers_per_block must be >= 1 and ddpm.num_train_timesteps >= 2")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(f"ddpm.beta_schedule: {self.beta_schedule!r}; known: {', '.join(BETA_SCHEDULES)}")

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "channels": self.channels, "block_out_channels": list(self.block_out_channels),
                "layers_per_block": self.layers_per_block, "attention": self.attention,
                "norm_num_groups": self.norm_num_groups, "num_train_timesteps": self.num_train_timesteps,
                "beta_schedule": self.beta_schedule, "beta_start": self.beta_start, "beta_end": self.beta_end}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "ddpm") -> DDPMConfig:
        if not isinstance(d, Mapping):
            raise DataError(f"{where}: 'unet' must be a table")
        known = set(cls().to_dict())
        unknown = set(d) - known
        if unknown:
            raise DataError(f"{where}: unknown UNet config keys {sorted(unknown)}")
        try:
            return cls(**dict(d))
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: invalid UNet config ({exc})") from exc


def use_classic_attention(unet: torch.nn.Module) -> torch.nn.Module:
    """Give every diffusers attention module the classic `AttnProcessor` (double-backward safe on CPU)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
    return unet


def build_unet(config: DDPMConfig, seed: int = 0) -> UNet2DModel:
    """A freshly initialised UNet; diffusers draws its init from the global RNG, seeded here and restored."""
    from diffusers import UNet2DModel

    n = len(config.block_out_channels)
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):  # built on the CPU (the same init everywhere)
        torch.manual_seed(seed)
        unet = UNet2DModel(sample_size=config.size, in_channels=config.channels, out_channels=config.channels,
                           block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
                           down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
                           add_attention=config.attention, norm_num_groups=config.norm_num_groups,
                           attention_head_dim=None)
    return use_classic_attention(unet)


def make_scheduler(config: DDPMConfig) -> DDPMScheduler:
    from diffusers import DDPMScheduler

    with torch.device("cpu"):  # its schedule tensors live on the CPU; users move them where they compute
        return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                             beta_start=config.beta_start, beta_end=config.beta_end)


def to_model(x: Tensor) -> Tensor:
    """[0, 1] images -> the model's [-1, 1]."""
    return x * 2.0 - 1.0


def from_model(x: Tensor) -> Tensor:
    """The model's [-1, 1] -> [0, 1] images (not clamped)."""
    return (x + 1.0) * 0.5


@dataclass
class DDPMPrior:
    """A trained (or untrained) noise predictor and the record of how it was made."""

    unet: UNet2DModel
    config: DDPMConfig
    training: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    kind: str = "ddpm"

    def __post_init__(self) -> None:
        self.alphas_cumprod = make_scheduler(self.config).alphas_cumprod.float().clone()

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def eps(self, x_t: Tensor, t: Tensor | int) -> Tensor:
        """Predicted noise for model-space `x_t` at timestep(s) `t`."""
        if not torch.is_tensor(t):
            t = torch.tensor([int(t)] * x_t.shape[0], device=x_t.device)
        return self.unet(x_t, t).sample

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config.channels, self.config.size, self.config.size)

    def to_document(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        state = {k: v.detach().contiguous().clone() for k, v in self.unet.state_dict().items()}
        return state, {"format": FORMAT, "kind": "ddpm", "name": self.name, "unet": self.config.to_dict(),
                       "training": self.training}

    def describe(self) -> dict[str, Any]:
        t = self.training
        return {"prior": self.name or "unnamed", "prior_kind": "ddpm", "prior_data": t.get("data", "none (untrained)"),
                "prior_size": self.config.size, "prior_steps": int(t.get("steps", 0)),
                "prior_params": sum(p.numel() for p in self.unet.parameters())}

    @torch.no_grad()
    def sample(self, n: int, *, steps: int = 50, generator: torch.Generator | None = None) -> Tensor:
        """`n` images in [0, 1] by deterministic DDIM (eta 0) with `steps` steps from seeded noise."""
        shape = (n, self.config.channels, self.config.size, self.config.size)
        z = torch.randn(shape, generator=generator, device=generator_device(generator)).to(placement(self.unet)[0])
        return from_model(ddim_sample(self.unet, self.alphas_cumprod, z, steps, clip=True)).clamp(0, 1)


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """DDIM's evenly spaced ("leading") timesteps, high to low, e.g. T=1000, 10 steps -> 900, 800, ..., 0."""
    if not 1 <= steps <= num_train_timesteps:
        raise ConfigError(f"sampler steps: {steps}; must be in 1..{num_train_timesteps}")
    ratio = num_train_timesteps // steps
    return [i * ratio for i in range(steps)][::-1]


def ddim_sample(unet: torch.nn.Module, alphas_cumprod: Tensor, z: Tensor, steps: int, *,
                clip: bool = False, timesteps: list[int] | None = None) -> Tensor:
    """Deterministic DDIM (Song et al. 2021, eta = 0) from noise `z` to a model-space image.

    Differentiable in `z` (and in the UNet's weights) when called with grad enabled: GIDM backpropagates
    through it. `clip` clamps each predicted x0 to [-1, 1] (sampling quality; kills gradients where it bites,
    so attacks leave it off).
    """
    ts = timesteps if timesteps is not None else ddim_timesteps(len(alphas_cumprod), steps)
    x = z
    for i, t in enumerate(ts):
        a_t = alphas_cumprod[t]
        a_prev = alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, device=alphas_cumprod.device)
        eps = unet(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)).sample
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if clip:
            x0 = x0.clamp(-1, 1)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


@torch.no_grad()
def ddpm_denoise(prior: DDPMPrior, x: Tensor, t_start: int, *, generator: torch.Generator | None = None,
                 steps: int | None = None) -> Tensor:
    """Noise [0, 1] images `x` to timestep `t_start` and run the reverse process back (SDEdit-style).

    With `steps` the reverse process is DDIM with that many steps over [0, t_start] (deterministic after
    the forward noising); otherwise ancestral DDPM, one step per timestep.
    """
    ac = prior.alphas_cumprod
    t_start = int(max(0, min(t_start, len(ac) - 1)))
    x0 = to_model(x)
    noise = torch.randn(x0.shape, generator=generator, device=generator_device(generator)).to(x0.device)
    xt = ac[t_start].sqrt() * x0 + (1 - ac[t_start]).sqrt() * noise
    if steps is not None:
        k = max(1, min(steps, t_start + 1))
        ts = sorted({round(t_start * (1 - i / k)) for i in range(k)}, reverse=True)
        return from_model(ddim_sample(prior.unet, ac, xt, len(ts), clip=True, timesteps=ts)).clamp(0, 1)
    betas = 1 - ac / torch.cat([torch.ones(1, device=ac.device, dtype=ac.dtype), ac[:-1]])
    for t in range(t_start, -1, -1):
        eps = prior.eps(xt, t)
        a_t, b_t = ac[t], betas[t]
        mean = (xt - b_t / (1 - a_t).sqrt() * eps) / (1 - b_t).sqrt()
        if t > 0:
            var = b_t * (1 - ac[t - 1]) / (1 - a_t)
            xt = mean + var.sqrt() * torch.randn(xt.shape, generator=generator,
                                                 device=generator_device(generator)).to(xt.device)
        else:
            xt = mean
    return from_model(xt).clamp(0, 1)


# ---------------------------------------------------------------------------------------------- save / load
# Through the prior protocol of `giaudit.priors.base`: `save_prior` / `load_prior` of `giaudit.priors.io` write
# and read any prior kind (same layouts, atomic writes, errors naming the file); this module registers the
# loader of its format.

def _load_document(doc: Mapping[str, Any], state: dict[str, Tensor], where: str) -> DDPMPrior:
    if "unet" not in doc:
        raise DataError(f"{where}: its config has no unet section")
    config = DDPMConfig.from_dict(doc["unet"], where=where)
    unet = build_unet(config)
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DataError(f"{where}: weights do not match the UNet config ({exc})") from exc
    return DDPMPrior(unet.eval(), config, dict(doc.get("training", {})), name=str(doc["name"]))


register_format(FORMAT, _load_document)


def save_ddpm(prior: DDPMPrior, out: str | os.PathLike[str]) -> Path:
    """Write the checkpoint atomically (`giaudit.priors.io.save_prior`); returns the path to load."""
    return save_prior(prior, out)


def shipped_ddpm_priors() -> dict[str, Path]:
    """Shipped DDPM priors (flat layout in ``giaudit/priors/assets``) by name."""
    out = {}
    for name, p in shipped_priors().items():
        try:
            if json.loads(p.with_suffix(".json").read_text()).get("format") == FORMAT:
                out[name] = p
        except (OSError, json.JSONDecodeError):
            continue
    return out


def load_ddpm(name_or_path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
              where: str = "prior") -> DDPMPrior:
    """Load a DDPM prior by shipped name (``mnist32_ddpm``) or path; the UNet is returned in eval mode."""
    prior = load_prior(name_or_path, device=device, where=where)
    if not isinstance(prior, DDPMPrior):
        raise ParamError(where, f"{str(name_or_path)!r} is a {prior.kind} prior; a DDPM prior is needed "
                         f"(shipped: {', '.join(shipped_ddpm_priors()) or 'none'}; train one with "
                         "`giaudit prior train --kind ddpm`)")
    return prior


def as_ddpm(spec: str | os.PathLike[str] | DDPMPrior, where: str = "prior") -> DDPMPrior:
    if isinstance(spec, DDPMPrior):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise ParamError(where, f"expected a DDPM prior name or path, got {type(spec).__name__}")
    return load_ddpm(spec, where=where)


def untrained_ddpm(config: DDPMConfig | None = None, seed: int = 0) -> DDPMPrior:
    config = config or DDPMConfig()
    return DDPMPrior(build_unet(config, seed).eval(), config, {"data": "none (untrained)", "steps": 0, "seed": seed},
                     name=f"untrained_ddpm{config.size}")


# ---------------------------------------------------------------------------------------------- training

def ddpm_loss(unet: torch.nn.Module, alphas_cumprod: Tensor, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Mean-squared DDPM loss `||eps - eps_phi(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t)||^2 / numel` (model space)."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return F.mse_loss(unet(x_t, t).sample, noise)


def train_ddpm(images: Tensor, *, config: DDPMConfig, seed: int = 0, steps: int = 100_000,
               minutes: float | None = None, batch_size: int = 64, lr: float = 5e-4, ema_decay: float = 0.999,
               warmup: int = 200, checkpoint: Callable[[DDPMPrior], None] | None = None,
               checkpoint_minutes: float = 5.0, show_progress: bool = True,
               resume: DDPMPrior | None = None) -> DDPMPrior:
    """Train until `steps` or the wall-time budget `minutes`; returns the EMA model as a prior (eval mode).

    `checkpoint(prior)` is called with the current EMA prior every `checkpoint_minutes` and at the end.

    `resume` continues a saved prior: its (EMA) weights start both the trained and the EMA model, the step count
    goes on from its record (so the EMA decay is already at `ema_decay`) and `steps` counts the new steps only.
    A checkpoint keeps no optimiser state, so AdamW starts afresh behind a new `warmup`; the batches come from
    a generator seeded by (seed, steps already done), not a replay of the first run's.
    """
    if steps < 1 or batch_size < 2:
        raise ConfigError("prior.steps must be >= 1 and prior.batch_size >= 2")
    if images.ndim != 4 or tuple(images.shape[1:]) != (config.channels, config.size, config.size):
        raise DataError(f"prior training images have shape {tuple(images.shape[1:])}, the UNet makes "
                        f"{(config.channels, config.size, config.size)}; set size / channels to match")
    torch.set_flush_denormal(True)
    done = 0
    if resume is not None:
        if resume.config != config:
            raise DataError(f"resume {resume.name}: its UNet config {resume.config.to_dict()} differs from this "
                            f"run's {config.to_dict()}; resume on images of the same size and channels")
        done = int(resume.training.get("steps", 0))
    rng = torch.Generator().manual_seed(seed if not done else seed * 1_000_003 + done)
    unet = (copy.deepcopy(resume.unet) if resume is not None else build_unet(config, seed)).train()
    ema = copy.deepcopy(unet).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    ac = make_scheduler(config).alphas_cumprod.float()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    data = to_model(images)
    n = data.shape[0]
    start = time.perf_counter()
    last_ckpt = start
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="prior ddpm", unit="step")
    losses: list[float] = []
    step = done

    def make_prior() -> DDPMPrior:
        record = {"steps": step, "seed": seed, "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay,
                  "train_s": round(time.perf_counter() - start, 1), "torch": torch.__version__,
                  "final_loss": round(sum(losses[-100:]) / max(1, len(losses[-100:])), 5),
                  "threads": torch.get_num_threads()}
        if resume is not None:
            # the earlier run's record, so the provenance of every step stays with the prior
            record["resumed_from"] = {"name": resume.name, **resume.training}
        return DDPMPrior(copy.deepcopy(ema).eval(), config, record)

    while step < done + steps:
        if minutes is not None and time.perf_counter() - start > minutes * 60:
            break
        x0 = data[torch.randint(0, n, (batch_size,), generator=rng, device=rng.device)]
        t = torch.randint(0, config.num_train_timesteps, (batch_size,), generator=rng, device=rng.device)
        noise = torch.randn(x0.shape, generator=rng, device=rng.device)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step - done + 1) / max(1, warmup))
        loss = ddpm_loss(unet, ac, x0, t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.mul_(d).add_(p.detach(), alpha=1 - d)
            for be, b in zip(ema.buffers(), unet.buffers()):
                be.copy_(b)
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.4f}")
        if checkpoint is not None and time.perf_counter() - last_ckpt > checkpoint_minutes * 60:
            checkpoint(make_prior())
            last_ckpt = time.perf_counter()
    if bar is not None:
        bar.close()
    prior = make_prior()
    if checkpoint is not None:
        checkpoint(prior)
    return prior


def train_main(data: str, out: Path, *, steps: int = 100_000, minutes: float | None = 60.0, size: int = 32,
               seed: int = 0, batch_size: int = 64, lr: float = 5e-4, channels: int | None = None,
               limit: int | None = None, holdout_mod: int = 5, threads: int = 1, width: int = 32,
               checkpoint_minutes: float = 5.0, name: str | None = None, show_progress: bool = True,
               resume: str | os.PathLike[str] | None = None) -> Path:
    """Train a DDPM prior on `data` (holding out every `holdout_mod`-th image, the audit pool) and save it.

    `resume` (a DDPM prior name or path) continues that prior's training for `steps` more steps; its
    architecture is kept (`width` is ignored) and `out` may be the same path (checkpoints are atomic).
    """
    out = Path(out)
    earlier = load_ddpm(resume, where="resume") if resume is not None else None
    with _threads(threads):
        images = training_images(data, size, channels, limit, holdout_mod, batch_size)
        config = earlier.config if earlier is not None else DDPMConfig(
            size=size, channels=int(images.shape[1]), block_out_channels=(width, 2 * width, 2 * width))
        flat = out.suffix == ".safetensors"
        stem = out.with_suffix("") if flat else out
        record = {"data": data if data in ("mnist5k", "digits", "lfw_subset") else Path(data).name,
                  "images": int(images.shape[0]), "holdout_mod": holdout_mod, "size": size,
                  "minutes_budget": minutes}
        prior_name = name or (out.stem if flat else out.name)

        def checkpoint(prior: DDPMPrior) -> None:
            prior.training.update(record)
            prior.name = prior_name
            save_ddpm(prior, out)

        prior = train_ddpm(images, config=config, seed=seed, steps=steps, minutes=minutes, batch_size=batch_size,
                           lr=lr, checkpoint=checkpoint, checkpoint_minutes=checkpoint_minutes,
                           show_progress=show_progress, resume=earlier)
        grid = prior.sample(64, steps=50, generator=torch.Generator().manual_seed(seed))
        save_grid(grid, Path(f"{stem}_samples.png") if flat else out / "samples.png")
    return out
