"""The generative side of a VAE: priors p(z), decoders, likelihoods p(x|z), and ``VAE``."""

from pyrovae.model.decoders import DECODERS, Decoder
from pyrovae.model.distributions import (
    DiscretizedLogistic,
    DiscretizedLogisticMixture,
    FullRankNormal,
)
from pyrovae.model.labelled import Labelled
from pyrovae.model.layers import ConditionalNormal
from pyrovae.model.likelihoods import (
    LIKELIHOODS,
    Bernoulli,
    ContinuousBernoulli,
    EightBitLogistic,
    EightBitLogisticMixture,
    Gaussian,
    HeteroscedasticGaussian,
    Laplace,
    bits_per_dim,
)
from pyrovae.model.priors import (
    PRIORS,
    FlowPrior,
    LearnedNormal,
    MixtureOfNormals,
    StandardNormal,
    VampPrior,
)
from pyrovae.model.sites import DATA_PLATE, LATENT, OBSERVED, latent_sites
from pyrovae.model.vae import VAE, ConditionalVAE, SemiSupervisedVAE

__all__ = [
    "FullRankNormal",
    "DATA_PLATE",
    "DECODERS",
    "LATENT",
    "LIKELIHOODS",
    "OBSERVED",
    "PRIORS",
    "VAE",
    "Bernoulli",
    "ConditionalVAE",
    "ConditionalNormal",
    "ContinuousBernoulli",
    "DiscretizedLogistic",
    "DiscretizedLogisticMixture",
    "EightBitLogistic",
    "EightBitLogisticMixture",
    "FlowPrior",
    "Gaussian",
    "HeteroscedasticGaussian",
    "Labelled",
    "Laplace",
    "LearnedNormal",
    "Decoder",
    "MixtureOfNormals",
    "SemiSupervisedVAE",
    "StandardNormal",
    "VampPrior",
    "bits_per_dim",
    "latent_sites",
]
