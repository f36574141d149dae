"""What the benchmarks share: where MNIST is found, the command line they record, and the
loop of a controlled comparison (arms trained one after another, results kept)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from pyrovae.inference.experiment.callbacks import Callback, FitState

ROOT = Path(__file__).resolve().parents[1]


def find_mnist(data: str | None = None) -> Path | None:
    """``mnist.npz`` from ``data`` (a file or a folder), else ``$PYROVAE_DATA``, else
    ``../shared/data`` beside the checkout; None where it is not there."""
    path = Path(data or os.environ.get("PYROVAE_DATA") or ROOT.parent / "shared" / "data")
    path = path / "mnist.npz" if path.is_dir() else path
    return path.resolve() if path.is_file() else None


def runs_table_parser(
    script: str, description: str, num_test: int, **runs: object
) -> argparse.ArgumentParser:
    """The options of ``script``, a table over trained MNIST runs: their directories
    (``runs`` are the positional argument's settings, ``nargs`` and ``default``), how many
    test images, the seed, where the results go."""
    parser = CommandParser(script, description=description)
    parser.add_argument("runs", help="run directories of MNIST models", **runs)
    parser.add_argument("--num-test", type=int, default=num_test, help="held-out test images")
    return parser


def runs_table_args(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> argparse.Namespace | None:
    """``parser``'s arguments (``argv``, else the command line's, with ``--seed`` and
    ``--output`` added last), checked; None, after saying so, where ``mnist.npz`` is not
    found (the table is then skipped)."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="write OUTPUT.md and OUTPUT.json")
    args = parser.parse_args(argv)
    if args.num_test < 2:
        parser.error("--num-test must be at least 2")
    if find_mnist() is None:
        print("skipped: mnist.npz not found; set PYROVAE_DATA")
        return None
    return args


def runs_with_splits(run_dirs: Iterable[str]):
    """Each run directory with its loaded run and its data's training and test images, as the
    run's spec prepares them."""
    from pyrovae.inference import load_run
    from pyrovae.inference.experiment.runs import load_run_data

    for run_dir in run_dirs:
        run = load_run(run_dir)
        data = load_run_data(run.spec)
        yield run_dir, run, data.split("train")[0], data.split("test")[0]


def table_meta(args: argparse.Namespace, **more: object) -> dict:
    """What a results table records of how it was made: the command, the test points and
    seed, ``more``, the versions and the date."""
    import time

    import pyro
    import torch

    return {
        "command": args.command,
        "num_test": args.num_test,
        **more,
        "seed": args.seed,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def write_table(
    output: Path, meta: dict, rows: list[dict], title: str, legend: str, lines: list[str]
) -> None:
    """``output`` as ``.json`` (``meta`` and ``rows``) and ``.md`` (the title, the legend, the
    table's lines and the command), each replaced atomically."""
    from pyrovae.inference.experiment.runs import atomic_write

    text = [
        f"# {title}",
        "",
        legend,
        "",
        *lines,
        "",
        f"Command: `{meta['command']}` (torch {meta['torch']}, Pyro {meta['pyro']}, "
        f"{meta['date']}).",
        "",
    ]
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(
        output.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows}, indent=2).encode()
    )
    atomic_write(output.with_suffix(".md"), "\n".join(text).encode())


