"""Stacked Inverting Gradients and DLG (giaudit.attacks.batched): each problem is its unbatched run to float
tolerance, problems never mix, per-problem plateau stops and restarts behave as in `reconstruct`, DLG's problem
threads end with the solve, and what cannot be stacked runs unbatched with the identical result."""
from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from giaudit.attacks import build_attack
from giaudit.attacks.base import Budget
from giaudit.attacks.batched import reconstruct_many, why_not_batched
from giaudit.data import load_mnist5k
from giaudit.metrics.image import psnr
from giaudit.metrics.matching import match
from giaudit.scenario.client import Scenario
from giaudit.scenario.models import build_model
from giaudit.threat import threat_model
from giaudit.types import ClientProtocol, SharedUpdate

POOL = None


def _cases(k: int, batch: int = 1) -> list:
    global POOL
    POOL = POOL or load_mnist5k(size=16)
    out = []
    for seed in range(k):
        g = torch.Generator().manual_seed(seed)
        m = build_model("lenet_relu", channels=1, num_classes=10, size=16, generator=g)
        out.append(Scenario(m, POOL, ClientProtocol(), batch, threat_model(batch_size=True)).simulate(None, generator=g))
    return out


def _gens(k: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + i) for i in range(k)]


def test_each_stacked_problem_is_its_unbatched_run() -> None:
    cases = _cases(3, batch=2)
    attack = build_attack("ig", tv_weight=1e-3)
    budget = Budget(iterations=16, restarts=2, workers=1)
    separate = [attack.reconstruct(obs, budget=budget, rng=g) for (obs, _), g in zip(cases, _gens(3))]
    stacked = reconstruct_many(attack, [obs for obs, _ in cases], budget=budget, rngs=_gens(3))
    for a, b in zip(separate, stacked):
        assert (a.images - b.images).abs().max() < 1e-4
        assert torch.equal(a.labels, b.labels) and a.label_source == b.label_source
        assert a.trace.best_restart == b.trace.best_restart and a.trace.iterations == b.trace.iterations
        assert max(abs(x - y) for x, y in zip(a.trace.losses, b.trace.losses)) < 1e-4
        assert b.trace.extra["stacked"] == 6


def test_problems_never_mix_and_stop_on_their_own_plateau() -> None:
    """Replacing one problem's observation by another leaves every other problem's result as it was (the
    gradient of problem k is that of its own objective), and a plateau stop freezes only its own problem."""
    cases = _cases(3)
    attack = build_attack("ig", schedule="constant")
    budget = Budget(iterations=40, patience=3, min_delta=0.05, workers=1)
    first = reconstruct_many(attack, [obs for obs, _ in cases], budget=budget, rngs=_gens(3))
    other = dataclasses.replace(cases[1][0], update=SharedUpdate(
        tuple(t.flip(0) if t.ndim else t for t in cases[1][0].update.tensors), cases[1][0].update.kind))
    second = reconstruct_many(attack, [cases[0][0], other, cases[2][0]], budget=budget, rngs=_gens(3))
    for k in (0, 2):
        assert torch.allclose(first[k].images, second[k].images, atol=1e-6)
        assert first[k].trace.losses == second[k].trace.losses or max(
            abs(x - y) for x, y in zip(first[k].trace.losses, second[k].trace.losses)) < 1e-6
    separate = [attack.reconstruct(obs, budget=budget, rng=g) for (obs, _), g in zip(cases, _gens(3))]
    assert [r.trace.iterations for r in first] == [r.trace.iterations for r in separate]
    assert any(r.trace.stopped_early for r in first) and min(r.trace.iterations for r in first) < 40


