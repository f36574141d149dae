"""Reproduce the papers: train each paper config to its budget, with a learning curve, and
evaluate it with the paper's protocol.

Each entry of :data:`REPRODUCTIONS` names a config under ``configs/paper-*.toml`` and the
figure its paper reports. For each one asked for, this script

1. trains the config into ``--runs/NAME`` with ``train_run`` (resuming the run where it
   stopped, at any point: a killed job loses at most the epoch it was in);
2. records the test log p(x) every ``--curve-every`` epochs (and after epochs 1, 3, 10 and
   30) by importance sampling with ``--curve-samples`` draws on the first
   ``--curve-points`` test images, through ``evaluate_run``, into
   ``--results/NAME.json``, so that a partial run still says where it is heading;
3. once training has finished (the budget, or the config's early stopping), evaluates the
   checkpoint its paper evaluates (the best-validation one where the config stops early,
   else the last) with the papers' protocol: importance sampling with
   K = ``--final-samples`` (5,000) on all 10,000 test images, and, where more than 20% of
   the points have k̂ > 0.7, AIS on the first ``--ais-points`` of them;
4. writes the reproducibility table (``--results/README.md``) from every results file.

Long runs are meant for one background job on one thread, which leaves the other core free:

    OMP_NUM_THREADS=1 nohup .venv/bin/python benchmarks/reproduce.py burda-vae-1 \\
        --threads 1 --runs ~/pyrovae-runs/reproduce > ~/pyrovae-runs/reproduce.log 2>&1 &

``--stop-at N`` ends this invocation after epoch N (the run resumes from there next time);
``--table`` only re-renders the table. ``--interim`` trains nothing: it evaluates the latest
checkpoint of each named run that has not finished with the final protocol, beside a training
that goes on, into ``--results/interim/NAME.json``, which the table shows for a partial row in
place of its curve's cheaper protocol.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro.util
import torch
from common import ROOT, command_line, find_mnist, live_run
from reproduce_table import (
    INTERIM,
    PER_POINT,
    ResultsError,
    needs_ais,
    read_json,
    write_table,
)

from pyrovae.inference import (
    Callback,
    Checkpoint,
    FitState,
    evaluate_run,
    load_run,
    load_spec,
    train_run,
)
from pyrovae.inference.algorithms.marginal import standard_error
from pyrovae.inference.errors import PyrovaeError
from pyrovae.inference.experiment.evaluation import classification_accuracy
from pyrovae.inference.experiment.runs import BEST

RESULTS = ROOT / "benchmarks" / "results" / "reproduce"
CURVE_EPOCHS = (1, 3, 10, 30)
"""Epochs whose test log p(x) is recorded besides every ``--curve-every``-th."""


@dataclass(frozen=True)
class Reproduction:
    """One row of the table: a paper config and the figure its paper reports.

    Attributes:
        config: the spec, relative to the checkout.
        model: what the row is, in words.
        metric: ``"log_px"`` (nats, test) or ``"accuracy"`` (test, M2).
        paper: the paper's figure (nats, or a share for accuracy); ``None`` for a row beyond
            the papers, which the table compares with the best paper figure on its data.
        source: where the figure is printed, as "Author (year), table"; for a row beyond
            the papers, what it adds to which paper config.
        data: the data protocol, in words.
        paper_epochs: the paper's training budget (its maximum, for early stopping).
        pythae: pythae's reproduction of the same figure, where it has one.
        overrides: ``--set``-style changes to the config that make this row (a budget
            variant of a paper config, say), applied when its run starts.
        base: the row this one changes (for a row beyond the papers); once both are final,
            the paired difference of their final figures on the same test points is kept.
    """

    config: str
    model: str
    metric: str
    paper: float | None
    source: str
    data: str
    paper_epochs: int
    pythae: float | None = None
    overrides: tuple[str, ...] = ()
    base: str | None = None


REPRODUCTIONS: dict[str, Reproduction] = {
    "burda-vae-1": Reproduction(
        "configs/paper-burda-vae-1.toml",
        "VAE, 1 stochastic layer (k = 1)",
        "log_px",
        -86.76,
        "Burda et al. (2016), Table 1",
        "dynamically binarized MNIST",
        3280,
    ),
    "burda-iwae-1": Reproduction(
        "configs/paper-burda-iwae-1.toml",
        "IWAE, 1 stochastic layer (k = 50)",
        "log_px",
        -84.78,
        "Burda et al. (2016), Table 1",
        "dynamically binarized MNIST",
        3280,
    ),
    "burda-vae-2": Reproduction(
        "configs/paper-burda-vae-2.toml",
        "VAE, 2 stochastic layers (k = 1)",
        "log_px",
        -85.33,
        "Burda et al. (2016), Table 1",
        "dynamically binarized MNIST",
        3280,
    ),
    "burda-iwae-2": Reproduction(
        "configs/paper-burda-iwae-2.toml",
        "IWAE, 2 stochastic layers (k = 50)",
        "log_px",
        -82.90,
        "Burda et al. (2016), Table 1",
        "dynamically binarized MNIST",
        3280,
    ),
    "burda-iwae-1-k5": Reproduction(
        "configs/paper-burda-iwae-1.toml",
        "IWAE, 1 stochastic layer (k = 5; budget variant of k = 50)",
        "log_px",
        -85.54,
        "Burda et al. (2016), Table 1",
        "dynamically binarized MNIST",
        3280,
        overrides=("train.objective.num_particles=5",),
    ),
    "burda-iwae-2-k5": Reproduction(
        "configs/paper-burda-iwae-2.toml",
        "IWAE, 2 stochastic layers (k = 5; budget variant of k = 50)",
        "log_px",
        -83.89,
        "Burda et al. (2016), Table 1",
        "dynamically binarized MNIST",
        3280,
        overrides=("train.objective.num_particles=5",),
    ),
    "vamp-1": Reproduction(
        "configs/paper-vamp-1.toml",
        "VAE + VampPrior, 1 layer (K = 500)",
        "log_px",
        -85.57,
        "Tomczak and Welling (2018), Table 2",
        "dynamically binarized MNIST",
        2000,
        pythae=-85.79,
    ),
    "vamp-hvae-2": Reproduction(
        "configs/paper-vamp-hvae-2.toml",
        "HVAE (2 layers) + VampPrior (K = 500)",
        "log_px",
        -83.19,
        "Tomczak and Welling (2018), Table 2",
        "dynamically binarized MNIST",
        2000,
    ),
    "vamp-1-iwae-k5": Reproduction(
        "configs/paper-vamp-1.toml",
        "VAE + VampPrior, 1 layer, trained on the IWAE bound (k = 5, DReG)",
        "log_px",
        None,
        "beyond the papers: paper-vamp-1 with the IWAE bound for its ELBO",
        "dynamically binarized MNIST",
        2000,
        overrides=('train.objective={ kind = "iwae", num_particles = 5, estimator = "dreg" }',),
        base="vamp-1",
    ),
    "m2-100": Reproduction(
        "configs/paper-m2-100.toml",
        "M2, 100 labels",
        "accuracy",
        0.8803,
        "Kingma et al. (2014), Table 1",
        "MNIST, 100 labels",
        3000,
    ),
}


def results_file(results: Path, name: str) -> Path:
    return results / f"{name}.json"


def _mend(path: Path) -> str:
    """How to mend ``path`` where it cannot be read: a run directory's evaluation is written
    again by ``pyrovae evaluate``; the results' files are committed."""
    if path.name.startswith("evaluation"):
        return (
            "write it again with `pyrovae evaluate RUN_DIR -o FILE --force` and its settings "
            "(the K of its name; --checkpoint best where the run has best.pt), or delete it"
        )
    return "restore it from git or delete it"


