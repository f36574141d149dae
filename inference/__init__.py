"""Running VAEs: objectives, training, data, specs, runs and the ``pyrovae`` command."""

from inference.data import Splits, load_data
from inference.errors import PyrovaeError
from inference.objectives import OBJECTIVES, analytic_kl, elbo
from inference.runs import Run, load_run
from inference.spec import Spec, build, build_objective, load_spec
from inference.train import TrainingDiverged, fit

__all__ = [
    "OBJECTIVES",
    "PyrovaeError",
    "Run",
    "Spec",
    "Splits",
    "TrainingDiverged",
    "analytic_kl",
    "build",
    "build_objective",
    "elbo",
    "fit",
    "load_data",
    "load_run",
    "load_spec",
]