def test_what_cannot_be_stacked_runs_unbatched_unchanged() -> None:
    (obs, _), = _cases(1)
    attack = build_attack("ig", schedule="plateau")
    budget = Budget(iterations=6, workers=1)
    assert "schedule" in (why_not_batched(attack, obs, budget) or "")
    assert "adaptive" in (why_not_batched(build_attack("dlg", adaptive=True), obs, budget) or "")
    assert why_not_batched(build_attack("dlg"), obs, budget) is None
    assert "not batched" in (why_not_batched(build_attack("imprint"), obs, budget) or "")
    assert why_not_batched(build_attack("gias"), obs, budget) is None
    assert "plateau" in (why_not_batched(build_attack("gias"), obs, Budget(iterations=6, patience=3)) or "")
    assert why_not_batched(build_attack("ggl"), obs, budget) is None
    assert "optimizer 'bo'" in (why_not_batched(build_attack("ggl", optimizer="bo"), obs, budget) or "")
    assert "halving" in (why_not_batched(build_attack("ggl"), obs, Budget(restarts=4, halving=2)) or "")
    assert "not batched" in (why_not_batched(build_attack("giml"), obs, budget) or "")
    alone = attack.reconstruct(obs, budget=budget, rng=torch.Generator().manual_seed(5))
    (many,) = reconstruct_many(attack, [obs], budget=budget, rngs=[torch.Generator().manual_seed(5)])
    assert torch.equal(alone.images, many.images) and "stacked" not in many.trace.extra
    # Cells whose options cannot be stacked are not grouped either (a group would run them one by one).
    from giaudit.config import parse_config
    from giaudit.orchestration.plan import plan_cells
    from giaudit.orchestration.run import cell_groups
    spec = parse_config({"name": "apart", "seeds": [0, 1], "data": {"source": "mnist5k", "size": 16},
                         "scenario": {"model": "lenet_relu", "batch_size": 1}, "threat": {"batch_size": True},
                         "attacks": {"ig": {"schedule": "plateau"}, "dlg": {"adaptive": True}},
                         "run": {"batch_cells": 4}})
    assert [len(g) for g in cell_groups(plan_cells(spec, "none"), 1)] == [1, 1, 1, 1]


def _psnr(rec, truth) -> float:
    return float(psnr(rec.images[match(rec.images, truth.images)], truth.images).mean())


def test_each_stacked_dlg_problem_is_its_unbatched_run_early_and_to_the_quality_later(one_thread) -> None:
    """Stacked DLG runs each problem's own L-BFGS loop: over its first steps every problem is its unbatched
    run to float tolerance (iDLG labels at batch 1 with two restarts each, recovered and optimised labels at
    batch 2); later L-BFGS carries last-bit differences into other trajectories (as it carries them in the
    unbatched run: benchmarks/batched_dlg.py --reference), and the runs agree to the reconstruction quality."""
    for batch, options, restarts in ((1, {}, 2), (2, {}, 1), (2, {"optimise_labels": True}, 1)):
        attack = build_attack("dlg", max_eval=2, **options)
        budget = Budget(iterations=2, restarts=restarts, workers=1)
        cases = _cases(4, batch)
        separate = [attack.reconstruct(obs, budget=budget, rng=g) for (obs, _), g in zip(cases, _gens(4))]
        stacked = reconstruct_many(attack, [obs for obs, _ in cases], budget=budget, rngs=_gens(4))
        for a, b in zip(separate, stacked):
            assert (a.images - b.images).abs().max() < 1e-3
            assert torch.equal(a.labels, b.labels) and a.label_source == b.label_source
            assert a.trace.best_restart == b.trace.best_restart and a.trace.iterations == b.trace.iterations
            assert all(abs(x - y) <= 1e-3 * abs(x) for x, y in zip(a.trace.losses, b.trace.losses))
            assert b.trace.extra["stacked"] == 4 * restarts
        assert stacked[0].label_source == ("optimised" if options else "idlg" if batch == 1 else "count")
    cases = _cases(6)
    attack = build_attack("dlg", max_eval=5)
    budget = Budget(iterations=3, workers=1)
    separate = [attack.reconstruct(obs, budget=budget, rng=g) for (obs, _), g in zip(cases, _gens(6))]
    stacked = reconstruct_many(attack, [obs for obs, _ in cases], budget=budget, rngs=_gens(6))
    gap = [abs(_psnr(a, t) - _psnr(b, t)) for a, b, (_o, t) in zip(separate, stacked, cases)]
    assert sum(gap) / len(gap) <= 0.5


