"""The ``pyrovae`` command's options: one subcommand per library workflow."""

from __future__ import annotations

import argparse

from pyrovae.inference.cli.commands import (
    cmd_bdmc,
    cmd_compare,
    cmd_evaluate,
    cmd_report,
    cmd_sample,
    cmd_train,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyrovae", description="Variational autoencoders as Pyro programs."
    )
    threads_help = (
        "CPU threads torch may use (default: torch's, one per core); on a machine busy with "
        "other work, 1 is often much faster"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--threads", type=int, metavar="N", help=threads_help)
    # --debug and --threads also after the command name; SUPPRESS keeps a command's parser
    # from resetting what was given before it.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    debug.add_argument(
        "--threads", type=int, metavar="N", default=argparse.SUPPRESS, help=threads_help
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
    evaluate.add_argument(
        "--checkpoint",
        default="latest",
        choices=["latest", "best"],
        help="the last epoch (checkpoint.pt) or, for a run with early stopping, the epoch "
        "with the best validation ELBO (best.pt)",
    )
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
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bound KL(q(z) || p(z)) from below with a critic trained on the training split, "
        "for the verdict (default; about 2 minutes on MNIST): --no-aggregate-kl skips it",
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
