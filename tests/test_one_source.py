"""One fact, one place: the metric and capability tables drive every reader, and the report, the comparison
table and the policy check agree on every figure they share (they read one aggregation)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from giaudit.aggregate import summarise as aggregate
from giaudit.compare import summarise as compare_rows
from giaudit.config import ThreatSection, parse_config
from giaudit.metrics.evaluate import evaluate
from giaudit.metrics.registry import METRICS, is_metric, is_rate, merge_values, parse, policy_key, summarised
from giaudit.policy import check, parse_policy
from giaudit.report.render import human_metric
from giaudit.report.summary import summarise as report_summary
from giaudit.results import AuditRecord
from giaudit.threat import threat_model
from giaudit.types import CAPABILITIES, Capability, GroundTruth, Reconstruction, Trace


def test_threat_section_threat_model_and_table_share_one_default_each():
    fields = {f.name: f.default for f in dataclasses.fields(ThreatSection)}
    assert set(fields) == {c.value for c in Capability} == {c.value for c in CAPABILITIES}
    granted = threat_model().granted
    section = ThreatSection().model().granted
    parsed = parse_config({}).threat
    for cap, row in CAPABILITIES.items():
        assert (cap in granted) == (cap in section) == row.default, cap
        assert bool(getattr(parsed, cap.value) or False) == row.default
        assert row.text and not row.text.startswith(cap.value)  # every capability has reader-facing words
    assert threat_model(surrogate_data=False).granted == granted - {Capability.SURROGATE_DATA}
    with pytest.raises(TypeError, match="unknown capability 'true_label'"):
        threat_model(true_label=True)


def test_every_key_the_evaluator_writes_is_a_registered_metric():
    g = torch.Generator().manual_seed(0)
    truth = GroundTruth(torch.rand(3, 1, 16, 16, generator=g), torch.tensor([1, 2, 3]))
    rec = Reconstruction(torch.rand(3, 1, 16, 16, generator=g), torch.tensor([1, 2, 0]), "idlg",
                         Trace((1.0,), (1.0,), 0, 1, 0.0))
    ev = evaluate(rec, truth, lpips=None, user_level=True)
    for key in ev.aggregate:
        assert is_metric(key), key
    for metric in summarised():
        assert metric.per_image in ev.per_image[0] or metric.name == "lpips"
    assert parse("psnr_db_worst").worst == "max" and parse("lpips_worst").worst == "min"
    assert parse("attribute_hair_colour_accuracy").is_rate and human_metric("attribute_hair_colour_accuracy") \
        == "hair colour inferred"
    assert is_rate("reid_rank1") and is_rate("reference_face_detection_batch") and not is_rate("psnr_db_mean")
    assert human_metric("user_psnr_db_mean") == "PSNR (dB) mean, every pair"
    assert not is_metric("psnr") and not is_metric("label_accuracy_worst")
    # clients merge: the worst of the worsts by direction, counts by their rule, the rest weighted by images
    assert merge_values("lpips_worst", [(0.3, 2), (0.1, 1)]) == 0.1
    assert merge_values("psnr_db_worst", [(20.0, 2), (25.0, 1)]) == 25.0
    assert merge_values("reid_scored", [(2.0, 2), (3.0, 1)]) == 5.0
    assert merge_values("reid_gallery_size", [(100.0, 2), (50.0, 1)]) == 50.0
    assert merge_values("label_accuracy", [(1.0, 3), (0.0, 1)]) == 0.75
    assert policy_key({"psnr_db_worst": 1.0, "psnr_db_mean": 0.5}, "psnr_db") == "psnr_db_worst"
    assert policy_key({"label_accuracy": 1.0}, "label_accuracy") == "label_accuracy"
    assert set(METRICS) >= {"mse", "psnr_db", "ssim", "lpips", "label_accuracy", "reid_rank1"}


def _records() -> list[AuditRecord]:
    """Two defenses x two attacks x two seeds, batches of unequal size (so a plain mean of records and a pool
    over images differ), with per-image rows as the evaluator writes them."""
    out = []
    for d_i, defense in enumerate(("none", "noise")):
        for a_i, attack in enumerate(("ig", "dlg")):
            for seed in range(2):
                n = 1 + 3 * seed  # 1 image, then 4
                psnr = [10.0 + 5 * a_i - 3 * d_i + seed + 0.5 * i for i in range(n)]
                ssim = [0.2 + 0.1 * a_i + 0.05 * i for i in range(n)]
                hits = [(i + seed + a_i) % 2 == 0 for i in range(n)]
                rows = tuple({"truth_index": i, "image_key": f"s{seed}i{i}", "psnr_db": p, "ssim": s, "mse": 0.1,
                              "label_true": 1, "label_pred": 1 if h else 0}
                             for i, (p, s, h) in enumerate(zip(psnr, ssim, hits)))
                out.append(AuditRecord(
                    record_id=f"scn__{defense}__{attack}__s{seed}", config_hash="h", scenario="scn",
                    defense=defense, attack=attack, seed=seed, threat={"sok_class": "B"}, attack_params={},
                    label_source="idlg",
                    metrics={"psnr_db_mean": sum(psnr) / n, "psnr_db_worst": max(psnr), "ssim_mean": sum(ssim) / n,
                             "ssim_worst": max(ssim), "label_accuracy": sum(hits) / n},
                    per_image=rows, timings={"attack_s": 1.0}, trace={},
                    disclosed={"0:noise": {"sigma": 0.1}} if d_i else {}))
    return out


def test_report_compare_and_policy_agree_on_every_shared_figure():
    records = _records()
    report = {(r.defense, r.attack): r.values for r in report_summary(records).rows}
    table = {(r["defense"], r["attack"]): r for r in compare_rows(records, {}, ["none", "noise"], ["ig", "dlg"])}
    verdict = check(records, parse_policy({"rules": {"psnr_db": {"max": 0}, "psnr_db_mean": {"max": 0},
                                                     "label_accuracy": {"max": 0}, "ssim": {"max": 0}}}))
    judged = {(r.defense, r.attack, r.metric): r for r in verdict.rules}
    assert set(report) == set(table) == {(d, a) for d in ("none", "noise") for a in ("ig", "dlg")}
    for key, rep in report.items():
        row = table[key]
        for name in ("psnr_db_mean", "psnr_db_worst", "psnr_db_ci_low", "psnr_db_ci_high", "ssim_mean",
                     "ssim_worst", "label_accuracy_mean", "label_accuracy_low", "label_accuracy_high", "images"):
            assert rep[name] == row[name] or (math.isnan(rep[name]) and math.isnan(row[name])), (key, name)
        assert judged[(*key, "psnr_db")].measured == rep["psnr_db_worst"]
        assert judged[(*key, "ssim")].measured == rep["ssim_worst"]
        assert judged[(*key, "psnr_db_mean")].measured == pytest.approx(rep["psnr_db_mean"], abs=1e-12)
        assert judged[(*key, "label_accuracy")].measured == pytest.approx(rep["label_accuracy_mean"], abs=1e-12)
        # label accuracy is pooled over the 5 images, not a mean of the two records' rates
        recs = [r for r in records if (r.defense, r.attack) == key]
        pooled = sum(r.metrics["label_accuracy"] * len(r.per_image) for r in recs) / 5
        assert rep["label_accuracy_mean"] == pytest.approx(pooled)
        assert rep["label_accuracy_mean"] != pytest.approx(sum(r.metrics["label_accuracy"] for r in recs) / 2)
    # the same numbers, one aggregation: the report's rows are the aggregation's rows
    assert [r["psnr_db_mean"] for r in aggregate(records)] == [r.values["psnr_db_mean"]
                                                                for r in report_summary(records).rows]
