"""A malicious server (SoK classes F-H): the capability, the server step, the imprint attack of Robbing the Fed
(Fowl et al. 2022) through secure aggregation, and the model_validation and DP-SGD defenses against it."""
from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
from conftest import client_scenario
from torch import nn

from giaudit.aggregate import summarise
from giaudit.attacks import build_attack
from giaudit.attacks.base import Budget
from giaudit.attacks.differencing import differenced
from giaudit.attacks.fishing import isolated, isolating_mask
from giaudit.attacks.imprint import find_block
from giaudit.attacks.trap_weights import find_trap
from giaudit.config import parse_config
from giaudit.data import load_digits
from giaudit.defenses import build_chain
from giaudit.engine import LocalEngine
from giaudit.errors import ConfigError, ModelRefused, ThreatModelError
from giaudit.fl import compute_update
from giaudit.metrics import psnr
from giaudit.orchestration import run_audit
from giaudit.policy import check, parse_policy
from giaudit.report import render
from giaudit.report.compare import render_compare
from giaudit.results import ResultsStore
from giaudit.scenario.client import Scenario
from giaudit.scenario.models import build_model
from giaudit.threat import observe, threat_model
from giaudit.types import ACTIVE_CLASSES, CAPABILITIES, Capability, ClientProtocol, SharedUpdate, class_span

BINS = 128
CLIENTS, BATCH = 8, 8
SEEDS = [0, 1, 2]
PSNR_BAR = 30.0      # a recovered image
NOISE_BAR = 15.0     # below it, an image is noise (the shipped policy's psnr_db.max)


def test_modifies_model_is_one_row_of_the_capability_table() -> None:
    row = CAPABILITIES[Capability.MODIFIES_MODEL]
    assert row.default is False and row.sok_class == "F"
    assert not threat_model().active
    assert threat_model(modifies_model=True, surrogate_data=False).sok_class == "F"
    assert threat_model(modifies_model=True).sok_class == "G"          # with surrogate data (its default)
    assert threat_model(modifies_model=True).active
    # Unset, the flag stays out of the canonical config (existing config hashes are unchanged).
    assert "modifies_model" not in parse_config({}).raw["threat"]
    assert parse_config({"threat": {"modifies_model": True}}).threat.model().active


def test_the_server_step_needs_the_capability(mnist32) -> None:
    scenario = client_scenario(mnist32, 2)
    attack = build_attack("imprint", bins=8)
    with pytest.raises(ThreatModelError, match="threat.modifies_model"):
        attack.serve(scenario.model, mnist32.spec, threat_model(), mnist32.images[:50], torch.Generator())


def _alone(images: torch.Tensor, sent: nn.Module) -> torch.Tensor:
    """Which images are alone in their bin (ground truth: the server's thresholds on their own measurement)."""
    block = find_block(sent)
    assert block is not None
    thresholds = -block.imprint.bias.detach()                 # ascending: bin i is (q_i, q_i+1]
    bins = torch.searchsorted(thresholds, images.flatten(1) @ block.imprint.weight[0].detach()) - 1
    return torch.bincount(bins, minlength=block.bins)[bins] == 1


