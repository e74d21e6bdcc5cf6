"""GGL: generative gradient leakage (Li, Zhang, Liu, Liu, "Auditing Privacy Defenses in Federated Learning via
Generative Gradient Leakage", CVPR 2022).

Threat model: honest-but-curious server, SoK class D: it holds a generator
trained on public data from the clients' distribution, sees the defended
update (noised, clipped, sparsified) and the batch size, and knows the
defense's disclosed parameters (the clipping bound, the sparsity level).

Recipe: search only the generator's latent space for
``min_z D(A(grad_w L(G(z), y)), g*) + 0.1 * KL(N(mean z, std z) || N(0, 1))``
where D is the squared L2 distance averaged over layers and A replays the
deterministic part of the disclosed defenses on the trial update ("adaptive"
attack): the same clipping (bound disclosed, else the norm of g*), the
observed sparsity mask (the zeros of g*) or, when the mask is hidden (noise
added after sparsification), the same top-k at the disclosed or estimated
sparsity. Labels come from the last-layer gradient (the base's recovery).

Optimisers (`optimizer`): CMA-ES (`cma` package; a population per generation,
`budget.iterations` generations), Bayesian optimisation (`optuna`: its
Gaussian-process sampler by default, or TPE; `budget.iterations` trials, the
first `bo_initial` of them random and evaluated as one batch, so the random
design is at most the whole budget), and Adam on z (`budget.iterations` steps;
the gradient-based comparison). No phase runs beyond `budget.iterations`.

Trial updates of a population need no second backward, so all candidates are
evaluated in ONE batched computation: per-candidate gradients with
``torch.func.vmap`` over ``torch.func.grad`` of the client's loss (FedAvg's
local steps are unrolled inside the same function), not a loop over
candidates (`evaluate_population(..., batched=False)` is the loop, kept for
the benchmark).

The replay is giaudit.replay's `Replay` (shared with every
attack's `adaptive` option), built once per observation and applied per
candidate inside the vmap.

Deviations: the L2 distance is divided by the squared norm of g* (a constant
per observation, so the optimum is the same) to make the KL weight mean the
same thing for every model.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from giaudit.attacks._common.optimise import adam_descent
from giaudit.attacks.base import ATTACKS, Budget, Plateau, Progress, RestartResult
from giaudit.attacks.gias import PriorAttack
from giaudit.device import to_model
from giaudit.fl import classification_loss, local_batches
from giaudit.priors.generator import Generator
from giaudit.registry import check_choice, check_number
from giaudit.replay import IDENTITY, Replay, replay_for
from giaudit.types import Capability, ClientProtocol, Observation

OPTIMIZERS = ("cma", "bo", "adam")
BO_SAMPLERS = ("gp", "tpe")


def kl_to_standard_normal(z: Tensor) -> Tensor:
    """KL(N(mean z, var z) || N(0, 1)) over the last dim, averaged over the rest (GGL's latent regulariser)."""
    mu = z.mean(-1)
    var = z.var(-1, unbiased=False).clamp_min(1e-8)
    return (0.5 * (var + mu * mu - 1.0 - var.log())).mean(-1)


# -- batched trial updates ---------------------------------------------------------------------
def functional_update_fn(model: nn.Module, protocol: ClientProtocol) -> Callable[[Tensor, Tensor], tuple[Tensor, ...]]:
    """(x, y) -> the client's update for batch x, written with torch.func so it can be vmapped.

    BatchNorm layers in train mode are switched to pure batch statistics (no running-stat
    updates, which vmap cannot do in place); that is what the client's forward uses anyway.
    """
    update, params, buffers = parametrised_update_fn(model, protocol)
    return lambda x, y: update(params, buffers, x, y)


def parametrised_update_fn(model: nn.Module, protocol: ClientProtocol
                           ) -> tuple[Callable[..., tuple[Tensor, ...]], dict[str, Tensor], dict[str, Tensor]]:
    """`functional_update_fn` with the model's parameters and buffers arguments, ``(params, buffers, x, y) ->
    update``, so that problems with models of their own can be mapped over; and the model's own (detached)."""
    model = copy.deepcopy(model)
    if model.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        torch.func.replace_all_batch_norm_modules_(model)
    names = [n for n, _ in model.named_parameters()]

    def loss(p: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return classification_loss(functional_call(model, (p, buffers), (x,)), y)

    g = grad(loss)

    def update(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        if protocol.name == "fedsgd":
            out = g(params, buffers, x, y)
            return tuple(out[n] for n in names)
        current = dict(params)
        for sl in local_batches(protocol, x.shape[0]):
            step = g(current, buffers, x[sl], y[sl])
            current = {n: current[n] - protocol.local_lr * step[n] for n in names}
        return tuple(current[n] - params[n] for n in names)

    return (update, {n: p.detach() for n, p in model.named_parameters()},
            {n: b.detach() for n, b in model.named_buffers()})


@ATTACKS.register("ggl")
class GGL(PriorAttack):
    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.BATCH_SIZE, Capability.SURROGATE_DATA})
    sok_class: ClassVar[str] = "D"
    display_name: ClassVar[str] = "GGL"

    def __init__(self, *, labels: str = "auto", prior: Any = "mnist32", optimizer: str = "cma",
                 population: int = 50, sigma0: float = 0.5, kl_weight: float = 0.1, lr: float = 0.05,
                 adaptive: bool = True, bo_sampler: str = "gp", bo_initial: int = 256, bo_bound: float = 3.0) -> None:
        super().__init__(labels=labels, adaptive=adaptive)
        check_choice("optimizer", optimizer, OPTIMIZERS)
        check_choice("bo_sampler", bo_sampler, BO_SAMPLERS)
        check_number("population", population, low=2)
        for key, value in (("sigma0", sigma0), ("lr", lr), ("bo_bound", bo_bound)):
            check_number(key, value, low=0.0, strict_low=True)
        check_number("kl_weight", kl_weight, low=0.0)
        check_number("bo_initial", bo_initial, low=1)
        self._set_prior(prior)
        self.optimizer, self.population, self.sigma0, self.kl_weight = optimizer, population, sigma0, kl_weight
        self.lr, self.bo_sampler, self.bo_initial, self.bo_bound = lr, bo_sampler, bo_initial, bo_bound

    # -- objective -----------------------------------------------------------------------------
    def _setup(self, obs: Observation) -> tuple[Generator, Replay, list[Tensor], Tensor]:
        gen = self.generator_for(obs)
        target = [t.detach() for t in obs.update.tensors]
        # The same replay `trial_update` applies when adaptive (cached per observation).
        replay = replay_for(obs) if self.adaptive else IDENTITY
        scale = sum((t * t).sum() for t in target) / len(target)
        return gen, replay, target, torch.as_tensor(scale, device=target[0].device).clamp_min(1e-20)

    @staticmethod
    def _distance(adapted: Sequence[Tensor], target: Sequence[Tensor], scale: Tensor) -> Tensor:
        """GGL's D on an already adapted trial update: squared L2 averaged over layers, over ||g*||^2."""
        return sum((x - y).pow(2).sum() for x, y in zip(adapted, target)) / len(target) / scale

    def evaluate_population(self, obs: Observation, labels: Tensor, z: Tensor, *, batched: bool = True,
                            setup: tuple | None = None, update_fn: Callable | None = None) -> Tensor:
        """Objective of P candidates, z: (P, B, latent) -> (P,). `batched=False` loops (benchmark only)."""
        gen, replay, target, scale = setup if setup is not None else self._setup(obs)
        z = to_model(z, gen)  # candidates live on the CPU (CMA-ES, BO); the generator computes on the device
        p, b, d = z.shape
        with torch.no_grad():
            x = gen(z.reshape(p * b, d)).reshape(p, b, *obs.data_spec.shape)
            if batched:
                fn = update_fn or functional_update_fn(obs.model, self.protocol_for(obs))
                trials = vmap(fn, in_dims=(0, None))(x, labels)  # each entry (P, *shape)
                dist = vmap(lambda *t: self._distance(replay(t), target, scale))(*trials)
        if not batched:
            # trial_update replays the same defenses (when adaptive) one candidate at a time.
            dist = torch.stack([self._distance(self.trial_update(obs, obs.model, x[i], labels, create_graph=False),
                                               target, scale).detach() for i in range(p)])
        return dist + self.kl_weight * kl_to_standard_normal(z)

    # -- optimisers ----------------------------------------------------------------------------
    def run_restart(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator,
                    progress: Progress | None) -> RestartResult:
        n = obs.batch_size or labels.numel()
        setup = self._setup(obs)
        gen, replay = setup[0], setup[1]
        shape = (n, gen.config.latent_dim)
        z0 = torch.randn(shape, generator=generator, device=generator.device)
        run = {"cma": self._cma, "bo": self._bo, "adam": self._adam}[self.optimizer]
        best_z, best, losses, stopped, extra = run(obs, labels, budget, generator, progress, setup, z0)
        with torch.no_grad():
            x = gen(to_model(best_z.reshape(shape), gen))
        extra = {"optimizer": self.optimizer, "adapted": list(replay.names), **self.prior.describe(), **extra}
        return RestartResult(x, labels, losses, best, stopped, extra)

    def _cma(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator,
             progress: Progress | None, setup: tuple, z0: Tensor) -> tuple:
        import cma

        shape = z0.shape
        seed = int(torch.randint(1, 2**31 - 1, (1,), generator=generator, device=generator.device))
        es = cma.CMAEvolutionStrategy(z0.reshape(-1).double().numpy(), self.sigma0,
                                      {"popsize": self.population, "seed": seed, "verbose": -9,
                                       "maxiter": budget.iterations, "tolfun": 0, "tolx": 0,
                                       "tolfunhist": 0, "tolstagnation": budget.iterations + 1})
        update_fn = functional_update_fn(obs.model, self.protocol_for(obs))
        plateau = Plateau(budget.patience, budget.min_delta)
        best, best_z, losses, stopped = float("inf"), z0.clone(), [], False
        for _ in range(budget.iterations):
            cands = es.ask()
            z = torch.from_numpy(np.asarray(cands, dtype=np.float32)).reshape(len(cands), *shape)
            values = self.evaluate_population(obs, labels, z, setup=setup, update_fn=update_fn)
            es.tell(cands, values.double().tolist())
            i = int(values.argmin())
            if float(values[i]) < best:
                best, best_z = float(values[i]), z[i].clone()
            losses.append(best)
            if progress is not None:
                progress(1)
            plateau.update(best)
            if plateau.stalled or es.stop():
                stopped = True
                break
        return best_z, best, losses, stopped, {"evaluations": len(losses) * self.population,
                                                "population": self.population}

    def _bo(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator,
            progress: Progress | None, setup: tuple, z0: Tensor) -> tuple:
        import optuna
        from optuna.distributions import BaseDistribution, FloatDistribution

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        shape = z0.shape
        dim = int(z0.numel())
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
        initial = min(self.bo_initial, budget.iterations)
        sampler = (optuna.samplers.GPSampler(seed=seed, n_startup_trials=initial) if self.bo_sampler == "gp"
                   else optuna.samplers.TPESampler(seed=seed, n_startup_trials=initial))
        study = optuna.create_study(direction="minimize", sampler=sampler)
        dists: dict[str, BaseDistribution] = {f"z{i}": FloatDistribution(-self.bo_bound, self.bo_bound)
                                              for i in range(dim)}
        update_fn = functional_update_fn(obs.model, self.protocol_for(obs))
        # The random initial design as one batch; our own seeded draws (N(0,1) clipped to the box)
        # so the batch does not depend on the sampler's internals.
        init = torch.randn((initial, dim), generator=generator, device=generator.device)
        init = init.clamp(-self.bo_bound, self.bo_bound)
        init[0] = z0.reshape(-1).clamp(-self.bo_bound, self.bo_bound)
        values = self.evaluate_population(obs, labels, init.reshape(initial, *shape), setup=setup, update_fn=update_fn)
        for row, v in zip(init.tolist(), values.tolist()):
            study.add_trial(optuna.trial.create_trial(params={f"z{i}": r for i, r in enumerate(row)},
                                                      distributions=dists, value=float(v)))
        i = int(values.argmin())
        best, best_z = float(values[i]), init[i].clone()
        losses = [float(values[: k + 1].min()) for k in range(initial)]
        plateau = Plateau(budget.patience, budget.min_delta)
        if progress is not None:
            progress(initial)
        stopped = False
        for _ in range(budget.iterations - initial):
            trial = study.ask(dists)
            z = torch.tensor([trial.params[f"z{i}"] for i in range(dim)], dtype=torch.float32, device="cpu")
            v = float(self.evaluate_population(obs, labels, z.reshape(1, *shape), setup=setup, update_fn=update_fn)[0])
            study.tell(trial, v)
            if v < best:
                best, best_z = v, z
            losses.append(best)
            if progress is not None:
                progress(1)
            plateau.update(best)
            if plateau.stalled:
                stopped = True
                break
        return best_z, best, losses, stopped, {"evaluations": len(losses), "bo_initial": initial,
                                                "bo_sampler": self.bo_sampler}

    def _adam(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator,
              progress: Progress | None, setup: tuple, z0: Tensor) -> tuple:
        gen, _, target, scale = setup
        z = to_model(z0, gen).clone().requires_grad_(True)

        def step() -> tuple[Tensor, Tensor, Tensor]:
            trial = self.trial_update(obs, obs.model, gen(z), labels)  # adapted when self.adaptive
            loss = self._distance(trial, target, scale) + self.kl_weight * kl_to_standard_normal(z)
            return loss, loss, z  # GGL ranks by its full objective, KL term included

        losses: list[float] = []
        best_z, best, stopped = adam_descent([z], step, lr=self.lr, iterations=budget.iterations, budget=budget,
                                             progress=progress, losses=losses, start=z.detach().clone())
        return best_z, best, losses, stopped, {}
