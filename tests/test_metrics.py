"""Tests for giaudit.metrics: oracle checks against scikit-image and scipy,
the evaluator's pairing and ranking, and the offline LPIPS loading path."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from giaudit.errors import ConfigError, DataError
from giaudit.metrics import PSNR_CAP_DB, evaluate, load_lpips, match, mse, psnr, ssim
from giaudit.metrics.lpips import ALEXNET_FILE, LPIPSMetric, _alexnet_features, checkpoints_dir
from giaudit.types import GroundTruth, Reconstruction, Trace


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _noisy_pairs(shape, seed):
    """Originals and copies with a different noise level per image (so metrics vary)."""
    g = _gen(seed)
    a = torch.rand(shape, generator=g)
    levels = torch.linspace(0.02, 0.5, shape[0]).view(-1, 1, 1, 1)
    b = (a + levels * torch.randn(shape, generator=g)).clamp(0, 1)
    return a, b


def _trace() -> Trace:
    return Trace(losses=(), restart_losses=(), best_restart=0, iterations=0, wall_s=0.0)


# ----------------------------------------------------------------------------- matching
def test_match_recovers_a_random_permutation():
    g = _gen(1)
    original = torch.rand(9, 3, 16, 16, generator=g)
    q = torch.randperm(9, generator=g)
    recon = original[q] + 0.05 * torch.randn(9, 3, 16, 16, generator=g)  # recon[j] ~ original[q[j]]
    perm = match(recon, original)
    assert perm.dtype == torch.long
    assert torch.equal(perm, torch.argsort(q))
    assert (mse(recon[perm], original) < 0.01).all()


def test_match_prefers_total_cost_over_greedy():
    # Greedy would give original 0 its nearest reconstruction (index 0) and leave
    # original 1 with a poor one; the optimal assignment swaps them.
    original = torch.tensor([0.50, 0.0]).view(2, 1, 1, 1)
    recon = torch.tensor([0.45, 0.60]).view(2, 1, 1, 1)
    assert match(recon, original).tolist() == [1, 0]


def test_match_rejects_unequal_counts_naming_both():
    with pytest.raises(ValueError, match=r"3 reconstructed .* 4 original"):
        match(torch.rand(3, 1, 8, 8), torch.rand(4, 1, 8, 8))


# ----------------------------------------------------------------------------- PSNR / SSIM oracles
@pytest.mark.parametrize("shape", [(4, 1, 32, 32), (4, 3, 32, 32), (4, 1, 28, 28), (4, 3, 28, 28)])
def test_psnr_and_ssim_equal_scikit_image(shape):
    a, b = _noisy_pairs(shape, seed=shape[1] * 100 + shape[2])
    ours_p, ours_s = psnr(a, b), ssim(a, b)
    assert ours_p.shape == ours_s.shape == (shape[0],)
    for i in range(shape[0]):
        x, y = a[i].double().numpy(), b[i].double().numpy()
        if shape[1] == 1:
            ref_s = sk_ssim(x[0], y[0], gaussian_weights=True, sigma=1.5,
                            use_sample_covariance=False, data_range=1.0)
        else:
            ref_s = sk_ssim(x, y, gaussian_weights=True, sigma=1.5,
                            use_sample_covariance=False, data_range=1.0, channel_axis=0)
        ref_p = sk_psnr(x, y, data_range=1.0)
        assert abs(float(ours_s[i]) - ref_s) < 1e-4
        assert abs(float(ours_p[i]) - ref_p) < 1e-4
    # The noise levels differ, so the images must not all score alike.
    assert float(ours_s.max() - ours_s.min()) > 0.1


def test_ssim_differs_from_other_ssim_variants():
    # Guards against an implementation that only agrees with scikit-image on easy inputs:
    # the sample-covariance variant is only ~2e-5 away, so check the match far more tightly
    # than the 1e-4 required above, and that the uniform 7x7 window is clearly different.
    a, b = _noisy_pairs((2, 1, 32, 32), seed=7)
    x, y = a[1, 0].double().numpy(), b[1, 0].double().numpy()
    ours = float(ssim(a, b)[1])
    sample_cov = sk_ssim(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=True, data_range=1.0)
    uniform = sk_ssim(x, y, data_range=1.0)
    population = sk_ssim(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    assert abs(ours - population) < 1e-10
    assert abs(ours - sample_cov) > 1e-6
    assert abs(ours - uniform) > 1e-3


def test_identical_images_infinite_psnr_unit_ssim():
    a = torch.rand(2, 3, 16, 16, generator=_gen(2))
    assert torch.equal(mse(a, a), torch.zeros(2, dtype=torch.float64))
    assert all(math.isinf(v) and v > 0 for v in psnr(a, a).tolist())
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64))


def test_metric_input_errors():
    with pytest.raises(DataError, match="11x11"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))
    with pytest.raises(DataError, match="shape"):
        mse(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 9))


# ----------------------------------------------------------------------------- evaluate
def test_user_level_scores_every_pair_and_do_not_flatter_a_sample_level_copy():
    """A perfect sample-level reconstruction (a permuted copy) scores 100 dB on Hungarian pairs, but at user
    level its mean over all pairs is that of comparing different images; a representative image repeated per
    element scores the same both ways (its Hungarian pairs are all pairs)."""
    g = _gen(4)
    images = torch.rand(6, 1, 16, 16, generator=g)
    labels = torch.zeros(6, dtype=torch.long)
    unavailable = LPIPSMetric(None, "LPIPS unavailable: test")
    truth = GroundTruth(images=images, labels=labels)
    copy = Reconstruction(images=images.flip(0), labels=labels, label_source="oracle", trace=_trace())
    ev = evaluate(copy, truth, lpips=unavailable, user_level=True)
    pairs = [(i, j) for i in range(6) for j in range(6)]
    by_hand = sum(min(float(psnr(images[i:i + 1], images[j:j + 1])), PSNR_CAP_DB) for i, j in pairs) / 36
    assert ev.aggregate["psnr_db_mean"] == PSNR_CAP_DB
    assert ev.aggregate["user_psnr_db_mean"] == pytest.approx(by_hand, rel=1e-5)
    assert ev.aggregate["user_psnr_db_mean"] < 30
    assert "user_lpips_mean" not in ev.aggregate
    rep = Reconstruction(images=images.mean(0, keepdim=True).expand(6, -1, -1, -1).clone(), labels=labels,
                         label_source="oracle", trace=_trace())
    ev = evaluate(rep, truth, lpips=unavailable, user_level=True)
    for k in ("mse", "psnr_db", "ssim"):
        assert ev.aggregate[f"user_{k}_mean"] == pytest.approx(ev.aggregate[f"{k}_mean"], rel=1e-5), k
    assert "user_psnr_db_mean" not in evaluate(rep, truth, lpips=unavailable).aggregate


def test_evaluate_on_a_permuted_copy():
    g = _gen(3)
    images = torch.rand(5, 1, 28, 28, generator=g)
    labels = torch.tensor([3, 1, 4, 1, 5])
    q = torch.randperm(5, generator=g)
    rec = Reconstruction(images=images[q].clone(), labels=labels[q].clone(), label_source="oracle", trace=_trace())
    unavailable = LPIPSMetric(None, "LPIPS unavailable: test")
    ev = evaluate(rec, GroundTruth(images=images, labels=labels), lpips=unavailable)

    assert len(ev.per_image) == 5
    assert [r["rank"] for r in ev.per_image] == [1, 2, 3, 4, 5]
    for row in ev.per_image:
        assert row["psnr_db"] == PSNR_CAP_DB
        assert row["mse"] == 0.0
        assert row["ssim"] == pytest.approx(1.0, abs=1e-12)
        assert row["lpips"] is None
        assert int(q[row["recon_index"]]) == row["truth_index"]
        assert row["label_pred"] == row["label_true"]
    agg = ev.aggregate
    assert agg["psnr_db_mean"] == agg["psnr_db_worst"] == PSNR_CAP_DB
    assert agg["ssim_mean"] == pytest.approx(1.0, abs=1e-12)
    assert agg["mse_worst"] == 0.0
    assert agg["label_accuracy"] == 1.0
    assert "lpips_mean" not in agg and "lpips_worst" not in agg
    assert "LPIPS unavailable: test" in ev.notes
    assert any("capped" in n for n in ev.notes)
    assert ev.original.dtype == np.float32 and ev.original.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(ev.original, ev.reconstruction)
    truth_order = [r["truth_index"] for r in ev.per_image]
    np.testing.assert_array_equal(ev.original, images[truth_order].numpy())


def test_evaluate_ranks_most_leaked_first_and_scores_labels():
    g = _gen(4)
    images = torch.rand(4, 3, 32, 32, generator=g)
    noise = torch.tensor([0.3, 0.01, 0.2, 0.05]).view(4, 1, 1, 1)
    recon = images + noise * torch.randn(4, 3, 32, 32, generator=g)  # some values leave [0, 1]
    truth_labels = torch.tensor([0, 1, 2, 3])
    pred = torch.tensor([0, 1, 2, 2])  # one wrong label
    ev = evaluate(Reconstruction(recon, pred, "count", _trace()),
                  GroundTruth(images, truth_labels), lpips=LPIPSMetric(None, "LPIPS unavailable: test"))
    psnrs = [r["psnr_db"] for r in ev.per_image]
    assert psnrs == sorted(psnrs, reverse=True)
    assert [r["truth_index"] for r in ev.per_image] == [1, 3, 2, 0]
    assert ev.aggregate["psnr_db_worst"] == max(psnrs)
    assert ev.aggregate["psnr_db_mean"] == pytest.approx(float(np.mean(psnrs)))
    assert ev.aggregate["ssim_worst"] == max(r["ssim"] for r in ev.per_image)
    assert ev.aggregate["mse_worst"] == min(r["mse"] for r in ev.per_image)
    assert ev.aggregate["label_accuracy"] == pytest.approx(0.75)
    assert any(n.startswith("clamped") for n in ev.notes)
    assert ev.reconstruction.min() >= 0.0 and ev.reconstruction.max() <= 1.0


def test_evaluate_rejects_mismatched_batches():
    images = torch.rand(3, 1, 16, 16)
    with pytest.raises(ValueError, match=r"2 reconstructed .* 3 original"):
        evaluate(Reconstruction(images[:2], torch.tensor([0, 1]), "oracle", _trace()),
                 GroundTruth(images, torch.tensor([0, 1, 2])), lpips=LPIPSMetric(None, "x"))


# ----------------------------------------------------------------------------- LPIPS loading
def _write_fake_alexnet(torch_home, seed=5):
    """Random AlexNet weights under torchvision's key names, in <torch_home>/hub/checkpoints."""
    torch.manual_seed(seed)
    state = {f"features.{k}": v for k, v in _alexnet_features().state_dict().items()}
    # torchvision's checkpoint also holds the classifier; the loader must ignore
    # it, so small tensors under the real names are enough (and keep the file small).
    for i, (o, n) in {1: (8, 16), 4: (8, 8), 6: (4, 8)}.items():
        state[f"classifier.{i}.weight"] = torch.randn(o, n)
        state[f"classifier.{i}.bias"] = torch.randn(o)
    d = checkpoints_dir(torch_home)
    d.mkdir(parents=True)
    torch.save(state, d / ALEXNET_FILE)
    return state


