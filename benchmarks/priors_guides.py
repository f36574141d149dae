"""The prior x guide grid on dynamically binarized MNIST: train each pair, estimate log p(x).

Every pair of {standard, mixture, vamp, flow} priors and {diagonal, fullcov, iaf} guides is
trained from ``configs/mnist-<prior>-<guide>.toml`` (one layer, 784-200-200-50 with ReLU
networks) for the same number of epochs with ``train_run``, then
scored on the first ``--num-test`` test points (binarized once with the fixed seed) by
importance sampling with ``--num-samples`` draws from the guide. The table goes to
``benchmarks/results/priors_guides_stl.md`` and every figure to ``priors_guides_stl.json``
(the configs train with sticking-the-landing gradients; ``priors_guides.md`` is the grid
of the configs before them, trained with Pyro's Trace_ELBO gradient).

Before training, a few optimizer steps of each pair are timed in this process; a pair whose
estimated training time exceeds ``--max-train-minutes`` is reported with that estimate
instead of being trained (a VampPrior over a fully autoregressive IAF guide scores B x K
pairs in the flow's sequential direction, 50 passes per transform; the shipped
``mnist-vamp-iaf.toml`` uses coupling transforms, 2 passes, and takes about 45 minutes).
Finished runs under ``--runs``, and their test figures when computed with the same
settings, are reused unless ``--retrain``; a finished run trained from another spec than the
one asked for is refused.

    .venv/bin/python benchmarks/priors_guides.py [--epochs 10] [--num-test 1000]
        [--num-samples 500] [--data ../shared/data] [--priors vamp flow] [--guides iaf]

References:
    Importance Weighted Autoencoders (Burda, Grosse and Salakhutdinov, 2016);
    VAE with a VampPrior (Tomczak and Welling, 2018)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyro
import torch
from common import command_line, find_mnist
from priors_guides_table import markdown

from pyrovae.inference import (
    Checkpoint,
    Run,
    Spec,
    build,
    diagnose,
    evaluate_run,
    load_data,
    load_run,
    load_spec,
    train_run,
)
from pyrovae.inference.algorithms.marginal import standard_error
from pyrovae.inference.experiment.build import build_objective
from pyrovae.inference.experiment.data import Splits
from pyrovae.inference.experiment.runs import SPEC, atomic_write, load_run_data

ROOT = Path(__file__).resolve().parents[1]
PRIORS = ("standard", "mixture", "vamp", "flow")
GUIDES = ("diagonal", "fullcov", "iaf")
RESULTS = ROOT / "benchmarks" / "results" / "priors_guides_stl"
EVALUATION = "priors_guides_evaluation.json"
"""Per run: the test figures and the settings they were computed with, reused when equal."""
ACTIVITY_DRAWS = 32
"""Draws per point behind the active units: a flow guide's posterior means are sample means,
whose Monte Carlo variance ``diagnose`` subtracts; with 32 draws what is left of it has a
standard error near 0.003 for a unit at N(0, 1) on 200 points, against the threshold 0.01."""


def main() -> None:
    """Runs the grid, rewriting the results after every pair."""
    parser = _parser()
    args = parser.parse_args()
    if args.jobs < 1 or min(args.seeds) < 0:
        parser.error("--jobs must be at least 1 and every --seeds value at least 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    data_path = find_mnist(args.data)
    if data_path is None:
        print(
            "skipped: mnist.npz not found; pass --data DIR or set PYROVAE_DATA "
            f"(looked in {args.data or os.environ.get('PYROVAE_DATA') or ROOT.parent / 'shared' / 'data'})"
        )
        return
    runs = [(p, g, seed) for p in args.priors for g in args.guides for seed in args.seeds]
    if args.jobs > 1:
        rows = run_in_parallel(runs, args)
    else:
        data = load_data("mnist", "dynamic", path=str(data_path))
        rows = []
        for prior, guide, seed in runs:
            print(f"== {prior} x {guide}, seed {seed}", flush=True)
            row = run_pair(prior, guide, seed, args, data_path, data)
            rows.append(row)
            print("   " + json.dumps(row), flush=True)
            write_results(rows, args, Path(args.output))
    write_results(rows, args, Path(args.output))
    print(f"wrote {args.output}.md and {args.output}.json")


def run_in_parallel(runs: list[tuple[str, str, int]], args: argparse.Namespace) -> list[dict]:
    """Each (prior, guide, seed) in its own single-threaded process of this script, ``--jobs``
    at a time (several runs share one GPU well: each step is mostly Python); the results are
    rewritten as each finishes, in grid order."""
    passed = _passed_options(args)
    rows: dict[tuple[str, str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:

        def launch(prior: str, guide: str, seed: int) -> subprocess.Popen:
            output = Path(tmp) / f"{prior}-{guide}-{seed}"
            command = [
                sys.executable, __file__, *passed, "--jobs", "1", "--threads", "1",
                "--priors", prior, "--guides", guide, "--seeds", str(seed),
                "--output", str(output),
            ]  # fmt: skip
            with open(output.with_suffix(".log"), "w") as log:  # the child keeps its own copy
                return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

        pending, running = list(runs), {}
        while pending or running:
            while pending and len(running) < args.jobs:
                key = pending.pop(0)
                running[key] = launch(*key)
            time.sleep(1)
            for key, process in list(running.items()):
                if process.poll() is None:
                    continue
                del running[key]
                result = Path(tmp) / "{}-{}-{}.json".format(*key)
                if process.returncode != 0 or not result.is_file():
                    log = Path(tmp) / "{}-{}-{}.log".format(*key)
                    print(f"== {key} failed:\n{log.read_text()[-2000:]}", flush=True)
                    continue
                rows[key] = json.loads(result.read_text())["rows"][0]
                print(f"== {key[0]} x {key[1]}, seed {key[2]}: done", flush=True)
                write_results([rows[k] for k in runs if k in rows], args, Path(args.output))
    return [rows[k] for k in runs if k in rows]


def _passed_options(args: argparse.Namespace) -> list[str]:
    """The options every child process takes from this one."""
    options = [
        f"--epochs={args.epochs}", f"--num-test={args.num_test}",
        f"--num-samples={args.num_samples}", f"--num-diagnose={args.num_diagnose}",
        f"--runs={args.runs}", f"--max-train-minutes={args.max_train_minutes}",
        f"--probe-steps={args.probe_steps}", f"--seed={args.seed}",
        *(f"--set={item}" for item in args.set),
    ]  # fmt: skip
    if args.data:
        options.append(f"--data={args.data}")
    return options + (["--retrain"] if args.retrain else [])


def run_pair(
    prior: str, guide: str, seed: int, args: argparse.Namespace, data_path: Path, data: Splits
) -> dict[str, Any]:
    """Trains (or reuses) one pair's run with training seed ``seed`` and estimates its test
    log p(x)."""
    config = ROOT / "configs" / f"mnist-{prior}-{guide}.toml"
    run_dir = Path(args.runs) / (f"{prior}-{guide}" + (f"-seed{seed}" if seed else ""))
    row: dict[str, Any] = {"prior": prior, "guide": guide, "epochs": args.epochs, "seed": seed}
    row["probe_seconds_per_step"] = None
    overrides = [f"data.path={data_path}", *args.set, f"train.seed={seed}"]
    spec = load_spec(config, overrides)
    row["steps_per_epoch"] = math.ceil(len(data.train) / spec.train.batch_size)
    checkpoint = Checkpoint.load(run_dir) if run_dir.is_dir() else None
    finished = checkpoint is not None and checkpoint.epoch == args.epochs
    if finished and not args.retrain:
        asked = load_spec(config, [*overrides, f"train.epochs={args.epochs}"])
        check_same_spec(run_dir, asked, config.name)
    if not finished or args.retrain:
        step = seconds_per_step(spec, data, args.probe_steps)
        steps = row["steps_per_epoch"] * args.epochs
        row["probe_seconds_per_step"] = step
        if step * steps > 60 * args.max_train_minutes:
            row["skipped"] = (
                f"not trained: the fastest of {args.probe_steps} optimizer steps (batch "
                f"{spec.train.batch_size}) took {step:.1f} s, which puts {args.epochs} epochs "
                f"({steps} steps) at {step * steps / 3600:.1f} h or more on this machine, over "
                f"the {args.max_train_minutes:g}-minute limit per run"
            )
            return row
        print(f"   training {config.name} into {run_dir}", flush=True)
        train_run(
            config,
            run_dir,
            overrides=[*overrides, f"train.epochs={args.epochs}"],
            force=True,
            progress=False,
        )
    run = load_run(run_dir)
    history = run.history
    row["train_seconds"] = sum(h["seconds"] for h in history)
    row["train_elbo"] = history[-1]["train_elbo"]
    row["validation_elbo"] = history[-1]["validation_elbo"]
    settings = {
        "num_test": args.num_test,
        "num_samples": args.num_samples,
        "num_diagnose": args.num_diagnose,
        "seed": args.seed,
    }
    cache = run_dir / EVALUATION
    if cache.is_file() and not args.retrain:
        saved = json.loads(cache.read_text())
        if saved["settings"] == settings and saved["epoch"] == run.epoch:
            figures = saved["figures"]
            if figures.get("activity_draws") != ACTIVITY_DRAWS:
                # Figures from before the active units were counted from 32 draws.
                x, _ = load_run_data(run.spec).split("test")
                figures.update(active_units(run, x, args))
                saved["figures"] = figures
                atomic_write(cache, json.dumps(saved).encode())
            return {**row, **figures}
    figures = evaluate(run, args)
    atomic_write(
        cache,
        json.dumps({"settings": settings, "epoch": run.epoch, "figures": figures}).encode(),
    )
    return {**row, **figures}


def check_same_spec(run_dir: Path, spec: Spec, config: str) -> None:
    """Refuses to reuse a finished run trained from another spec than the one asked for
    (another config, ``--set`` or seed), wherever the data were read from."""
    trained = load_spec(run_dir / SPEC)  # the run's own spec file, without building it
    trained = dataclasses.replace(
        trained, data=dataclasses.replace(trained.data, path=spec.data.path)
    )
    if trained != spec:
        print(
            f"error: {run_dir} was trained from another spec than {config} with these options "
            "(--set, --seeds, --epochs); pass another --runs, or --retrain to replace it",
            file=sys.stderr,
        )
        raise SystemExit(2)


def evaluate(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """Test figures of one run: ``evaluate_run`` with K = ``--num-samples`` on the first
    ``--num-test`` points, and ``diagnose`` (marginal KL, mutual information with 4 draws
    per point; active units with :data:`ACTIVITY_DRAWS`) on the first ``--num-diagnose``."""
    evaluation = evaluate_run(
        run,
        num_samples=args.num_samples,
        limit=args.num_test,
        seed=args.seed,
        output=run.path / "priors_guides_evaluation_full.json",
        force=True,
    )
    summary, result = evaluation.summary(), evaluation.result
    log_px = result.log_px
    x, _ = load_run_data(run.spec).split("test")
    pyro.set_rng_seed(args.seed)
    start = time.perf_counter()
    diag = diagnose(
        run.model, run.guide, x[: args.num_diagnose], num_samples=0, num_latent_samples=4
    )
    diagnose_seconds = time.perf_counter() - start
    return {
        "eval_seconds": evaluation.seconds,
        "diagnose_seconds": diagnose_seconds,
        "test_elbo": summary["elbo"],
        "log_px": summary["log_px"],
        "log_px_se_points": standard_error(log_px),
        "log_px_mc_error": summary["log_px_mc_error"],
        "kl": summary["kl"],
        "khat_bad_fraction": summary["khat_bad_fraction"],
        "khat_median": result.khat.nanmedian().item(),
        "iwae_bounds": {str(k): v.mean().item() for k, v in result.iwae.items()},
        **active_units(run, x, args),
        "marginal_kl": diag.marginal_kl,
        "mutual_information": diag.mutual_information,
        "log_px_per_point": log_px.tolist(),
    }


def active_units(run: Run, x: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Active units of the first ``--num-diagnose`` test points ``x``, from
    :data:`ACTIVITY_DRAWS` draws each (no aggregate posterior, so cheap for a flow guide)."""
    pyro.set_rng_seed(args.seed)
    diag = diagnose(
        run.model,
        run.guide,
        x[: args.num_diagnose],
        num_samples=0,
        num_latent_samples=ACTIVITY_DRAWS,
        aggregate=False,
    )
    return {"active_units": diag.summary()["active_units"], "activity_draws": ACTIVITY_DRAWS}


