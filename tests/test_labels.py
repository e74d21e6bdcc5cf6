"""Label recovery: iDLG at batch 1, the row rule for distinct labels, counts for repeats."""
from __future__ import annotations

import torch

from giaudit.attacks.labels import recover_labels
from giaudit.defenses.base import ClientStep, Defense
from giaudit.metrics.evaluate import label_accuracy
from giaudit.types import ClientProtocol


class _Distinct(Defense):
    """Test helper: draw a batch whose labels are all different."""

    def configure(self, step: ClientStep) -> ClientStep:
        def sampler(labels: torch.Tensor, b: int, g: torch.Generator) -> torch.Tensor:
            classes = torch.randperm(int(labels.max()) + 1, generator=g)[:b]
            picks = []
            for c in classes.tolist():
                idx = (labels == c).nonzero().view(-1)
                picks.append(idx[torch.randint(0, idx.numel(), (1,), generator=g)])
            return torch.cat(picks)

        return step.with_(sampler=sampler)


def test_idlg_is_exact_on_50_single_images(observe):
    hits = 0
    for seed in range(50):
        obs, truth = observe(1, seed=seed, model=("lenet", "lenet_relu", "convnet")[seed % 3])
        labels, source = recover_labels(obs)
        assert source == "idlg"
        hits += int(labels.item() == truth.labels.item())
    assert hits == 50


def test_row_rule_is_exact_on_distinct_labels_batch_8(observe):
    for seed in range(10):
        obs, truth = observe(8, seed=seed, defense=_Distinct())
        assert truth.labels.unique().numel() == 8
        labels, _ = recover_labels(obs, "yin")
        assert label_accuracy(labels, truth.labels) == 1.0


def test_count_rule_handles_repeated_labels(observe):
    accs = []
    for seed in range(10):
        obs, truth = observe(16, seed=seed)
        labels, source = recover_labels(obs, "auto")
        assert source == "count" and labels.numel() == 16
        accs.append(label_accuracy(labels, truth.labels))
    # Counts, not just the set of classes present: repeated labels are recovered too.
    assert sum(accs) / len(accs) >= 0.9, accs


def test_labels_from_fedavg_delta(observe):
    obs, truth = observe(1, protocol=ClientProtocol("fedavg", 2, 0.05))
    labels, _ = recover_labels(obs)
    assert labels.item() == truth.labels.item()


def test_label_accuracy_is_order_free():
    assert label_accuracy(torch.tensor([1, 2, 2]), torch.tensor([2, 1, 2])) == 1.0
    assert label_accuracy(torch.tensor([1, 1, 1]), torch.tensor([2, 1, 2])) == 1 / 3
