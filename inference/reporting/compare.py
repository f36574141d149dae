"""Comparing runs on the same data points: bounds, log p(x) and the paired difference.

Every run is evaluated on the same points of one split (:func:`inference.reporting.diagnostics.diagnose`
with importance-sampled log p(x)). Differences of log p(x) are paired: for each point the
difference between a run and the first, then their mean and standard error sd / sqrt(n).
Pairing removes the spread between points that both runs share (some digits are hard for
every model), so the paired standard error is usually far smaller than either run's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from torch import Tensor

from pyrovae.inference.algorithms.marginal import standard_error
from pyrovae.inference.errors import PyrovaeError, check_int
from pyrovae.inference.experiment.evaluation import estimate_log_px
from pyrovae.inference.experiment.runs import Run, load_run
from pyrovae.inference.reporting.diagnostics import diagnose

__all__ = ["Comparison", "compare_runs", "format_comparison"]

_COLUMNS = ("elbo", "log_px", "kl", "mutual_information", "marginal_kl", "active_units")


@dataclass(frozen=True)
class Comparison:
    """Runs evaluated on the same points.

    Attributes:
        rows: one dict per run, in the order given: ``run`` (its directory) and floats
            ``elbo``, ``log_px``, ``log_px_se`` (standard error over points), ``kl``,
            ``mutual_information``, ``marginal_kl``, ``active_units``, ``latent_dim``,
            ``khat_bad_fraction``, and the paired difference to the first run
            ``delta_log_px`` with ``delta_log_px_se`` (both 0 for the first run).
        log_px: ``(runs, N)`` per-point log p(x) estimates, float64.
        split: the data split evaluated.
        num_points: N, the points evaluated.
        num_samples: K, importance samples per point.
        seed: the seed each run's evaluation started from.
        method: how log p(x) was estimated, in words.
    """

    rows: tuple[dict[str, float | str], ...]
    log_px: Tensor
    split: str
    num_points: int
    num_samples: int
    seed: int
    method: str = "K = 500 importance samples"


def compare_runs(
    run_dirs: Sequence[str | Path],
    split: str = "test",
    *,
    limit: int | None = 500,
    num_samples: int = 500,
    num_latent_samples: int = 16,
    seed: int = 0,
    method: str = "is",
    num_chains: int = 16,
    num_steps: int = 200,
    progress: bool = False,
) -> Comparison:
    """Evaluates runs on the same points of a split and pairs their log p(x) with the first.

    Args:
        run_dirs: run directories; the first is the baseline of the paired differences.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        limit: evaluate the first ``limit`` points of the split (None: all).
        num_samples: K, importance samples per point for log p(x).
        num_latent_samples: S, draws of z per point for KL and mutual information.
        seed: every run's evaluation starts from this seed, so a comparison is repeatable
            and a run compared with itself differs by exactly 0.
        method: log p(x) by ``"is"`` (importance sampling, K = ``num_samples``) or
            ``"ais"`` (annealed importance sampling, ``num_chains`` x ``num_steps``).
        progress: show a progress bar over each run's points.

    Returns:
        The :class:`Comparison`.

    Raises:
        PyrovaeError: no runs, K < 1, or runs trained on different data (name, path,
            binarization, split sizes or number of features).

    Example:
        >>> import tempfile
        >>> from pyrovae.inference import train_run
        >>> tmp = tempfile.TemporaryDirectory()
        >>> overrides = ["train.epochs=1", "data.limit=100"]  # the default spec: digits
        >>> run = train_run(None, f"{tmp.name}/a", overrides=overrides, progress=False)
        >>> comparison = compare_runs([run.path, run.path], limit=20, num_samples=10)
        >>> [row["delta_log_px"] for row in comparison.rows]  # a run against itself: exactly 0
        [0.0, 0.0]
        >>> print(format_comparison(comparison))  # doctest: +ELLIPSIS
        run ...
        >>> tmp.cleanup()
    """
    if not run_dirs:
        raise PyrovaeError("no runs to compare; give at least one run directory")
    check_int(num_samples, "num_samples", error=PyrovaeError)
    runs = [load_run(path) for path in run_dirs]
    first = runs[0]
    for run in runs[1:]:
        ours, theirs = run.spec.data, first.spec.data
        # A conditional model's log p(x | y) and M2's rows are other quantities and data.
        same_labels = run.spec.model.labels == first.spec.model.labels
        if (
            ours != theirs
            or run.checkpoint.features != first.checkpoint.features
            or not same_labels
        ):
            raise PyrovaeError(
                f"{run.path} was trained on other data than {first.path} ({_describe(run)} "
                f"against {_describe(first)}); compare runs trained on the same data set"
            )
    recorded = {run.checkpoint.data_sha256 for run in runs} - {None}
    if len(recorded) > 1:
        raise PyrovaeError(
            "the runs were trained on different data (their data fingerprints differ) though "
            "their specs name the same; compare runs trained on the same data"
        )
    x, _ = first.points(split, limit, purpose=("a comparison", 2))
    rows, log_px = [], []
    for run in runs:
        # The estimate `evaluate` prints for the same run, K, seed and points.
        estimate = estimate_log_px(
            run.model,
            run.guide,
            x,
            method=method,
            num_samples=num_samples,
            num_chains=num_chains,
            num_steps=num_steps,
            seed=seed,
            progress=progress,
        )
        pyro.set_rng_seed(seed)
        diag = diagnose(
            run.model,
            run.guide,
            x,
            num_samples=0,
            marginal=estimate if method == "is" else None,
            num_latent_samples=num_latent_samples,
        )
        summary = diag.summary()
        log_px.append(estimate.log_px)
        if method != "is":
            summary["log_px"] = estimate.log_px.mean().item()
            summary["log_px_se"] = standard_error(estimate.log_px)
        difference = log_px[-1] - log_px[0]
        row: dict[str, float | str] = {"run": str(run.path)}
        row.update({k: summary[k] for k in (*_COLUMNS, "log_px_se", "latent_dim")})
        row["khat_bad_fraction"] = summary.get("khat_bad_fraction", math.nan)
        row["delta_log_px"] = difference.mean().item()
        row["delta_log_px_se"] = standard_error(difference)
        rows.append(row)
    how = (
        f"K = {num_samples} importance samples"
        if method == "is"
        else (f"AIS with {num_chains} chains x {num_steps} steps")
    )
    return Comparison(tuple(rows), torch.stack(log_px), split, len(x), num_samples, seed, how)


def format_comparison(comparison: Comparison) -> str:
    """The comparison as a plain-text table, one line per run, nats per point."""
    header = (
        "run",
        "ELBO",
        "log p(x) ± se",
        "Δ log p(x) ± se",
        "KL",
        "MI",
        "marginal KL",
        "active",
        "k̂>0.7",
    )
    lines = [header]
    for i, row in enumerate(comparison.rows):
        delta = (
            "baseline" if i == 0 else f"{row['delta_log_px']:+.3f} ± {row['delta_log_px_se']:.3f}"
        )
        lines.append(
            (
                str(row["run"]),
                f"{row['elbo']:.3f}",
                f"{row['log_px']:.3f} ± {row['log_px_se']:.3f}",
                delta,
                f"{row['kl']:.3f}",
                f"{row['mutual_information']:.3f}",
                f"{row['marginal_kl']:.3f}",
                f"{int(row['active_units'])}/{int(row['latent_dim'])}",
                "n/a"
                if math.isnan(row["khat_bad_fraction"])
                else f"{row['khat_bad_fraction']:.1%}",
            )
        )
    widths = [max(len(line[j]) for line in lines) for j in range(len(header))]
    text = [
        "  ".join(
            cell.ljust(w) if j == 0 else cell.rjust(w)
            for j, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    footer = (
        f"{comparison.num_points} {comparison.split} points, {comparison.method}, "
        f"seed {comparison.seed}; Δ is paired with the first run, "
        "se = sd / sqrt(n) over points"
    )
    return "\n".join([*text, footer])


def _describe(run: Run) -> str:
    spec = run.spec.data
    text = f"{spec.name}, binarize={spec.binarize}, {run.checkpoint.features} features"
    if run.spec.model.labels != "none":
        text += f", labels as {run.spec.model.labels}"
    if spec.labels_per_class is not None:
        text += f", {spec.labels_per_class} labels per class"
    return text
