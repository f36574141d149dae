"""The prior x guide grid on dynamically binarized MNIST: train each pair, estimate log p(x).

Every pair of {standard, mixture, vamp, flow} priors and {diagonal, fullcov, iaf} guides is
trained from ``configs/mnist-<prior>-<guide>.toml`` (one layer, 784-200-200-50 with ReLU
networks) for the same number of epochs with ``train_run``, then
scored on the first ``--num-test`` test points (binarized once with the fixed seed) by
importance sampling with ``--num-samples`` draws from the guide. The table goes to
``benchmarks/results/priors_guides.md`` and every figure to ``priors_guides.json``.

Before training, a few optimizer steps of each pair are timed in this process; a pair whose
estimated training time exceeds ``--max-train-minutes`` is reported with that estimate
instead of being trained (a VampPrior over a fully autoregressive IAF guide scores B x K
pairs in the flow's sequential direction, 50 passes per transform; the shipped
``mnist-vamp-iaf.toml`` uses coupling transforms, 2 passes, and takes about 45 minutes).
Finished runs under ``--runs``, and their test figures when computed with the same
settings, are reused unless ``--retrain``.

    .venv/bin/python benchmarks/priors_guides.py [--epochs 10] [--num-test 1000]
        [--num-samples 500] [--data ../shared/data] [--priors vamp flow] [--guides iaf]

References:
    Importance Weighted Autoencoders (Burda, Grosse and Salakhutdinov, 2016);
    VAE with a VampPrior (Tomczak and Welling, 2018)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyro
import torch
from common import command_line, find_mnist

from pyrovae.inference import (
    Checkpoint,
    Run,
    Spec,
    Splits,
    build,
    build_objective,
    diagnose,
    evaluate_run,
    load_data,
    load_run,
    load_spec,
    train_run,
)
from pyrovae.inference.experiment.runs import atomic_write
from pyrovae.inference.experiment.workflow import load_run_data

ROOT = Path(__file__).resolve().parents[1]
PRIORS = ("standard", "mixture", "vamp", "flow")
GUIDES = ("diagonal", "fullcov", "iaf")
RESULTS = ROOT / "benchmarks" / "results" / "priors_guides"
COLLAPSE_KL = 1.0
"""Below this test KL (nats) the latents carry almost no information: posterior collapse."""
EVALUATION = "priors_guides_evaluation.json"
"""Per run: the test figures and the settings they were computed with, reused when equal."""
ACTIVITY_DRAWS = 32
"""Draws per point behind the active units: a flow guide's posterior means are sample means,
whose Monte Carlo variance ``diagnose`` subtracts; with 32 draws what is left of it has a
standard error near 0.003 for a unit at N(0, 1) on 200 points, against the threshold 0.01."""
BURDA_VAE, BURDA_IWAE = -86.76, -84.78
"""Test log p(x) of this architecture after 3,280 epochs (Burda et al., 2016, Table 1)."""


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
        "log_px_se_points": (log_px.std() / math.sqrt(len(log_px))).item(),
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


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results page: what was measured, the table, the command and notes on the rows."""
    lines = [
        "# Prior x guide on dynamically binarized MNIST",
        "",
        f"One-layer 784-200-200-50 ReLU VAE, the shipped configs, {meta['epochs']} epochs of "
        f"Adam (lr 1e-3, batch 100, single-sample ELBO) on the 50k training split; test "
        f"figures on the first {meta['num_test']} MNIST test points (binarized once, fixed "
        f"seed) with K = {meta['num_samples']} importance samples from the guide. "
        f"{_seeds_text(meta)}"
        "log p(x) is the mean over points ± its standard error across points; Δ is the paired difference "
        "to standard x diagonal on the same points ± its standard error (with several seeds: "
        "to the baseline of the same seed, averaged, with each seed's Δ); test ELBO is the "
        "mean log weight; KL is the mean of log q(z|x) - log p(z) over the same draws; active "
        "units (of 50) and the marginal KL(q(z) ‖ p(z)) come from `diagnose` on the first "
        f"{meta['num_diagnose']} test points (4 draws each; the marginal KL of the N-point "
        "aggregate is biased up for finite N, equally for every pair); k̂ > 0.7 is the share "
        "of points whose K weights have a PSIS Pareto shape above 0.7 (estimate unreliable). "
        "Train s is the sum of the epochs' training time (no validation, no start-up); eval s "
        f"is the time of the log p(x) estimate, both on {_where(meta)}.",
        "",
        "| prior | guide | epochs | test ELBO | log p(x) | Δ log p(x) | KL | active | marginal KL "
        "| k̂ > 0.7 | train s | eval s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    notes = []
    trained = [r for r in rows if "skipped" not in r]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["prior"], row["guide"]), []).append(row)
    baselines = {r.get("seed", 0): r for r in groups.get(("standard", "diagonal"), [])}
    per_step = [r["train_seconds"] / (r["epochs"] * r["steps_per_epoch"]) for r in trained]
    collapsed, unreliable = [], []
    for (prior, guide), group in groups.items():
        done = [r for r in group if "skipped" not in r]
        if not done:
            lines.append(f"| {prior} | {guide} | — | — | — | — | — | — | — | — | see note | — |")
            others = (
                f"; the trained pairs averaged {statistics.median(per_step):.3f} s per step "
                "(median over pairs)"
                if per_step
                else ""
            )
            notes.append(f"- {prior} x {guide}: {group[0]['skipped']}{others}.")
            continue

        def mean(key: str, done: list[dict[str, Any]] = done) -> float:
            return statistics.fmean(r[key] for r in done)

        per_point = torch.tensor([r["log_px_per_point"] for r in done]).mean(0)
        se = (per_point.std() / math.sqrt(len(per_point))).item()
        lines.append(
            f"| {prior} | {guide} | {done[0]['epochs']} | {mean('test_elbo'):.2f} | "
            f"{mean('log_px'):.2f} ± {se:.2f} | {_delta(done, baselines)} | "
            f"{mean('kl'):.2f} | {mean('active_units'):.0f} | {mean('marginal_kl'):.2f} | "
            f"{100 * mean('khat_bad_fraction'):.1f}% | {mean('train_seconds'):.0f} | "
            f"{mean('eval_seconds'):.0f} |"
        )
        name = f"{prior} x {guide}"
        if mean("kl") < COLLAPSE_KL:
            collapsed.append(name)
        if mean("khat_bad_fraction") > 0.5:
            unreliable.append(name)
    if collapsed:
        notes.append(
            f"- Posterior collapse in {', '.join(collapsed)}: KL < {COLLAPSE_KL:g} nat, so the "
            "decoder ignores z and log p(x) is that of a model without latents. A prior fitted "
            "to the aggregate posterior can match a constant encoder exactly, and a VampPrior "
            "does so by construction (its components are the encoder's outputs), which makes "
            "collapse a stable optimum."
        )
    if unreliable:
        pairs_trained = {(r["prior"], r["guide"]) for r in trained}
        everywhere = len(unreliable) == len(pairs_trained) - len(collapsed)
        where = "every pair without collapse" if everywhere else ", ".join(unreliable)
        notes.append(
            f"- k̂ > 0.7 for most points in {where}: the importance weights are "
            "heavy-tailed, so log p(x) there is a stochastic lower bound of unknown tightness; "
            "more samples or a better guide would raise it."
        )
    total = sum(r["train_seconds"] + r["eval_seconds"] for r in trained)
    lines += [
        "",
        f"Command: `{meta['command']}` ({meta.get('device', 'CPU')}, {meta['cpus']} CPU "
        f"cores, {meta['threads']} torch threads, torch {meta['torch']}, Pyro {meta['pyro']}, "
        f"{meta['date']}). Training and "
        f"evaluation of the trained pairs took {total / 60:.1f} minutes in all (the sum of the "
        "two time columns; start-up and the validation pass after each epoch come on top).",
        "",
        f"For context: Burda et al. (2016) report {BURDA_VAE} nats for the VAE and "
        f"{BURDA_IWAE} for IWAE (k = 50) with the tanh version of this architecture "
        "(configs/mnist-burda-tanh.toml) after 3,280 epochs; the "
        f"budget here is {meta['epochs']} epochs, so every figure is far from converged and "
        "the ranking is that of early training, not of the final models.",
        *notes,
    ]
    return "\n".join(lines) + "\n"


