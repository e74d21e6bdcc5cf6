"""User batches (scenario.client_data = "one_label"): a client's private batch is one user's images, the
setting of DiffULA (seed 003); bad sizes fail with one line naming the key."""
from __future__ import annotations

import torch

from giaudit.cli import main
from giaudit.defenses.base import one_label_sampler

CONFIG = """
name = "ol"
seeds = [0, 1]
[data]
source = "digits"
size = 16
[scenario]
model = "lenet_relu"
batch_size = 4
client_data = "one_label"
clients_per_seed = 2
[attacks.ig]
iterations = 2
[output]
lpips = false
"""


def test_one_label_batches_share_a_label_and_vary_with_the_seed():
    labels = torch.arange(50) % 5
    labels[labels == 4] = 3            # label 4 has no images; 3 has twice as many
    drawn = [one_label_sampler(labels, 8, torch.Generator().manual_seed(s)) for s in range(12)]
    for idx in drawn:
        assert len(set(idx.tolist())) == 8 and len(set(labels[idx].tolist())) == 1
    assert len({int(labels[idx[0]]) for idx in drawn}) == 4
    again = one_label_sampler(labels, 8, torch.Generator().manual_seed(3))
    assert torch.equal(again, drawn[3])
    big = [one_label_sampler(labels, 15, torch.Generator().manual_seed(s)) for s in range(4)]
    assert {int(labels[idx[0]]) for idx in big} == {3}   # only label 3 has 15 images


def test_an_audit_attacks_one_users_batch_per_client(tmp_path, capsys):
    cfg = tmp_path / "ol.toml"
    cfg.write_text(CONFIG)
    assert main(["audit", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    from giaudit.results import ResultsStore

    records = ResultsStore.open(tmp_path / "run").records
    assert len(records) == 2
    for r in records:
        by_client: dict[int, set[int]] = {}
        for p in r.per_image:
            by_client.setdefault(p["client"], set()).add(p["label_true"])
        assert sorted(by_client) == [0, 1] and all(len(v) == 1 for v in by_client.values()), by_client
    cfg.write_text(CONFIG.replace("batch_size = 4", "batch_size = 100"))
    capsys.readouterr()
    assert main(["audit", str(cfg), "--out", str(tmp_path / "big"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "scenario.client_data = 'one_label': no label has 100 images" in err and "batch_size" in err
