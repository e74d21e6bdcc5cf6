"""Semantic (face) leakage metrics: offline dlib/ONNX backend, deepface adapter, metric plumbing.

Real-face checks read ../shared/data (ORL, UTKFace subset) and skip where it is absent.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from giaudit.errors import ConfigError, DataError
from giaudit.metrics.faces import FaceBackendUnavailable, backend_status, get_analyzer, semantic_metrics

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OFFLINE_MISSING = backend_status("offline")
needs_offline = pytest.mark.skipif(OFFLINE_MISSING is not None, reason=f"offline face backend: {OFFLINE_MISSING}")


def _data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (face data for tests lives in ../shared/data beside the repo)")
    return path


@pytest.fixture(scope="module")
def utk64():
    from giaudit.data import load_folder

    return load_folder(_data("utkface64"), size=64, label_parser="utkface")


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="output.semantic"):
        get_analyzer("magic")


@needs_offline
def test_orl_identity_same_vs_different_subject():
    from giaudit.data import load_folder

    torch.set_num_threads(1)
    ds = load_folder(_data("orl"), size=64)
    labels = ds.labels.numpy()
    # 10 subjects x 6 photos keep the test fast; pairs are drawn among them.
    keep = np.concatenate([np.flatnonzero(labels == s)[:6] for s in range(10)])
    an = get_analyzer("offline")
    embs = [a.embedding for a in an.analyze(ds.images[keep].numpy(), what=("identity",))]
    lab = labels[keep]
    rng = np.random.default_rng(0)
    correct = 0
    for k in range(200):
        i = int(rng.integers(len(keep)))
        same = k % 2 == 0
        cand = np.flatnonzero((lab == lab[i]) & (np.arange(len(keep)) != i)) if same else np.flatnonzero(lab != lab[i])
        j = int(rng.choice(cand))
        correct += an.same_identity(embs[i], embs[j]) == same
    assert correct / 200 >= 0.90, f"identity accuracy {correct / 200:.3f} on 200 ORL pairs"


@needs_offline
def test_utkface_gender_accuracy_on_originals(utk64):
    idx = np.random.default_rng(0).choice(len(utk64), 300, replace=False)
    an = get_analyzer("offline")
    res = an.analyze(utk64.images[idx].numpy(), what=("detection", "gender", "age"))
    acc = np.mean([r.gender == utk64.meta[i]["gender"] for r, i in zip(res, idx)])
    age_err = np.mean([abs(r.age - utk64.meta[i]["age"]) for r, i in zip(res, idx)])
    assert acc >= 0.85, f"gender accuracy {acc:.3f} on 300 UTKFace originals"
    assert age_err < 12.0, f"age error {age_err:.1f} years"
    assert np.mean([r.detected for r in res]) >= 0.9


@needs_offline
def test_identical_reconstruction_and_noise(utk64):
    idx = np.random.default_rng(1).choice(len(utk64), 12, replace=False)
    x = utk64.images[idx].numpy()
    meta = [utk64.meta[i] for i in idx]
    an = get_analyzer("offline")
    same = semantic_metrics(x, x.copy(), analyzer=an, labels_meta=meta)
    assert same.aggregate["identity_match_rate"] == 1.0
    assert same.aggregate["identity_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert same.aggregate["face_detection_rate"] == same.reference["face_detection_rate"] > 0.8
    assert same.aggregate["gender_accuracy"] == same.reference["gender_accuracy"]
    assert same.aggregate["age_abs_error"] == pytest.approx(same.reference["age_abs_error"])
    assert "race_accuracy" not in same.aggregate
    assert any("race: unavailable with the offline backend" in n for n in same.notes)
    assert any("128x128" in n and "64x64 RGB" in n for n in same.notes)
    assert len(same.per_image) == 12 and same.per_image[0]["gender_true"] == meta[0]["gender"]

    noise = np.random.default_rng(2).random(x.shape).astype(np.float32)
    res = semantic_metrics(x, noise, analyzer=an, labels_meta=meta)
    assert res.aggregate["face_detection_rate"] <= 1 / 12
    assert res.aggregate["identity_match_rate"] <= 1 / 12
    assert res.reference == same.reference  # the reference row only depends on the originals

    # Without labels, truth is the analyzer's reading of the original: identical images agree fully.
    nolab = semantic_metrics(x, x, analyzer=an, labels_meta=None)
    assert nolab.aggregate["gender_accuracy"] == 1.0 and nolab.aggregate["age_abs_error"] == 0.0
    assert "gender_accuracy" not in nolab.reference


@needs_offline
def test_user_level_pairs_and_grey_input(utk64):
    x = utk64.images[:5].numpy().mean(axis=1, keepdims=True)  # grey 64x64
    an = get_analyzer("offline")
    res = semantic_metrics(x, x[2:3], analyzer=an, user_level=True)
    assert [(p["recon_index"], p["truth_index"]) for p in res.per_image] == [(0, i) for i in range(5)]
    assert res.per_image[2]["identity_match"] is True
    assert 0.0 <= res.aggregate["identity_match_rate"] <= 1.0
    assert any("64x64 grey" in n for n in res.notes)
    with pytest.raises(DataError, match="reconstructions for 5 originals"):
        semantic_metrics(x, x[:2], analyzer=an)
    with pytest.raises(DataError, match="N,C,H,W"):
        semantic_metrics(x[:, :, :, :, None], x, analyzer=an)


# ---- deepface adapter, real deepface code on generated random weights ---------------------

def _deepface_ready() -> str | None:
    if importlib.util.find_spec("deepface") is None:
        return "deepface is not installed (pip install deepface)"
    try:
        import deepface.DeepFace  # noqa: F401
    except Exception as exc:  # deepface needs opencv, werkzeug, gdown, requests besides its engine
        return f"deepface cannot be imported here: {exc}"
    return None


def _random_weights(folder: Path, generator: torch.Generator) -> None:
    """deepface's pytorch weight files, same architectures, random values.

    Built on the meta device (no memory), then each tensor gets random values;
    the large VGG matrices are one random row repeated (expand), so a file is
    a few MB instead of 540 MB while loading into the exact architecture.
    """
    from deepface.models.demography.pytorch import Age, Gender, Race
    from deepface.models.facial_recognition.pytorch.DeepID import DeepIdNet

    folder.mkdir(parents=True, exist_ok=True)
    for build, name in [(Gender.base_model, "gender_model_weights.pth"), (Age.base_model, "age_model_weights.pth"),
                        (Race.base_model, "race_model_single_batch.pth"), (DeepIdNet, "deepid_weights.pth")]:
        with torch.device("meta"):
            model = build()
        state = {}
        for key, v in model.state_dict().items():
            if v.numel() > 1_000_000:
                state[key] = (torch.randn(v.shape[-1], generator=generator) / v.shape[-1] ** 0.5).expand(v.shape)
            else:
                state[key] = torch.randn(v.shape, generator=generator) * 0.05
        torch.save(state, folder / name)


def test_deepface_adapter_on_generated_weights(tmp_path, utk64, monkeypatch):
    reason = _deepface_ready()
    if reason:
        pytest.skip(reason)
    import deepface.commons.backend_utils as bu

    if bu._backend_engine not in (None, "pytorch"):
        pytest.skip(f"deepface already runs on {bu._backend_engine} in this process")
    # deepface's VGG models (224 px) are the one workload here large enough to gain from every core.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    try:
        _deepface_checks(tmp_path, utk64, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _deepface_checks(tmp_path, utk64, monkeypatch):
    home = tmp_path / "dfhome"
    # Missing weights: the adapter refuses to download and names the file.
    an_missing = get_analyzer("deepface", home=str(tmp_path / "empty"), engine="pytorch", model_name="DeepID")
    with pytest.raises(FaceBackendUnavailable, match="gender_model_weights.pth"):
        an_missing.analyze(utk64.images[:1].numpy(), what=("detection", "gender"))
    with pytest.raises(FaceBackendUnavailable, match="deepid_weights.pth"):
        an_missing.analyze(utk64.images[:1].numpy(), what=("identity",))

    from deepface.modules import modeling

    monkeypatch.setattr(modeling, "cached_models", {k: {} for k in modeling.cached_models}, raising=False)
    _random_weights(home / ".deepface" / "weights", torch.Generator().manual_seed(0))
    an = get_analyzer("deepface", home=str(home), engine="pytorch", model_name="DeepID")
    assert an.provides == {"detection", "identity", "gender", "age", "race"}
    x = utk64.images[:1].numpy()
    noise = np.random.default_rng(0).random(x.shape).astype(np.float32)
    res = an.analyze(np.concatenate([x, noise]))
    assert res[0].detected and not res[1].detected  # opencv Haar: a real face vs noise
    for r in res:
        assert r.gender in (0, 1) and r.race in range(5) and 0 <= r.age <= 100
        assert r.embedding is not None and r.embedding.shape == (160,)
    # The analyses above are reused below (the same frame, the same capabilities): deepface is not called again.
    calls = []
    import deepface.DeepFace as df_mod
    real = df_mod.analyze
    monkeypatch.setattr(df_mod, "analyze", lambda *a, **k: calls.append(1) or real(*a, **k))
    sem = semantic_metrics(x, x, analyzer=an, labels_meta=[utk64.meta[0]])
    assert not calls  # the original's analysis was memoised by content
    assert sem.aggregate["identity_match_rate"] == 1.0
    assert set(sem.aggregate) >= {"race_accuracy", "gender_accuracy", "age_abs_error", "face_detection_batch"}
    assert sem.aggregate["race_accuracy"] == sem.reference["race_accuracy"]


# ---- re-identification: ORL's people as the gallery --------------------------

@needs_offline
def test_orl_reidentification_originals_and_noise():
    """Originals against their own people's gallery: rank-1 >= 0.9; noise: within the Wilson interval of chance."""
    from giaudit.data import load_folder
    from giaudit.metrics.faces import identity_gallery
    from giaudit.stats import wilson_interval

    torch.set_num_threads(1)
    ds = load_folder(_data("orl"), size=32)  # the size audits use
    keep_people = ds.labels < 20             # 20 of the 40 people keep the test near half a minute
    idx = np.flatnonzero(keep_people.numpy())
    pool = idx[idx % 5 == 0]                 # the audited pool (data.pool_every = 5) ...
    rest = idx[idx % 5 != 0]                 # ... and the enrolment photos the gallery is made of
    an = get_analyzer("offline")
    gallery = identity_gallery(an, ds.images[rest].numpy(), ds.labels[rest].tolist(), per_identity=2)
    assert gallery.size == 20 and gallery.kind == "identities"
    x = ds.images[pool].numpy()
    noise = np.random.default_rng(0).random(x.shape).astype(np.float32)
    res = semantic_metrics(x, noise, analyzer=an, gallery=gallery, identities=ds.labels[pool].tolist())
    # reference = the originals themselves against the gallery
    assert res.reference["reid_rank1"] >= 0.9, res.reference
    n = int(res.aggregate["reid_scored"])
    assert n == len(pool) and res.aggregate["reid_gallery_size"] == 20
    lo, hi = wilson_interval(round(res.aggregate["reid_rank1"] * n), n)
    assert lo <= 1 / 20 <= hi, (res.aggregate["reid_rank1"], lo, hi)
    assert all("reid_rank" in p for p in res.per_image)