def test_lpips_missing_weights_is_unavailable_with_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    metric = load_lpips()
    assert not metric.available
    assert metric.reason == (f"LPIPS unavailable: {ALEXNET_FILE} is not in {tmp_path / 'hub' / 'checkpoints'}; "
                             "run `giaudit weights fetch lpips-alexnet` (or place torchvision's file there)")
    with pytest.raises(DataError, match="LPIPS unavailable"):
        metric(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))


def test_lpips_loads_alexnet_from_torch_home(tmp_path, monkeypatch):
    state = _write_fake_alexnet(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    metric = load_lpips()
    assert metric.available and metric.reason is None
    assert "torchvision" not in sys.modules or not getattr(sys.modules["torchvision"], "__giaudit_shim__", False)
    # The trunk holds exactly the checkpoint's tensors, under torchvision's indices.
    trunk = metric._model.net
    assert torch.equal(getattr(trunk.slice1, "0").weight, state["features.0.weight"])
    assert torch.equal(getattr(trunk.slice5, "10").bias, state["features.10.bias"])

    g = _gen(6)
    for shape in [(3, 3, 32, 32), (3, 1, 28, 28)]:
        a = torch.rand(shape, generator=g)
        b = torch.rand(shape, generator=g)
        same, diff = metric(a, a.clone()), metric(a, b)
        assert same.shape == diff.shape == (3,)
        assert torch.allclose(same, torch.zeros(3, dtype=torch.float64), atol=1e-7)
        assert (diff > 0).all()
    assert metric.input_note(28, 28) is not None and metric.input_note(32, 32) is None

    # evaluate() with LPIPS available fills the column and the aggregates.
    images = torch.rand(3, 1, 28, 28, generator=g)
    recon = (images + 0.1 * torch.randn(3, 1, 28, 28, generator=g)).clamp(0, 1)
    ev = evaluate(Reconstruction(recon, torch.tensor([0, 1, 2]), "oracle", _trace()),
                  GroundTruth(images, torch.tensor([0, 1, 2])), lpips=metric)
    values = [r["lpips"] for r in ev.per_image]
    assert all(v > 0 for v in values)
    assert ev.aggregate["lpips_worst"] == min(values)
    assert ev.aggregate["lpips_mean"] == pytest.approx(float(np.mean(values)))
    assert any("upsampled from 28x28 to 32x32" in n for n in ev.notes)


def test_lpips_explicit_torch_home_and_bad_inputs(tmp_path):
    missing = load_lpips(torch_home=str(tmp_path / "none"))
    assert not missing.available and str(tmp_path / "none") in missing.reason
    with pytest.raises(ConfigError, match="only 'alex'"):
        load_lpips("vgg", torch_home=str(tmp_path))
    d = checkpoints_dir(tmp_path)
    d.mkdir(parents=True)
    (d / ALEXNET_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=ALEXNET_FILE):
        load_lpips(torch_home=str(tmp_path))
    torch.save({"features.0.weight": torch.zeros(1)}, d / ALEXNET_FILE)
    with pytest.raises(DataError, match="features.0"):
        load_lpips(torch_home=str(tmp_path))


def test_lpips_without_the_package_is_unavailable(tmp_path, monkeypatch):
    import giaudit.metrics.lpips as lp_mod

    _write_fake_alexnet(tmp_path, seed=8)

    def no_package():
        raise ImportError("No module named 'lpips'")

    monkeypatch.setattr(lp_mod, "_import_lpips", no_package)
    metric = load_lpips(torch_home=str(tmp_path))
    assert not metric.available
    assert "pip install --no-deps lpips" in metric.reason
