"""The audit report: content from the records, escaping, figures, and a real browser render."""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from giaudit.io import config_as_text
from giaudit.report import figures, render
from giaudit.report.format import md_escape
from giaudit.report.summary import summarise
from giaudit.results import AuditRecord, ResultsStore, load_images, load_results, save_images
from giaudit.stats import wilson_interval

CONFIG = {
    "name": "unit <run>",
    "seeds": [0, 1],
    "data": {"source": "mnist5k", "size": 32, "holdout": 0.2},
    "scenario": {"model": "lenet_relu", "protocol": "fedsgd", "batch_size": 3},
    "threat": {"batch_size": True, "training_details": True, "true_labels": True},
    "defenses": [{"name": "noise", "sigma": 0.01}],
    "attacks": {"ig": {"iterations": 50, "lr": 0.1}},
    "output": {"lpips": True},
}


def _record(run_dir: Path, rng: np.random.Generator, seed: int, *, lpips: bool, extra: dict) -> AuditRecord:
    n, c, h = 3, 1, 16
    original = rng.random((n, c, h, h), dtype=np.float32)
    recon = np.clip(original + rng.normal(0, 0.05 + 0.1 * np.arange(n)[:, None, None, None], original.shape),
                    0, 1).astype(np.float32)
    rid = f"mnist5k__noise__ig__s{seed}"
    images_file = save_images(run_dir, rid, original, recon)
    psnr = [31.5 - 4 * i - seed for i in range(n)]
    ssim = [0.93 - 0.1 * i for i in range(n)]
    per_image = tuple({"rank": i + 1, "recon_index": i, "truth_index": (i + 1) % n, "mse": 10 ** (-p / 10),
                       "psnr_db": p, "ssim": s, "lpips": (0.1 + 0.05 * i) if lpips else None,
                       "label_true": i, "label_pred": i} for i, (p, s) in enumerate(zip(psnr, ssim)))
    metrics = {"psnr_db_mean": float(np.mean(psnr)), "psnr_db_worst": max(psnr),
               "ssim_mean": float(np.mean(ssim)), "ssim_worst": max(ssim),
               "mse_mean": 0.01, "mse_worst": 0.0007, "label_accuracy": 1.0, **extra}
    if lpips:
        metrics.update(lpips_mean=0.15, lpips_worst=0.1)
    notes = () if lpips else ("LPIPS unavailable: place alexnet-owt-7be5be79.pth in /nowhere/hub/checkpoints",)
    losses = list(np.exp(-np.linspace(0, 5, 50) - seed) + 1e-4)
    losses[7] = float("nan")  # a diverged step must not break the log axis
    return AuditRecord(
        record_id=rid, config_hash=f"abc{seed}def0123456", scenario="mnist5k", defense="noise", attack="ig",
        seed=seed, threat={"sok_class": "C", "granted": ["batch_size", "training_details", "true_labels"],
                           "oracles": ["true labels given to the attacker"]},
        attack_params={"lr": 0.1, "tv": 1e-4}, label_source="oracle", metrics=metrics, per_image=per_image,
        timings={"attack_s": 1.5 + seed, "total_s": 2.0 + seed, "iterations": 50},
        trace={"losses": losses, "restart_losses": [losses[-1]], "best_restart": 0},
        disclosed={"0:noise": {"sigma": 0.01, "mechanism": "gaussian <b>noise</b>"}}, notes=notes, images_file=images_file)


@pytest.fixture()
def store(tmp_path: Path) -> ResultsStore:
    run = tmp_path / "run"
    s = ResultsStore.open(run)
    s.meta = {"config": CONFIG, "command": ["giaudit", "audit", "cfg.toml", "--out", str(run)]}
    rng = np.random.default_rng(0)
    s.add(_record(run, rng, 0, lpips=True, extra={"identity_match_rate": 0.5}))
    s.add(_record(run, rng, 1, lpips=False, extra={}))
    return load_results(run)  # render what a later `giaudit report` would read back from disk


