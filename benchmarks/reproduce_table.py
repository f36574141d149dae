"""The reproducibility table: one row per paper model, rendered from the results files that
``benchmarks/reproduce.py`` writes (``benchmarks/results/reproduce/NAME.json``).

    .venv/bin/python benchmarks/reproduce_table.py [--results DIR]

re-renders ``DIR/README.md`` from the JSON alone; nothing is trained or evaluated.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "reproduce"
TABLE = "README.md"
INTERIM = "interim"
"""The folder of the results holding the interim evaluations of runs still training
(``reproduce.py NAME --interim``)."""


AIS_KHAT_SHARE = 0.2
"""Where a final evaluation has more than this share of points with k̂ > 0.7, AIS checks its
figure on the first test points."""


PER_POINT = "per_point"
"""The folder of the results holding each final evaluation's per-point log p(x), kept with
the results so that rows can be paired point by point after their run directories are
gone."""


class ResultsError(ValueError):
    """A results or evaluation file that cannot be read; its message names the file."""


CURVES = "## Learning curves"
CURVES_NOTE = (
    "Each run's test log p(x) at the epochs of its curve (by default every 50, and after "
    "epochs 1, 3, 10 and 30), by importance sampling on its first test images (a cheaper "
    "protocol than the final one, "
    "named under each curve), and its validation ELBO at that epoch; M2's with its "
    "classifier's accuracy on all test images."
)


def read_json(
    path: Path, what: str = "results file", fix: str = "restore it from git or delete it"
) -> dict[str, Any]:
    """``path`` parsed as a JSON object, or a :class:`ResultsError` that names it and says
    how to ``fix`` it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsError(f"{path} is not a readable {what} ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise ResultsError(
            f"{path} is not a readable {what} (a JSON object expected, got "
            f"{type(data).__name__}); {fix}"
        )
    return data


HEADER = """# Reproducing the papers

Each row is one config under `configs/paper-*.toml`, trained by `benchmarks/reproduce.py`
with its paper's recipe (the config's comment says which table and section it follows, and
where it departs); a budget variant, or a row beyond the papers, is such a config with the
overrides its entry in `benchmarks/reproduce.py` names (also kept in its results file).
**Final** figures are test log p(x) in nats by importance sampling with K = 5,000 on all
10,000 test images, from the epoch its paper evaluates (the papers' protocol): the one with
the best validation ELBO where the paper stops early, the last where it trains a fixed
budget; ± is the standard error over the test points. A run that has not finished its budget or its
early stopping is **partial**. Its figure is an interim evaluation of its latest checkpoint
with the same protocol where it has one (`reproduce.py NAME --interim`; the protocol column
names the epoch), else the latest point of its learning curve (the weights of that epoch on
the first test images, with the K and the number of points in the protocol column), a
cheaper protocol that says only where the run is heading. A run that has finished training
but not yet its final evaluation shows the same, marked as such. Δ is this project's figure minus
the paper's (positive: better); in parentheses for a curve's point, whose protocol reads
higher than the paper's (the first 500 test images with K = 500 read 1.4 to 1.9 nats above
all 10,000 with K = 5,000 in the VampPrior and the two Burda VAE rows). Every figure here was
measured; none is copied from a log by hand. In the commands, `DATA_DIR` is the folder
holding `mnist.npz` and `RUNS_DIR` the folder the runs are written to. M2's figure is the
test accuracy of its classifier q(y|x), on all 10,000 test images also in its partial rows,
± its binomial standard error.
"""