def test_stacked_dlg_problems_never_mix_and_an_error_ends_the_solve(monkeypatch, one_thread) -> None:
    """Replacing one problem's observation leaves every other problem's result as it was, to the bit (its
    L-BFGS sees only its own answers and its vector work is never batched by who else is in a round); an
    error in an evaluation, mid-run, ends the solve and is raised; torch's thread count is as it was."""
    cases = _cases(3)
    attack = build_attack("dlg", max_eval=5)
    budget = Budget(iterations=3, workers=1)
    threads, alive = torch.get_num_threads(), threading.active_count()
    first = reconstruct_many(attack, [obs for obs, _ in cases], budget=budget, rngs=_gens(3))
    other = dataclasses.replace(cases[1][0], update=SharedUpdate(
        tuple(t.flip(0) if t.ndim else t for t in cases[1][0].update.tensors), cases[1][0].update.kind))
    second = reconstruct_many(attack, [cases[0][0], other, cases[2][0]], budget=budget, rngs=_gens(3))
    assert not torch.equal(first[1].images, second[1].images)
    for k in (0, 2):
        assert torch.equal(first[k].images, second[k].images) and first[k].trace.losses == second[k].trace.losses
    assert threading.active_count() == alive and torch.get_num_threads() == threads

    import giaudit.attacks.batched as batched

    distance, calls = batched.l2_distance, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] > 4:
            raise RuntimeError("evaluation failed")
        return distance(*args, **kwargs)

    monkeypatch.setattr(batched, "l2_distance", failing)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        reconstruct_many(attack, [cases[0][0], other, cases[2][0]], budget=budget, rngs=_gens(3))
    assert calls[0] == 5
    assert threading.active_count() == alive and torch.get_num_threads() == threads


def test_an_audit_with_stacked_cells_gives_the_unbatched_records(tmp_path) -> None:
    """`[run] batch_cells` groups the cells of one attack into one task and one stacked solve: the records are
    the unbatched run's to the stated tolerance (IG: mean |ΔPSNR| <= 0.5 dB; DLG over its first L-BFGS steps:
    to float rounding), with the same ids and hashes (the setting is not in the cell hash)."""
    from giaudit.config import parse_config
    from giaudit.engine import LocalEngine
    from giaudit.orchestration import run_audit
    from giaudit.orchestration.run import cell_groups
    from giaudit.orchestration.plan import plan_cells

    base = {"name": "stack", "seeds": [0, 1, 2, 3], "data": {"source": "mnist5k", "size": 16},
            "scenario": {"model": "lenet_relu", "batch_size": 1}, "threat": {"batch_size": True},
            "attacks": {"ig": {"iterations": 24}, "dlg": {"iterations": 2, "max_eval": 2}}, "output": {"lpips": False}}
    plain = run_audit(parse_config(base), tmp_path / "plain", show_progress=False, engine=LocalEngine(1))
    spec = parse_config({**base, "run": {"batch_cells": 4}})
    groups = cell_groups(plan_cells(spec, "none"), 1)
    assert sorted(len(g) for g in groups) == [4, 4]
    stacked = run_audit(spec, tmp_path / "stacked", show_progress=False, engine=LocalEngine(1))
    a = {r.record_id: r for r in plain.records}
    b = {r.record_id: r for r in stacked.records}
    assert a.keys() == b.keys() and all(a[k].config_hash == b[k].config_hash for k in a)
    for attack, tolerance in (("ig", 0.5), ("dlg", 0.01)):
        keys = [k for k in a if f"__{attack}__" in k]
        gap = [abs(a[k].metrics["psnr_db_mean"] - b[k].metrics["psnr_db_mean"]) for k in keys]
        assert len(keys) == 4 and sum(gap) / len(gap) <= tolerance
        assert all(a[k].label_source == b[k].label_source for k in keys)