RUN_RECORD = "reproduce.json"
"""The copy of a row's results file kept in its run directory, so that a run resumed from a
fresh checkout keeps its learning curve."""


def read_results(results: Path, name: str, run_dir: Path | None = None) -> dict[str, Any]:
    """The row's results file, or the run directory's copy where that one has seen more
    epochs (the checkout's copy is the one committed; the run's is the one kept with it)."""
    records = []
    if results_file(results, name).is_file():
        records.append(read_json(results_file(results, name)))
    if run_dir is not None and (run_dir / RUN_RECORD).is_file():
        fix = "delete it, and the results file of the checkout is used in its place"
        records.append(read_json(run_dir / RUN_RECORD, fix=fix))
    return max(records, key=lambda r: r.get("epochs_run", 0), default={})


def write_results(
    results: Path, name: str, data: dict[str, Any], run_dir: Path | None = None
) -> None:
    """Writes the row's results file atomically, and its copy into ``run_dir`` if it exists."""
    from pyrovae.inference.experiment.runs import atomic_write

    results.mkdir(parents=True, exist_ok=True)
    text = (json.dumps(data, indent=2, allow_nan=False) + "\n").encode()
    atomic_write(results_file(results, name), text)
    if run_dir is not None and run_dir.is_dir():
        atomic_write(run_dir / RUN_RECORD, text)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def summary_of(evaluation: Any) -> dict[str, Any]:
    """The figures of an ``Evaluation`` a results file keeps."""
    s = evaluation.summary()
    return {
        "log_px": _finite(s["log_px"]),
        "log_px_se": _finite(s["log_px_se"]),
        "log_px_mc_error": _finite(s.get("log_px_mc_error")),
        "elbo": _finite(s.get("elbo")),
        "khat_share": _finite(s.get("khat_bad_fraction")),
        "accuracy": _finite(s.get("accuracy")),
        "method": evaluation.method,
        "num_samples": evaluation.num_samples,
        "num_chains": evaluation.num_chains,
        "num_steps": evaluation.num_steps,
        "points": evaluation.num_points,
        "seconds": evaluation.seconds,
    }