class UserNet(nn.Module):
    """A user's own classifier, not one giaudit builds."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 16), nn.Tanh(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("model", ["lenet", "user"])
def test_an_image_alone_in_its_bin_is_returned_exactly(mnist32, model) -> None:
    images, labels, surrogate = mnist32.images[:16], mnist32.labels[:16], mnist32.images[100:600]
    torch.manual_seed(0)
    agreed = client_scenario(mnist32).model if model == "lenet" else UserNet()
    threat = threat_model(modifies_model=True)
    attack = build_attack("imprint", bins=32)
    sent = attack.serve(agreed, mnist32.spec, threat, surrogate, torch.Generator().manual_seed(0))
    grads = compute_update(sent, images, labels, ClientProtocol())
    obs = observe(model=sent, update=SharedUpdate(tuple(g.detach() for g in grads)), data_spec=mnist32.spec,
                  threat=threat, batch_size=16, protocol=ClientProtocol(), labels=None, bn_statistics=None)
    rec = attack.reconstruct(obs)
    alone = _alone(images, sent)
    assert int(alone.sum()) >= 4
    for x in images[alone]:
        err = (rec.images - x).abs().flatten(1).amax(1).min()
        assert float(err) < 1e-5, f"an image alone in its bin came back {float(err):.2e} off"
    assert rec.images.shape[0] >= 16 and rec.labels.shape[0] == rec.images.shape[0]
    assert rec.label_source == "classified"


def _audit(tmp_path, name: str, defenses: list[dict], attacks: dict) -> list:
    cfg = {"name": name, "seeds": SEEDS, "data": {"source": "mnist5k", "size": 32},
           "scenario": {"model": "lenet_relu", "batch_size": BATCH}, "threat": {"modifies_model": True},
           "defenses": defenses, "attacks": attacks, "output": {"lpips": False}}
    return run_audit(parse_config(cfg), tmp_path / name, show_progress=False, engine=LocalEngine(1)).records


@pytest.fixture(scope="module")
def secure_agg_records(tmp_path_factory) -> list:
    """Imprint and IG (30 iterations) on the same aggregates: 8 clients x batch 8 on 32 px digits, 3 seeds."""
    return _audit(tmp_path_factory.mktemp("active"), "sa", [{"name": "secure_agg", "clients": CLIENTS}],
                  {"imprint": {"bins": BINS}, "ig": {"iterations": 30}})


def _psnrs(records: list, attack: str) -> list[float]:
    return [row["psnr_db"] for r in records if r.attack == attack for row in r.per_image]


def test_imprint_breaks_secure_aggregation(secure_agg_records) -> None:
    n = CLIENTS * BATCH
    expected = (1 - 1 / BINS) ** (n - 1)              # the share of the 64 images alone in their bin
    psnrs = _psnrs(secure_agg_records, "imprint")
    assert len(psnrs) == BATCH * len(SEEDS)
    share = sum(p >= PSNR_BAR for p in psnrs) / len(psnrs)
    error = math.sqrt(expected * (1 - expected) / len(psnrs))
    assert share >= expected - 2 * error, (share, expected, error)
    ig = _psnrs(secure_agg_records, "ig")              # the same aggregate, the agreed model: nothing
    assert max(ig) < NOISE_BAR
    imprint = [r for r in secure_agg_records if r.attack == "imprint"]
    assert all(r.active and r.threat["sok_class"] == "G" for r in imprint)
    assert imprint[0].threat["modification"]["bins"] == BINS
    assert not any(r.active for r in secure_agg_records if r.attack == "ig")


@pytest.fixture(scope="module")
def validated_records(tmp_path_factory) -> list:
    """The same clients, each validating the model it receives before computing."""
    return _audit(tmp_path_factory.mktemp("validated"), "mv",
                  [{"name": "model_validation"}, {"name": "secure_agg", "clients": CLIENTS}],
                  {"imprint": {"bins": BINS}, "ig": {"iterations": 2}})


def test_model_validation_blocks_the_imprint_and_dp_sgd_drowns_it(tmp_path, validated_records) -> None:
    records = validated_records
    blocked = [r for r in records if r.attack == "imprint"]
    assert blocked and all(r.blocked and "model_validation" in r.blocked and not r.metrics for r in blocked)
    assert all(r.blocked is None and r.metrics for r in records if r.attack == "ig")   # the agreed model passes
    dp = _audit(tmp_path, "dp", [{"name": "dpsgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0},
                                 {"name": "secure_agg", "clients": CLIENTS}], {"imprint": {"bins": BINS}})
    assert max(_psnrs(dp, "imprint")) < NOISE_BAR


def test_architecture_check_misses_changed_values_the_parameter_check_catches(mnist32) -> None:
    scenario: Scenario = client_scenario(mnist32, 1)

    def nudge(m: nn.Module) -> nn.Module:
        out = copy.deepcopy(m)
        with torch.no_grad():
            next(out.parameters()).add_(1.0)
        return out

    served = scenario.serve(nudge)
    served.simulate(build_chain([{"name": "model_validation", "check": "architecture"}]))
    with pytest.raises(ModelRefused, match="other values"):
        served.simulate(build_chain([{"name": "model_validation"}]))
    scenario.simulate(build_chain([{"name": "model_validation"}]))   # the agreed model is accepted


def test_policy_and_report_keep_the_malicious_server_apart(tmp_path, secure_agg_records, validated_records) -> None:
    records = secure_agg_records + validated_records
    rules = {"rules": {"psnr_db": {"max": 15}}}
    passive = check(records, parse_policy(rules))                          # threat_classes = "A-E"
    assert passive.passed and passive.threat_classes == "A-E"
    assert all(r.attack == "ig" for r in passive.rules)
    assert "secure_agg / imprint (class G, a malicious server)" in passive.coverage()
    assert "covers SoK classes A-E (an honest-but-curious server)" in passive.format()
    every = check(records, parse_policy({**rules, "threat_classes": "A-H"}))
    assert not every.passed
    status = {(r.defense, r.attack): r.status for r in every.rules}
    assert status[("secure_agg", "imprint")] == "FAIL" and status[("secure_agg", "ig")] == "PASS"
    assert status[("model_validation+secure_agg", "imprint")] == "BLOCKED"
    servers = every.by_defense()["secure_agg"]["servers"]
    assert servers == {"malicious": False, "honest-but-curious": True}
    with pytest.raises(ConfigError, match="threat_classes"):
        parse_policy({**rules, "threat_classes": "E-A"})
    # The verdict per SoK letter attacked (letters from the capability table), and per kind of server.
    assert ACTIVE_CLASSES == {"F", "G", "H"} and class_span(False) == "A-E" and class_span(True) == "F-H"
    assert every.by_class() == {
        "B": {"passed": True, "server": "honest-but-curious", "failed": [], "blocked": []},
        "G": {"passed": False, "server": "malicious", "failed": ["secure_agg / imprint"],
              "blocked": ["model_validation+secure_agg / imprint"]}}
    assert passive.by_class()["G"]["passed"] is None                        # outside "A-E": not judged
    assert ("per threat class: an honest-but-curious server (SoK classes A-E): PASS (class B: PASS); a malicious "
            "server (SoK classes F-H): FAIL (class G: FAIL: secure_agg / imprint)") in every.format()
    assert every.by_defense()["secure_agg"]["classes"] == {"B": True, "G": False}
    assert "a malicious server (SoK classes F-H): not judged (class G: not judged)" in passive.classes_text()

    store = ResultsStore(tmp_path / "run", {"name": "active"}, records)
    _html, md = render(store, tmp_path / "run", verdict=every)
    text = md.read_text()
    honest = text.index("An honest-but-curious server (SoK classes A-E) could:")
    malicious = text.index("A malicious server (SoK classes F-H")
    assert honest < malicious
    found = text[malicious:]
    assert "secure\\_agg · imprint**: Under secure\\_agg, a malicious server (SoK class G: it sent a model with an " \
        "added imprint block" in found
    assert "was blocked: the clients refused its model" in found
    assert "covers SoK classes A-H" in text
    assert "Per threat class: an honest-but-curious server (SoK classes A-E): PASS" in text
    assert "Threat classes attacked:" in text and "class G (active manipulator): secure\\_agg / imprint most leaked " \
        "image" in text and "model\\_validation+secure\\_agg / imprint blocked" in text
    # The comparison table lists the malicious server's rows after the curious one's, marked as such.
    table = (render_compare(summarise(records), {}, tmp_path / "cmp").parent / "compare.md").read_text()
    assert table.index("| secure_agg | ig |") < table.index("| secure_agg | imprint (a malicious server, class G) |")
    assert "imprint (a malicious server, class G; blocked in 3 of 3 records)" in table
    assert "- A malicious server (SoK classes F-H) was run in class G:" in table


def test_an_image_alone_at_a_trap_neuron_is_returned_exactly(mnist32) -> None:
    """Trap weights (Boenisch et al. 2023), class F: no surrogate data; every image that is the only one firing
    some neuron comes back to float32 precision, through the sum of a batch of 32."""
    images, labels = mnist32.images[:32], mnist32.labels[:32]
    threat = threat_model(modifies_model=True, surrogate_data=False)
    assert threat.sok_class == "F"
    attack = build_attack("trap_weights", neurons=200)
    sent = attack.serve(client_scenario(mnist32).model, mnist32.spec, threat, None, torch.Generator().manual_seed(0))
    grads = compute_update(sent, images, labels, ClientProtocol())
    obs = observe(model=sent, update=SharedUpdate(tuple(g.detach() for g in grads)), data_spec=mnist32.spec,
                  threat=threat, batch_size=32, protocol=ClientProtocol(), labels=None, bn_statistics=None)
    rec = attack.reconstruct(obs)
    trap = find_trap(sent)
    assert trap is not None
    fired = images.flatten(1) @ trap.trap.weight.detach().T > 0           # image i fires neuron j
    alone = fired[:, fired.sum(0) == 1].any(1)
    assert int(alone.sum()) >= 8
    for x in images[alone]:
        assert float((rec.images - x).abs().flatten(1).amax(1).min()) < 1e-5
    assert attack.threat_record(obs, rec.label_source)["sok_class"] == "F"
    # The architecture check catches the added block.
    with pytest.raises(ModelRefused, match="architecture|module"):
        client_scenario(mnist32).serve(lambda m: sent).simulate(
            build_chain([{"name": "model_validation", "check": "architecture"}]))


class UserNet16(nn.Module):
    """A user's own 16 px classifier, its last module an nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def digits16():
    return load_digits(size=16)