def test_the_presets_of_a_comparison_are_one_stream_and_share_stacked_solves(tmp_path) -> None:
    """`run_audits` (what `giaudit compare` runs): the cells of two defenses are grouped together (one solve holds
    both defenses' cells), each record goes to its own run folder, and the records are those of two separate
    stacked runs (the same problems, stacked differently: to the stated tolerance)."""
    from giaudit.config import parse_config
    from giaudit.engine import LocalEngine
    from giaudit.orchestration import run_audit
    from giaudit.orchestration.plan import plan_cells
    from giaudit.orchestration.run import cell_groups, run_audits

    base = {"name": "pair", "seeds": [0, 1], "data": {"source": "mnist5k", "size": 16},
            "scenario": {"model": "lenet_relu", "batch_size": 1}, "threat": {"batch_size": True},
            "attacks": {"ig": {"iterations": 24}}, "output": {"lpips": False}, "run": {"batch_cells": 4}}
    specs = [parse_config(base), parse_config({**base, "defenses": [{"name": "noise", "sigma": 0.01}]})]
    cells = [c for s in specs for c in plan_cells(s, s.defenses and "noise" or "none")]
    groups = cell_groups(cells, 1)
    assert [sorted({c.label for c in g}) for g in groups] == [["noise", "none"]] and len(groups[0]) == 4
    both = run_audits([(s, tmp_path / f"both-{i}", None) for i, s in enumerate(specs)], show_progress=False,
                      engine=LocalEngine(1))
    for i, s in enumerate(specs):
        alone = run_audit(s, tmp_path / f"alone-{i}", show_progress=False, engine=LocalEngine(1))
        a = {r.record_id: r for r in alone.records}
        b = {r.record_id: r for r in both[i].records}
        assert a.keys() == b.keys() and len(a) == 2 and all(a[k].config_hash == b[k].config_hash for k in a)
        assert all(r.trace["stacked"] == 4 for r in b.values())  # one solve held both defenses' cells
        gap = [abs(a[k].metrics["psnr_db_mean"] - b[k].metrics["psnr_db_mean"]) for k in a]
        assert sum(gap) / len(gap) <= 0.5


def test_auto_stack_keeps_a_stack_within_a_share_of_a_workers_memory(monkeypatch) -> None:
    """`batch_cells = "auto"`: by parameter count 32 LeNet cells, fewer when a worker's share of memory would not
    hold them (the per-problem estimate counts every client and restart of a cell)."""
    from giaudit.config import parse_config
    from giaudit.orchestration import run as run_module

    spec = parse_config({"name": "auto", "seeds": [0], "data": {"source": "digits", "size": 16},
                         "scenario": {"model": "lenet_relu", "batch_size": 2, "clients_per_seed": 2},
                         "threat": {"batch_size": True}, "attacks": {"ig": {"restarts": 2}},
                         "run": {"batch_cells": "auto"}})
    assert run_module.auto_stack(spec, 2) == 32
    scen, _ = run_module.build_scenario(spec.data, spec.scenario, spec.threat.model(), 0, base=spec.base)
    from giaudit.attacks.batched import problem_bytes
    per_cell = problem_bytes(spec.attacks["ig"].build(), scen.model, scen.pool.spec.shape, 2) * 2 * 2
    monkeypatch.setattr(run_module, "memory_bytes", lambda: int(10 * per_cell * 2 / run_module.AUTO_MEMORY_SHARE))
    assert run_module.auto_stack(spec, 2) == 10  # 10 cells fit in a quarter of each of the 2 workers' memory
    # Each attack's stacks are sized by its own memory: GGL's population does not shrink IG's stacks.
    both = spec.replace(attacks={"ig": {"restarts": 2}, "ggl": {"restarts": 2, "population": 50}})
    assert run_module.auto_stack(both, 2, "ig") == 10 and run_module.auto_stack(both, 2, "ggl") == 1
    monkeypatch.setattr(run_module, "memory_bytes", lambda: 1)
    assert run_module.auto_stack(spec, 2) == 1
    # GGL evaluates its whole population per problem, GIAS adds a generator copy per image: each costs more.
    one = problem_bytes(build_attack("ig"), scen.model, scen.pool.spec.shape, 2)
    assert problem_bytes(build_attack("ggl", population=50), scen.model, scen.pool.spec.shape, 2) == 50 * one
    assert problem_bytes(build_attack("gias"), scen.model, scen.pool.spec.shape, 2) > one


