"""Generative priors: architecture, save -> load round trip, seeded training, the shipped MNIST prior."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from giaudit.errors import ConfigError, DataError
from giaudit.priors import GeneratorConfig, Prior, build_generator, load_prior, save_prior, shipped_priors
from giaudit.priors.generator import Discriminator
from giaudit.priors.train import train_main

torch.set_num_threads(1)


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 1), (48, 3), (64, 3)])
def test_generator_and_discriminator_shapes(size: int, channels: int) -> None:
    cfg = GeneratorConfig(size=size, channels=channels, latent_dim=8, width=4)
    g = build_generator(cfg, torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        x = g(torch.randn(3, 8))
    assert x.shape == (3, channels, size, size)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert Discriminator(cfg)(x).shape == (3,)
    assert Discriminator(cfg, spectral=True)(x).shape == (3,)


@pytest.mark.parametrize("size", [16, 30, 100])
def test_unsupported_sizes_raise_config_error(size: int) -> None:
    with pytest.raises(ConfigError, match="prior.size"):
        GeneratorConfig(size=size)


def test_untrained_generators_are_seeded() -> None:
    cfg = GeneratorConfig(width=4)
    a = build_generator(cfg, torch.Generator().manual_seed(3))
    b = build_generator(cfg, torch.Generator().manual_seed(3))
    c = build_generator(cfg, torch.Generator().manual_seed(4))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("layout", ["folder", "flat"])
def test_save_load_round_trip_is_exact(tmp_path: Path, layout: str) -> None:
    gen = build_generator(GeneratorConfig(latent_dim=16, width=8), torch.Generator().manual_seed(1))
    # Move the BN running statistics off their defaults so buffers are part of the check.
    gen.train()
    with torch.no_grad():
        gen(torch.randn(16, 16, generator=torch.Generator().manual_seed(2)))
    gen.eval()
    prior = Prior(gen, {"data": "test", "steps": 7, "loss": "gan"}, name="rt")
    out = tmp_path / ("p" if layout == "folder" else "p.safetensors")
    path = save_prior(prior, out)
    loaded = load_prior(path)
    z = torch.randn(5, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(gen(z), loaded.generator(z))
    assert loaded.training["steps"] == 7 and loaded.name == "rt"
    assert loaded.describe()["prior_data"] == "test"


def test_shipped_prior_loads_and_round_trips(tmp_path: Path) -> None:
    assert "mnist32" in shipped_priors()
    prior = load_prior("mnist32")
    assert prior.config.size == 32 and prior.config.channels == 1
    assert prior.training["data"] == "mnist5k" and prior.training["steps"] > 0
    weights = shipped_priors()["mnist32"]
    assert weights.stat().st_size < 4 * 2**20  # "a few MB at most"
    z = torch.randn(4, prior.config.latent_dim, generator=torch.Generator().manual_seed(0))
    again = load_prior(save_prior(prior, tmp_path / "copy"))
    with torch.no_grad():
        x = prior.generator(z)
        assert torch.equal(x, again.generator(z))
    # A trained prior makes varied images, not one mode or a constant.
    assert float(x.std(0).mean()) > 0.05


def test_bad_checkpoints_raise_user_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a shipped prior"):
        load_prior(tmp_path / "missing")
    path = save_prior(Prior(build_generator(GeneratorConfig(width=4))), tmp_path / "p")
    doc = json.loads((path / "config.json").read_text())
    doc["generator"]["width"] = 8  # weights no longer match the config
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="do not match"):
        load_prior(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        load_prior(path)


def test_train_main_writes_a_loadable_seeded_prior(tmp_path: Path) -> None:
    kw = dict(steps=3, size=32, seed=5, latent_dim=8, width=4, show_progress=False)
    a = train_main("digits", tmp_path / "a", **kw)
    b = train_main("digits", tmp_path / "b.safetensors", **kw)
    assert (tmp_path / "a" / "samples.png").is_file() and (tmp_path / "b_samples.png").is_file()
    pa, pb = load_prior(a), load_prior(b)
    assert pa.training["data"] == "digits" and pa.training["steps"] == 3 and pa.training["holdout_mod"] == 5
    assert all(torch.equal(p, q) for p, q in zip(pa.generator.state_dict().values(),
                                                 pb.generator.state_dict().values()))
    c = train_main("digits", tmp_path / "c", **{**kw, "seed": 6, "loss": "wgan-gp"})
    assert not torch.equal(load_prior(c).generator.project[0].weight, pa.generator.project[0].weight)
    with pytest.raises(DataError, match="neither a data source"):
        train_main(str(tmp_path / "nowhere"), tmp_path / "d", **kw)
