"""The generative side of a VAE: priors p(z), decoders, likelihoods p(x|z), and ``VAE``."""

from model.decoders import DECODERS, ConvDecoder, MLPDecoder
from model.distributions import DiscretizedLogistic
from model.likelihoods import (
    LIKELIHOODS,
    Bernoulli,
    ContinuousBernoulli,
    EightBitLogistic,
    Gaussian,
    HeteroscedasticGaussian,
    Laplace,
    bits_per_dim,
)
from model.priors import (
    PRIORS,
    FlowPrior,
    LearnedNormal,
    MixtureOfNormals,
    StandardNormal,
    VampPrior,
)
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
    "ContinuousBernoulli",
    "ConvDecoder",
    "DiscretizedLogistic",
    "EightBitLogistic",
    "FlowPrior",
    "Gaussian",
    "HeteroscedasticGaussian",
    "Laplace",
    "LearnedNormal",
    "MLPDecoder",
    "MixtureOfNormals",
    "StandardNormal",
    "VampPrior",
    "bits_per_dim",
]
