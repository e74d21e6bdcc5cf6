"""GIML: gradient inversion to meta-learn a generator (Jeon et al., NeurIPS 2021).

Threat model: honest-but-curious server that holds NO prior (no surrogate
data: SoK class B per observation) but observes many client updates (several
clients or rounds) from the same data distribution. From those gradients alone
it meta-learns a generator, then runs GIAS (`giaudit.attacks.gias`) with it on
the target update.

Recipe, Reptile-style (Nichol et al. 2018):
start from an untrained generator G_theta; repeat `meta_steps` times: sample
`tasks_per_step` observed updates; for each, latent search with an L2 penalty
on z (`meta_z_l2`; an untrained generator's latent search diverges without
it); then `inner_theta_steps` Adam steps on ONE copy theta' of the weights
minimising the summed matching loss of the sampled tasks; move
theta <- theta + meta_lr * (theta' - theta). Then GIAS (mode `mode`) with the
learned G on the target.

How the audit feeds it (the hooks): `others_wanted()` (the option
`meta_observations`) says how many other observations it wants; the audit
passes them to `prepare`, which calls `observe_many(list_of_observations)`
(callable directly too) before `reconstruct`. They are updates of other client
batches (never ground truth). Without them, `reconstruct` meta-learns from
each target update alone (in `before_restarts`) and says so in the trace
(`meta_source`). The meta-learning runs within the attack's budget: meta
steps, latent steps and theta steps are each at most `Budget.iterations`.

What the report can show: `Trace.extra["meta_losses"]` is the mean matching
loss of the sampled tasks after their latent search, per meta step (computed by
the attack, from gradients only). `on_step` / `snapshots` expose the generator
per meta step so a benchmark can evaluate image quality as meta-learning
proceeds; that evaluation is not part of the attack.

Deviation: each observed task keeps its latent code between meta steps
(warm start) instead of searching from scratch every time, which saves most of
the inner latent-search iterations on this CPU.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from giaudit.attacks.base import ATTACKS, Budget, Descent
from giaudit.attacks.gias import GIAS, frozen_copy, gan_prior
from giaudit.attacks.labels import recover_labels
from giaudit.device import placement
from giaudit.errors import ConfigError
from giaudit.priors.generator import Generator, GeneratorConfig, build_generator
from giaudit.priors.io import Prior
from giaudit.registry import check_number
from giaudit.threat import check
from giaudit.types import Capability, Observation


@ATTACKS.register("giml")
class GIML(GIAS):
    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.BATCH_SIZE})
    sok_class: ClassVar[str] = "B"
    display_name: ClassVar[str] = "GIML"

    def __init__(self, *, labels: str = "auto", start: Any = None, latent_dim: int = 32, width: int = 16,
                 meta_observations: int = 16, meta_steps: int = 20, tasks_per_step: int = 4,
                 inner_z_steps: int = 20, inner_theta_steps: int = 5, meta_z_l2: float = 0.1,
                 meta_lr: float = 0.5, meta_theta_lr: float = 1e-3, seed: int = 0, snapshot_every: int = 0,
                 mode: str = "z+theta", lr_z: float = 0.03, lr_theta: float = 1e-3, tv_weight: float = 1e-4,
                 distance: str = "cosine", z_fraction: float = 0.5, z_l2: float = 0.0,
                 adaptive: bool = False) -> None:
        untrained = Prior(build_generator(GeneratorConfig(latent_dim=latent_dim, width=width)), name="untrained")
        super().__init__(labels=labels, prior=untrained, mode=mode, lr_z=lr_z, lr_theta=lr_theta,
                         tv_weight=tv_weight, distance=distance, z_fraction=z_fraction, z_l2=z_l2,
                         adaptive=adaptive)
        check_number("meta_observations", meta_observations, low=0)
        for key, val in (("meta_steps", meta_steps), ("tasks_per_step", tasks_per_step),
                         ("inner_z_steps", inner_z_steps), ("inner_theta_steps", inner_theta_steps)):
            check_number(key, val, low=1)
        # Reptile's step towards the adapted weights.
        check_number("meta_lr", meta_lr, low=0.0, strict_low=True, high=1.0)
        check_number("meta_z_l2", meta_z_l2, low=0.0)
        check_number("meta_theta_lr", meta_theta_lr, low=0.0, strict_low=True)
        self.start = start
        # Loaded now: a bad `start` fails naming the key before any data is loaded.
        self._start_prior = gan_prior(start, "start", "giml") if start is not None else None
        self.latent_dim, self.width = latent_dim, width
        self.meta_observations, self.meta_steps, self.tasks_per_step = meta_observations, meta_steps, tasks_per_step
        self.inner_z_steps, self.inner_theta_steps = inner_z_steps, inner_theta_steps
        self.meta_z_l2, self.meta_lr, self.meta_theta_lr, self.seed = meta_z_l2, meta_lr, meta_theta_lr, seed
        self.snapshot_every = snapshot_every
        self._learned: Prior | None = None
        self._from_target = False  # the learned prior came from a reconstruct's target, not from others
        self._others: tuple[Observation, ...] = ()  # other clients' observations kept by `prepare`
        self._learned_for: Any = None  # what the learned prior was learned for: "observe_many", "target", ...
        self.meta_losses: list[float] = []
        self.meta_source = "none"
        self.meta_wall_s = 0.0
        self.snapshots: dict[int, Prior] = {}

    def others_wanted(self) -> int:
        return self.meta_observations

    def prepare(self, others: Sequence[Observation]) -> None:
        """Keep the other clients' observations; `reconstruct` meta-learns from them within its budget."""
        for o in others:
            check(self.name, self.requires, o.threat)
        self._others = tuple(others)
        self._learned_for = None

    @property
    def prior(self) -> Prior:
        return self._learned if self._learned is not None else self._prior

    # -- meta-learning -------------------------------------------------------------------------
    def _initial_generator(self, obs: Observation) -> Generator:
        c, h, _ = obs.data_spec.shape
        if self._start_prior is not None:
            gen = copy.deepcopy(self._start_prior.generator)
        else:
            cfg = GeneratorConfig(size=h, channels=c, latent_dim=self.latent_dim, width=self.width)
            gen = build_generator(cfg, torch.Generator().manual_seed(self.seed))
        return gen.eval()

    def observe_many(self, observations: Sequence[Observation], *, rng: torch.Generator | None = None,
                     on_step: Callable[[int, Prior], None] | None = None, budget: Budget | None = None) -> Prior:
        """Meta-learn the generator from other clients' observed updates now (within `budget`'s iterations when
        given, see `steps_within`); returns the learned prior, which every later `reconstruct` uses."""
        if not observations:
            raise ConfigError(f"attacks.{self.name}: observe_many needs at least one observation")
        for o in observations:
            check(self.name, self.requires, o.threat)
        learned = self._meta_learn(observations, rng if rng is not None else torch.Generator().manual_seed(self.seed),
                                   on_step, self.steps_within(budget))
        self._from_target, self._others, self._learned_for = False, (), "observe_many"
        return learned

    def steps_within(self, budget: Budget | None) -> tuple[int, int, int]:
        """(meta steps, latent steps, theta steps) of the meta-learning: the options, each at most the budget's
        iterations, so a tiny budget is tiny in the meta-learning too (at the default 1000 nothing changes)."""
        def cap(v: int) -> int:
            return v if budget is None else min(v, budget.iterations)

        return cap(self.meta_steps), cap(self.inner_z_steps), cap(self.inner_theta_steps)

    def _meta_learn(self, observations: Sequence[Observation], gen_rng: torch.Generator,
                    on_step: Callable[[int, Prior], None] | None, steps: tuple[int, int, int]) -> Prior:
        """Reptile on the generator (see the module docstring); the threat model was checked by the caller."""
        meta_steps, inner_z_steps, inner_theta_steps = steps
        start = time.perf_counter()
        device, dtype = placement(observations[0].model)
        gen = self._initial_generator(observations[0]).to(device, dtype)
        theta = list(gen.parameters())
        for p in theta:
            p.requires_grad_(False)
        tasks: list[tuple[Observation, Tensor, Tensor]] = []
        for o in observations:
            labels, _ = recover_labels(o, self.label_method, gen_rng, self.name)
            z = torch.randn((o.batch_size or labels.numel(), gen.config.latent_dim), generator=gen_rng,
                            device=gen_rng.device).to(device, dtype)
            tasks.append((o, labels, z))
        self.meta_losses, self.snapshots = [], {}
        quiet = Budget(iterations=inner_z_steps)
        names = [n for n, _ in gen.named_parameters()]
        buffers = dict(gen.named_buffers())
        for step in range(1, meta_steps + 1):
            k = min(self.tasks_per_step, len(tasks))
            chosen = [int(i) for i in torch.randperm(len(tasks), generator=gen_rng, device=gen_rng.device)[:k]]
            task_losses = []
            for i in chosen:
                o, labels, z = tasks[i]
                z, loss, _ = self.latent_search(o, labels, gen, z, inner_z_steps, quiet, None, [],
                                                z_l2=self.meta_z_l2)
                tasks[i] = (o, labels, z)
                task_losses.append(loss)
            picked = [tasks[i] for i in chosen]
            self.meta_losses.append(sum(task_losses) / len(task_losses))
            # Reptile: a few steps on one copy theta' for the summed loss, then theta += eps (theta' - theta).
            adapted = [p.detach().clone().requires_grad_(True) for p in theta]
            opt = torch.optim.Adam(adapted, lr=self.meta_theta_lr)
            for _ in range(inner_theta_steps):
                total = torch.zeros((), device=device)
                for o, labels, z in picked:
                    x = torch.func.functional_call(gen, {**dict(zip(names, adapted)), **buffers}, (z,))
                    total = total + self.objective(o, labels, x)[1]
                grads = torch.autograd.grad(total, adapted)
                for a, g in zip(adapted, grads):
                    a.grad = g
                opt.step()
            with torch.no_grad():
                for p, a in zip(theta, adapted):
                    p.add_(self.meta_lr * (a.detach() - p))
            if on_step is not None or (self.snapshot_every and step % self.snapshot_every == 0):
                snap = Prior(frozen_copy(gen), self._training(step, len(observations)), name=f"giml@{step}")
                if self.snapshot_every and step % self.snapshot_every == 0:
                    self.snapshots[step] = snap
                if on_step is not None:
                    on_step(step, snap)
        self.meta_wall_s = time.perf_counter() - start
        self._learned = Prior(frozen_copy(gen), self._training(meta_steps, len(observations)),
                              name="giml")
        self.meta_source = f"{len(observations)} observed updates"
        return self._learned

    def _training(self, steps: int, n_obs: int) -> dict[str, Any]:
        return {"data": f"meta-learned from {n_obs} observed updates (GIML)", "steps": steps,
                "loss": "giml-reptile", "seed": self.seed}

    # -- attack --------------------------------------------------------------------------------
    def before_restarts(self, obs: Observation, budget: Budget) -> None:
        """Meta-learn before the restarts, within `budget` (`steps_within`): from the other clients'
        observations `prepare` kept (once for all the targets of a cell), else from this target alone.

        A prior learned from a target serves that target only: the next `reconstruct` learns again from its
        own target (same seed, same target: the same prior), so no record claims a prior learned elsewhere.
        A prior `observe_many` learned is used as it is.
        """
        steps = self.steps_within(budget)
        if self._learned_for == "observe_many" and self._learned is not None:
            return
        if self._others:
            if self._learned_for != ("others", steps):
                self._meta_learn(self._others, torch.Generator().manual_seed(self.seed), None, steps)
                self._learned_for, self._from_target = ("others", steps), False
            return
        self._meta_learn([obs], torch.Generator().manual_seed(self.seed), None, steps)
        self.meta_source = "the target update only (observe_many was not called)"
        self._from_target, self._learned_for = True, "target"

    def descend(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator) -> Descent:
        r = yield from super().descend(obs, labels, budget, generator)
        r.extra.update({"meta_losses": list(self.meta_losses), "meta_source": self.meta_source,
                        "meta_wall_s": round(self.meta_wall_s, 2)})
        return r
