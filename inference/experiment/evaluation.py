"""Evaluating a run: :func:`evaluate_run` and the :class:`Evaluation` it returns and writes.

An evaluation is written as strict JSON (NaN and infinities become null), atomically, and
never over an evaluation made with other settings unless asked: a quick ``-k 1 --limit 1``
cannot silently replace a K = 5000 result.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro

from pyrovae.inference.algorithms.marginal import MarginalLikelihood, log_marginal_likelihood
from pyrovae.inference.algorithms.psis import KHAT_THRESHOLD
from pyrovae.inference.errors import PyrovaeError
from pyrovae.inference.experiment.data import check_data
from pyrovae.inference.experiment.runs import Run, atomic_write, check_writable, load_run
from pyrovae.inference.experiment.training import resolve_device
from pyrovae.inference.experiment.workflow import load_run_data
from pyrovae.model.likelihoods import bits_per_dim

__all__ = [
    "EVALUATION",
    "SETTINGS",
    "Evaluation",
    "check_evaluation_target",
    "evaluate_run",
]

EVALUATION = "evaluation.json"
"""Where :func:`evaluate_run` writes its results in the run directory by default."""

SETTINGS = ("split", "num_samples", "limit", "seed")
"""The settings that make two evaluations of a run the same evaluation."""


@dataclass(frozen=True)
class Evaluation:
    """The importance-sampling evaluation of a run on a data split.

    Attributes:
        run: the run directory.
        epoch: the run's epoch when evaluated.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        num_samples: K, draws per point.
        limit: the first ``limit`` points of the split were evaluated (None: all).
        seed: the seed the draws started from.
        seconds: time of the estimate.
        features: data features per point, for bits/dim.
        levels: grey levels for the bits/dim of a density (None for a pmf), see
            :func:`pyrovae.model.bits_per_dim`.
        result: the per-point :class:`MarginalLikelihood` (``log_px``, ``stderr``,
            ``khat``, ``elbo``, ... each ``(N,)``).
    """

    run: Path
    epoch: int
    split: str
    num_samples: int
    limit: int | None
    seed: int
    seconds: float
    features: int
    levels: int | None
    result: MarginalLikelihood

    @property
    def num_points(self) -> int:
        return len(self.result.log_px)

    def summary(self) -> dict[str, float]:
        """Means over the points, the Monte Carlo error of the mean log p(x), bits/dim and the
        k̂ share (NaN when k̂ was not computed)."""
        summary = self.result.summary()
        summary["bits_per_dim"] = float(bits_per_dim(summary["log_px"], self.features, self.levels))
        return summary

    def to_json(self) -> dict[str, Any]:
        """Settings, summary and per-point figures in data order, as strict JSON values
        (NaN and infinities become null)."""
        per_point = {
            name: [_finite(v) for v in getattr(self.result, name).tolist()]
            for name in ("log_px", "stderr", "khat", "elbo")
        }
        return {
            "run": str(self.run),
            "epoch": self.epoch,
            "split": self.split,
            "points": self.num_points,
            "num_samples": self.num_samples,
            "limit": self.limit,
            "seed": self.seed,
            "seconds": self.seconds,
            "features": self.features,
            "bits_per_dim_levels": self.levels,
            "khat_threshold": KHAT_THRESHOLD,
            **{k: _finite(v) for k, v in self.summary().items()},
            "per_point": per_point,
        }

    def write(self, path: str | Path) -> Path:
        """Writes :meth:`to_json` to ``path`` atomically."""
        path = Path(path)
        text = json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"
        atomic_write(path, text.encode())
        return path


def check_evaluation_target(path: Path, settings: dict[str, Any], force: bool = False) -> None:
    """Refuses, before any work, an output that cannot be written or that holds an
    evaluation made with other settings (unless ``force``).

    Raises:
        PyrovaeError: one line naming the file, the settings that differ, and the way out.
    """
    check_writable(path, "evaluation")
    if path.is_dir():
        raise PyrovaeError(f"cannot write the evaluation to {path}: it is a directory")
    if not path.exists() or force:
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict):
        raise PyrovaeError(
            f"{path} exists and is not a pyrovae evaluation; pass --force to replace it or "
            "--output FILE to write elsewhere"
        )
    differ = [
        f"{k} {saved.get(k)!r} -> {settings[k]!r}" for k in SETTINGS if saved.get(k) != settings[k]
    ]
    if differ:
        raise PyrovaeError(
            f"{path} holds an evaluation with other settings ({', '.join(differ)}); pass "
            "--force to replace it or --output FILE to keep both"
        )


def evaluate_run(
    run: Run | str | Path,
    *,
    split: str = "test",
    num_samples: int = 5000,
    limit: int | None = None,
    seed: int = 0,
    device: str | None = None,
    output: str | Path | None = None,
    force: bool = False,
    write: bool = True,
    progress: bool = False,
) -> Evaluation:
    """Estimates log p(x) per data point of a run's split by importance sampling.

    Args:
        run: a :class:`Run` or a run directory.
        split: ``"test"``, ``"validation"`` or ``"train"`` (binarized once with a fixed seed
            where the run binarizes).
        num_samples: K, draws from the guide per point.
        limit: only the first ``limit`` points.
        seed: seeds the draws.
        device: default the run's ``train.device``.
        output: where to write the JSON; default ``RUN/evaluation.json``.
        force: replace an evaluation made there with other settings.
        write: write the JSON (checked before the work starts); False leaves it to the
            caller's :meth:`Evaluation.write`.
        progress: show a progress bar over the data points.

    Returns:
        The :class:`Evaluation`.

    Raises:
        PyrovaeError: bad settings or output, or a model the estimator cannot score, found
            before the work starts where possible.
    """
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
        raise PyrovaeError(f"num_samples must be at least 1, got {num_samples}")
    if limit is not None and limit < 1:
        raise PyrovaeError(f"limit must be at least 1, got {limit}")
    run = run if isinstance(run, Run) else load_run(run)
    target = Path(output) if output is not None else run.path / EVALUATION
    if write:
        settings = {"split": split, "num_samples": num_samples, "limit": limit, "seed": seed}
        check_evaluation_target(target, settings, force)
    device_ = resolve_device(device or run.spec.train.device)
    x, _ = load_run_data(run.spec).split(split)
    likelihood = getattr(run.model, "likelihood", None)
    check_data(x, f"the {split} split", getattr(likelihood, "support", None))
    x = x[:limit].to(device_)
    run.model.to(device_)
    run.guide.to(device_)
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    try:
        result = log_marginal_likelihood(
            run.model, run.guide, x, num_samples=num_samples, progress=progress
        )
    except ValueError as e:
        raise PyrovaeError(str(e)) from None
    evaluation = Evaluation(
        run=run.path,
        epoch=run.epoch,
        split=split,
        num_samples=num_samples,
        limit=limit,
        seed=seed,
        seconds=time.perf_counter() - start,
        features=x[0].numel(),
        # A density on [0, 1] data is reported on the scale of 256 grey levels; a pmf, or a
        # model without a likelihood module, as it is.
        levels=256
        if likelihood is not None and not getattr(likelihood, "discrete", False)
        else None,
        result=result,
    )
    if write:
        evaluation.write(target)
    return evaluation


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