class LearningCurve(Callback):
    """Every ``every`` epochs (and at :data:`CURVE_EPOCHS`), the test log p(x) of the model
    being trained, by ``evaluate_run`` on the first ``points`` test images with
    ``num_samples`` draws, appended to the results file; for a row scored by accuracy (M2),
    also the classifier's accuracy on the whole test set (one cheap pass, where 500 points
    would leave a standard error of 1.4 points). The training's random state is left as it
    was, so a run with a curve trains exactly as one without."""

    def __init__(
        self,
        name: str,
        spec: Any,
        results: Path,
        record: dict[str, Any],
        every: int,
        num_samples: int,
        points: int,
        run_dir: Path | None = None,
        metric: str = "log_px",
    ) -> None:
        self.name, self.spec, self.results, self.record = name, spec, results, record
        self.metric = metric
        self.run_dir = run_dir
        self.every, self.num_samples, self.points = every, num_samples, points

    def on_epoch_end(self, state: FitState) -> None:
        epoch = state.epoch
        history = state.history[-1]
        self.record["epochs_run"] = epoch
        self.record["train_seconds"] = sum(h["seconds"] for h in state.history)
        self.record.setdefault("history", [])
        self.record["history"] = [
            {k: h[k] for k in ("epoch", "train_elbo", "validation_elbo", "lr", "seconds")}
            for h in state.history
        ]
        curve = self.record.setdefault("curve", [])
        due = epoch % self.every == 0 or epoch in CURVE_EPOCHS or epoch == state.epochs
        if due and not any(point["epoch"] == epoch for point in curve):
            rng = pyro.util.get_rng_state()
            was_training = state.model.training, state.guide.training
            state.model.eval()
            state.guide.eval()
            try:
                live = live_run(self.spec, state)
                evaluation = evaluate_run(
                    live, num_samples=self.num_samples, limit=self.points, write=False
                )
                whole = classification_accuracy(live) if self.metric == "accuracy" else None
            finally:
                pyro.util.set_rng_state(rng)
                state.model.train(was_training[0])
                state.guide.train(was_training[1])
            point = {"epoch": epoch, **summary_of(evaluation)}
            if whole is not None:
                point["accuracy"], point["accuracy_points"] = whole
            point["validation_elbo"] = _finite(history.get("validation_elbo"))
            curve.append(point)
            scored = (
                f", test accuracy {point['accuracy']:.2%} ({point['accuracy_points']} points)"
                if whole is not None
                else ""
            )
            print(
                f"{self.name} epoch {epoch}: test log p(x) {point['log_px']:.2f} "
                f"(K = {self.num_samples}, {self.points} points){scored}",
                flush=True,
            )
        write_results(self.results, self.name, self.record, self.run_dir)


