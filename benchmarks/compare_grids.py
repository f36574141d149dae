"""Two prior x guide grids run pair by pair on the same test points: what one recipe adds.

Reads the figures ``benchmarks/priors_guides.py`` cached in each run directory of two
``--runs`` folders (nothing is trained or evaluated) and, for every run present in both,
the paired difference of per-point test log p(x), ``new - old``, on the same points. Per
(prior, guide) pair: each seed's difference and their mean ± its standard error over seeds.
Both grids must have been evaluated with the same settings (points, K, seed).

    python benchmarks/compare_grids.py runs/priors_guides_stl runs/priors_guides \
        --output benchmarks/results/stl_against_trace
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
from common import command_line
from priors_guides import EVALUATION, GUIDES, PRIORS

from pyrovae.inference.algorithms.marginal import standard_error
from pyrovae.inference.experiment.runs import atomic_write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("new", type=Path, help="the grid's --runs folder with the new recipe")
    parser.add_argument("old", type=Path, help="the grid's --runs folder it is compared with")
    parser.add_argument("--output", type=Path, help="results path, without suffix")
    args = parser.parse_args()
    rows = compare(args.new, args.old)
    if not rows:
        fail(f"no run of {args.new} has a cached evaluation in {args.old} too")
    page = markdown(rows, args.new, args.old)
    print(page)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.output.with_suffix(".md"), page.encode())
        atomic_write(args.output.with_suffix(".json"), json.dumps(rows, indent=2).encode())


def fail(message: str) -> NoReturn:
    """One line on stderr and exit code 2, as for any bad input."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def figures(run_dir: Path) -> dict[str, Any] | None:
    """The cached evaluation of a run directory, or None where it has none."""
    path = run_dir / EVALUATION
    return json.loads(path.read_text()) if path.is_file() else None


def _seeds(runs: Path, pair: str) -> list[int]:
    """The training seeds of a pair's run directories under ``runs``, as the grid names them
    (``PAIR`` for seed 0, ``PAIR-seedN`` for the others)."""
    found = set()
    for path in runs.glob(f"{pair}*"):
        rest = path.name.removeprefix(pair)
        if rest == "":
            found.add(0)
        elif rest.startswith("-seed") and rest[5:].isdigit():
            found.add(int(rest[5:]))
    return sorted(found)


def compare(new: Path, old: Path) -> list[dict[str, Any]]:
    """One row per (prior, guide) with runs in both folders: each seed's paired difference."""
    rows = []
    for prior in PRIORS:
        for guide in GUIDES:
            seeds, deltas, errors, new_px, old_px = [], [], [], [], []
            for seed in _seeds(new, f"{prior}-{guide}"):
                name = f"{prior}-{guide}" + (f"-seed{seed}" if seed else "")
                a, b = figures(new / name), figures(old / name)
                if a is None or b is None:
                    continue
                if a["settings"] != b["settings"]:
                    fail(
                        f"{new / name} and {old / name} were evaluated with other "
                        f"settings ({a['settings']} against {b['settings']}); rerun one grid "
                        "with the other's --num-test, --num-samples and --seed"
                    )
                x = torch.tensor(a["figures"]["log_px_per_point"])
                y = torch.tensor(b["figures"]["log_px_per_point"])
                diff = x - y
                seeds.append(seed)
                deltas.append(diff.mean().item())
                errors.append(standard_error(diff))
                new_px.append(x.mean().item())
                old_px.append(y.mean().item())
            if seeds:
                rows.append(
                    {
                        "prior": prior,
                        "guide": guide,
                        "seeds": seeds,
                        "delta": deltas,
                        "delta_se_points": errors,
                        "log_px_new": statistics.fmean(new_px),
                        "log_px_old": statistics.fmean(old_px),
                    }
                )
    return rows


def markdown(rows: list[dict[str, Any]], new: Path, old: Path) -> str:
    lines = [
        f"# {new} against {old}",
        "",
        "Paired difference of test log p(x) per point, the same points, K and seed, for each "
        "run in both grids (same pair, same training seed); the mean over seeds ± its "
        "standard error over seeds, and each seed's difference ± its standard error over "
        "points (nats).",
        "",
        f"| prior | guide | log p(x), {new.name} | log p(x), {old.name} | difference | seeds |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        deltas = row["delta"]
        mean = statistics.fmean(deltas)
        between = (
            f" ± {statistics.stdev(deltas) / math.sqrt(len(deltas)):.2f}" if len(deltas) > 1 else ""
        )
        each = ", ".join(
            f"{d:+.2f} ± {e:.2f}" for d, e in zip(deltas, row["delta_se_points"], strict=True)
        )
        lines.append(
            f"| {row['prior']} | {row['guide']} | {row['log_px_new']:.2f} | "
            f"{row['log_px_old']:.2f} | {mean:+.2f}{between} | {each} |"
        )
    lines += ["", f"Command: `{command_line()}`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