def _delta(rows: list[dict[str, Any]], baselines: dict[int, dict[str, Any]]) -> str:
    """The paired difference of log p(x) to the baseline run of the same training seed on the
    same points: its mean ± the standard error over points for one seed; with several seeds,
    the mean over seeds and each seed's difference."""
    if rows[0]["prior"] == "standard" and rows[0]["guide"] == "diagonal":
        return "baseline"
    deltas, errors = [], []
    for row in rows:
        baseline = baselines.get(row.get("seed", 0))
        if baseline is None or "log_px_per_point" not in baseline:
            continue
        diff = torch.tensor(row["log_px_per_point"]) - torch.tensor(baseline["log_px_per_point"])
        deltas.append(diff.mean().item())
        errors.append((diff.std() / math.sqrt(len(diff))).item())
    if not deltas:
        return "—"
    if len(deltas) == 1:
        return f"{deltas[0]:+.2f} ± {errors[0]:.2f}"
    seeds = ", ".join(f"{d:+.2f}" for d in deltas)
    return f"{statistics.fmean(deltas):+.2f} (seeds: {seeds})"


def _seeds_text(meta: dict[str, Any]) -> str:
    seeds = meta.get("seeds", [0])
    if len(seeds) == 1:
        return ""
    return (
        f"Every pair is trained once per training seed ({', '.join(map(str, seeds))}) and "
        "each figure is the mean over its runs; "
    )


def _where(meta: dict[str, Any]) -> str:
    jobs = meta.get("jobs", 1)
    shared = f", {jobs} runs at a time" if jobs > 1 else ""
    if meta.get("device", "CPU") == "CPU":
        return (
            f"{meta['cpus']} CPU cores{shared}, where timings vary by 10% or more from run to run"
        )
    return f"one {meta['device']}{shared}, so times are those of a shared device"


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
    parser.add_argument("--runs", default=str(ROOT / "runs" / "priors_guides"))
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