def reproduce(name: str, args: argparse.Namespace, entry: Reproduction | None = None) -> None:
    """Trains (or resumes) one reproduction, records its curve, evaluates it when done.

    Args:
        name: the row's name, which names its run directory and results file.
        args: the options of :func:`parser`.
        entry: the row; default ``REPRODUCTIONS[name]``.
    """
    entry = entry or REPRODUCTIONS[name]
    results = Path(args.results)
    run_dir = Path(args.runs).expanduser() / name
    record = read_results(results, name, run_dir)
    done = checkpoint_epoch(run_dir)
    if lost_run(record, done):
        if not args.restart:
            raise PyrovaeError(_lost_message([name], args))
        record = set_aside_lost_run(record, results, name, run_dir)
    record.update(
        name=name,
        config=entry.config,
        model=entry.model,
        metric=entry.metric,
        paper=entry.paper,
        source=entry.source,
        data=entry.data,
        pythae=entry.pythae,
        paper_epochs=entry.paper_epochs,
        overrides=list(entry.overrides),
        base=entry.base,
        device=_device(),
        threads=torch.get_num_threads(),
        command=command_line(),
        curve_protocol={"num_samples": args.curve_samples, "points": args.curve_points},
    )
    data = find_mnist(args.data)
    if data is None:
        raise PyrovaeError("mnist.npz not found: pass --data or set PYROVAE_DATA")
    overrides = [f"data.path={json.dumps(str(data))}", *entry.overrides]
    spec = load_spec(ROOT / entry.config, overrides)
    budget = spec.train.epochs
    stop_at = min(budget, args.stop_at) if args.stop_at else budget
    record["budget_epochs"] = budget
    finished = record.get("training") == "finished"
    if not finished and done < stop_at:
        record["training"] = "running"
        write_results(results, name, record, run_dir)
        curve = LearningCurve(
            name,
            spec,
            results,
            record,
            args.curve_every,
            args.curve_samples,
            args.curve_points,
            run_dir,
            entry.metric,
        )
        if done:
            run = train_run(
                None,
                run_dir,
                overrides=[f"train.epochs={stop_at}"],
                resume=True,
                progress=False,
                callbacks=[curve],
            )
        else:
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            run = train_run(
                ROOT / entry.config,
                run_dir,
                overrides=[*overrides, f"train.epochs={stop_at}"],
                progress=False,
                callbacks=[curve],
            )
        done = run.epoch
        stopped_early = done < stop_at
        finished = stopped_early or done >= budget
        record["training"] = "finished" if finished else "partial"
        if finished:
            record["stopped_by"] = "early stopping" if stopped_early else "budget"
        write_results(results, name, record, run_dir)
    elif done >= budget:
        finished = True
    if finished and not args.no_final and "final" not in record:
        record["training"] = "finished"
        evaluate_final(name, run_dir, record, args)
        write_results(results, name, record, run_dir)
    if finished and not args.no_final and "ais" not in record and args.ais_points:
        _khat_share(record, run_dir)  # fills it in for results written before it was kept
        if needs_ais(record):
            if (run_dir / "checkpoint.pt").is_file():
                check_with_ais(name, run_dir, record, args)
                write_results(results, name, record, run_dir)
            else:
                # The final figure stands on its own; only its check needs the weights.
                print(
                    f"{name}: the AIS check needs the evaluated checkpoint, and {run_dir} has "
                    "none; it is left out (pass the --runs folder that holds the run to run it)",
                    file=sys.stderr,
                    flush=True,
                )
    if record.get("final") and not per_point_file(results, name).is_file():
        # A row made final before its per-point figures were kept with the results.
        evaluation = run_dir / f"evaluation-k{record['final']['num_samples']}.json"
        if evaluation.is_file():
            keep_per_point(results, name, evaluation)
    if entry.base and record.get("final") and not record.get("against_base", {}).get("paired"):
        runs = Path(args.runs).expanduser()
        against = _against_base(record, results, runs, name, entry.base)
        if against and against != record.get("against_base"):
            record["against_base"] = against
            write_results(results, name, record, run_dir)
    if record.get("ais") and "difference_se" not in record["ais"]:
        # An AIS check recorded before the paired difference was.
        record["ais"].update(_paired_with_final(record, run_dir))
        write_results(results, name, record, run_dir)
    write_table(results, REPRODUCTIONS)


def checkpoint_epoch(run_dir: Path) -> int:
    """The epoch of the run's checkpoint; 0 where it has none."""
    return Checkpoint.load(run_dir).epoch if (run_dir / "checkpoint.pt").is_file() else 0


