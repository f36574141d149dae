"""The reproduction driver (benchmarks/reproduce.py) on a small MNIST-shaped file: it trains a
paper config in pieces, keeps a learning curve that survives a lost checkout, evaluates the
best epoch when training ends, and renders the table from the results alone."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import reproduce
import reproduce_table
import tomllib
import torch

from pyrovae.inference import Checkpoint, load_run, load_spec, train_run
from pyrovae.inference.experiment.build import build

TINY = """
[data]
name = "mnist"
binarize = "dynamic"
validation_size = 40

[model]
latent_dim = 2
prior = { kind = "vamp", components = 3 }
decoder = { kind = "feedforward", network = "gated_mlp", hidden = [8], activation = "identity" }
likelihood = { kind = "bernoulli" }

[guide]
encoder = { kind = "diagonal_normal", network = "gated_mlp", hidden = [8], activation = "identity" }

[train]
kl = { kind = "linear", warmup_steps = 4 }
optimizer = { kind = "adam", normalize_grad = true }
epochs = 4
patience = 50
batch_size = 64
lr = 1e-3
"""


@pytest.fixture
def setting(tmp_path, mnist_like):
    npz = mnist_like(tmp_path / "mnist.npz")
    config = tmp_path / "paper-tiny.toml"
    config.write_text(TINY)
    entry = reproduce.Reproduction(
        str(config), "tiny VAE + VampPrior", "log_px", -85.57, "a paper, Table 2", "fake", 4, -85.0
    )
    args = reproduce.parser().parse_args(
        [
            "--data",
            str(npz),
            "--runs",
            str(tmp_path / "runs"),
            "--results",
            str(tmp_path / "results"),
            "--curve-every",
            "2",
            "--curve-samples",
            "5",
            "--curve-points",
            "10",
            "--final-samples",
            "30",
            "--ais-points",
            "0",
        ]
    )
    return entry, args, tmp_path


def test_every_row_names_a_shipped_paper_config_that_loads():
    for name, entry in reproduce.REPRODUCTIONS.items():
        spec = load_spec(reproduce.ROOT / entry.config, list(entry.overrides))
        # A row is its config, or (a budget variant) that config with overrides.
        stem = Path(entry.config).stem
        assert stem == f"paper-{name}" or (entry.overrides and f"paper-{name}".startswith(stem))
        assert spec.data.name == "mnist"
        # The budget a row is compared with is the config's own.
        assert spec.train.epochs == entry.paper_epochs, name
        build(spec, 784 + (10 if spec.model.labels != "none" else 0), (28, 28))
        if entry.paper is None:
            # A row beyond the papers says which paper config it changes.
            assert entry.overrides and stem in entry.source
        else:
            assert entry.source.split()[0] in (reproduce.ROOT / entry.config).read_text()[:300]


def test_a_row_trains_in_pieces_keeps_its_curve_and_ends_with_the_final_protocol(setting, capsys):
    entry, args, tmp = setting
    args.stop_at = 2
    reproduce.reproduce("tiny", args, entry)
    results = tmp / "results" / "tiny.json"
    record = json.loads(results.read_text())
    assert record["training"] == "partial" and record["epochs_run"] == 2
    assert "stopped_by" not in record and "final" not in record
    assert [p["epoch"] for p in record["curve"]] == [1, 2]
    assert all(p["num_samples"] == 5 and p["points"] == 10 for p in record["curve"])
    table = (tmp / "results" / "README.md").read_text()
    assert "(partial, epoch 2)" in table and "2 / 4" in table
    # A partial row's Δ is in parentheses: its protocol is not the paper's.
    partial_delta = f"({record['curve'][-1]['log_px'] - entry.paper:+.2f})"
    assert partial_delta in table

    # A fresh checkout has lost the results file; the run directory's copy keeps the curve.
    results.unlink()
    args.stop_at, args.no_final = None, True
    reproduce.reproduce("tiny", args, entry)
    record = json.loads(results.read_text())
    assert record["training"] == "finished" and "final" not in record
    # Trained but not yet evaluated: the table says so, not "partial".
    table = (tmp / "results" / "README.md").read_text()
    assert "(trained, final evaluation pending; shown: epoch 4)" in table
    assert "partial" not in table.split("| command |")[1]
    # The next invocation trains nothing more and runs the final evaluation.
    args.no_final = False
    trained = (tmp / "runs" / "tiny" / "checkpoint.pt").stat().st_mtime_ns
    reproduce.reproduce("tiny", args, entry)
    assert (tmp / "runs" / "tiny" / "checkpoint.pt").stat().st_mtime_ns == trained
    record = json.loads(results.read_text())
    assert record["training"] == "finished" and record["stopped_by"] == "budget"
    assert [p["epoch"] for p in record["curve"]] == [1, 2, 3, 4]
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3, 4]
    final = record["final"]
    run_dir = tmp / "runs" / "tiny"
    # The best validation epoch after the KL warm-up (4 steps: epochs 1 and 2 here) is the
    # one evaluated, with K = --final-samples on every test point.
    history = Checkpoint.load(run_dir).history
    counted = [h for h in history if h["epoch"] >= 3]
    best = max(counted, key=lambda h: (h["validation_elbo"], -h["epoch"]))["epoch"]
    assert final["checkpoint"] == "best" and final["epoch"] == best
    assert final["num_samples"] == 30 and final["points"] == 30
    evaluation = json.loads((run_dir / "evaluation-k30.json").read_text())
    assert evaluation["epoch"] == best
    # The share of points with k-hat > 0.7 is kept: it decides whether AIS checks the figure.
    assert final["khat_share"] is not None
    assert final["khat_share"] == evaluation["khat_bad_fraction"]
    table = (tmp / "results" / "README.md").read_text()
    assert "(final)" in table and "4 / 4" in table
    assert f"| {final['log_px'] - entry.paper:+.2f} |" in table
    assert f"{final['log_px']:.2f}" in table
    # Nothing is trained or evaluated again once the row is final.
    before = (run_dir / "checkpoint.pt").stat().st_mtime_ns
    reproduce.reproduce("tiny", args, entry)
    assert (run_dir / "checkpoint.pt").stat().st_mtime_ns == before
    assert json.loads(results.read_text())["final"] == final

    # Where k-hat says importance sampling is loose, AIS checks the first points, paired with
    # the final evaluation's figures of the same points.
    record = json.loads(results.read_text())
    record["final"]["khat_share"] = 1.0
    results.write_text(json.dumps(record))
    args.ais_points, args.ais_chains, args.ais_steps = 3, 2, 3
    reproduce.reproduce("tiny", args, entry)
    ais = json.loads(results.read_text())["ais"]
    per_point = json.loads((run_dir / "evaluation-ais.json").read_text())["per_point"]["log_px"]
    final_points = torch.tensor(evaluation["per_point"]["log_px"][:3], dtype=torch.float64)
    paired = torch.tensor(per_point, dtype=torch.float64) - final_points
    assert ais["points"] == 3 and ais["num_chains"] == 2 and ais["num_steps"] == 3
    assert ais["difference"] == pytest.approx(paired.mean().item(), abs=1e-9)
    assert ais["is_same_points"] == pytest.approx(final_points.mean().item(), abs=1e-9)
    # A check recorded before the paired difference was gets it from the two files.
    record = json.loads(results.read_text())
    del record["ais"]["difference"], record["ais"]["difference_se"]
    results.write_text(json.dumps(record))
    reproduce.reproduce("tiny", args, entry)
    again = json.loads(results.read_text())["ais"]
    assert again["difference"] == pytest.approx(ais["difference"], abs=1e-9)
    assert again["difference_se"] == pytest.approx(ais["difference_se"], abs=1e-9)
    assert "(paired)" in (tmp / "results" / "README.md").read_text()
    # A final row whose run directory is gone keeps its figure: the check it still needs is
    # left out with a note, and the other rows go on.
    record = json.loads(results.read_text())
    del record["ais"]
    results.write_text(json.dumps(record))
    shutil.rmtree(run_dir)
    reproduce.reproduce("tiny", args, entry)
    assert "left out" in capsys.readouterr().err
    kept = json.loads(results.read_text())
    assert "ais" not in kept and kept["final"] == record["final"]
    assert "| not run |" in (tmp / "results" / "README.md").read_text()


def test_the_table_renders_from_json_alone(tmp_path):
    record = {
        "name": "x",
        "model": "M",
        "metric": "accuracy",
        "paper": 0.8803,
        "source": "K (2014), Table 1",
        "data": "MNIST",
        "paper_epochs": 3000,
        "epochs_run": 10,
        "train_seconds": 7200.0,
        "device": "CPU",
        "command": "python benchmarks/reproduce.py m2-100 --data '/home/a b/data' --runs /r",
        "curve": [{"epoch": 10, "log_px": -100.0, "log_px_se": 1.0, "accuracy": 0.85,
                   "accuracy_points": 10000, "num_samples": 500, "points": 500,
                   "validation_elbo": -101.0}],
    }  # fmt: skip
    (tmp_path / "x.json").write_text(json.dumps(record))
    assert reproduce_table.main(["--results", str(tmp_path)]) == 0
    page = (tmp_path / "README.md").read_text()
    # The accuracy's binomial standard error: sqrt(0.85 * 0.15 / 10,000) = 0.36 points.
    assert "**85.0% ± 0.4** (partial, epoch 10)" in page
    assert "accuracy of q(y\\|x) on 10,000 test points" in page
    assert "-3.0 points" in page and "88.0%" in page and "2.0 h" in page
    # This machine's folders are shown as placeholders, the rest as it ran.
    assert "`python benchmarks/reproduce.py m2-100 --data DATA_DIR --runs RUNS_DIR`" in page
    (tmp_path / "y.json").write_text("{")
    assert reproduce_table.main(["--results", str(tmp_path)]) == 2
    assert reproduce_table.main(["--results", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize(
    "broken, text",
    [("x.json", "{"), ("x.json", "[1, 2]"), ("interim/x.json", "not json"), ("x.json", b"\xff")],
)
def test_an_unreadable_results_file_ends_the_driver_with_one_line_naming_it(
    tmp_path, capsys, broken, text
):
    record = {"name": "x", "model": "M", "metric": "log_px", "paper": -85.0, "epochs_run": 1}
    (tmp_path / "interim").mkdir()
    for name, content in (("x.json", json.dumps(record)), ("interim/x.json", "{}")):
        (tmp_path / name).write_text(content)
    path = tmp_path / broken
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = path.read_bytes()
    assert reproduce.main(["--table", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err
    assert "restore it from git or delete it" in err
    assert path.read_bytes() == before and not (tmp_path / "README.md").exists()
    assert reproduce_table.main(["--results", str(tmp_path)]) == 2


TINY_M2 = """
[data]
name = "mnist"
binarize = "dynamic"
validation_size = 40
labels_per_class = 2
labelled_share = 0.1

