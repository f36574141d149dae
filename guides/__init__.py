"""The inference side of a VAE: encoders q(z|x) and the ``AmortizedGuide`` that samples them."""

from guides.amortized import AmortizedGuide
from guides.encoders import ENCODERS, DiagonalNormal, FullCovarianceNormal, LowRankNormal
from guides.flows import FlowEncoder

__all__ = [
    "ENCODERS",
    "AmortizedGuide",
    "DiagonalNormal",
    "FlowEncoder",
    "FullCovarianceNormal",
    "LowRankNormal",
]
