"""The prior x guide grid's results page: the table of ``benchmarks/priors_guides.py``'s rows,
what each column means, the command and notes on the rows."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from pyrovae.inference.algorithms.marginal import standard_error
from pyrovae.inference.experiment.runs import atomic_write

COLLAPSE_KL = 1.0
"""Below this test KL (nats) the latents carry almost no information: posterior collapse."""
BURDA_VAE, BURDA_IWAE = -86.76, -84.78
"""Test log p(x) of this architecture after 3,280 epochs (Burda et al., 2016, Table 1)."""


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
        "to the baseline of the same seed, averaged ± its standard error over seeds, with each seed's Δ); test "
        "ELBO is the "
        "mean log weight; KL is the mean of log q(z|x) - log p(z) over the same draws; active "
        "units (of 50; 32 draws per point for a guide without closed-form means) and the "
        "marginal KL(q(z) ‖ p(z)) (4 draws per point) come from `diagnose` on the first "
        f"{meta['num_diagnose']} test points (the marginal KL of the N-point "
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
        se = standard_error(per_point)
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
        errors.append(standard_error(diff))
    if not deltas:
        return "—"
    if len(deltas) == 1:
        return f"{deltas[0]:+.2f} ± {errors[0]:.2f}"
    seeds = ", ".join(f"{d:+.2f}" for d in deltas)
    between = statistics.stdev(deltas) / math.sqrt(len(deltas))
    return f"{statistics.fmean(deltas):+.2f} ± {between:.2f} (seeds: {seeds})"


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


def main() -> None:
    """Rewrites each results page (``.md``) from its figures (``.json``), as the grid writes
    them, without training or evaluating anything."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", nargs="+", type=Path, help="a grid's .json results file")
    for path in parser.parse_args().results:
        results = json.loads(path.read_text())
        atomic_write(path.with_suffix(".md"), markdown(results["rows"], results["meta"]).encode())
        print(f"wrote {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