[model]
latent_dim = 2
decoder = { kind = "feedforward", network = "mlp", hidden = [8], activation = "softplus" }
likelihood = { kind = "bernoulli" }
labels = "latent"
classes = 10
classification_weight = 50.0

[guide]
encoder = { kind = "diagonal_normal", network = "mlp", hidden = [8], activation = "softplus" }

[train]
objective = { kind = "enumerated_elbo" }
epochs = 2
batch_size = 50
lr = 1e-3
"""


def test_an_m2_row_scores_its_curve_by_accuracy_on_the_whole_test_set(setting):
    _, args, tmp = setting
    config = tmp / "paper-tiny-m2.toml"
    config.write_text(TINY_M2)
    entry = reproduce.Reproduction(
        str(config), "tiny M2", "accuracy", 0.8803, "a paper, Table 1", "fake", 2
    )
    reproduce.reproduce("tiny-m2", args, entry)
    record = json.loads((tmp / "results" / "tiny-m2.json").read_text())
    run = load_run(tmp / "runs" / "tiny-m2")
    last = record["curve"][-1]
    # log p(x) on the curve's 10 points; the accuracy on all 30 test images, of the weights
    # the final evaluation scores too (the last epoch's: no early stopping).
    assert last["points"] == 10 and last["accuracy_points"] == 30
    assert last["epoch"] == run.epoch == 2
    x, labels = run.points("test")
    with torch.no_grad():
        guess = run.guide.classifier(x.x).probs.argmax(-1)
    accuracy = (guess == labels).double().mean().item()
    assert last["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert record["final"]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert "accuracy of q(y\\|x) on 30 test points" in (tmp / "results" / "README.md").read_text()


def test_the_table_shows_the_ais_check_beside_importance_sampling_on_the_same_points(tmp_path):
    final = {
        "log_px": -82.5,
        "log_px_se": 0.2,
        "num_samples": 5000,
        "points": 10000,
        "epoch": 9,
        "checkpoint": "best",
        "khat_share": 0.71,
    }
    ais = {
        "log_px": -80.0,
        "log_px_se": 1.5,
        "points": 100,
        "num_chains": 16,
        "num_steps": 500,
        "seconds": 1800.0,
        "is_same_points": -80.4,
    }
    record = {"name": "v", "model": "M", "paper": -85.57, "source": "T (2018)", "data": "MNIST",
              "paper_epochs": 2000, "epochs_run": 9, "final": final, "ais": ais}  # fmt: skip
    page = reproduce_table.render([record])
    line = next(line for line in page.splitlines() if line.startswith("| M | 100 |"))
    assert "71%" in line and "-80.40 (K = 5,000)" in line and "-80.00 ± 1.50 (16 × 500)" in line
    assert "+0.40" in line and "30 min" in line  # below an hour, in minutes
    # A row that needs the check and has none says so; one that does not need it is left out.
    page = reproduce_table.render([{**record, "ais": None}])
    line = next(line for line in page.splitlines() if line.startswith("| M | — |"))
    assert "71%" in line and "not run" in line
    trusted = {**record, "ais": None, "final": {**final, "khat_share": 0.2}}
    assert "How tight" not in reproduce_table.render([trusted])


def test_the_curves_follow_the_tables_under_a_heading_of_their_own_with_their_protocol():
    """The docs page includes the tables above ``## Learning curves`` and the curves below."""

    def point(epoch, log_px, k=500, points=500):
        return {"epoch": epoch, "log_px": log_px, "num_samples": k, "points": points}

    record = {"name": "v", "model": "M", "paper": -85.57, "source": "T (2018)", "data": "MNIST",
              "paper_epochs": 2000, "epochs_run": 50,
              "curve": [point(1, -120.0), point(50, -90.0)]}  # fmt: skip
    page = reproduce_table.render([record])
    tables, curves = page.split(f"\n{reproduce_table.CURVES}\n")
    assert "| M |" in tables and "### M: learning curve" not in tables
    assert "### M: learning curve\n\nK = 500 on the first 500 test images." in curves
    assert "| 50 | -90.00 |" in curves
    # A curve whose points differ in protocol names none; a row without a curve has no section.
    mixed = {**record, "curve": [point(1, -120.0), point(50, -90.0, points=1000)]}
    assert "test images." not in reproduce_table.render([mixed]).split("### M: learning curve")[1]
    assert reproduce_table.CURVES not in reproduce_table.render([{**record, "curve": []}])