def test_report_content(store: ResultsStore) -> None:
    html_path, md_path = render(store)
    assert html_path == store.run_dir / "report.html" and md_path == store.run_dir / "report.md"
    doc = html_path.read_text()
    text = html.unescape(re.sub(r"<[^>]+>", " ", doc))
    # Threat model: the SoK letter, its name, the granted capabilities and the oracle in bold.
    assert '<span class="sok">C</span>' in doc and "parameter-aware eavesdropper" in text
    assert "training details: learning rate, local steps" in text
    assert "<strong>true labels given to the attacker</strong>" in doc
    # Defense disclosure, escaped (the user string holds markup).
    assert "gaussian &lt;b&gt;noise&lt;/b&gt;" in doc and "<b>noise</b>" not in doc
    assert "unit &lt;run&gt;" in doc and "unit <run>" not in doc
    # The summary leads: one row for (noise, ig) aggregated over both seeds, with a finding sentence.
    assert doc.index('id="summary"') < doc.index('id="strongest"') < doc.index('id="threat"') < doc.index(
        'id="details"')
    r0, r1 = store.records
    worst = max(r0.metrics["psnr_db_worst"], r1.metrics["psnr_db_worst"])
    assert "PSNR (dB) worst; mean (95 % CI)" in text and f"{worst:.1f}" in text
    assert "Under noise, Inverting Gradients's most leaked image" in text
    assert "Verified as same person" in text  # the only identity figure these records hold
    # The per-record table, read from the records, not recomputed, with human column names.
    for h in ("PSNR (dB) mean / worst", "SSIM (0–1) mean / worst", "LPIPS (0–1, low = close) mean / best",
              "labels recovered (source)"):
        assert f"<th>{html.escape(h)}</th>" in doc
    assert f"{r0.metrics['psnr_db_mean']:.2f} / {r0.metrics['psnr_db_worst']:.2f}" in text
    assert "0.150 / 0.100" in text and "100 % (oracle)" in text
    assert "unavailable (see notes)" in text and "LPIPS unavailable: place alexnet-owt-7be5be79.pth" in text
    # Extra metric keys get human columns (semantic metrics, MSE), never raw keys.
    assert "<th>verified as same person</th>" in doc and "<th>MSE mean / lowest</th>" in doc
    assert "identity_match_rate" not in text.split("Config (TOML)")[0]
    # Images embedded: the strongest grid, two record grids and the loss curves, each a decodable PNG.
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', doc)
    assert len(uris) == 4
    for u in uris:
        img = Image.open(io.BytesIO(base64.b64decode(u)))
        assert img.format == "PNG" and img.width > 100
    assert not re.search(r'(src|href)="(https?:|//)', doc), "the HTML must not load anything from outside"
    # Reproducibility: versions, seeds, config hashes, command, config as TOML that parses back.
    for needle in ("giaudit", "torch", "numpy", "python", "abc0def0123456", "abc1def0123456",
                   "giaudit audit cfg.toml --out"):
        assert needle in text
    pre = re.findall(r"<pre>(.*?)</pre>", doc, re.S)
    assert any(tomllib.loads(html.unescape(p)) == CONFIG for p in pre if "[scenario]" in p)

    md = md_path.read_text()
    assert "Oracle outside the SoK classes: **true labels given to the attacker**" in md
    assert "SoK class C" in md and "| record | seed | PSNR (dB) mean / worst |" in md
    assert md.index("## What the server could learn") < md.index("## Threat model")
    assert "| Defense / attack | PSNR (dB) worst; mean (95 % CI) |" in md
    imgs = re.findall(r"!\[[^\]]*\]\((figures/[^)]+)\)", md)
    assert len(imgs) == 4 and all((store.run_dir / p).is_file() for p in imgs)
    assert "gaussian &lt;b&gt;noise&lt;/b&gt;" in md