def lost_run(record: dict[str, Any], done: int) -> bool:
    """Whether the row's results record training that its run directory, with ``done``
    epochs in its checkpoint (0: none), cannot resume: its checkpoint was lost."""
    return not done and bool(record.get("epochs_run")) and record.get("training") != "finished"


def _lost_message(names: list[str], args: argparse.Namespace) -> str:
    rows = ", ".join(names)
    return (
        f"{rows}: the results record epochs of training, but {Path(args.runs).expanduser()} "
        "has no checkpoint to resume them from; pass the --runs folder that holds the runs, "
        "or --restart to train them again from epoch 0 (the earlier runs' curves are kept in "
        "the results files)"
    )


def check_resumable(names: list[str], args: argparse.Namespace) -> None:
    """Refuses, before any row trains, rows whose runs lost their checkpoints, unless
    ``--restart``: one line naming them all."""
    if args.restart:
        return
    runs, results = Path(args.runs).expanduser(), Path(args.results)
    lost = []
    for name in names:
        run_dir = runs / name
        done = checkpoint_epoch(run_dir)
        if lost_run(read_results(results, name, run_dir), done):
            lost.append(name)
    if lost:
        raise PyrovaeError(_lost_message(lost, args))


EARLIER_RUN = (
    "training",
    "epochs_run",
    "train_seconds",
    "device",
    "threads",
    "command",
    "curve_protocol",
    "history",
    "curve",
)
"""The keys of a results file that describe its run (not its row), which a restart sets
aside under ``earlier_runs``."""


def set_aside_lost_run(
    record: dict[str, Any], results: Path, name: str, run_dir: Path
) -> dict[str, Any]:
    """The results of a row whose run lost its checkpoint (its machine was replaced before
    it finished), made ready for a new run from epoch 0: the earlier run's figures (its
    history, curve and interim evaluation) move to ``record["earlier_runs"]``, where the
    table still shows them, and the new run's are recorded afresh. The results file is
    written before the interim file it absorbed is removed."""
    earlier = {key: record.pop(key) for key in EARLIER_RUN if key in record}
    interim = interim_file(results, name)
    if interim.is_file():
        earlier["interim"] = read_json(interim, "evaluation")
    earlier["lost"] = f"no checkpoint left when restarted on {time.strftime('%Y-%m-%d')}"
    record.setdefault("earlier_runs", []).append(earlier)
    write_results(results, name, record, run_dir if run_dir.is_dir() else None)
    interim.unlink(missing_ok=True)
    print(
        f"{name}: the earlier run (epoch {earlier.get('epochs_run')}) has no checkpoint; "
        "its curve is kept under earlier_runs, and the row trains again from epoch 0",
        flush=True,
    )
    return record


def evaluate_final(
    name: str, run_dir: Path, record: dict[str, Any], args: argparse.Namespace
) -> None:
    """The papers' protocol on the run's best checkpoint: IS with K = --final-samples on the
    whole test set; AIS on a subset where k̂ says importance sampling is loose."""
    which = "best" if (run_dir / BEST).is_file() else "latest"
    run = load_run(run_dir, checkpoint=which)
    start = time.perf_counter()
    output = run_dir / f"evaluation-k{args.final_samples}.json"
    evaluation = evaluate_run(run, num_samples=args.final_samples, output=output, force=True)
    final = summary_of(evaluation)
    final.update(checkpoint=which, epoch=run.epoch, seconds=time.perf_counter() - start)
    record["final"] = final
    keep_per_point(Path(args.results), name, output)
    print(f"{name}: test log p(x) {final['log_px']:.2f} ± {final['log_px_se']:.2f}", flush=True)


def per_point_file(results: Path, name: str) -> Path:
    return results / PER_POINT / f"{name}.json"


def keep_per_point(results: Path, name: str, evaluation_file: Path) -> Path:
    """Copies a final evaluation's settings and per-point log p(x) (not its other per-point
    figures) from the run directory into the results, which are committed where run
    directories are not, so that a row can be paired with it after its run is gone."""
    from pyrovae.inference.experiment.runs import atomic_write

    evaluation = read_json(evaluation_file, "evaluation", _mend(evaluation_file))
    kept = {
        key: evaluation.get(key)
        for key in ("epoch", "method", "num_samples", "points", "seed", "log_px", "log_px_se")
    }
    kept["per_point"] = {"log_px": _per_point_log_px(evaluation_file).tolist()}
    path = per_point_file(results, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(kept, allow_nan=False) + "\n").encode())
    return path