def test_configs_are_valid_toml_with_a_comment_naming_the_paper():
    for entry in reproduce.REPRODUCTIONS.values():
        text = (reproduce.ROOT / entry.config).read_text()
        tomllib.loads(text)
        assert "departs" in text  # every config says where it departs from the paper


def test_the_curve_leaves_training_as_it_would_be_without_it(setting):
    entry, args, tmp = setting
    args.stop_at = 3
    reproduce.reproduce("tiny", args, entry)
    with_curve = load_run(tmp / "runs" / "tiny")
    overrides = [f"data.path={json.dumps(args.data)}", "train.epochs=3"]
    plain = train_run(entry.config, tmp / "plain", overrides=overrides, progress=False)
    assert len(json.loads((tmp / "results" / "tiny.json").read_text())["curve"]) == 3
    for (name, p), q in zip(
        plain.model.state_dict().items(), with_curve.model.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name


def test_the_projects_table_lists_every_row_whether_run_or_not():
    records = reproduce_table.read_records(reproduce_table.RESULTS, reproduce.REPRODUCTIONS)
    assert [r["name"] for r in records] == list(reproduce.REPRODUCTIONS)
    page = reproduce_table.render(records)
    for entry in reproduce.REPRODUCTIONS.values():
        assert entry.model in page


def test_a_budget_variant_row_trains_its_config_with_its_overrides_and_resumes_with_them(
    setting,
):
    entry, args, tmp = setting
    variant = dataclasses.replace(entry, overrides=("model.latent_dim=3",))
    args.stop_at = 1
    reproduce.reproduce("tiny-variant", args, variant)
    run_dir = tmp / "runs" / "tiny-variant"
    assert load_run(run_dir).spec.model.latent_dim == 3
    args.stop_at = 2
    reproduce.reproduce("tiny-variant", args, variant)
    run = load_run(run_dir)
    assert run.epoch == 2 and run.spec.model.latent_dim == 3
    record = json.loads((tmp / "results" / "tiny-variant.json").read_text())
    assert record["overrides"] == ["model.latent_dim=3"]
    assert [p["epoch"] for p in record["curve"]] == [1, 2]


def test_a_row_beyond_the_papers_is_compared_with_the_best_paper_figure_on_its_data(tmp_path):
    def record(name, paper, data, log_px=None, final=True):
        r = {
            "name": name,
            "model": f"model {name}",
            "metric": "log_px",
            "paper": paper,
            "source": f"source {name}",
            "data": data,
            "paper_epochs": 100,
            "epochs_run": 100,
        }
        if log_px is not None:
            point = {
                "epoch": 90,
                "log_px": log_px,
                "log_px_se": 0.2,
                "num_samples": 5000,
                "points": 10000,
                "checkpoint": "best",
            }
            r["final" if final else "curve"] = point if final else [point]
        return r  # fmt: skip

    records = [
        record("a", -86.0, "dynamic", -85.0),
        record("b", -83.0, "dynamic"),
        record("c", -80.0, "static"),  # better, but on other data
        record("beyond", None, "dynamic", -82.25),
    ]
    for r in records:
        (tmp_path / f"{r['name']}.json").write_text(json.dumps(r))
    assert reproduce_table.main(["--results", str(tmp_path)]) == 0
    line = next(
        line
        for line in (tmp_path / "README.md").read_text().splitlines()
        if line.startswith("| model beyond |")
    )
    cells = [cell.strip() for cell in line.split("|")[1:-1]]
    assert cells[2].startswith("— (source beyond; Δ against the best paper figure here, -83.00")
    assert "model b" in cells[2]
    assert cells[4] == "**-82.25 ± 0.20** (final)" and cells[5] == "+0.75"
    # Partial, its Δ is in parentheses like any partial log p(x).
    (tmp_path / "beyond.json").write_text(
        json.dumps(record("beyond", None, "dynamic", -82.25, final=False))
    )
    assert reproduce_table.main(["--results", str(tmp_path)]) == 0
    assert "| (+0.75) |" in (tmp_path / "README.md").read_text()


def test_a_row_beyond_the_papers_is_paired_with_its_base_rows_final_evaluation(setting):
    entry, args, tmp = setting
    beyond = dataclasses.replace(
        entry, paper=None, overrides=("model.latent_dim=3",), base="tiny", source="tiny + z3"
    )
    # Final before its base is: nothing to pair with yet.
    reproduce.reproduce("beyond", args, beyond)
    results = tmp / "results"
    assert "against_base" not in json.loads((results / "beyond.json").read_text())
    reproduce.reproduce("tiny", args, entry)
    runs = tmp / "runs"
    # Each final evaluation's per-point log p(x) is kept with the results.
    a, b = (
        torch.tensor(
            json.loads((runs / name / "evaluation-k30.json").read_text())["per_point"]["log_px"],
            dtype=torch.float64,
        )
        for name in ("beyond", "tiny")
    )
    for name, values in (("beyond", a), ("tiny", b)):
        kept = json.loads((results / "per_point" / f"{name}.json").read_text())
        assert kept["num_samples"] == 30 and kept["points"] == 30
        assert torch.equal(torch.tensor(kept["per_point"]["log_px"], dtype=torch.float64), values)
    # The base row's run directory is gone, and with it (here) the results' copy: the two
    # means are compared, unpaired.
    (runs / "tiny").rename(tmp / "tiny-run")
    (results / "per_point" / "tiny.json").rename(tmp / "tiny-per-point.json")
    reproduce.reproduce("beyond", args, beyond)
    record = json.loads((results / "beyond.json").read_text())
    base = json.loads((results / "tiny.json").read_text())["final"]
    against = record["against_base"]
    assert against["paired"] is False and against["points"] == 30
    assert against["difference"] == pytest.approx(
        record["final"]["log_px"] - base["log_px"], abs=1e-12
    )
    assert against["difference_se"] == pytest.approx(
        (record["final"]["log_px_se"] ** 2 + base["log_px_se"] ** 2) ** 0.5, abs=1e-12
    )
    assert "(unpaired)" in (results / "README.md").read_text()
    # The results' copy alone (the run directory still gone) pairs them point by point.
    (tmp / "tiny-per-point.json").rename(results / "per_point" / "tiny.json")
    reproduce.reproduce("beyond", args, beyond)
    against = json.loads((results / "beyond.json").read_text())["against_base"]
    assert against["base"] == "tiny" and against["points"] == 30 and against["paired"]
    assert against["difference"] == pytest.approx((a - b).mean().item(), abs=1e-9)
    assert against["difference_se"] == pytest.approx((a - b).std().item() / 30**0.5, abs=1e-9)
    table = (results / "README.md").read_text()
    assert "### Beyond the papers, against the row each one changes" in table
    assert f"{against['difference']:+.2f} ± {against['difference_se']:.2f} (paired)" in table
    # Its paper cell names the paper row it is measured against.
    assert "— (tiny + z3; Δ against the best paper figure here, -85.57" in table


def test_an_interim_evaluation_gives_a_partial_row_the_final_protocol(setting, capsys):
    entry, args, tmp = setting
    reproduce.REPRODUCTIONS["tiny"] = entry
    try:
        common = [
            "--data", args.data, "--runs", args.runs, "--results", args.results,
            "--final-samples", "30", "--curve-samples", "5", "--curve-points", "10",
        ]  # fmt: skip
        # Nothing to evaluate before the run has a checkpoint: one line, exit code 2.
        assert reproduce.main(["tiny", "--interim", *common]) == 2
        assert "has no checkpoint" in capsys.readouterr().err
        assert reproduce.main(["tiny", "--stop-at", "2", "--ais-points", "0", *common]) == 0
        results = tmp / "results"
        record = json.loads((results / "tiny.json").read_text())
        assert reproduce.main(["tiny", "--interim", *common]) == 0
        interim = json.loads((results / "interim" / "tiny.json").read_text())
        # The latest checkpoint, K = --final-samples on every test point; training untouched.
        assert interim["epoch"] == 2 and interim["checkpoint"] == "latest"
        assert interim["num_samples"] == 30 and interim["points"] == 30
        assert json.loads((results / "tiny.json").read_text()) == record
        run = load_run(tmp / "runs" / "tiny")
        assert run.epoch == 2
        expected = reproduce.evaluate_run(run, num_samples=30, write=False).summary()["log_px"]
        assert interim["log_px"] == pytest.approx(expected, abs=1e-6)
        table = (results / "README.md").read_text()
        assert (
            f"**{interim['log_px']:.2f} ± {interim['log_px_se']:.2f}** (partial, epoch 2)" in table
        )
        assert "K = 30, 30 points, epoch 2 (latest)" in table
        # Same protocol as the paper's: its Δ is not in parentheses.
        assert f"| {interim['log_px'] - entry.paper:+.2f} |" in table
        # Once final, the final evaluation replaces it, and a final run has no interim.
        assert reproduce.main(["tiny", "--ais-points", "0", *common]) == 0
        final = json.loads((results / "tiny.json").read_text())["final"]
        table = (results / "README.md").read_text()
        assert "(final)" in table and f"{final['log_px']:.2f}" in table
        assert "(latest)" not in table
        assert reproduce.main(["tiny", "--interim", *common]) == 2
        assert "is final" in capsys.readouterr().err
    finally:
        del reproduce.REPRODUCTIONS["tiny"]


def test_a_run_that_lost_its_checkpoint_restarts_only_when_asked_and_keeps_its_curve(
    setting, capsys
):
    entry, args, tmp = setting
    reproduce.REPRODUCTIONS["tiny"] = entry
    try:
        common = [
            "--data", args.data, "--results", args.results, "--final-samples", "30",
            "--curve-samples", "5", "--curve-points", "10", "--curve-every", "2",
            "--ais-points", "0",
        ]  # fmt: skip
        runs = ["--runs", args.runs]
        assert reproduce.main(["tiny", "--stop-at", "3", *runs, *common]) == 0
        assert reproduce.main(["tiny", "--interim", *runs, *common]) == 0
        results = tmp / "results"
        before = (results / "tiny.json").read_bytes()
        lost = json.loads(before)
        interim = json.loads((results / "interim" / "tiny.json").read_text())
        assert lost["epochs_run"] == 3 and interim["epoch"] == 3
        # The machine was replaced: a fresh runs folder, without the checkpoint.
        fresh = ["--runs", str(tmp / "fresh")]
        assert reproduce.main(["tiny", "--stop-at", "1", *fresh, *common]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "tiny: the results record epochs" in err
        assert "--restart" in err and str(tmp / "fresh") in err
        assert (results / "tiny.json").read_bytes() == before
        assert (results / "interim" / "tiny.json").is_file()
        assert not (tmp / "fresh").exists()
        # Checked for every row named before any trains: a new row listed first waits.
        reproduce.REPRODUCTIONS["other"] = entry
        assert reproduce.main(["other", "tiny", "--stop-at", "1", *fresh, *common]) == 2
        assert "tiny: the results record epochs" in capsys.readouterr().err
        assert not (tmp / "fresh").exists() and not (results / "other.json").exists()

        assert reproduce.main(["tiny", "--stop-at", "1", "--restart", *fresh, *common]) == 0
        record = json.loads((results / "tiny.json").read_text())
        # The new run has its own history and curve, from epoch 0.
        assert record["epochs_run"] == 1 and record["training"] == "partial"
        assert [h["epoch"] for h in record["history"]] == [1]
        assert [p["epoch"] for p in record["curve"]] == [1]
        # The earlier run is kept whole, its interim evaluation with it.
        (earlier,) = record["earlier_runs"]
        for key in ("epochs_run", "train_seconds", "history", "curve", "device", "command"):
            assert earlier[key] == lost[key], key
        assert earlier["interim"] == interim and "no checkpoint" in earlier["lost"]
        assert not (results / "interim" / "tiny.json").exists()
        # Until the new run passes it, the row shows the earlier run's evaluation.
        table = (results / "README.md").read_text()
        shown = f"**{interim['log_px']:.2f} ± {interim['log_px_se']:.2f}**"
        assert f"{shown} (partial, epoch 3 of an earlier run, lost at epoch 3)" in table
        assert "1 / 4 (an earlier run: 3)" in table
        assert f"| {reproduce_table._hours(lost['train_seconds'])} (the earlier run) |" in table
        assert "learning curve of earlier run 1" in table
        # Lost again before it passed the first: the row still shows the run that got furthest.
        shutil.rmtree(tmp / "fresh")
        assert reproduce.main(["tiny", "--stop-at", "1", "--restart", *fresh, *common]) == 0
        record = json.loads((results / "tiny.json").read_text())
        assert [r["epochs_run"] for r in record["earlier_runs"]] == [3, 1]
        table = (results / "README.md").read_text()
        assert f"{shown} (partial, epoch 3 of an earlier run, lost at epoch 3)" in table
        assert "learning curve of earlier run 2" in table
        # Resuming the new run needs no --restart; once past, the row is the new run's.
        assert reproduce.main(["tiny", *fresh, *common]) == 0
        record = json.loads((results / "tiny.json").read_text())
        assert record["training"] == "finished" and len(record["earlier_runs"]) == 2
        assert [h["epoch"] for h in record["history"]] == [1, 2, 3, 4]
        table = (results / "README.md").read_text()
        assert "(final)" in table and "of an earlier run" not in table
        assert f"{record['final']['log_px']:.2f}" in table
    finally:
        del reproduce.REPRODUCTIONS["tiny"]
        reproduce.REPRODUCTIONS.pop("other", None)


def test_an_unreadable_file_of_a_run_directory_is_named_with_its_own_remedy(tmp_path):
    results, run_dir = tmp_path / "results", tmp_path / "runs" / "x"
    results.mkdir()
    run_dir.mkdir(parents=True)
    (results / "x.json").write_text(json.dumps({"name": "x", "epochs_run": 2}))
    (run_dir / reproduce.RUN_RECORD).write_text("{")
    # The run's copy of the results is not in git: deleting it falls back on the checkout's.
    with pytest.raises(reproduce_table.ResultsError) as e:
        reproduce.read_results(results, "x", run_dir)
    assert str(run_dir / reproduce.RUN_RECORD) in str(e.value)
    assert "delete it, and the results file of the checkout is used" in str(e.value)
    assert "git" not in str(e.value)
    (run_dir / reproduce.RUN_RECORD).unlink()
    assert reproduce.read_results(results, "x", run_dir)["epochs_run"] == 2
    # A run's evaluation is written again by `pyrovae evaluate`.
    (run_dir / "evaluation-k30.json").write_text("[]")
    record = {"final": {"method": "is", "num_samples": 30}}
    with pytest.raises(reproduce_table.ResultsError, match="pyrovae evaluate RUN_DIR"):
        reproduce._khat_share(record, run_dir)


def test_pairing_with_an_evaluation_without_per_point_figures_names_the_file(tmp_path):
    good, bad = tmp_path / "a.json", tmp_path / "b.json"
    good.write_text(json.dumps({"per_point": {"log_px": [-1.0, -2.0, -4.0]}}))
    bad.write_text(json.dumps({"log_px": -2.0}))
    with pytest.raises(reproduce_table.ResultsError, match="b.json has no per-point log p"):
        reproduce._paired(good, bad)
    bad.write_text(json.dumps({"per_point": {"log_px": [-2.0, -2.0]}}))
    paired = reproduce._paired(good, bad)
    assert paired["points"] == 2 and paired["difference"] == pytest.approx(0.5)


def test_a_partial_row_beyond_the_papers_is_read_against_its_base_rows_curve(tmp_path):
    def point(epoch, log_px, points=500):
        return {"epoch": epoch, "log_px": log_px, "log_px_se": 1.0, "num_samples": 500,
                "points": points}  # fmt: skip

    common = {"metric": "log_px", "source": "s", "data": "dynamic", "paper_epochs": 100}
    base = {**common, "name": "base", "model": "model base", "paper": -86.0,
            "curve": [point(10, -100.0), point(50, -90.0), point(100, -85.0, points=1000)]}  # fmt: skip
    beyond = {**common, "name": "beyond", "model": "model beyond", "paper": None,
              "base": "base", "curve": [point(10, -97.5), point(30, -93.0), point(100, -84.0)]}  # fmt: skip
    for r in (base, beyond):
        (tmp_path / f"{r['name']}.json").write_text(json.dumps(r))
    assert reproduce_table.main(["--results", str(tmp_path)]) == 0
    rows = [
        line
        for line in (tmp_path / "README.md").read_text().splitlines()
        if line.startswith("| model beyond | model base |")
    ]
    # Epoch 30 is not in the base's curve and epoch 100 has another protocol there: the
    # latest epoch both curves have with the same protocol is 10.
    assert rows == ["| model beyond | model base | 10 | -100.00 ± 1.00 | -97.50 ± 1.00 | +2.50 |"]
    # Once the comparison of the final evaluations is recorded, it replaces the curves'.
    beyond["final"] = {**point(90, -83.0, points=10000), "checkpoint": "best"}
    beyond["against_base"] = {"base": "base", "points": 10000, "other_same_points": -84.0,
                              "difference": 1.0, "difference_se": 0.1}  # fmt: skip
    (tmp_path / "beyond.json").write_text(json.dumps(beyond))
    assert reproduce_table.main(["--results", str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "| +1.00 ± 0.10 (paired) |" in text
    assert "| model beyond | model base | 10 |" not in text
