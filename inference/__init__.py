"""Running VAEs, in three layers that import downwards only.

- :mod:`~pyrovae.inference.algorithms`: objectives, KL schedules, the scoring path, the
  marginal-likelihood estimators (importance sampling, AIS, BDMC) and PSIS diagnostics;
- :mod:`~pyrovae.inference.experiment`: the spec, data sets, runs and checkpoints, the
  training loop with its callbacks, and ``train_run`` / ``evaluate_run``;
- :mod:`~pyrovae.inference.reporting`: diagnostics, figures, the run report and comparisons;

with the ``pyrovae`` command (:mod:`~pyrovae.inference.cli`) on top.
"""

from pyrovae.inference.algorithms.annealing import (
    AnnealedLikelihood,
    annealed_log_marginal_likelihood,
)
from pyrovae.inference.algorithms.bdmc import BDMC, bdmc
from pyrovae.inference.algorithms.marginal import MarginalLikelihood, log_marginal_likelihood
from pyrovae.inference.algorithms.objectives import (
    OBJECTIVES,
    ParticleBound,
    analytic_kl,
    elbo,
    enumerated_elbo,
    iwae,
)
from pyrovae.inference.algorithms.psis import KHAT_THRESHOLD, khat_bad_fraction, pareto_khat
from pyrovae.inference.algorithms.schedules import (
    SCHEDULES,
    ConstantBeta,
    CyclicalAnnealing,
    FreeBits,
    KLSchedule,
    KLWeight,
    LinearWarmup,
)
from pyrovae.inference.algorithms.scoring import Scores, score
from pyrovae.inference.errors import PyrovaeError
from pyrovae.inference.experiment.build import build, build_objective, build_schedule
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
from pyrovae.inference.experiment.data import Splits, load_data
from pyrovae.inference.experiment.evaluation import Evaluation, evaluate_run
from pyrovae.inference.experiment.runs import Checkpoint, Run, load_run
from pyrovae.inference.experiment.spec import Spec, load_spec
from pyrovae.inference.experiment.training import TrainingDiverged, fit
from pyrovae.inference.experiment.warmup import GuideWarmup
from pyrovae.inference.experiment.workflow import train_run
from pyrovae.inference.reporting.aggregate import AggregateKL, aggregate_kl
from pyrovae.inference.reporting.compare import compare_runs, format_comparison
from pyrovae.inference.reporting.diagnostics import Diagnostics, SiteDiagnostics, diagnose
from pyrovae.inference.reporting.prior_fit import PriorFit, fit_prior
from pyrovae.inference.reporting.report import write_report

__all__ = [
    "AggregateKL",
    "PriorFit",
    "BDMC",
    "KHAT_THRESHOLD",
    "AnnealedLikelihood",
    "OBJECTIVES",
    "SCHEDULES",
    "BatchTransform",
    "Callback",
    "Checkpoint",
    "Checkpointing",
    "CollapseAlarm",
    "DivergenceAlarm",
    "ConstantBeta",
    "CyclicalAnnealing",
    "Diagnostics",
    "EarlyStopping",
    "GuideWarmup",
    "Evaluation",
    "FitState",
    "FreeBits",
    "GradientClipping",
    "KLSchedule",
    "KLWeight",
    "LinearWarmup",
    "MarginalLikelihood",
    "ParticleBound",
    "ProgressBar",
    "PyrovaeError",
    "Run",
    "Scores",
    "SiteDiagnostics",
    "Spec",
    "Splits",
    "TrainingDiverged",
    "aggregate_kl",
    "fit_prior",
    "analytic_kl",
    "enumerated_elbo",
    "annealed_log_marginal_likelihood",
    "bdmc",
    "build",
    "build_objective",
    "build_schedule",
    "compare_runs",
    "diagnose",
    "elbo",
    "evaluate_run",
    "fit",
    "format_comparison",
    "iwae",
    "khat_bad_fraction",
    "load_data",
    "load_run",
    "load_spec",
    "log_marginal_likelihood",
    "pareto_khat",
    "score",
    "train_run",
    "write_report",
]
