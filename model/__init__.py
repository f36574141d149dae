"""The generative side of a VAE: priors p(z), decoders, likelihoods p(x|z), and ``VAE``."""

from model.decoders import DECODERS, MLPDecoder
from model.likelihoods import LIKELIHOODS, Bernoulli, Gaussian
from model.priors import PRIORS, StandardNormal
from model.sites import DATA_PLATE, LATENT, OBSERVED
from model.vae import VAE

__all__ = [
    "DATA_PLATE",
    "DECODERS",
    "LATENT",
    "LIKELIHOODS",
    "OBSERVED",
    "PRIORS",
    "VAE",
    "Bernoulli",
    "Gaussian",
    "MLPDecoder",
    "StandardNormal",
]
