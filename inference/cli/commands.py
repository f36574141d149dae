"""The ``pyrovae`` subcommands: each checks its options, makes one library call and prints."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import pyro
import torch

from pyrovae.inference.algorithms.psis import KHAT_THRESHOLD
from pyrovae.inference.errors import PyrovaeError, check_int
from pyrovae.inference.experiment.distributed import is_main_process
from pyrovae.inference.experiment.evaluation import (
    Evaluation,
    check_evaluation_target,
    evaluate_run,
    evaluation_settings,
)
from pyrovae.inference.experiment.inputs import resolve_device
from pyrovae.inference.experiment.runs import (
    EVALUATION,
    REPORT,
    SAMPLES,
    Run,
    load_run,
    run_lock,
)
from pyrovae.inference.experiment.workflow import train_run

UNRELIABLE_SHARE = 0.2
"""Above this share of points with k̂ > 0.7, ``evaluate`` warns that log p(x) is a bound."""


def cmd_train(args: argparse.Namespace) -> None:
    if args.resume and (args.spec or args.set or args.out or args.force):
        raise PyrovaeError(
            "--resume takes the spec and directory from RUN; drop SPEC, --set, --out, --force"
        )
    overrides = list(args.set)
    if args.tensorboard:
        overrides.append('train.log="tensorboard"')
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    start = time.perf_counter()
    run = train_run(
        args.spec,
        args.resume or args.out,
        overrides=overrides,
        resume=bool(args.resume),
        force=args.force,
        device=args.device,
        progress=not args.no_progress,
    )
    if not is_main_process():
        return
    last = run.history[-1]
    # train_elbo is the training objective's bound: the IWAE bound when training with iwae.
    objective = run.spec.train.objective["kind"]
    bound = "ELBO" if objective in ("elbo", "analytic_kl") else f"{objective} bound"
    print(
        f"trained {run.path}: epoch {last['epoch']}/{run.spec.train.epochs}, "
        f"train {bound} {last['train_elbo']:.2f}, validation ELBO "
        f"{last['validation_elbo']:.2f} "
        f"nats/point, {last['images_per_s']:.0f} images/s on "
        f"{resolve_device(run.spec.train.device)}, {time.perf_counter() - start:.1f} s"
    )


MAX_GRID = 10_000
"""The most samples ``sample`` puts in one image grid (100 x 100 images)."""

SAMPLE_CHUNK = 1000
"""Samples decoded at a time."""


def cmd_sample(args: argparse.Namespace) -> None:
    from pyrovae.inference.reporting.plots import check_image_path, save_image_grid

    check_int(args.num_samples, "-n", error=PyrovaeError)
    if args.num_samples > MAX_GRID:
        raise PyrovaeError(
            f"-n {args.num_samples} is more than one image grid holds ({MAX_GRID}, a "
            f"{int(MAX_GRID**0.5)} x {int(MAX_GRID**0.5)} grid); write several grids with "
            "different --seed values, or draw from Python with run.model.sample(n)"
        )
    _check_seed(args)
    run = load_run(args.run)
    output = _output(args, run.output(SAMPLES))
    check_image_path(output)
    shape = _image_shape(run)
    classes = getattr(run.model, "classes", 0)
    if args.label is not None and not 0 <= args.label < max(classes, 1):
        raise PyrovaeError(
            f"--label {args.label} is not a class of {run.path} (classes 0 to {classes - 1})"
            if classes
            else f"--label needs a conditional run (model.labels = 'context'); {run.path} is not"
        )
    with _lock_if_inside(run.path, output):
        pyro.set_rng_seed(args.seed)
        n = args.num_samples
        labels = None
        if classes:  # the classes in turn, or the one asked for
            labels = (
                torch.arange(n) % classes if args.label is None else torch.full((n,), args.label)
            )
        parts = []
        with torch.no_grad():  # decoded in chunks: memory stays bounded whatever -n is
            for start in range(0, n, SAMPLE_CHUNK):
                size = min(SAMPLE_CHUNK, n - start)
                options = {"labels": labels[start : start + size]} if classes else {}
                parts.append(run.model.sample(size, mean=not args.draw, **options))
        save_image_grid(torch.cat(parts), shape, output)
    print(f"wrote {args.num_samples} samples from {run.path} to {output}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    _check_diagnostic_options(args)
    run = load_run(args.run, checkpoint=args.checkpoint)
    target = Path(args.output) if args.output else run.output(EVALUATION)
    settings = evaluation_settings(
        args.method, args.split, args.num_samples, args.chains, args.steps, args.limit, args.seed
    )
    check_evaluation_target(target, settings, args.force)
    with _lock_if_inside(run.path, target):
        _evaluate(args, run, target)


def _evaluate(args: argparse.Namespace, run: Run, target: Path) -> None:
    evaluation = evaluate_run(
        run,
        split=args.split,
        method=args.method,
        num_samples=args.num_samples,
        num_chains=args.chains,
        num_steps=args.steps,
        limit=args.limit,
        seed=args.seed,
        device=args.device,
        write=False,
        progress=True,
    )
    if not is_main_process():
        return  # under torchrun, rank 0 prints and writes
    try:
        if args.json:
            print(json.dumps(evaluation.to_json(), indent=2))
        else:
            _print_evaluation(evaluation, target)
    finally:
        # Printed first, then written: a failed write still leaves the table on screen,
        # and a closed pipe still gets the results written.
        evaluation.write(target)
    share = evaluation.summary().get("khat_bad_fraction", math.nan)
    if share > UNRELIABLE_SHARE:
        print(
            f"pyrovae: warning: {share:.0%} of points have k̂ > {KHAT_THRESHOLD}, so log p(x) "
            "is a lower bound of unknown tightness; raise -k, use a richer guide, or use "
            "--method ais",
            file=sys.stderr,
        )


def _print_evaluation(evaluation: Evaluation, target: Path) -> None:
    summary = evaluation.summary()
    rows = [
        (
            "log p(x) ± se over points",
            f"{summary['log_px']:.3f} ± {_shown(summary['log_px_se'], 3)} "
            f"(Monte Carlo error of the mean {_shown(summary['log_px_mc_error'], 4)})",
        ),
        (
            "bits/dim",
            f"n/a: {evaluation.bits_undefined}"
            if evaluation.bits_undefined
            else f"{summary['bits_per_dim']:.4f}",
        ),
    ]
    if evaluation.method == "is":
        share = summary["khat_bad_fraction"]
        rows = [
            ("ELBO", f"{summary['elbo']:.3f}"),
            *rows,
            ("reconstruction E[log p(x|z)]", f"{summary['reconstruction']:.3f}"),
            ("KL(q(z|x) || p(z))", f"{summary['kl']:.3f}"),
            *[(f"IWAE k={k}", f"{v.mean().item():.3f}") for k, v in evaluation.result.iwae.items()],
            (
                f"share of points with k̂ > {KHAT_THRESHOLD}",
                "not computed (k̂ needs K >= 25)" if math.isnan(share) else f"{share:.1%}",
            ),
        ]
        how = f"K = {evaluation.num_samples}"
    else:
        rows.append(
            (
                "HMC acceptance (mean, lowest point)",
                f"{summary['acceptance']:.2f}, {summary['acceptance_min']:.2f}",
            )
        )
        how = f"AIS, {evaluation.num_chains} chains x {evaluation.num_steps} steps"
    if evaluation.accuracy is not None:
        rows.append(("classification accuracy of q(y|x)", f"{evaluation.accuracy:.2%}"))
    width = max(len(name) for name, _ in rows)
    print(
        f"{evaluation.run}: {evaluation.split} split, {evaluation.num_points} points, {how}, "
        f"{evaluation.seconds:.1f} s (nats per point)"
    )
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"writing {target}")


def cmd_bdmc(args: argparse.Namespace) -> None:
    from pyrovae.inference.algorithms.bdmc import bdmc

    for flag, value in (
        ("--num-points", args.num_points),
        ("--steps", args.steps),
        ("--chains", args.chains),
    ):
        check_int(value, flag, error=PyrovaeError)
    _check_seed(args)
    run = load_run(args.run)
    if run.spec.model.labels != "none":
        raise PyrovaeError(
            f"bdmc simulates data from the model, and {run.path} is a labelled model "
            f"(model.labels = {run.spec.model.labels!r}); bound its log p(x) with evaluate"
        )
    device = resolve_device(args.device or run.spec.train.device)
    run.model.to(device)
    run.guide.to(device)
    example = run.data().test[:1].to(device)
    pyro.set_rng_seed(args.seed)
    start = time.perf_counter()
    try:
        result = bdmc(
            run.model,
            run.guide,
            args.num_points,
            example=example,
            num_chains=args.chains,
            num_steps=args.steps,
            progress=True,
        )
    except ValueError as e:
        raise PyrovaeError(str(e)) from None
    summary = result.summary()
    print(
        f"{run.path}: BDMC on {args.num_points} points simulated from the model, "
        f"{args.chains} chains x {args.steps} steps each way, "
        f"{time.perf_counter() - start:.1f} s (nats per point)"
    )
    print(f"  forward AIS (lower bound)   {summary['lower']:.3f}")
    print(f"  reverse AIS (upper bound)   {summary['upper']:.3f}")
    gap = summary["gap"]
    note = (
        "  (negative: the two bounds hold in expectation only, and with these chains and "
        "steps their Monte Carlo error exceeds the gap; more steps tighten it)"
        if gap < 0
        else ""
    )
    print(f"  gap                         {gap:.3f}{note}")
    print(f"  HMC acceptance (forward)    {summary['acceptance']:.2f}")


def cmd_report(args: argparse.Namespace) -> None:
    from pyrovae.inference.reporting.report import write_report

    _check_diagnostic_options(args)
    run = load_run(args.run)
    target = _output(args, run.output(REPORT))
    with _lock_if_inside(run.path, target):
        path = write_report(
            run,
            args.split,
            limit=args.limit,
            num_samples=args.num_samples,
            seed=args.seed,
            path=args.output,
            progress=True,
            aggregate=args.aggregate_kl,
        )
    print(f"wrote {path}")


def _output(args: argparse.Namespace, default: Path) -> Path:
    """Where a command writes its file, by one rule: its default file in the run is the
    run's own and is replaced; a file named with ``-o`` that exists is replaced only with
    ``--force``. A folder is never a file name."""
    output = Path(args.output) if args.output else default
    if output.is_dir():
        raise PyrovaeError(
            f"-o {output} is a directory; give a file name, such as {output / default.name}"
        )
    if args.output and output.exists() and not args.force:
        raise PyrovaeError(
            f"{output} already exists; pass --force to replace it or choose another -o"
        )
    return output


def _lock_if_inside(run_dir: Path, target: Path) -> contextlib.AbstractContextManager:
    """The run's lock while a command writes ``target`` inside it (on the process that
    writes), else nothing: outputs written elsewhere do not touch the run."""
    inside = Path(target).absolute().resolve().is_relative_to(Path(run_dir).resolve())
    return run_lock(run_dir) if inside and is_main_process() else contextlib.nullcontext()


def cmd_compare(args: argparse.Namespace) -> None:
    from pyrovae.inference.reporting.compare import compare_runs, format_comparison

    _check_diagnostic_options(args)
    if len(args.runs) < 2:
        raise PyrovaeError("compare needs at least two runs")
    comparison = compare_runs(
        args.runs,
        args.split,
        limit=args.limit,
        num_samples=args.num_samples,
        seed=args.seed,
        method=args.method,
        num_chains=args.chains,
        num_steps=args.steps,
        progress=True,
    )
    print(format_comparison(comparison))


def _check_diagnostic_options(args: argparse.Namespace) -> None:
    for name in ("num_samples", "limit", "chains", "steps"):
        value = getattr(args, name, None)
        if value is not None:
            check_int(value, "--" + name.replace("_", "-"), error=PyrovaeError)
    _check_seed(args)


def _check_seed(args: argparse.Namespace) -> None:
    """The rule train.seed follows: NumPy seeds take 32 bits."""
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2**32:
        raise PyrovaeError(f"--seed must be an integer from 0 to 2**32 - 1, got {seed}")


def _shown(value: float, digits: int) -> str:
    """A figure as printed, or n/a where there is none (a spread over one point, an error
    from one draw)."""
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def _image_shape(run: Run) -> tuple[int, ...]:
    from pyrovae.inference.reporting.plots import drawable

    shape = tuple(run.image_shape)
    if not drawable(shape):
        raise PyrovaeError(
            f"{run.path} was trained on data that are not grey or RGB images (shape "
            f"{shape or 'of feature vectors'}); no grid to draw"
        )
    return shape