def test_stacked_ggl_populations_give_the_unbatched_reconstructions(prior_scenario) -> None:
    """GGL (CMA-ES): K problems' populations evaluated in one stacked computation. Every restart's losses equal
    the unbatched run's to 1e-5 relative (each strategy draws its own samples though they are interleaved), the
    same restart is kept, the reconstructions' PSNR agree to the stated tolerance, and a problem's result does
    not depend on the others in its stack (a changed neighbour changes nothing)."""
    import dataclasses

    from giaudit.attacks.ggl import GGL
    from giaudit.metrics.image import psnr

    scen = prior_scenario(1)
    cases = [scen.simulate(generator=torch.Generator().manual_seed(i)) for i in range(3)]
    obs = [o for o, _ in cases]
    attack = GGL(prior="mnist32", optimizer="cma", population=8)
    budget = Budget(iterations=4, restarts=2, workers=1)
    rngs = lambda: [torch.Generator().manual_seed(10 + i) for i in range(3)]  # noqa: E731
    plain = [attack.reconstruct(o, budget=budget, rng=r) for o, r in zip(obs, rngs())]
    stacked = reconstruct_many(attack, obs, budget=budget, rngs=rngs())
    for a, b, (_o, truth) in zip(plain, stacked, cases):
        assert b.trace.extra["stacked"] == 6 and a.label_source == b.label_source
        assert a.trace.best_restart == b.trace.best_restart
        assert np.allclose(a.trace.losses, b.trace.losses, rtol=1e-5)
        assert np.allclose(a.trace.restart_losses, b.trace.restart_losses, rtol=1e-5)
        assert abs(float(psnr(a.images, truth.images).mean()) - float(psnr(b.images, truth.images).mean())) < 0.5
    # A different neighbour (another client's update in problem 0's place) leaves problems 1 and 2 as they were.
    other = dataclasses.replace(obs[0], update=prior_scenario(1, seed=5).simulate(
        generator=torch.Generator().manual_seed(9))[0].update)
    again = reconstruct_many(attack, [other, obs[1], obs[2]], budget=budget, rngs=rngs())
    for b, c in zip(stacked[1:], again[1:]):
        assert b.trace.losses == c.trace.losses and torch.equal(b.images, c.images)


def test_stacked_gias_gives_the_unbatched_reconstructions(prior_scenario) -> None:
    """GIAS (latent search, then per-image generator weights), K problems stacked: the same restart kept, images
    equal to 1e-4 and losses to 1e-5 relative; a changed neighbour changes nothing."""
    scen = prior_scenario(2)
    obs = [scen.simulate(generator=torch.Generator().manual_seed(i))[0] for i in range(3)]
    attack = build_attack("gias")
    budget = Budget(iterations=4, restarts=2, workers=1)
    rngs = lambda: [torch.Generator().manual_seed(20 + i) for i in range(3)]  # noqa: E731
    plain = [attack.reconstruct(o, budget=budget, rng=r) for o, r in zip(obs, rngs())]
    stacked = reconstruct_many(attack, obs, budget=budget, rngs=rngs())
    for a, b in zip(plain, stacked):
        assert b.trace.extra["stacked"] == 6 and a.trace.best_restart == b.trace.best_restart
        assert torch.allclose(a.images, b.images, atol=1e-4) and torch.equal(a.labels, b.labels)
        assert np.allclose(a.trace.losses, b.trace.losses, rtol=1e-5)
        assert a.trace.extra.get("theta_iterations") == b.trace.extra.get("theta_iterations")
    other = dataclasses.replace(obs[0], update=prior_scenario(2, seed=5).simulate(
        generator=torch.Generator().manual_seed(9))[0].update)
    again = reconstruct_many(attack, [other, obs[1], obs[2]], budget=budget, rngs=rngs())
    for b, c in zip(stacked[1:], again[1:]):
        assert b.trace.losses == c.trace.losses and torch.equal(b.images, c.images)


def test_stacked_ggl_on_fedavg_updates_gives_the_unbatched_losses(unseen_pool) -> None:
    """GGL stacks FedAvg updates (its stacked update function unrolls the client's local steps as the unbatched
    one does): the same losses to 1e-5 relative."""
    from conftest import client_scenario

    from giaudit.attacks.ggl import GGL
    from giaudit.types import ClientProtocol

    fedavg = ClientProtocol(name="fedavg", local_steps=2, local_lr=0.1, local_batch_size=1)
    scen = client_scenario(unseen_pool, 2, protocol=fedavg, surrogate_data=True, training_details=True)
    obs = [scen.simulate(generator=torch.Generator().manual_seed(i))[0] for i in range(2)]
    attack = GGL(prior="mnist32", optimizer="cma", population=8)
    budget = Budget(iterations=3, workers=1)
    assert obs[0].update.kind == "delta" and why_not_batched(attack, obs[0], budget) is None
    plain = [attack.reconstruct(o, budget=budget, rng=torch.Generator().manual_seed(10 + i)) for i, o in enumerate(obs)]
    stacked = reconstruct_many(attack, obs, budget=budget, rngs=[torch.Generator().manual_seed(10 + i) for i in range(2)])
    for a, b in zip(plain, stacked):
        assert b.trace.extra["stacked"] == 2 and np.allclose(a.trace.losses, b.trace.losses, rtol=1e-5)