def _cosine(a, b) -> float:
    fa, fb = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return float(torch.nn.functional.cosine_similarity(fa, fb, dim=0))


@pytest.mark.parametrize("model", ["lenet_relu", "user"])
def test_fishing_isolates_the_target_images_gradient(digits16, model) -> None:
    """Class fishing (Wen et al. 2022), class F: on the fished model the gradient of a batch of 16, restricted to
    the parameters the fishing isolates, is the gradient of its one target-class image; on the agreed model it
    is not. The attack reads from the update that it caught one image."""
    images, labels = digits16.images[:16], digits16.labels[:16]
    counts = torch.bincount(labels, minlength=10)
    target = int((counts == 1).nonzero()[0])              # the test's choice: a class held by one image
    one = labels == target
    agreed = build_model("lenet_relu", channels=1, num_classes=10, size=16,
                         generator=torch.Generator().manual_seed(0)) if model == "lenet_relu" else UserNet16()
    threat = threat_model(modifies_model=True, surrogate_data=False)
    attack = build_attack("fishing", target_class=target)
    sent = attack.serve(agreed, digits16.spec, threat, None, torch.Generator())
    assert attack.modification(sent)["target_class"] == target and not attack.modification(agreed)
    masks = isolating_mask(sent, target)
    for net, close in ((sent, True), (agreed, False)):
        whole = isolated(compute_update(net, images, labels), masks)
        single = isolated(compute_update(net, images[one], labels[one]), masks)
        cos = _cosine(whole, single)
        assert (cos > 0.99) if close else (cos < 0.6), (model, close, cos)
    grads = compute_update(sent, images, labels)
    obs = observe(model=sent, update=SharedUpdate(tuple(g.detach() for g in grads)), data_spec=digits16.spec,
                  threat=threat, batch_size=16, protocol=ClientProtocol(), labels=None, bn_statistics=None)
    assert attack.labels_for(obs, torch.Generator())[0].tolist() == [target]
    # The same architecture with other values: only the parameter check refuses it.
    served = Scenario(agreed, digits16, ClientProtocol(), 1, threat).serve(lambda m: sent)
    served.simulate(build_chain([{"name": "model_validation", "check": "architecture"}]))
    with pytest.raises(ModelRefused, match="other values"):
        served.simulate(build_chain([{"name": "model_validation"}]))


