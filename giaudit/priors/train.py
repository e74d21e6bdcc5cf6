"""Train a DCGAN-style prior on CPU (`giaudit prior train --data ... --out ...`).

Losses: the non-saturating GAN loss of Goodfellow et al. 2014 with DCGAN's
Adam settings (Radford et al. 2016: lr 2e-4, beta1 0.5), or WGAN-GP
(Gulrajani et al. 2017: critic loss E[D(fake)] - E[D(real)] + 10 * gradient
penalty on random interpolates, Adam lr 1e-4, betas (0, 0.9), several critic
steps per generator step).

Threat model: this is the attacker's side of SoK class D (surrogate data).
The attacker trains the prior on data from the same or a similar
distribution as the clients'. For honest audits the training images should
not include the audited client's batch: `holdout_mod = k` leaves out every
image whose index is a multiple of k, and the checkpoint records it.

Everything random draws from one seeded `torch.Generator`; with the same
torch build and thread count the run is bit-for-bit reproducible.

The shipped prior ``giaudit/priors/assets/mnist32`` was made with
``giaudit prior train --data mnist5k --out giaudit/priors/assets/mnist32.safetensors
--steps 2000 --size 32 --seed 0`` (defaults: latent 32, width 16, GAN loss,
batch 64, holdout_mod 5, one thread), i.e. in Python
``train_main("mnist5k", Path("giaudit/priors/assets/mnist32.safetensors"), steps=2000, size=32, seed=0)``.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from giaudit import data as D
from giaudit.errors import ConfigError, DataError
from giaudit.priors.generator import Discriminator, GeneratorConfig, build_generator, init_weights
from giaudit.priors.io import Prior, save_prior

LOSSES = ("gan", "wgan-gp")


def training_images(data: str, size: int, channels: int | None, limit: int | None, holdout_mod: int,
                    batch_size: int) -> Tensor:
    """A prior's training images: `data` without every `holdout_mod`-th image (the audit pool; 0 keeps all),
    at least one batch of them."""
    if holdout_mod < 0:
        raise ConfigError(f"holdout_mod: must be >= 0, got {holdout_mod}")
    images = _load_images(data, size, channels, limit)
    if holdout_mod:
        images = images[torch.arange(images.shape[0]) % holdout_mod != 0]
    if images.shape[0] < batch_size:
        raise DataError(f"data: only {images.shape[0]} training images, fewer than the batch size {batch_size}")
    return images


def _load_images(data: str, size: int, channels: int | None, limit: int | None) -> Tensor:
    """A data source name (mnist5k, digits, lfw_subset) or an image folder -> images N,C,H,W in [0,1]."""
    if data in D.SOURCES and data != "folder":
        images = D.SOURCES[data](size=size, channels=channels).images
    else:
        root = Path(data).expanduser()
        if not root.is_dir():
            known = ", ".join(s for s in D.SOURCES if s != "folder")
            raise DataError(f"data: {data!r} is neither a data source ({known}) nor an image folder")
        if any(p.is_dir() for p in root.iterdir()):
            images = D.load_folder(root, size=size, channels=channels, label_parser="subfolder",
                                   limit=limit).images
        else:
            files = D._list_images(root)
            if limit is not None:
                files = files[:limit]
            if not files:
                raise DataError(f"data: no images found in {root}")
            tensors = [D._resize(D._read_image(p).unsqueeze(0), size) for p in files]
            c = channels or max(t.shape[1] for t in tensors)
            images = torch.cat([D._to_channels(t, c) for t in tensors])
    if limit is not None:
        images = images[:limit]
    return images.float().clamp(0, 1).contiguous()


def save_grid(images: Tensor, path: Path, nrow: int = 8) -> Path:
    """Tile images (N,C,H,W in [0,1]) into one PNG."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + 2) + 2, nrow * (w + 2) + 2)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + col * (w + 2):2 + col * (w + 2) + w] = images[i]
    u8 = (grid.clamp(0, 1) * 255).round().byte()
    arr = u8[0].numpy() if c == 1 else u8.permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _gradient_penalty(disc: torch.nn.Module, real: Tensor, fake: Tensor, gen: torch.Generator) -> Tensor:
    eps = torch.rand((real.shape[0], 1, 1, 1), generator=gen)
    mix = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (g,) = torch.autograd.grad(disc(mix).sum(), mix, create_graph=True)
    return (g.flatten(1).norm(dim=1) - 1).pow(2).mean()


