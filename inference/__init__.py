"""Running VAEs: objectives, schedules, training, marginal likelihood, diagnostics, data, specs."""

from inference.compare import compare_runs, format_comparison
from inference.data import Splits, load_data
from inference.diagnostics import Diagnostics, diagnose
from inference.errors import PyrovaeError
from inference.marginal import MarginalLikelihood, log_marginal_likelihood
from inference.objectives import OBJECTIVES, ParticleBound, analytic_kl, elbo, iwae, log_weights
from inference.psis import KHAT_THRESHOLD, pareto_khat
from inference.report import write_report
from inference.runs import Run, load_run
from inference.schedules import (
    SCHEDULES,
    ConstantBeta,
    CyclicalAnnealing,
    FreeBits,
    KLSchedule,
    KLWeight,
    LinearWarmup,
)
from inference.spec import Spec, build, build_objective, build_schedule, load_spec
from inference.train import TrainingDiverged, fit

__all__ = [
    "KHAT_THRESHOLD",
    "OBJECTIVES",
    "SCHEDULES",
    "ConstantBeta",
    "CyclicalAnnealing",
    "Diagnostics",
    "FreeBits",
    "KLSchedule",
    "KLWeight",
    "LinearWarmup",
    "MarginalLikelihood",
    "ParticleBound",
    "PyrovaeError",
    "Run",
    "Spec",
    "Splits",
    "TrainingDiverged",
    "analytic_kl",
    "build",
    "build_objective",
    "build_schedule",
    "compare_runs",
    "diagnose",
    "elbo",
    "fit",
    "format_comparison",
    "iwae",
    "load_data",
    "load_run",
    "load_spec",
    "log_marginal_likelihood",
    "log_weights",
    "pareto_khat",
    "write_report",
]