def seconds_per_step(spec: Spec, data: Splits, num_steps: int) -> float:
    """The fastest of ``num_steps`` optimizer steps on real batches, after a warm-up step.

    The minimum, not the median: on a CPU shared with other jobs, contention only ever adds
    time, so the fastest step is the estimate least disturbed by it.
    """
    pyro.set_rng_seed(0)
    model, guide = build(spec, data.features, data.image_shape)
    loss_fn = build_objective(spec)(model, guide)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=spec.train.lr)
    batch = spec.train.batch_size
    times = []
    with pyro.validation_enabled(False):
        for i in range(num_steps + 1):
            x = torch.bernoulli(data.train[i * batch : (i + 1) * batch])
            start = time.perf_counter()
            loss = loss_fn(x)
            optimizer.zero_grad(set_to_none=True)
            (loss / len(x)).backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
    return min(times[1:])


def write_results(rows: list[dict[str, Any]], args: argparse.Namespace, output: Path) -> None:
    """Writes the table (markdown) and every figure (JSON)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": command_line(),
        "epochs": args.epochs,
        "num_test": args.num_test,
        "num_samples": args.num_samples,
        "num_diagnose": args.num_diagnose,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "cpus": os.cpu_count(),
        "threads": 1 if args.jobs > 1 else torch.get_num_threads(),
        "machine": platform.machine(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "seeds": args.seeds,
        "jobs": args.jobs,
        "date": time.strftime("%Y-%m-%d"),
    }
    results = json.dumps({"meta": meta, "rows": rows}, indent=2)
    atomic_write(output.with_suffix(".json"), results.encode())
    atomic_write(output.with_suffix(".md"), markdown(rows, meta).encode())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every run")
    parser.add_argument("--num-test", type=int, default=1000, help="test points scored")
    parser.add_argument("--num-samples", type=int, default=500, help="importance samples K")
    parser.add_argument(
        "--num-diagnose",
        type=int,
        default=200,
        help="test points for active units and marginal KL (the aggregate posterior of a flow "
        "guide scores every draw under every point's q, in the flow's sequential direction)",
    )
    parser.add_argument(
        "--data",
        help="mnist.npz or its directory (default: PYROVAE_DATA, "
        "then ../shared/data beside the repository)",
    )
    parser.add_argument("--priors", nargs="+", choices=PRIORS, default=list(PRIORS))
    parser.add_argument("--guides", nargs="+", choices=GUIDES, default=list(GUIDES))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "priors_guides_stl"))
    parser.add_argument("--output", default=str(RESULTS), help="results path, without suffix")
    parser.add_argument(
        "--max-train-minutes",
        type=float,
        default=60.0,
        help="report, rather than train, a pair estimated to take longer",
    )
    parser.add_argument("--probe-steps", type=int, default=3, help="steps timed per pair")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a spec override for every pair, as in pyrovae train (use another --runs)",
    )
    parser.add_argument("--retrain", action="store_true", help="retrain finished runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="training seeds: a run of each pair each"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at a time, in processes")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    return parser


if __name__ == "__main__":
    main()