def train_prior(images: Tensor, *, steps: int, config: GeneratorConfig, seed: int = 0, loss: str = "gan",
                batch_size: int = 64, lr: float | None = None, critic_steps: int | None = None,
                show_progress: bool = True, on_sample: Callable[[int, Tensor], None] | None = None,
                sample_every: int = 0) -> tuple[Prior, dict[str, Any]]:
    """Train a generator on `images`; returns the prior (eval mode) and a training summary."""
    if loss not in LOSSES:
        raise ConfigError(f"prior.loss: {loss!r} unknown; known: {', '.join(LOSSES)}")
    if steps < 1 or batch_size < 2:
        raise ConfigError("prior.steps must be >= 1 and prior.batch_size >= 2")
    if images.ndim != 4 or images.shape[1:] != (config.channels, config.size, config.size):
        raise DataError(f"prior training images have shape {tuple(images.shape[1:])}, the generator makes "
                        f"{(config.channels, config.size, config.size)}; set size / channels to match")
    rng = torch.Generator().manual_seed(seed)
    gen = build_generator(config, rng)
    wgan = loss == "wgan-gp"
    with torch.random.fork_rng(devices=[]):
        # spectral_norm draws its power-iteration vectors from the global RNG: seed it.
        torch.manual_seed(seed)
        disc = Discriminator(config, spectral=not wgan)
    init_weights(disc, rng)
    lr = lr if lr is not None else (1e-4 if wgan else 2e-4)
    betas = (0.0, 0.9) if wgan else (0.5, 0.999)
    n_critic = critic_steps if critic_steps is not None else (5 if wgan else 1)
    opt_g = torch.optim.Adam(gen.parameters(), lr=lr, betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=betas)
    fixed_z = torch.randn((64, config.latent_dim), generator=rng)
    n = images.shape[0]
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=f"prior {loss}", unit="step")
    start = time.perf_counter()
    d_loss = g_loss = torch.zeros(())
    gen.train()
    for step in range(1, steps + 1):
        for _ in range(n_critic):
            real = images[torch.randint(0, n, (batch_size,), generator=rng)]
            z = torch.randn((batch_size, config.latent_dim), generator=rng)
            with torch.no_grad():
                fake = gen(z)
            if wgan:
                d_loss = disc(fake).mean() - disc(real).mean() + 10.0 * _gradient_penalty(disc, real, fake, rng)
            else:
                d_loss = F.softplus(-disc(real)).mean() + F.softplus(disc(fake)).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        z = torch.randn((batch_size, config.latent_dim), generator=rng)
        out = disc(gen(z))
        g_loss = -out.mean() if wgan else F.softplus(-out).mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(d=f"{float(d_loss):.3f}", g=f"{float(g_loss):.3f}")
        if on_sample is not None and sample_every and step % sample_every == 0 and step < steps:
            gen.eval()
            with torch.no_grad():
                on_sample(step, gen(fixed_z))
            gen.train()
    if bar is not None:
        bar.close()
    gen.eval()
    summary = {"steps": steps, "seed": seed, "loss": loss, "batch_size": batch_size, "lr": lr,
               "critic_steps": n_critic, "final_d_loss": float(d_loss.detach()), "final_g_loss": float(g_loss.detach()),
               "train_s": round(time.perf_counter() - start, 1), "torch": torch.__version__}
    return Prior(gen, summary), {"fixed_z": fixed_z}


def train_main(data: str, out: Path, *, steps: int = 2000, size: int = 32, seed: int = 0, latent_dim: int = 32,
               width: int = 16, loss: str = "gan", batch_size: int = 64, lr: float | None = None,
               channels: int | None = None, limit: int | None = None, holdout_mod: int = 5,
               threads: int = 1, sample_every: int = 0, name: str | None = None,
               show_progress: bool = True) -> Path:
    """Train a prior and write it (safetensors + JSON) and a sample grid PNG; returns the checkpoint path.

    `data`: mnist5k | digits | lfw_subset | an image folder (with per-label subfolders or flat).
    `out`: a folder (``generator.safetensors``, ``config.json``, ``samples.png``) or a
    ``NAME.safetensors`` path (flat: ``NAME.json``, ``NAME_samples.png`` beside it).
    `holdout_mod`: leave out images whose index is a multiple of it (0 keeps all), so audits can
    draw client batches the prior never saw.
    """
    out = Path(out)
    with _threads(threads):
        images = training_images(data, size, channels, limit, holdout_mod, batch_size)
        config = GeneratorConfig(size=size, channels=int(images.shape[1]), latent_dim=latent_dim, width=width)
        flat = out.suffix == ".safetensors"
        stem = out.with_suffix("") if flat else out

        def grid_path(tag: str) -> Path:
            return Path(f"{stem}_{tag}.png") if flat else out / f"{tag}.png"

        def on_sample(step: int, imgs: Tensor) -> None:
            save_grid(imgs, grid_path(f"samples_step{step}"))

        prior, aux = train_prior(images, steps=steps, config=config, seed=seed, loss=loss, batch_size=batch_size,
                                 lr=lr, show_progress=show_progress, on_sample=on_sample,
                                 sample_every=sample_every)
        prior.training.update({"data": data if data in ("mnist5k", "digits", "lfw_subset") else Path(data).name,
                               "images": int(images.shape[0]), "holdout_mod": holdout_mod, "size": size,
                               "threads": threads})
        prior.name = name or (out.stem if flat else out.name)
        path = save_prior(prior, out)
        with torch.no_grad():
            save_grid(prior.generator(aux["fixed_z"]), grid_path("samples"))
    return path