def interim_file(results: Path, name: str) -> Path:
    return results / INTERIM / f"{name}.json"


def evaluate_interim(name: str, args: argparse.Namespace) -> None:
    """The final protocol (K = --final-samples on the whole test set) on the latest
    checkpoint of a run that has not finished, written to its own file, not the results
    file, which the training process rewrites every epoch."""
    from pyrovae.inference.experiment.runs import atomic_write

    results = Path(args.results)
    run_dir = Path(args.runs).expanduser() / name
    if not (run_dir / "checkpoint.pt").is_file():
        raise PyrovaeError(f"{run_dir} has no checkpoint to evaluate: train the row first")
    if read_results(results, name, run_dir).get("final"):
        raise PyrovaeError(f"{name} is final; its final evaluation is in its results file")
    run = load_run(run_dir, checkpoint="latest")
    evaluation = evaluate_run(run, num_samples=args.final_samples, write=False)
    interim = {**summary_of(evaluation), "checkpoint": "latest", "epoch": run.epoch}
    path = interim_file(results, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(interim, indent=2, allow_nan=False) + "\n").encode())
    print(
        f"{name} epoch {run.epoch}: test log p(x) {interim['log_px']:.2f} ± "
        f"{interim['log_px_se']:.2f} (K = {args.final_samples}, {interim['points']} points)",
        flush=True,
    )


def _khat_share(record: dict[str, Any], run_dir: Path) -> float | None:
    """The final evaluation's share of points with k̂ > 0.7; for a results file written
    before it was recorded, read from the evaluation file beside the run."""
    final = record.get("final") or {}
    if final.get("khat_share") is None and final.get("method") == "is":
        file = run_dir / f"evaluation-k{final.get('num_samples')}.json"
        if file.is_file():
            evaluation = read_json(file, "evaluation", _mend(file))
            final["khat_share"] = _finite(evaluation.get("khat_bad_fraction"))
    return final.get("khat_share")


def check_with_ais(
    name: str, run_dir: Path, record: dict[str, Any], args: argparse.Namespace
) -> None:
    """AIS on the first --ais-points test points of the evaluated checkpoint, beside
    importance sampling on the same points, where k̂ says importance sampling is loose."""
    run = load_run(run_dir, checkpoint=record["final"]["checkpoint"])
    ais = evaluate_run(
        run,
        method="ais",
        limit=args.ais_points,
        num_chains=args.ais_chains,
        num_steps=args.ais_steps,
        output=run_dir / "evaluation-ais.json",
        force=True,
    )
    record["ais"] = summary_of(ais)
    record["ais"].update(_paired_with_final(record, run_dir))
    print(f"{name}: AIS on {ais.num_points} points {record['ais']['log_px']:.2f}", flush=True)


