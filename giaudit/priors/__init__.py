"""Generative priors: GAN priors for the class-D attacks (GIAS, GIML, GGL) and DDPM priors for the diffusion
attacks (GIDM, GIDM+, DiffULA): build, train, save, load.

`load_prior("mnist32")` loads the prior shipped in ``giaudit/priors/assets``;
any other argument is a checkpoint path (see `giaudit.priors.io`). Importing this package registers both
formats, so `load_prior` reads either kind.
"""
from giaudit.priors.ddpm import DDPMConfig, DDPMPrior, load_ddpm, save_ddpm, untrained_ddpm
from giaudit.priors.generator import Discriminator, Generator, GeneratorConfig, build_generator
from giaudit.priors.io import Prior, as_prior, load_prior, save_prior, shipped_priors, untrained_prior

__all__ = ["DDPMConfig", "DDPMPrior", "Discriminator", "Generator", "GeneratorConfig", "Prior", "as_prior",
           "build_generator", "load_ddpm", "load_prior", "save_ddpm", "save_prior", "shipped_priors",
           "untrained_ddpm", "untrained_prior"]
