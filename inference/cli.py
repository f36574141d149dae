"""The ``pyrovae`` command: train, sample, evaluate, report, compare."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pyro
import torch

from inference.data import load_data
from inference.errors import PyrovaeError
from inference.runs import SPEC, Run, atomic_write, create_run, load_run, read_checkpoint
from inference.spec import Spec, build, build_objective, build_schedule, load_spec
from inference.train import check_inputs, fit, resolve_device


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyrovae`` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.command(args)
    except PyrovaeError as e:
        if args.debug:
            raise
        print(f"pyrovae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyrovae: interrupted; the last finished epoch's checkpoint is kept", file=sys.stderr)
        return 130
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyrovae", description="Variational autoencoders as Pyro programs."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a VAE from a spec")
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
    train.set_defaults(command=cmd_train)

    sample = commands.add_parser("sample", help="write an image grid of samples from a run")
    sample.add_argument("run", help="run directory")
    sample.add_argument("-n", "--num-samples", type=int, default=64)
    sample.add_argument("-o", "--output", default="samples.png", help="image file to write")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--draw", action="store_true", help="draw x ~ p(x|z), not its mean")
    sample.add_argument("--force", action="store_true", help="replace an existing output file")
    sample.set_defaults(command=cmd_sample)

    evaluate = commands.add_parser(
        "evaluate", help="estimate log p(x) per data point by importance sampling"
    )
    evaluate.add_argument("run", help="run directory")
    evaluate.add_argument("--num-samples", "-k", type=int, default=5000, help="K, draws per point")
    evaluate.add_argument("--split", default="test", choices=["test", "validation", "train"])
    evaluate.add_argument("--limit", type=int, help="only the first N points of the split")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: the run's)")
    evaluate.add_argument("--json", action="store_true", help="print the results as JSON")
    evaluate.set_defaults(command=cmd_evaluate)

    report = commands.add_parser(
        "report", help="write RUN/report.html: diagnostics of q(z|x) against the prior"
    )
    report.add_argument("run", help="run directory")
    _add_diagnostic_options(report)
    report.add_argument("-o", "--output", help="HTML file to write (default: RUN/report.html)")
    report.add_argument("--force", action="store_true", help="replace an existing -o file")
    report.set_defaults(command=cmd_report)

    compare = commands.add_parser("compare", help="compare runs on the same data points")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run directories (two or more)")
    _add_diagnostic_options(compare)
    compare.set_defaults(command=cmd_compare)
    return parser


def _add_diagnostic_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="test", choices=["test", "validation", "train"])
    parser.add_argument("--limit", type=int, default=500, help="the first N points of the split")
    parser.add_argument("--num-samples", "-k", type=int, default=500, help="K, draws per point")
    parser.add_argument("--seed", type=int, default=0)


def cmd_train(args: argparse.Namespace) -> None:
    if args.resume:
        if args.spec or args.set or args.out or args.force:
            raise PyrovaeError(
                "--resume takes the spec and directory from RUN; drop SPEC, --set, --out, --force"
            )
        out = Path(args.resume)
        if read_checkpoint(out) is None:
            raise PyrovaeError(f"{out} has no checkpoint to resume; train it afresh instead")
        spec = load_run(out).spec
    else:
        spec = load_spec(args.spec, args.set)
        out = Path(args.out or Path("runs") / (Path(args.spec).stem if args.spec else "default"))
    changes = {"epochs": args.epochs, "device": args.device}
    spec = spec.replace(train={k: v for k, v in changes.items() if v is not None})
    if spec.train.epochs < 1:
        raise PyrovaeError(f"train.epochs must be at least 1, got {spec.train.epochs}")
    device = resolve_device(spec.train.device)

    data = load_data(spec.data.name, spec.data.binarize, spec.data.path, spec.data.validation_size)
    pyro.set_rng_seed(spec.train.seed)
    model, guide = build(spec, data.features, data.image_shape)
    objective = build_objective(spec)
    check_inputs(model, data.train, data.validation)
    if args.resume:
        atomic_write(out / SPEC, spec.to_toml().encode())
    else:
        create_run(out, spec, force=args.force)
    start = time.perf_counter()
    history = fit(
        model,
        guide,
        data.train,
        validation=data.validation,
        objective=objective,
        kl_schedule=build_schedule(spec),
        epochs=spec.train.epochs,
        batch_size=spec.train.batch_size,
        lr=spec.train.lr,
        grad_clip=spec.train.grad_clip,
        patience=spec.train.patience,
        transform=torch.bernoulli if data.dynamic else None,
        device=device,
        seed=spec.train.seed,
        run_dir=out,
        metadata={"features": data.features, "image_shape": list(data.image_shape or [])},
        progress=not args.no_progress,
    )
    last = history[-1]
    print(
        f"trained {out}: epoch {last['epoch']}/{spec.train.epochs}, "
        f"train ELBO {last['train_elbo']:.2f}, validation ELBO {last['validation_elbo']:.2f} "
        f"nats/point, {last['images_per_s']:.0f} images/s on {device}, "
        f"{time.perf_counter() - start:.1f} s"
    )


def cmd_sample(args: argparse.Namespace) -> None:
    from inference.plots import save_image_grid

    if args.num_samples < 1:
        raise PyrovaeError(f"-n must be at least 1, got {args.num_samples}")
    output = Path(args.output)
    if output.exists() and not args.force:
        raise PyrovaeError(
            f"{output} already exists; pass --force to replace it or choose another -o"
        )
    run = load_run(args.run)
    shape = _image_shape(run)
    pyro.set_rng_seed(args.seed)
    images = run.model.sample(args.num_samples, mean=not args.draw)
    save_image_grid(images, shape, output)
    print(f"wrote {args.num_samples} samples from {run.path} to {output}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from inference.marginal import KHAT_THRESHOLD, log_marginal_likelihood

    if args.num_samples < 1:
        raise PyrovaeError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.limit is not None and args.limit < 1:
        raise PyrovaeError(f"--limit must be at least 1, got {args.limit}")
    run = load_run(args.run)
    device = resolve_device(args.device or run.spec.train.device)
    d = run.spec.data
    x, _ = load_data(d.name, d.binarize, d.path, d.validation_size).split(args.split)
    x = x[: args.limit].to(device)
    run.model.to(device)
    run.guide.to(device)
    pyro.set_rng_seed(args.seed)
    start = time.perf_counter()
    try:
        result = log_marginal_likelihood(run.model, run.guide, x, num_samples=args.num_samples)
    except ValueError as e:
        raise PyrovaeError(str(e)) from None
    summary = result.summary()
    features = x.shape[1]
    report = {
        "run": str(run.path),
        "epoch": run.epoch,
        "split": args.split,
        "points": len(x),
        "num_samples": args.num_samples,
        "seed": args.seed,
        "seconds": time.perf_counter() - start,
        "features": features,
        "bits_per_dim": -summary["log_px"] / (features * math.log(2)),
        "khat_threshold": KHAT_THRESHOLD,
        **summary,
    }
    atomic_write(run.path / "evaluation.json", (json.dumps(report, indent=2) + "\n").encode())
    if args.json:
        print(json.dumps(report, indent=2))
        return
    rows = [
        ("ELBO", f"{summary['elbo']:.3f}"),
        ("log p(x)", f"{summary['log_px']:.3f} ± {summary['log_px_stderr']:.3f}"),
        ("bits/dim", f"{report['bits_per_dim']:.4f}"),
        ("reconstruction E[log p(x|z)]", f"{summary['reconstruction']:.3f}"),
        ("KL(q(z|x) || p(z))", f"{summary['kl']:.3f}"),
        *[(f"IWAE k={k}", f"{v.mean().item():.3f}") for k, v in result.iwae.items()],
        (f"share of points with k̂ > {KHAT_THRESHOLD}", f"{summary['khat_bad_fraction']:.1%}"),
    ]
    width = max(len(name) for name, _ in rows)
    print(
        f"{run.path}: {args.split} split, {len(x)} points, K = {args.num_samples}, "
        f"{report['seconds']:.1f} s (nats per point)"
    )
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"wrote {run.path / 'evaluation.json'}")


def cmd_report(args: argparse.Namespace) -> None:
    from inference.report import write_report

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
    )
    print(f"wrote {path}")


def cmd_compare(args: argparse.Namespace) -> None:
    from inference.compare import compare_runs, format_comparison

    _check_diagnostic_options(args)
    if len(args.runs) < 2:
        raise PyrovaeError("compare needs at least two runs")
    comparison = compare_runs(
        args.runs, args.split, limit=args.limit, num_samples=args.num_samples, seed=args.seed
    )
    print(format_comparison(comparison))


def _check_diagnostic_options(args: argparse.Namespace) -> None:
    for name in ("num_samples", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise PyrovaeError(f"{flag} must be at least 1, got {value}")


def _image_shape(run: Run) -> tuple[int, ...]:
    shape = tuple(run.checkpoint["image_shape"])
    if len(shape) != 2:
        raise PyrovaeError(
            f"{run.path} was trained on data that are not 2-D images; no grid to draw"
        )
    return shape


__all__ = ["main", "Spec"]

if __name__ == "__main__":
    sys.exit(main())
