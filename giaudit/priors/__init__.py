"""Generative priors for the class-D attacks (GIAS, GIML, GGL): build, train, save, load.

`load_prior("mnist32")` loads the prior shipped in ``giaudit/priors/assets``;
any other argument is a checkpoint path (see `giaudit.priors.io`).
"""
from giaudit.priors.generator import Discriminator, Generator, GeneratorConfig, build_generator
from giaudit.priors.io import Prior, as_prior, load_prior, save_prior, shipped_priors, untrained_prior

__all__ = ["Discriminator", "Generator", "GeneratorConfig", "Prior", "as_prior", "build_generator",
           "load_prior", "save_prior", "shipped_priors", "untrained_prior"]
