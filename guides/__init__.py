"""The inference side of a VAE: encoders q(z|x) and the ``AmortizedGuide`` that samples them."""

from pyrovae.guides.amortized import AmortizedGuide
from pyrovae.guides.encoders import ENCODERS, DiagonalNormal, FullCovarianceNormal, LowRankNormal
from pyrovae.guides.flows import FlowEncoder

__all__ = [
    "ENCODERS",
    "AmortizedGuide",
    "DiagonalNormal",
    "FlowEncoder",
    "FullCovarianceNormal",
    "LowRankNormal",
]
