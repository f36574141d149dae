"""The inference side of a VAE: encoders q(z|x) and the ``AmortizedGuide`` that samples them."""

from pyrovae.guides.amortized import (
    AmortizedGuide,
    Classifier,
    ConditionalGuide,
    SemiSupervisedGuide,
    TopDownGuide,
)
from pyrovae.guides.encoders import (
    DiagonalNormal,
    DiagonalNormalHead,
    Encoder,
    FullCovarianceHead,
    FullCovarianceNormal,
    LowRankHead,
    LowRankNormal,
)
from pyrovae.guides.flows import FlowEncoder, FlowHead

ENCODERS = {
    "diagonal_normal": DiagonalNormal,
    "full_covariance_normal": FullCovarianceNormal,
    "low_rank_normal": LowRankNormal,
    "flow": FlowEncoder,
}
"""Spec name -> encoder constructor; the constructor's signature (with the trunk's options of
:class:`Encoder`, which it passes on) is the spec's schema."""

__all__ = [
    "ENCODERS",
    "AmortizedGuide",
    "Classifier",
    "ConditionalGuide",
    "DiagonalNormal",
    "DiagonalNormalHead",
    "Encoder",
    "FlowEncoder",
    "FlowHead",
    "FullCovarianceHead",
    "FullCovarianceNormal",
    "LowRankHead",
    "LowRankNormal",
    "SemiSupervisedGuide",
    "TopDownGuide",
]
