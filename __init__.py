"""pyrovae: variational autoencoders as Pyro programs.

The generative side is :mod:`pyrovae.model`, the amortized guides are :mod:`pyrovae.guides`,
and everything that runs them (objectives, training, estimators, diagnostics, the CLI) is
:mod:`pyrovae.inference`. The names below are the ones most programs need.
"""

from pyrovae.guides import AmortizedGuide
from pyrovae.inference import (
    Checkpoint,
    Evaluation,
    Run,
    Spec,
    diagnose,
    evaluate_run,
    fit,
    load_data,
    load_run,
    load_spec,
    log_marginal_likelihood,
    train_run,
)
from pyrovae.model import VAE

__version__ = "0.1.0"

__all__ = [
    "VAE",
    "AmortizedGuide",
    "Checkpoint",
    "Evaluation",
    "Run",
    "Spec",
    "__version__",
    "diagnose",
    "evaluate_run",
    "fit",
    "load_data",
    "load_run",
    "load_spec",
    "log_marginal_likelihood",
    "train_run",
]