def test_wilson_interval_and_ranks():
    from giaudit.metrics.faces.reid import rank_of
    from giaudit.stats import wilson_interval

    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.35
    lo, hi = wilson_interval(5, 10)
    assert lo < 0.5 < hi and hi - 0.5 == pytest.approx(0.5 - lo)
    assert np.isnan(wilson_interval(0, 0)[0])
    assert rank_of(np.array([0.5, 0.1, 0.5, 0.9]), 0) == 2  # ties favour the true candidate


@needs_offline
def test_a_user_level_run_on_orl_scores_identity_over_every_pair(tmp_path):
    """A run with DiffULA on ORL people (client_data = one_label: a client's batch is one person's photos)
    scores faces, identity and re-identification over every (reconstruction, original) pair too, for the
    sample-level attack beside it as well. Ten of ORL's 40 people (the enrolment gallery is built per process:
    its size, not the attacks, is what this run costs)."""
    import shutil

    from giaudit.config import load_config
    from giaudit.orchestration import run_audit

    torch.set_num_threads(1)
    people = 10
    for s in range(1, people + 1):
        shutil.copytree(_data("orl") / f"s{s}", tmp_path / "orl" / f"s{s}")
    (tmp_path / "orl.toml").write_text(f"""
name = "orl-users"
seeds = [0]
[data]
source = "folder"
path = "{tmp_path / "orl"}"
label_parser = "subfolder"
size = 32
[scenario]
model = "lenet_relu"
batch_size = 2
client_data = "one_label"
[attacks.ig]
iterations = 3
[attacks.diffula]
iterations = 2
t_star = 20
denoise_steps = 2
[output]
lpips = false
semantic = "offline"
""")
    store = run_audit(load_config(tmp_path / "orl.toml"), tmp_path / "run", show_progress=False)
    recs = {r.attack: r for r in store.records}
    for r in recs.values():
        m = r.metrics
        assert {"user_face_detection_rate", "user_identity_similarity", "user_reid_rank1"} <= set(m), r.attack
        assert "user_reid_gallery_size" not in m and m["reid_gallery_size"] == people
    d = recs["diffula"].metrics  # one representative image: every pair is a Hungarian pair already
    assert d["user_identity_similarity"] == pytest.approx(d["identity_similarity"])