def _nats(value: float | None, se: float | None = None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" + (f" ± {se:.2f}" if se is not None else "")


def _hours(seconds: float | None) -> str:
    """A duration in hours, or in minutes below one hour (so that no time reads 0.0 h)."""
    if seconds is None:
        return "—"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def row(record: dict[str, Any], best_paper: dict[str, Any] | None = None) -> list[str]:
    """The table cells of one results file; a row beyond the papers (no paper figure) is
    compared with ``best_paper``, the record with the best paper figure on its data."""
    final = record.get("final")
    accuracy = record.get("metric") == "accuracy"
    # Of the earlier runs (restarted from epoch 0 after losing their checkpoints), the one
    # that got furthest; the row shows its figures until the current run passes them.
    earlier = max(record.get("earlier_runs") or [], key=_shown_epoch, default=None)
    run = record
    if final is None and earlier is not None and _shown_epoch(earlier) > _shown_epoch(record):
        run = earlier
    measured, point = _shown(run)
    status = _status(record, run, point)
    if point is None:
        figure, se, protocol = None, None, "—"
    elif accuracy:
        figure = point["accuracy"]
        points = point.get("accuracy_points", point["points"])
        se = math.sqrt(figure * (1 - figure) / points) if figure is not None else None
        protocol = f"accuracy of q(y\\|x) on {points:,} test points"
    else:
        figure, se = point["log_px"], point.get("log_px_se")
        protocol = f"K = {point['num_samples']}, {point['points']:,} points"
    if measured is not None:
        protocol += f", epoch {measured['epoch']} ({measured['checkpoint']})"
    paper = record["paper"]
    beyond = paper is None
    if beyond and best_paper is not None:
        paper = best_paper["paper"]
    if accuracy:
        shown = "—" if figure is None else f"{100 * figure:.1f}%"
        if se is not None:
            shown += f" ± {100 * se:.1f}"
        paper_shown = "—" if paper is None else f"{100 * paper:.1f}%"
        delta = "—" if figure is None or paper is None else f"{100 * (figure - paper):+.1f} points"
        pythae = "—"
    else:
        shown = _nats(figure, se)
        paper_shown = "—" if paper is None else f"{paper:.2f}"
        delta = "—" if figure is None or paper is None else f"{figure - paper:+.2f}"
        pythae = _nats(record.get("pythae"))
        if measured is None and figure is not None and paper is not None:
            delta = f"({delta})"  # the curve's protocol reads higher than the paper's
    if beyond:
        against = (
            f"; Δ against the best paper figure here, {paper_shown}: {best_paper['model']}, "
            f"{best_paper['source']}"
            if best_paper is not None
            else ""
        )
        paper_cell = f"— ({record['source']}{against})"
    else:
        paper_cell = f"{paper_shown} ({record['source']})"
    epochs = f"{record.get('epochs_run', 0)} / {record['paper_epochs']}"
    if earlier is not None:
        epochs += f" (an earlier run: {earlier.get('epochs_run', 0)})"
    return [
        record["model"],
        record["data"],
        paper_cell,
        pythae,
        f"**{shown}** ({status})",
        delta,
        protocol,
        epochs,
        _hours(run.get("train_seconds")) + ("" if run is record else " (the earlier run)"),
        run.get("device", "—"),
        f"`{_portable(record['command'])}`" if record.get("command") else "—",
    ]


def _status(record: dict[str, Any], run: dict[str, Any], point: dict[str, Any] | None) -> str:
    """What a row's figure is: final, a run trained whose final evaluation has not yet run,
    or partial (of ``run``, which may be an earlier run of the row that lost its checkpoint)."""
    if point is None:
        return "not run"
    if record.get("final") is not None:
        return "final"
    if run is record and record.get("training") == "finished":
        return f"trained, final evaluation pending; shown: epoch {point['epoch']}"
    of_run = "" if run is record else f" of an earlier run, lost at epoch {run['epochs_run']}"
    return f"partial, epoch {point['epoch']}{of_run}"


def _shown(run: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """A run's evaluation with the papers' protocol (final, else interim), if it has one,
    and the point the table shows for it: that evaluation, else its curve's latest point
    (a partial row's interim evaluation has the final protocol; its curve a cheaper one)."""
    measured = run.get("final") if run.get("final") is not None else run.get("interim")
    curve = run.get("curve") or []
    return measured, measured if measured is not None else (curve[-1] if curve else None)


def _shown_epoch(run: dict[str, Any]) -> int:
    point = _shown(run)[1]
    return point["epoch"] if point is not None else 0


PLACEHOLDERS = {"--data": "DATA_DIR", "--runs": "RUNS_DIR"}
"""Options whose values are folders of the machine that ran the command, shown by name."""


def _portable(command: str) -> str:
    """The recorded command with this machine's folders (``--data``, ``--runs``) shown as
    placeholders, so that the table reads the same wherever it is rendered."""
    words = shlex.split(command)
    for i, word in enumerate(words[:-1]):
        if word in PLACEHOLDERS:
            words[i + 1] = PLACEHOLDERS[word]
    return shlex.join(words)


COLUMNS = [
    "model",
    "data",
    "paper",
    "pythae",
    "pyrovae",
    "Δ",
    "protocol",
    "epochs (run / paper)",
    "training time",
    "device",
    "command",
]


def curve_lines(record: dict[str, Any]) -> list[str]:
    """A run's learning curve: test log p(x) and validation ELBO by epoch; then those of
    the earlier runs of its row that lost their checkpoints, with what they reached."""
    lines = []
    for i, earlier in enumerate(record.get("earlier_runs") or [], 1):
        interim = earlier.get("interim")
        reached = (
            f" Its interim evaluation with the final protocol, at epoch {interim['epoch']}: "
            f"{_nats(interim['log_px'], interim.get('log_px_se'))}."
            if interim is not None and interim.get("log_px") is not None
            else ""
        )
        lines += _curve_table(
            f"{record['model']}: learning curve of earlier run {i}",
            f"This run reached epoch {earlier.get('epochs_run', 0)} in "
            f"{_hours(earlier.get('train_seconds'))} on {earlier.get('device', '—')}, then lost "
            f"its checkpoint ({earlier.get('lost', 'lost')}); the row trains again from epoch "
            f"0.{reached}",
            earlier.get("curve") or [],
            record.get("metric") == "accuracy",
        )
    title = f"{record['model']}: learning curve"
    curve = record.get("curve") or []
    protocols = {(p.get("num_samples"), p.get("points")) for p in curve}
    note = None
    if len(protocols) == 1 and None not in (only := next(iter(protocols))):
        note = f"K = {only[0]:,} on the first {only[1]:,} test images."
    return _curve_table(title, note, curve, record.get("metric") == "accuracy") + lines


def _curve_table(
    title: str, note: str | None, curve: list[dict[str, Any]], accuracy: bool
) -> list[str]:
    if not curve:
        return []
    lines = [
        f"### {title}",
        "",
        *([note, ""] if note else []),
        "| epoch | test log p(x) | test accuracy | validation ELBO |"
        if accuracy
        else "| epoch | test log p(x) | validation ELBO |",
        "|---:|---:|---:|---:|" if accuracy else "|---:|---:|---:|",
    ]
    for point in curve:
        cells = [str(point["epoch"]), _nats(point["log_px"], point.get("log_px_se"))]
        if accuracy:
            acc = point.get("accuracy")
            cells.append("—" if acc is None else f"{100 * acc:.1f}%")
        cells.append(_nats(point.get("validation_elbo")))
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def needs_ais(record: dict[str, Any]) -> bool:
    """Whether the row's final evaluation had so many points with k̂ > 0.7 that AIS checks
    it (``reproduce.check_with_ais``)."""
    share = (record.get("final") or {}).get("khat_share")
    return share is not None and share > AIS_KHAT_SHARE


def ais_lines(records: list[dict[str, Any]]) -> list[str]:
    """Importance sampling against AIS on the same test points, for the rows whose final
    evaluation had many points with k̂ > 0.7 (``reproduce.check_with_ais``), and a line for
    each such row whose check has not run."""
    checked = [r for r in records if r.get("final") and (r.get("ais") or needs_ais(r))]
    if not checked:
        return []
    lines = [
        "### How tight the importance-sampling figures are",
        "",
        "Where more than a fifth of the test points have k̂ > 0.7, importance sampling from the "
        "guide may be far below log p(x). AIS (HMC transitions annealed from q(z|x) to the "
        "posterior, with the chains and steps shown) on the first test points gives a second "
        "stochastic lower bound; a higher AIS figure means the IS figure is loose by about the "
        "difference. A row whose check needs to run but has not (its checkpoint is gone) says "
        "so.",
        "",
        "| model | points | k̂ > 0.7 (final IS) | IS, same K as final | AIS (chains × steps) "
        "| AIS − IS | AIS time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in checked:
        ais, final = r.get("ais"), r["final"]
        share = final.get("khat_share")
        if not ais:
            cells = [r["model"], "—", f"{100 * share:.0f}%", "—", "not run", "—", "—"]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        same = ais.get("is_same_points")
        if ais.get("difference") is not None:
            gap = f"{ais['difference']:+.2f} ± {ais['difference_se']:.2f} (paired)"
        elif same is not None and ais.get("log_px") is not None:
            gap = f"{ais['log_px'] - same:+.2f}"
        else:
            gap = "—"
        cells = [
            r["model"],
            f"{ais['points']:,}",
            "—" if share is None else f"{100 * share:.0f}%",
            f"{_nats(same)} (K = {final['num_samples']:,})",
            f"{_nats(ais.get('log_px'), ais.get('log_px_se'))} "
            f"({ais.get('num_chains')} × {ais.get('num_steps')})",
            gap,
            _hours(ais.get("seconds")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def best_paper_row(record: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """For a row beyond the papers, the row with the best paper figure on the same data and
    metric (the highest log p(x) or accuracy); ``None`` for a paper row, or where none is."""
    if record.get("paper") is not None:
        return None
    same = [
        r
        for r in records
        if r.get("paper") is not None
        and r.get("data") == record.get("data")
        and r.get("metric") == record.get("metric")
    ]
    return max(same, key=lambda r: r["paper"], default=None)


def beyond_lines(records: list[dict[str, Any]]) -> list[str]:
    """Each row beyond the papers against the paper row it changes: point by point on the
    same test images (``reproduce._against_base``) once both are final; until then, the
    latest epoch of its curve that both curves have."""
    names = {r.get("name"): r for r in records}
    compared = [r for r in records if r.get("against_base")]
    heading = ["### Beyond the papers, against the row each one changes", ""]
    lines = []
    if compared:
        lines += [
            "Both final evaluations (the same K, the same test images): the difference is "
            "this row's log p(x) minus its base row's, point by point, ± its standard error "
            "(paired); where the base row's per-point figures were lost with its run, the "
            "difference of the two means, ± the root of the sum of their squared standard "
            "errors (unpaired).",
            "",
            "| model | base row | points | base row's figure | this row's figure | difference |",
            "|---|---|---:|---:|---:|---:|",
        ]
    for r in compared:
        against = r["against_base"]
        base = names.get(against["base"], {})
        cells = [
            r["model"],
            base.get("model", against["base"]),
            f"{against['points']:,}",
            _nats(against["other_same_points"]),
            _nats(r["final"]["log_px"]),
            f"{against['difference']:+.2f} ± {against['difference_se']:.2f} "
            f"({'paired' if against.get('paired', True) else 'unpaired'})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if compared:
        lines.append("")
    partial = [
        (r, names[r["base"]], pair)
        for r in records
        if r.get("base") in names
        and not r.get("against_base")
        and (pair := _latest_common_point(r, names[r["base"]])) is not None
    ]
    if partial:
        lines += [
            "Until both rows are final, their learning curves at the latest epoch both have "
            "(the curves' protocol, the same first test images and K; not paired, so the "
            "difference has no standard error here):",
            "",
            "| model | base row | epoch | base row's curve | this row's curve | difference |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r, base, (this, other) in partial:
            cells = [
                r["model"],
                base["model"],
                str(this["epoch"]),
                _nats(other["log_px"], other.get("log_px_se")),
                _nats(this["log_px"], this.get("log_px_se")),
                f"{this['log_px'] - other['log_px']:+.2f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return heading + lines if lines else []


def _latest_common_point(
    record: dict[str, Any], base: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The two curves' points at the latest epoch where both have a log p(x) with the same
    protocol (the same K and number of test points): ``(record's, base's)``, or None."""

    def by_epoch(r: dict[str, Any]) -> dict[tuple[Any, Any, Any], dict[str, Any]]:
        curve = r.get("curve") or []
        return {(p["epoch"], p.get("num_samples"), p.get("points")): p for p in curve
                if p.get("log_px") is not None}  # fmt: skip

    mine, theirs = by_epoch(record), by_epoch(base)
    common = max((key for key in mine if key in theirs), default=None)
    return None if common is None else (mine[common], theirs[common])


def render(records: list[dict[str, Any]]) -> str:
    """The page: the table, the rows beyond the papers against their bases, the AIS checks,
    then each run's learning curve."""
    lines = [HEADER, "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(r, best_paper_row(r, records))) + " |" for r in records]
    lines.append("")
    lines += beyond_lines(records)
    lines += ais_lines(records)
    curves = [line for record in records for line in curve_lines(record)]
    if curves:
        lines += [CURVES, "", CURVES_NOTE, "", *curves]
    return "\n".join(lines)


def read_records(results: Path, catalogue: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every results file in ``results``, in the order of ``catalogue`` (the driver's
    ``REPRODUCTIONS``) where the name is known, then by name; the project's own table also
    lists the catalogue's rows not yet run."""
    records = []
    for path in sorted(results.glob("*.json")):
        records.append(read_json(path))
    catalogue = catalogue or {}
    for record in records:
        interim = results / INTERIM / f"{record.get('name')}.json"
        if record.get("final") is None and interim.is_file():
            record["interim"] = read_json(interim, "evaluation")
    order = {name: i for i, name in enumerate(catalogue)}
    if results.resolve() == RESULTS.resolve():
        # The project's own table lists every row, those not yet run too.
        seen = {r.get("name") for r in records}
        for name, entry in catalogue.items():
            if name not in seen:
                records.append(
                    {
                        "name": name,
                        "config": entry.config,
                        "model": entry.model,
                        "metric": entry.metric,
                        "paper": entry.paper,
                        "source": entry.source,
                        "data": entry.data,
                        "pythae": entry.pythae,
                        "paper_epochs": entry.paper_epochs,
                    }
                )
    return sorted(records, key=lambda r: (order.get(r.get("name"), len(order)), r.get("name")))


def write_table(results: Path, catalogue: Mapping[str, Any] | None = None) -> Path:
    """Renders ``results/README.md`` from the results files there, atomically, in the order
    of ``catalogue`` (see :func:`read_records`)."""
    from pyrovae.inference.experiment.runs import atomic_write

    records = read_records(results, catalogue)
    path = results / TABLE
    atomic_write(path, render(records).encode())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        print(f"reproduce_table: {results} is not a directory", file=sys.stderr)
        return 2
    from reproduce import REPRODUCTIONS

    try:
        print(write_table(results, REPRODUCTIONS))
    except ResultsError as e:
        print(f"reproduce_table: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