def _per_point_log_px(path: Path) -> torch.Tensor:
    evaluation = read_json(path, "evaluation", _mend(path))
    try:
        return torch.tensor(evaluation["per_point"]["log_px"], dtype=torch.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise ResultsError(
            f"{path} has no per-point log p(x) ({e!r}); evaluate the run again to rewrite it"
        ) from None


def _paired(this: Path, other: Path) -> dict[str, float]:
    """The paired difference of two evaluation files' per-point log p(x) (``this`` minus
    ``other``) on the points both have (the first ones), with its standard error."""
    a, b = (_per_point_log_px(f) for f in (this, other))
    n = min(len(a), len(b))
    difference = a[:n] - b[:n]
    return {
        "other_same_points": b[:n].mean().item(),
        "difference": difference.mean().item(),
        "difference_se": standard_error(difference),
        "points": n,
    }


def _final_per_point(results: Path, runs: Path, name: str, num_samples: int) -> Path | None:
    """The file holding a row's final per-point log p(x) with K = ``num_samples``: the
    results' copy, else the evaluation in its run directory; ``None`` where neither is."""
    for path in (per_point_file(results, name), runs / name / f"evaluation-k{num_samples}.json"):
        if not path.is_file():
            continue
        if read_json(path, "evaluation", _mend(path)).get("num_samples") == num_samples:
            return path
    return None


def _against_base(
    record: dict[str, Any], results: Path, runs: Path, name: str, base: str
) -> dict[str, Any]:
    """This row's final evaluation against its base row's, where the base row is final with
    the same K on as many points: point by point where both per-point figures are kept
    (``paired``), else the difference of the two means with the root of the sum of their
    squared standard errors; nothing before the base row is final."""
    final = record["final"]
    base_final = read_results(results, base, runs / base).get("final")
    if not base_final or (base_final.get("num_samples"), base_final.get("points")) != (
        final["num_samples"],
        final["points"],
    ):
        return {}
    files = [_final_per_point(results, runs, n, final["num_samples"]) for n in (name, base)]
    if all(files):
        paired = _paired(*files)
        if paired["points"] == final["points"]:
            return {"base": base, **paired, "paired": True}
    return {
        "base": base,
        "other_same_points": base_final["log_px"],
        "difference": final["log_px"] - base_final["log_px"],
        "difference_se": math.hypot(final["log_px_se"], base_final["log_px_se"]),
        "points": final["points"],
        "paired": False,
    }


def _paired_with_final(record: dict[str, Any], run_dir: Path) -> dict[str, float]:
    """AIS against the final importance-sampling evaluation on the same first test points,
    from the two evaluation files: the latter's mean over those points, and the paired
    difference (AIS minus IS, point by point) with its standard error."""
    final = record["final"]
    files = (run_dir / "evaluation-ais.json", run_dir / f"evaluation-k{final['num_samples']}.json")
    if not all(f.is_file() for f in files):
        return {}
    paired = _paired(*files)
    return {
        "is_same_points": paired["other_same_points"],
        "difference": paired["difference"],
        "difference_se": paired["difference_se"],
    }


def _device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}), torch {torch.__version__}"


def parser() -> argparse.ArgumentParser:
    """The command line's options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", choices=[*REPRODUCTIONS, []], metavar="NAME")
    parser.add_argument("--runs", default="~/pyrovae-runs/reproduce")
    parser.add_argument(
        "--results",
        default=str(RESULTS),
        help="folder of the results files and the table (default: the checkout's); an empty "
        "folder trains the named rows afresh, where the checkout's only resumes its partial "
        "rows and re-renders its final ones",
    )
    parser.add_argument("--data", default=None, help="mnist.npz or its folder")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--stop-at", type=int, default=None, help="end after this epoch")
    parser.add_argument("--curve-every", type=int, default=50)
    parser.add_argument("--curve-samples", type=int, default=500)
    parser.add_argument("--curve-points", type=int, default=500)
    parser.add_argument("--final-samples", type=int, default=5000)
    # 100 points: 16 chains x 500 steps of 10 leapfrog steps on 500 points would take about
    # 2.4 h on one CPU thread for the VampPrior model (measured on 10 points x 20 steps).
    parser.add_argument("--ais-points", type=int, default=100)
    parser.add_argument("--ais-chains", type=int, default=16)
    parser.add_argument("--ais-steps", type=int, default=500)
    parser.add_argument(
        "--restart",
        action="store_true",
        help="train a row whose run lost its checkpoint again from epoch 0, keeping the "
        "earlier run's curve",
    )
    parser.add_argument("--no-final", action="store_true", help="skip the final evaluation")
    parser.add_argument("--table", action="store_true", help="only re-render the table")
    parser.add_argument(
        "--interim",
        action="store_true",
        help="train nothing: evaluate the latest checkpoint of each unfinished run with the "
        "final protocol",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    options = parser()
    args = options.parse_args(argv)
    for value, flag in ((args.curve_every, "--curve-every"), (args.threads, "--threads")):
        if value is not None and value < 1:
            options.error(f"{flag} must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.table:
            write_table(Path(args.results), REPRODUCTIONS)
            return 0
        names = args.names or list(REPRODUCTIONS)
        if args.interim and not args.names:
            # Every run that is training or paused, and only those.
            runs = Path(args.runs).expanduser()
            names = [
                n
                for n in names
                if (runs / n / "checkpoint.pt").is_file()
                and not read_results(Path(args.results), n, runs / n).get("final")
            ]
        if not args.interim:
            check_resumable(names, args)
        for name in names:
            if args.interim:
                evaluate_interim(name, args)
            else:
                reproduce(name, args)
        if args.interim:
            write_table(Path(args.results), REPRODUCTIONS)
    except (PyrovaeError, ResultsError) as e:
        print(f"reproduce: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