def command_line(argv: Iterable[str] | None = None, script: str | None = None) -> str:
    """The command line that runs ``script`` (default this process's) with ``argv`` (default
    this process's), as a result page records it: the interpreter and the script relative to
    the checkout where they lie inside it, the interpreter else by its name."""
    python = Path(sys.executable)
    shown = str(python.relative_to(ROOT)) if python.is_relative_to(ROOT) else python.name
    if script is None:
        script = sys.argv[0]
    elif Path(script).resolve().is_relative_to(ROOT):
        script = str(Path(script).resolve().relative_to(ROOT))
    return shlex.join([shown, script, *(sys.argv[1:] if argv is None else argv)])


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` of ``script`` whose parsed arguments also hold ``command``: the
    command line that gives them (:func:`command_line`), also where ``main(argv)`` was
    called from Python rather than from a shell."""

    def __init__(self, script: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.script = script

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        parsed.command = command_line(args, self.script)
        return parsed


def arms_parser(
    script: str, description: str, arms: Iterable[str], runs: str, output: Path
) -> argparse.ArgumentParser:
    """The options every comparison of arms (``script``) takes: which arms, their epochs and
    seed, where the runs and the results go, the data, the threads."""
    parser = CommandParser(script, description=description)
    parser.add_argument("arms", nargs="*", choices=[*arms, []], metavar="ARM")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=runs)
    parser.add_argument("--output", default=str(output))
    parser.add_argument("--data", default=None)
    parser.add_argument("--threads", type=int, default=None)
    return parser


def run_arms(
    prog: str,
    args: argparse.Namespace,
    arms: Iterable[str],
    run_arm: Callable[[str, argparse.Namespace, Path], dict],
    render: Callable[[list[dict]], str],
) -> int:
    """Trains the arms asked for (every arm without any), one after another; after each,
    replaces the results (``--output`` as ``.json`` and ``.md``) atomically, keeping the rows
    of the other arms, epochs and seeds. Returns the exit code."""
    import torch

    from pyrovae.inference.errors import PyrovaeError
    from pyrovae.inference.experiment.runs import atomic_write

    if args.threads:
        torch.set_num_threads(args.threads)
    data = find_mnist(args.data)
    if data is None:
        print(f"{prog}: mnist.npz not found: pass --data or set PYROVAE_DATA", file=sys.stderr)
        return 2
    output = Path(args.output)
    path = output.with_suffix(".json")
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    try:
        for name in args.arms or list(arms):
            key = (name, args.epochs, args.seed)
            rows = [r for r in rows if (r["arm"], r["epochs"], r["seed"]) != key]
            rows.append(run_arm(name, args, data))
            output.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps({"rows": rows}, indent=1).encode())
            atomic_write(output.with_suffix(".md"), render(rows).encode())
    except PyrovaeError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    return 0


def paired_delta(row: dict, base: dict) -> str:
    """``row``'s mean log p(x) minus ``base``'s, paired on their per-point figures, ± its
    standard error, as a results page shows it."""
    import torch

    from pyrovae.inference import standard_error

    diff = torch.tensor(row["per_point"]) - torch.tensor(base["per_point"])
    return f"{diff.mean():+.2f} ± {standard_error(diff):.2f}"


def evaluated_arm(run, args: argparse.Namespace, **fields) -> dict:
    """An arm's results row: ``fields`` (its name, what it changes, ...), then its run's epochs
    and seed, its test figures by importance sampling (``args.num_samples`` samples on the
    first ``args.points`` test points), its last epoch's validation figures, its training
    time and its per-point log p(x), for :func:`paired_delta`."""
    from pyrovae.inference import evaluate_run

    evaluation = evaluate_run(
        run, num_samples=args.num_samples, limit=args.points, seed=0, write=False
    )
    s = evaluation.summary()
    last = run.history[-1]
    return {
        **fields,
        "epochs": run.epoch,
        "seed": args.seed,
        "points": evaluation.num_points,
        "num_samples": args.num_samples,
        "log_px": s["log_px"],
        "log_px_se": s["log_px_se"],
        "elbo": s["elbo"],
        "khat_bad_fraction": s["khat_bad_fraction"],
        "validation_elbo": last["validation_elbo"],
        "validation_kl": last["validation_kl"],
        "active_units": last["validation_active_units"],
        "train_seconds": sum(h["seconds"] for h in run.history),
        "command": args.command,
        "per_point": evaluation.result.log_px.tolist(),
    }


def announcing(
    render: Callable[[list[dict], str], str], protocol: str
) -> Callable[[list[dict]], str]:
    """A ``render`` for :func:`run_arms` that also prints the latest arm's log p(x)."""

    def announce(rows: list[dict]) -> str:
        print(f"{rows[-1]['arm']}: log p(x) {rows[-1]['log_px']:.2f}", flush=True)
        return render(rows, protocol)

    return announce


def live_run(spec, state):
    """A ``Run`` of the model being trained (its modules as they are at ``state``'s epoch,
    nothing on disk), for ``evaluate_run`` and the like from a training callback."""
    from pyrovae.inference import Checkpoint, Run

    return Run(Path("."), spec, state.model, state.guide, Checkpoint(state.epoch, {}, {}))


class Turns:
    """Runs the arms' epochs in turn: an arm waits for its turn before an epoch and hands
    the turn to the next arm after it, so that one arm trains at a time."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.current = 0
        self.done: set[str] = set()
        self.condition = threading.Condition()

    def wait(self, name: str) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.names[self.current] == name)

    def pass_on(self, name: str, finished: bool = False) -> None:
        with self.condition:
            if finished:
                self.done.add(name)
            if len(self.done) < len(self.names):
                self.current = (self.current + 1) % len(self.names)
                while self.names[self.current] in self.done:
                    self.current = (self.current + 1) % len(self.names)
            self.condition.notify_all()


class TakeTurns(Callback):
    """A ``fit`` callback that waits for its arm's turn before every epoch."""

    def __init__(self, turns: Turns, name: str, epochs: int) -> None:
        self.turns, self.name, self.epochs = turns, name, epochs

    def on_epoch_start(self, state: FitState) -> None:
        self.turns.wait(self.name)

    def on_epoch_end(self, state: FitState) -> None:
        self.turns.pass_on(self.name, finished=state.epoch == self.epochs)


def interleaved(arms: dict[str, Callable[[Turns, str], list[float]]]) -> dict[str, list[float]]:
    """Runs ``arm(turns, name)`` for every arm, each in its own thread, taking turns (see
    :class:`Turns`); returns each arm's result. An arm's error is raised once all are done."""
    turns = Turns(list(arms))
    results: dict[str, list[float]] = {}
    errors: list[BaseException] = []

    def run_arm(name: str) -> None:
        try:
            results[name] = arms[name](turns, name)
        except BaseException as err:  # raised below; the other arms must not wait forever
            errors.append(err)
            turns.pass_on(name, finished=True)

    threads = [threading.Thread(target=run_arm, args=(name,)) for name in arms]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