def test_report_verdict_and_out_dir(store: ResultsStore, tmp_path: Path) -> None:
    rule = SimpleNamespace(metric="psnr_db", scope="worst", op="<=", threshold=20.0, measured=31.5, passed=False,
                           defense="noise", attack="ig")
    ok = SimpleNamespace(metric="label_accuracy", scope="mean", op="<=", threshold=1.0, measured=1.0, passed=True)
    out = tmp_path / "elsewhere"
    html_path, md_path = render(store, out, verdict=SimpleNamespace(passed=False, rules=[rule, ok]))
    assert html_path.parent == out and (out / "figures" / "loss_curves.png").is_file()
    doc = html_path.read_text()
    assert '<div class="banner fail">Policy verdict: FAIL' in doc and "1 of 2 rules failed: psnr_db" in doc
    assert doc.index("Policy verdict") < doc.index('id="summary"')
    # Each rule row names the (defense, attack) it judged.
    assert "<td>psnr_db</td><td>noise / ig</td><td>worst</td><td>&lt;=</td>" in doc
    assert '<td class="num">31.5</td>' in doc and "measured 31.5 on noise / ig" in doc
    assert "## Policy verdict: **FAIL**" in md_path.read_text()
    _, _ = render(store, out, verdict=SimpleNamespace(passed=True, rules=[ok]))
    assert "Policy verdict: PASS" in html_path.read_text()


def test_report_without_images_or_losses(tmp_path: Path) -> None:
    s = ResultsStore.open(tmp_path)
    rec = AuditRecord(record_id="r|x", config_hash="h", scenario="s", defense="none", attack="dlg", seed=3,
                      threat={"sok_class": "A", "granted": [], "oracles": []}, attack_params={},
                      label_source="idlg", metrics={"psnr_db_mean": 12.0, "psnr_db_worst": 13.0},
                      per_image=(), timings={}, trace={})
    s.add(rec)
    html_path, md_path = render(s)
    doc = html_path.read_text()
    assert "No oracle" in doc and "eavesdropper" in doc and "this record saved no images" in doc
    assert "No record has a loss trace." in doc and "data:image/png" not in doc
    assert "r\\|x" in md_path.read_text()  # a pipe in a name must not split the Markdown table


def test_helpers() -> None:
    assert md_escape("a_b|c*<d>&\n") == r"a\_b\|c\*&lt;d&gt;&amp; "
    text, lang = config_as_text(CONFIG)
    assert lang == "toml" and tomllib.loads(text) == CONFIG
    text, lang = config_as_text({"a": None})  # TOML has no null: falls back to JSON
    assert lang == "json" and '"a": null' in text
    rng = np.random.default_rng(1)
    png = figures.pair_grid_png(rng.random((5, 3, 8, 8)), rng.random((5, 3, 8, 8)), ["x"] * 5, max_pairs=4)
    assert Image.open(io.BytesIO(png)).size[0] > 200
    with pytest.raises(ValueError):
        figures.loss_curves_png({"a": [0.0, float("nan")]})
    with pytest.raises(ValueError):
        figures.pair_grid_png(np.zeros((2, 1, 4, 4)), np.zeros((3, 1, 4, 4)))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _semantic_store(tmp_path: Path) -> ResultsStore:
    """Records of a face run with every summary column: re-identification, attributes, ε, three defenses."""
    s = ResultsStore.open(tmp_path / "faces")
    s.meta = {"config": CONFIG}
    rng = np.random.default_rng(3)
    for d_i, defense in enumerate(("none", "dpsgd-eps8", "noise-0.01")):
        for attack in ("ig", "gias"):
            for seed in range(3):
                base = _record(tmp_path / "faces", rng, seed, lpips=True, extra={
                    "identity_match_rate": 0.5, "identity_similarity": 0.8, "reid_rank1": float(seed == 0),
                    "reid_rank5": 1.0, "reid_gallery_size": 100.0, "reid_scored": 1.0,
                    "attribute_race_accuracy": 0.4, "attribute_race_chance": 0.42,
                    "reference_attribute_race_accuracy": 0.7, "gender_accuracy": 1.0, "face_detection_rate": 1.0,
                    "age_abs_error": 7.0, "reference_age_abs_error": 5.0, "reference_gender_accuracy": 0.9})
                disclosed = {"0:dpsgd": {"epsilon": 8.0, "delta": 1e-5}} if d_i == 1 else {}
                rid = f"faces__{defense}__{attack}__s{seed}"
                s.add(dataclasses.replace(base, record_id=rid, defense=defense, attack=attack, disclosed=disclosed,
                                          images_file=save_images(tmp_path / "faces", rid, *load_images(
                                              tmp_path / "faces", base))))
    return load_results(tmp_path / "faces")


