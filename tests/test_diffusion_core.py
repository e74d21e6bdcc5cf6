"""Diffusion core: the client's DDPM update (oracle), the scenario's threat boundary, DDPM prior I/O,
and differentiating through the DDIM sampler (finite differences). Tiny UNets, 16 px."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from giaudit.data import ImageDataset
from giaudit.errors import ConfigError, DataError, ParamError
from giaudit.fl_diffusion import diffusion_update, draw
from giaudit.priors.ddpm import (
    DDPMConfig,
    DDPMPrior,
    build_unet,
    ddim_sample,
    load_ddpm,
    make_scheduler,
    save_ddpm,
    train_main,
    untrained_ddpm,
)
from giaudit.scenario.diffusion import DiffusionScenario
from giaudit.threat import threat_model
from giaudit.types import ClientProtocol, DataSpec


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = DDPMConfig(size=16, channels=1, block_out_channels=(8, 16), norm_num_groups=4)


def tiny(seed: int = 0) -> DDPMPrior:
    return untrained_ddpm(TINY, seed)


def _hand_loss(unet, ac, x, t, eps):
    x0 = 2 * x - 1
    a = ac[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    return ((unet(xt, t).sample - eps) ** 2).mean()


def test_fedsgd_update_equals_hand_written_ddpm_gradient():
    p = tiny()
    g = torch.Generator().manual_seed(1)
    x = torch.rand((3, 1, 16, 16), generator=g)
    d = draw(3, (1, 16, 16), 1000, g)
    ours = diffusion_update(p.unet, x, d.timesteps, d.noise, p.alphas_cumprod)
    loss = _hand_loss(p.unet, p.alphas_cumprod, x, d.timesteps, d.noise)
    ref = torch.autograd.grad(loss, list(p.unet.parameters()))
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fedavg_delta_equals_hand_written_local_sgd():
    p = tiny()
    g = torch.Generator().manual_seed(2)
    x = torch.rand((4, 1, 16, 16), generator=g)
    d = draw(4, (1, 16, 16), 1000, g)
    proto = ClientProtocol("fedavg", local_steps=2, local_lr=0.05, local_batch_size=2)
    ours = diffusion_update(p.unet, x, d.timesteps, d.noise, p.alphas_cumprod, proto)
    ref_model = copy.deepcopy(p.unet)
    before = [q.detach().clone() for q in ref_model.parameters()]
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    for _ in range(2):
        for sl in (slice(0, 2), slice(2, 4)):
            opt.zero_grad()
            _hand_loss(ref_model, p.alphas_cumprod, x[sl], d.timesteps[sl], d.noise[sl]).backward()
            opt.step()
    for a, q, b in zip(ours, ref_model.parameters(), before):
        torch.testing.assert_close(a, q.detach() - b, rtol=1e-4, atol=1e-6)


def test_soft_timesteps_give_the_expected_update():
    p = tiny()
    g = torch.Generator().manual_seed(3)
    x = torch.rand((1, 1, 16, 16), generator=g)
    eps = torch.randn((1, 1, 16, 16), generator=g)
    grid = torch.tensor([[100, 500, 900]])
    w = torch.tensor([[0.2, 0.5, 0.3]])
    soft = diffusion_update(p.unet, x, grid, eps, p.alphas_cumprod, weights=w)
    parts = [diffusion_update(p.unet, x, grid[:, k], eps, p.alphas_cumprod) for k in range(3)]
    for i, s in enumerate(soft):
        torch.testing.assert_close(s, sum(float(w[0, k]) * parts[k][i] for k in range(3)), rtol=1e-4, atol=1e-7)


def _scenario(diffusion_noise: bool) -> DiffusionScenario:
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand((6, 1, 16, 16), generator=g)
    pool = ImageDataset(imgs, torch.zeros(6, dtype=torch.long), DataSpec(1, 16, 16, 10, (0.0, 1.0), "rand"))
    p = tiny()
    return DiffusionScenario(p.unet, p.alphas_cumprod, pool, ClientProtocol(), 2,
                             threat_model(diffusion_noise=diffusion_noise))


def test_scenario_update_is_the_shared_function_and_t_eps_only_when_granted():
    obs, truth = _scenario(True).simulate(generator=torch.Generator().manual_seed(5))
    assert obs.diffusion is not None and obs.diffusion.timesteps is not None and obs.diffusion.noise is not None
    assert [m["diffusion_t"] for m in truth.meta] == obs.diffusion.timesteps.tolist()
    again = diffusion_update(obs.model, truth.images, obs.diffusion.timesteps, obs.diffusion.noise,
                             obs.diffusion.alphas_cumprod)
    for a, b in zip(again, obs.update.tensors):
        torch.testing.assert_close(a, b)
    hidden, _ = _scenario(False).simulate(generator=torch.Generator().manual_seed(5))
    assert hidden.diffusion is not None and hidden.diffusion.timesteps is None and hidden.diffusion.noise is None
    torch.testing.assert_close(hidden.update.flat(), obs.update.flat())


def test_ddpm_prior_save_load_exact(tmp_path):
    p = tiny(3)
    p.name = "t16"
    p.training = {"steps": 7, "data": "rand"}
    path = save_ddpm(p, tmp_path / "t16.safetensors")
    q = load_ddpm(path)
    assert q.config == p.config and q.training == p.training and q.name == "t16"
    for (ka, a), (kb, b) in zip(p.unet.state_dict().items(), q.unet.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    z = torch.randn((2, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ddim_sample(p.unet, p.alphas_cumprod, z, 3), ddim_sample(q.unet, q.alphas_cumprod, z, 3))
    save_ddpm(p, tmp_path / "folder")
    assert load_ddpm(tmp_path / "folder").config == p.config


def test_ddpm_training_is_seeded_and_resumes_from_a_saved_prior(tmp_path):
    kw = dict(steps=3, minutes=None, size=16, batch_size=8, width=8, threads=1, show_progress=False)
    a = load_ddpm(train_main("digits", tmp_path / "a.safetensors", **kw))
    b = load_ddpm(train_main("digits", tmp_path / "b", **kw))
    assert a.training["steps"] == 3 and a.training["data"] == "digits" and a.training["holdout_mod"] == 5
    assert all(torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values()))
    # two more steps on top of the first three, written over the same file
    c = load_ddpm(train_main("digits", tmp_path / "a.safetensors", **{**kw, "steps": 2},
                             resume=tmp_path / "a.safetensors"))
    assert c.training["steps"] == 5 and c.training["resumed_from"]["steps"] == 3
    assert c.training["resumed_from"]["name"] == "a" and c.config == a.config
    assert not all(torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), c.unet.state_dict().values()))
    with pytest.raises(DataError, match="size / channels"):
        train_main("digits", tmp_path / "d.safetensors", **{**kw, "size": 32}, resume=tmp_path / "a.safetensors")
    with pytest.raises(ParamError, match="resume.*nowhere"):
        train_main("digits", tmp_path / "e.safetensors", **kw, resume=tmp_path / "nowhere.safetensors")


def test_ddpm_prior_corrupt_or_wrong_shape_names_the_file(tmp_path):
    p = tiny()
    path = save_ddpm(p, tmp_path / "bad.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(DataError, match="bad.safetensors"):
        load_ddpm(path)
    save_ddpm(p, tmp_path / "shape.safetensors")
    doc = json.loads((tmp_path / "shape.json").read_text())
    doc["unet"]["block_out_channels"] = [8, 24]
    (tmp_path / "shape.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="shape.safetensors"):
        load_ddpm(tmp_path / "shape.safetensors")
    (tmp_path / "cfg.safetensors").write_bytes((tmp_path / "shape.safetensors").read_bytes())
    (tmp_path / "cfg.json").write_text("{broken")
    with pytest.raises(DataError, match="cfg.json"):
        load_ddpm(tmp_path / "cfg.safetensors")
    with pytest.raises(ConfigError, match="missing"):
        load_ddpm(tmp_path / "missing.safetensors")


def test_ddim_sampler_gradient_matches_finite_differences():
    torch.manual_seed(0)
    cfg = DDPMConfig(size=8, channels=1, block_out_channels=(8, 8), norm_num_groups=4, attention=True)
    unet = build_unet(cfg, 1).double().eval().requires_grad_(False)
    ac = make_scheduler(cfg).alphas_cumprod.double()
    z = torch.randn((1, 1, 8, 8), dtype=torch.double, generator=torch.Generator().manual_seed(2))
    w = torch.randn((1, 1, 8, 8), dtype=torch.double, generator=torch.Generator().manual_seed(3))

    def f(zz):
        return (ddim_sample(unet, ac, zz, 3) * w).sum()

    zg = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(zg), zg)
    d = torch.randn(z.shape, dtype=torch.double, generator=torch.Generator().manual_seed(4))
    # Each DDIM step from t near T divides by sqrt(a_t) ~ 6e-3, so f is very curved and some of diffusers'
    # internals stay float32: a central difference at h = 1e-4 agrees to ~1e-4; a wrong gradient would not.
    h = 1e-4
    with torch.no_grad():
        fd = (f(z + h * d) - f(z - h * d)) / (2 * h)
    torch.testing.assert_close((g * d).sum(), fd, rtol=2e-3, atol=1e-6)


def test_double_backward_through_classic_attention():
    p = untrained_ddpm(DDPMConfig(size=16, channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                                  attention=True))
    x = torch.rand((1, 1, 16, 16)).requires_grad_(True)
    g = diffusion_update(p.unet, x, torch.tensor([300]), torch.randn(1, 1, 16, 16), p.alphas_cumprod,
                         create_graph=True)
    (gx,) = torch.autograd.grad(sum(t.pow(2).sum() for t in g), x)
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0