@pytest.mark.usefixtures("one_thread")
def test_fishing_and_ig_break_secure_aggregation_where_ig_alone_does_not(digits16) -> None:
    """Secure aggregation of 4 clients x 1 image on 16 px digits: IG on the fished aggregate recovers the audited
    client's image, IG on the agreed model's aggregate of the same clients does not."""
    seed = 0
    agreed = build_model("lenet_relu", channels=1, num_classes=10, size=16,
                         generator=torch.Generator().manual_seed(seed))
    threat = threat_model(modifies_model=True, surrogate_data=False)
    scenario = Scenario(agreed, digits16, ClientProtocol(), 1, threat)
    chain = build_chain([{"name": "secure_agg", "clients": 4}])
    plain, truth = scenario.simulate(chain, generator=torch.Generator().manual_seed(seed))
    # The server declares the class it fishes for; the test picks the audited client's, which no other holds here.
    attack = build_attack("fishing", target_class=int(truth.labels[0]))
    served = scenario.serve(partial(attack.serve, data_spec=digits16.spec, threat=threat, surrogate=None,
                                    generator=torch.Generator()))
    fished, same = served.simulate(chain, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(same.images, truth.images)
    budget = Budget(iterations=100)
    rec = attack.reconstruct(fished, budget=budget)
    assert rec.trace.extra["caught"] == 1 and rec.label_source == "fished"
    ig = build_attack("ig").reconstruct(plain, budget=budget)
    fish_db, ig_db = float(psnr(rec.images[:1], truth.images)), float(psnr(ig.images, truth.images))
    assert fish_db > 18.0 and fish_db > ig_db + 8.0, (fish_db, ig_db)
    record = attack.threat_record(fished, rec.label_source)
    assert record["sok_class"] == "F" and record["modification"]["target_class"] == int(truth.labels[0])


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


@pytest.mark.usefixtures("one_thread")
def test_a_server_that_selects_clients_differences_secure_aggregation_away(digits16) -> None:
    """Class H: the round through secure_agg-8 run again without the audited client (the other clients recompute
    on their same batches); the difference of the two sums is the audited client's update to float precision.
    Noise, central or DP-SGD's in every client, is drawn anew in the second round and does not cancel."""
    threat = threat_model(selects_clients=True)
    assert CAPABILITIES[Capability.SELECTS_CLIENTS].sok_class == "H" and threat.sok_class == "H" and threat.active
    assert "selects_clients" not in parse_config({}).raw["threat"]
    agreed = build_model("lenet_relu", channels=1, num_classes=10, size=16, generator=torch.Generator().manual_seed(0))
    scenario = Scenario(agreed, digits16, ClientProtocol(), 2, threat)
    secure_agg = {"name": "secure_agg", "clients": 8}
    obs, truth = scenario.simulate(build_chain([secure_agg]), generator=torch.Generator().manual_seed(0))
    own = _flat(compute_update(agreed, truth.images, truth.labels))
    diff = _flat(differenced(obs).update.tensors)
    assert float((diff - own).abs().max()) < 1e-5 * float(own.abs().max())
    assert float((_flat(obs.update.tensors) - own).abs().max()) > 0.1 * float(own.abs().max())  # the sum is not it
    # A passive server gets no second round.
    assert Scenario(agreed, digits16, ClientProtocol(), 2, threat_model()).simulate(
        build_chain([secure_agg]))[0].without_client is None
    sigma = 0.01
    noisy, _ = scenario.simulate(build_chain([secure_agg, {"name": "noise", "sigma": sigma}]),
                                 generator=torch.Generator().manual_seed(0))
    residual = float((_flat(differenced(noisy).update.tensors) - own).std())
    assert abs(residual / (sigma * math.sqrt(2)) - 1) < 0.1, residual          # two rounds' noise, not zero
    # DP-SGD in every client (no clipping at this bound): the others' noise is drawn anew in the second round, so
    # the difference holds 1 + 2 x 7 clients' noise, not the audited client's alone.
    dp = {"name": "dpsgd", "noise_multiplier": 1e-3, "max_grad_norm": 1e3}
    private, _ = scenario.simulate(build_chain([dp, secure_agg]), generator=torch.Generator().manual_seed(0))
    per_client = 1e-3 * 1e3 / 2
    ratio = float((_flat(differenced(private).update.tensors) - own).std()) / per_client
    assert ratio > 3.0, ratio                                                    # sqrt(15) ~ 3.9; 1 if it cancelled
