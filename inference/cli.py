"""The ``pyrovae`` command: train, sample, evaluate, report, compare, bdmc."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pyro

from pyrovae.inference.algorithms.psis import KHAT_THRESHOLD
from pyrovae.inference.errors import Interrupted, PyrovaeError
from pyrovae.inference.experiment.distributed import is_main_process
from pyrovae.inference.experiment.evaluation import (
    EVALUATION,
    Evaluation,
    check_evaluation_target,
    evaluate_run,
    evaluation_settings,
)
from pyrovae.inference.experiment.runs import Run, load_run
from pyrovae.inference.experiment.training import resolve_device
from pyrovae.inference.experiment.workflow import train_run

UNRELIABLE_SHARE = 0.2
"""Above this share of points with k̂ > 0.7, ``evaluate`` warns that log p(x) is a bound."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyrovae`` command; returns the exit code.

    Every problem with the user's input, files or environment is one line on stderr and
    exit code 2 (130 for an interruption); ``--debug`` shows the traceback instead.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.command(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        # The reader went away (| head): stop writing to it, without a traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("pyrovae: error: the output pipe closed early; printing stopped", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"pyrovae: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("pyrovae: interrupted", file=sys.stderr)
        return 130
    except (PyrovaeError, OSError) as e:
        if args.debug:
            raise
        line = f"pyrovae: error: {_one_line(e)}"
        print(line, file=sys.stderr)
        _tell_the_launcher(line)
        return 2
    return 0


def _tell_the_launcher(line: str) -> None:
    """Under torchrun, writes the error line where torch.distributed.elastic reads a failed
    rank's error (``TORCHELASTIC_ERROR_FILE``), in the plain-message form it accepts, so that
    the "Root Cause" of torchrun's own failure summary names it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        Path(path).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
    except OSError:
        pass  # the line is on stderr already


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyrovae", description="Variational autoencoders as Pyro programs."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    # --debug also after the command name; SUPPRESS keeps a command's parser from resetting it.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    train = commands.add_parser(parents=[debug], name="train", help="train a VAE from a spec")
    train.add_argument("spec", nargs="?", help="a TOML spec (default: the built-in digits spec)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec key, e.g. --set model.latent_dim=2 (value read as TOML)",
    )
    train.add_argument("--out", help="run directory (default: runs/<spec name>)")
    train.add_argument("--epochs", type=int, help="total number of epochs")
    train.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    train.add_argument("--resume", metavar="RUN", help="continue the run in RUN")
    train.add_argument("--force", action="store_true", help="replace an existing run directory")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument(
        "--tensorboard", action="store_true", help="log to RUN/tensorboard (train.log)"
    )
    train.set_defaults(command=cmd_train)

    sample = commands.add_parser(
        parents=[debug], name="sample", help="write an image grid of samples from a run"
    )
    sample.add_argument("run", help="run directory")
    sample.add_argument("-n", "--num-samples", type=int, default=64)
    sample.add_argument("-o", "--output", help="image file to write (default: RUN/samples.png)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--draw", action="store_true", help="draw x ~ p(x|z), not its mean")
    sample.add_argument(
        "--label", type=int, help="class to draw, for a conditional run (default: each in turn)"
    )
    sample.add_argument("--force", action="store_true", help="replace an existing output file")
    sample.set_defaults(command=cmd_sample)

    evaluate = commands.add_parser(
        parents=[debug],
        name="evaluate",
        help="estimate log p(x) per data point by importance sampling",
    )
    evaluate.add_argument("run", help="run directory")
    evaluate.add_argument("--num-samples", "-k", type=int, default=5000, help="K, draws per point")
    evaluate.add_argument("--split", default="test", choices=["test", "validation", "train"])
    evaluate.add_argument("--limit", type=int, help="only the first N points of the split")
    evaluate.add_argument("--seed", type=int, default=0)
    _add_method_options(evaluate)
    evaluate.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: the run's)")
    evaluate.add_argument("--json", action="store_true", help="print the results as JSON")
    evaluate.add_argument(
        "-o", "--output", help="JSON file to write (default: RUN/evaluation.json)"
    )
    evaluate.add_argument(
        "--force", action="store_true", help="replace an evaluation made with other settings"
    )
    evaluate.set_defaults(command=cmd_evaluate)

    report = commands.add_parser(
        parents=[debug],
        name="report",
        help="write RUN/report.html: diagnostics of q(z|x) against the prior",
    )
    report.add_argument("run", help="run directory")
    _add_diagnostic_options(report)
    report.add_argument("-o", "--output", help="HTML file to write (default: RUN/report.html)")
    report.add_argument("--force", action="store_true", help="replace an existing -o file")
    report.add_argument(
        "--aggregate-kl",
        action="store_true",
        help="also bound KL(q(z) || p(z)) from below with a critic trained on the training "
        "split (minutes on MNIST)",
    )
    report.set_defaults(command=cmd_report)

    compare = commands.add_parser(
        parents=[debug], name="compare", help="compare runs on the same data points"
    )
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run directories (two or more)")
    _add_diagnostic_options(compare)
    _add_method_options(compare, steps=200)
    compare.set_defaults(command=cmd_compare)

    sandwich = commands.add_parser(
        parents=[debug],
        name="bdmc",
        help="bound log p(x) from both sides on data simulated from the model",
    )
    sandwich.add_argument("run", help="run directory")
    sandwich.add_argument("--num-points", "-n", type=int, default=100)
    sandwich.add_argument("--steps", type=int, default=500, help="annealing steps per chain")
    sandwich.add_argument("--chains", type=int, default=4, help="chains per point")
    sandwich.add_argument("--seed", type=int, default=0)
    sandwich.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: the run's)")
    sandwich.set_defaults(command=cmd_bdmc)
    return parser


def _add_method_options(parser: argparse.ArgumentParser, steps: int = 500) -> None:
    parser.add_argument(
        "--method",
        default="is",
        choices=["is", "ais"],
        help="is: importance sampling from the guide; ais: annealed importance sampling",
    )
    parser.add_argument("--chains", type=int, default=16, help="AIS chains per point")
    parser.add_argument("--steps", type=int, default=steps, help="AIS annealing steps")


def _add_diagnostic_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="test", choices=["test", "validation", "train"])
    parser.add_argument("--limit", type=int, default=500, help="the first N points of the split")
    parser.add_argument("--num-samples", "-k", type=int, default=500, help="K, draws per point")
    parser.add_argument("--seed", type=int, default=0)


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


def cmd_sample(args: argparse.Namespace) -> None:
    from pyrovae.inference.reporting.plots import check_image_path, save_image_grid

    if args.num_samples < 1:
        raise PyrovaeError(f"-n must be at least 1, got {args.num_samples}")
    run = load_run(args.run)
    output = Path(args.output) if args.output else run.path / "samples.png"
    if output.exists() and not args.force:
        raise PyrovaeError(
            f"{output} already exists; pass --force to replace it or choose another -o"
        )
    check_image_path(output)
    shape = _image_shape(run)
    classes = getattr(run.model, "classes", 0)
    if args.label is not None and not 0 <= args.label < max(classes, 1):
        raise PyrovaeError(
            f"--label {args.label} is not a class of {run.path} (classes 0 to {classes - 1})"
            if classes
            else f"--label needs a conditional run (model.labels = 'context'); {run.path} is not"
        )
    pyro.set_rng_seed(args.seed)
    options = {"labels": args.label} if classes else {}
    images = run.model.sample(args.num_samples, mean=not args.draw, **options)
    save_image_grid(images, shape, output)
    print(f"wrote {args.num_samples} samples from {run.path} to {output}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    _check_diagnostic_options(args)
    run = load_run(args.run)
    target = Path(args.output) if args.output else run.path / EVALUATION
    settings = evaluation_settings(
        args.method, args.split, args.num_samples, args.chains, args.steps, args.limit, args.seed
    )
    check_evaluation_target(target, settings, args.force)
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
            f"{summary['log_px']:.3f} ± {summary['log_px_se']:.3f} "
            f"(Monte Carlo error of the mean {summary['log_px_mc_error']:.4f})",
        ),
        ("bits/dim", f"{summary['bits_per_dim']:.4f}"),
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
    from pyrovae.inference.experiment.workflow import load_run_data

    for flag, value in (
        ("--num-points", args.num_points),
        ("--steps", args.steps),
        ("--chains", args.chains),
    ):
        if value < 1:
            raise PyrovaeError(f"{flag} must be at least 1, got {value}")
    run = load_run(args.run)
    device = resolve_device(args.device or run.spec.train.device)
    run.model.to(device)
    run.guide.to(device)
    example = load_run_data(run.spec).test[:1].to(device)
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
    print(f"  gap                         {summary['gap']:.3f}")
    print(f"  HMC acceptance (forward)    {summary['acceptance']:.2f}")


def cmd_report(args: argparse.Namespace) -> None:
    from pyrovae.inference.reporting.report import write_report

    _check_diagnostic_options(args)
    if args.output and Path(args.output).exists() and not args.force:
        raise PyrovaeError(
            f"{args.output} already exists; pass --force to replace it or choose another -o"
        )
    path = write_report(
        args.run,
        args.split,
        limit=args.limit,
        num_samples=args.num_samples,
        seed=args.seed,
        path=args.output,
        progress=True,
        aggregate=args.aggregate_kl,
    )
    print(f"wrote {path}")


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
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise PyrovaeError(f"{flag} must be at least 1, got {value}")


def _image_shape(run: Run) -> tuple[int, ...]:
    shape = tuple(run.image_shape)
    if len(shape) != 2:
        raise PyrovaeError(
            f"{run.path} was trained on data that are not 2-D images; no grid to draw"
        )
    return shape


__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