def test_summary_aggregates_over_seeds(tmp_path: Path) -> None:
    store = _semantic_store(tmp_path)
    summ = summarise(store.records)
    assert [(r.defense, r.attack) for r in summ.rows][:2] == [("none", "ig"), ("none", "gias")]
    row = summ.rows[2]  # dpsgd-eps8, ig
    v = row.values
    assert v["reid_hits"] == 1 and v["reid_n"] == 3 and v["reid_chance"] == pytest.approx(0.01)
    lo, hi = wilson_interval(1, 3)
    assert (v["reid_ci_low"], v["reid_ci_high"]) == (lo, hi) and lo < 1 / 3 < hi
    assert v["epsilon"] == 8.0 and "ε = 8" in row.cells["setting"].text()
    assert (v["attr_race_accuracy"], v["attr_race_reference"], v["attr_race_chance"]) == (
        pytest.approx(0.4), pytest.approx(0.7), pytest.approx(0.42))
    assert "re-identified 1 of 3 faces among 100 (chance 0.01)" in row.finding
    assert row.finding.startswith("Under dpsgd-eps8 (ε = 8)") and "race read right for 40 % (originals 70 %, chance" \
        " 42 %)" in row.finding
    headers = [h for _, h in summ.columns]
    assert "Re-identified (rank-1), 95 % CI, chance" in headers
    assert "Race inferred (originals, chance)" in headers and "Gender inferred (originals, chance)" in headers
    assert not any("cosine" in h for h in headers)  # raw mean cosine is not a headline figure
    util = {"none": [{"accuracy": 0.9, "baseline_accuracy": 0.9, "n_test": 1000}],
            "dpsgd-eps8": [{"accuracy": 0.7, "baseline_accuracy": 0.9, "n_test": 1000}]}
    with_util = summarise(store.records, util)
    assert with_util.rows[2].values["utility_accuracy_mean"] == pytest.approx(0.7)
    assert "Model accuracy with the defense" in [h for _, h in with_util.columns]


def _chromium(html_path: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args, html_path.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


_PROBE = """<script>window.addEventListener('load', () => {
  const top = (id) => { const e = document.getElementById(id);
    return e ? Math.round(e.getBoundingClientRect().bottom) : -1; };
  document.title = JSON.stringify({scroll: document.documentElement.scrollWidth, inner: window.innerWidth,
    verdict: top('verdict'), summary: top('summary-table')});
});</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's `chromium` is not installed (apt-get install chromium)")
def test_report_first_screen_in_chromium(tmp_path: Path) -> None:
    """Verdict and summary table inside the first 1280x900 viewport; no horizontal overflow."""
    store = _semantic_store(tmp_path)
    rule = SimpleNamespace(metric="psnr_db", scope="worst", op="<=", threshold=20.0, measured=31.5, passed=False,
                           defense="noise", attack="ig")
    html_path, _ = render(store, verdict=SimpleNamespace(passed=False, rules=[rule] * 9))
    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text().replace("</body>", _PROBE + "</body>"))
    proc = _chromium(probe, tmp_path, "--window-size=1280,900", "--dump-dom")
    m = re.search(r"<title>(\{.*?\})</title>", html.unescape(proc.stdout))
    assert m, f"no measurement from chromium (rc {proc.returncode}): {proc.stderr[-2000:]}"
    got = json.loads(m.group(1))
    assert got["scroll"] <= got["inner"], got
    assert 0 < got["verdict"] < got["summary"] <= 900, got  # what a screenshot shows: the next test checks one


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's `chromium` is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(store: ResultsStore, tmp_path: Path) -> None:
    html_path, _ = render(store)
    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--screenshot={shot}",
           "--window-size=1200,1600", html_path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (1600, 1200)
    flat = img.reshape(-1, 3)
    distinct = len(np.unique(flat[::7], axis=0))
    non_white = float(np.mean(np.any(flat < 245, axis=1)))
    assert img.std() > 10 and distinct > 200 and non_white > 0.05, (img.std(), distinct, non_white)
