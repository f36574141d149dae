"""Running VAEs, in three layers that import downwards only.

- :mod:`~pyrovae.inference.algorithms`: objectives, KL schedules, the scoring path, the
  marginal-likelihood estimators (importance sampling, AIS, BDMC) and PSIS diagnostics;
- :mod:`~pyrovae.inference.experiment`: the spec, data sets, runs and checkpoints, the
  training loop with its callbacks, and ``train_run`` / ``evaluate_run``;
- :mod:`~pyrovae.inference.reporting`: diagnostics, figures, the run report and comparisons;

with the ``pyrovae`` command (:mod:`~pyrovae.inference.cli`) on top.

This package exports what a user calls; the building blocks behind them (registries, the
scoring path, KL handlers, PSIS helpers, spec builders) are imported from their modules.
"""

from pyrovae.inference.algorithms.annealing import annealed_log_marginal_likelihood
from pyrovae.inference.algorithms.bdmc import BDMC, bdmc
from pyrovae.inference.algorithms.marginal import (
    MarginalLikelihood,
    log_marginal_likelihood,
    standard_error,
)
from pyrovae.inference.algorithms.objectives import analytic_kl, elbo, enumerated_elbo, iwae
from pyrovae.inference.algorithms.psis import pareto_khat
from pyrovae.inference.algorithms.schedules import (
    ConstantBeta,
    CyclicalAnnealing,
    FreeBits,
    LinearWarmup,
)
from pyrovae.inference.errors import PyrovaeError
from pyrovae.inference.experiment.build import build
from pyrovae.inference.experiment.callbacks import (
    BatchTransform,
    Callback,
    Checkpointing,
    CollapseAlarm,
    DivergenceAlarm,
    EarlyStopping,
    FitState,
    GradientClipping,
    ProgressBar,
)
from pyrovae.inference.experiment.data import load_data
from pyrovae.inference.experiment.evaluation import Evaluation, evaluate_run
from pyrovae.inference.experiment.runs import Checkpoint, Run, load_run
from pyrovae.inference.experiment.spec import Spec, load_spec
from pyrovae.inference.experiment.training import TrainingDiverged, fit
from pyrovae.inference.experiment.warmup import GuideWarmup
from pyrovae.inference.experiment.workflow import train_run
from pyrovae.inference.reporting.aggregate import AggregateKL, aggregate_kl
from pyrovae.inference.reporting.compare import compare_runs
from pyrovae.inference.reporting.diagnostics import Diagnostics, diagnose
from pyrovae.inference.reporting.prior_fit import PriorFit, fit_prior
from pyrovae.inference.reporting.report import write_report

__all__ = [
    # the spec, data and runs
    "Checkpoint",
    "Evaluation",
    "PyrovaeError",
    "Run",
    "Spec",
    "build",
    "evaluate_run",
    "load_data",
    "load_run",
    "load_spec",
    "train_run",
    # training
    "BatchTransform",
    "Callback",
    "Checkpointing",
    "CollapseAlarm",
    "DivergenceAlarm",
    "EarlyStopping",
    "FitState",
    "GradientClipping",
    "GuideWarmup",
    "ProgressBar",
    "TrainingDiverged",
    "fit",
    # objectives and KL schedules
    "ConstantBeta",
    "CyclicalAnnealing",
    "FreeBits",
    "LinearWarmup",
    "analytic_kl",
    "elbo",
    "enumerated_elbo",
    "iwae",
    # log p(x)
    "BDMC",
    "MarginalLikelihood",
    "annealed_log_marginal_likelihood",
    "bdmc",
    "log_marginal_likelihood",
    "pareto_khat",
    "standard_error",
    # diagnostics and reports
    "AggregateKL",
    "Diagnostics",
    "PriorFit",
    "aggregate_kl",
    "compare_runs",
    "diagnose",
    "fit_prior",
    "write_report",
]
