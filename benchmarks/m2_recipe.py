"""Why does M2's classifier fall behind its paper? A controlled comparison of recipes.

Each arm is ``configs/paper-m2-100.toml`` with ``--set``-style overrides that change one part
of the recipe, trained from the same seed for the same number of epochs; after every epoch
the accuracy of q(y|x) on all 10,000 test images is recorded (one pass of the classifier,
which leaves the training's random state alone), so the arms compare epoch by epoch.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/m2_recipe.py ARM --threads 1 --epochs 10

writes ``benchmarks/results/m2_recipe.json`` and ``.md``. An arm asked for again trains
afresh and replaces its row; the rows of other arms, epochs and seeds are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import ROOT, arms_parser, live_run, run_arms

from pyrovae.inference import Callback, FitState, load_run, load_spec, train_run
from pyrovae.inference.experiment.evaluation import classification_accuracy

CONFIG = "configs/paper-m2-100.toml"

RELU = [
    'model.decoder={kind="feedforward", network="mlp", hidden=[500], activation="relu"}',
    'guide.encoder={kind="diagonal_normal", network="mlp", hidden=[500], activation="relu"}',
]
"""The paper's networks with ReLU units (the classifier takes the encoder's)."""

ARMS: dict[str, tuple[list[str], str]] = {
    "paper": ([], "as shipped: batches of 100 with about 10 labelled rows (labels repeated)"),
    "their-batches": (
        ["train.batch_size=500", "data.labelled_share=0.002"],
        "Kingma et al.'s sampling: batches of 500, each labelled row once an epoch "
        "(about 1 a batch)",
    ),
    "relu-lr1e-3": (
        [*RELU, "train.lr=1e-3"],
        "ReLU networks (the classifier too) and lr 1e-3, as configs/mnist-m2-100.toml",
    ),
    "lr1e-3": (["train.lr=1e-3"], "lr 1e-3 (the paper's softplus networks)"),
    "relu": (
        RELU,
        "ReLU networks (the classifier too; the paper's lr 3e-4)",
    ),
}
"""Arm name -> (overrides of the paper config, what it changes)."""

RESULTS = ROOT / "benchmarks" / "results" / "m2_recipe"


class TestAccuracy(Callback):
    """After every epoch, the accuracy of q(y|x) on the whole test set."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.curve: list[dict] = []

    def on_epoch_end(self, state: FitState) -> None:
        was = state.guide.training
        state.guide.eval()
        try:
            accuracy, points = classification_accuracy(live_run(self.spec, state))
        finally:
            state.guide.train(was)
        h = state.history[-1]
        self.curve.append(
            {
                "epoch": state.epoch,
                "accuracy": accuracy,
                "points": points,
                "validation_elbo": h.get("validation_elbo"),
                "seconds": h["seconds"],
            }
        )
        print(f"epoch {state.epoch}: test accuracy {accuracy:.2%}", flush=True)


def run_arm(name: str, args: argparse.Namespace, data: Path) -> dict:
    overrides, what = ARMS[name]
    out = Path(args.runs).expanduser() / f"{name}-e{args.epochs}-s{args.seed}"
    settings = [
        f"data.path={json.dumps(str(data))}",
        f"train.epochs={args.epochs}",
        f"train.seed={args.seed}",
        *overrides,
        *args.set,
    ]
    spec = load_spec(ROOT / CONFIG, settings)
    record = TestAccuracy(spec)
    train_run(
        ROOT / CONFIG, out, overrides=settings, progress=False, force=True, callbacks=[record]
    )
    run = load_run(out)
    return {
        "arm": name,
        "what": what,
        "overrides": overrides,
        "epochs": run.epoch,
        "seed": args.seed,
        "curve": record.curve,
        "train_seconds": sum(h["seconds"] for h in run.history),
        "command": args.command,
    }


def render(rows: list[dict]) -> str:
    epochs = sorted({p["epoch"] for r in rows for p in r["curve"]})
    shown = [e for e in epochs if e in (1, 2, 3, 5) or e % 5 == 0 or e == epochs[-1]]
    lines = [
        "# M2 with 100 labels: the recipe against its paper's 88.0%",
        "",
        "Test accuracy of q(y|x) on all 10,000 MNIST test images after each epoch; every arm is "
        f"`{CONFIG}` with the overrides shown, the same seed and the same data. "
        "Trained by `.venv/bin/python benchmarks/m2_recipe.py ARM --epochs E --threads 1`.",
        "",
        "| arm | seed | " + " | ".join(f"epoch {e}" for e in shown) + " | train s |",
        "|---|---:|" + "---:|" * len(shown) + "---:|",
    ]
    order = list(ARMS)
    for r in sorted(
        rows,
        key=lambda r: (
            order.index(r["arm"]) if r["arm"] in order else len(order),
            r["epochs"],
            r["seed"],
        ),
    ):
        by_epoch = {p["epoch"]: p["accuracy"] for p in r["curve"]}
        cells = [f"{100 * by_epoch[e]:.1f}%" if e in by_epoch else "—" for e in shown]
        lines.append(
            f"| {r['what']} | {r['seed']} | " + " | ".join(cells) + f" | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = arms_parser(
        __file__, __doc__.splitlines()[0], ARMS, "~/pyrovae-runs/m2_recipe", RESULTS
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="one more override"
    )
    return run_arms("m2_recipe", parser.parse_args(argv), ARMS, run_arm, render)


if __name__ == "__main__":
    sys.exit(main())
