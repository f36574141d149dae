"""The run report and run comparison, end to end on tiny digits runs."""

from __future__ import annotations

import base64
import dataclasses
import re
import shutil

import pytest
import torch

from pyrovae.inference.cli import main
from pyrovae.inference.errors import PyrovaeError
from pyrovae.inference.experiment.runs import Checkpoint, load_run
from pyrovae.inference.reporting.compare import compare_runs, format_comparison
from pyrovae.inference.reporting.report import write_report

SECTIONS = (
    "Verdict: how well does q(z) match the prior?",
    "Summary",
    "Training curves",
    "Latent units",
    "Reconstructions",
    "Samples: prior against aggregate posterior",
    "Latent traversals",
    "Latent space",
    "Aggregate posterior against the prior",
    "Importance sampling: Pareto k̂",
)
FAST = {"limit": 40, "num_samples": 30, "num_latent_samples": 4, "aggregate": False}


def tiny_run(path, latent_dim: int = 2):
    code = main(
        [
            "train",
            "--out",
            str(path),
            "--epochs",
            "2",
            "--set",
            'model.likelihood={ kind = "bernoulli" }',
            "--set",
            'data.binarize="dynamic"',
            "--set",
            f"model.latent_dim={latent_dim}",
            "--set",
            "model.decoder.hidden=[16]",
            "--set",
            "guide.encoder.hidden=[16]",
            "--no-progress",
        ]
    )
    assert code == 0
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("report") / "run")


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("report") / "wide", latent_dim=3)


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_report_is_one_self_contained_page(run_dir):
    path = write_report(run_dir, **FAST)
    assert path == run_dir / "report.html"
    page = path.read_text()
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page
    # Every image is inline; nothing is fetched from elsewhere.
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    assert "<link" not in page and "<script" not in page
    images = embedded_pngs(page)
    assert len(images) >= 9
    assert all(image[:8] == b"\x89PNG\r\n\x1a\n" for image in images)
    assert "at most log N = 3.69" in page  # the mutual information's bound for N = 40
    assert "lower bound (critic)" not in page  # aggregate=False: no classifier trained
    assert "--no-aggregate-kl" in page  # the verdict says where the lower bound comes from
    # The verdict comes first, then the prior's samples beside the aggregate posterior's.
    order = [page.index(f"<h2>{title}</h2>") for title in SECTIONS[:3]]
    assert order[0] < page.index("<h2>Samples: prior against aggregate posterior</h2>") < order[1]


def test_the_report_brackets_the_marginal_kl(run_dir, tmp_path):
    """By default the critic's lower bound sits under the N-point marginal KL, in the verdict
    and the summary; for a report of the training split the critic trains on the validation
    split."""
    for split in ("test", "train"):
        out = tmp_path / f"{split}.html"
        code = main(
            ["report", str(run_dir), "--split", split, "--limit", "200"]
            + ["-k", "30", "-o", str(out)]
        )
        assert code == 0
        page = out.read_text()
        upper = float(re.search(r"marginal KL\(q\(z\) ‖ p\(z\)\)</td><td>([-\d.]+)", page)[1])
        lower, se = map(
            float,
            re.search(r"lower bound \(critic\)</td><td>([-\d.]+) ± ([\d.]+)", page).groups(),
        )
        # A 2-d latent space and 200 points: the N-point figure, an upper bound in
        # expectation, is nearly the truth, and the critic comes within 0.3 nats of it from
        # below (up to 3 standard errors above: its own noise).
        assert upper - 0.3 < lower < upper + 3 * se and 0 < se < 0.2, (split, lower, se, upper)
        assert "site z" in page and "Donsker-Varadhan" in page
        verdict = re.search(r"<b>([-\d.]+) ≤ KL\(q\(z\) ‖ p\(z\)\) ≤ ([-\d.]+)</b>", page)
        assert verdict is not None and float(verdict[2]) == pytest.approx(upper, abs=0.01)


def test_the_verdict_warns_of_unreliable_estimates_and_shows_the_runs_evaluation(run_dir, tmp_path):
    """A banner when more than a tenth of the points have k̂ > 0.7; the run's own
    evaluation.json is quoted beside the report's estimate."""
    from types import SimpleNamespace

    from pyrovae.inference.reporting.report import KHAT_BANNER, _verdict

    run = load_run(run_dir)
    summary = {"num_points": 40, "marginal_kl": 0.8, "kl": 4.0, "mutual_information": 3.0,
               "num_samples": 30, "log_px": -30.0}  # fmt: skip
    for share, banner in ((KHAT_BANNER / 2, False), (2 * KHAT_BANNER, True)):
        diag = SimpleNamespace(summary=lambda share=share: {**summary, "khat_bad_fraction": share})
        page = _verdict(run, diag, "test", None)
        assert ('class="banner"' in page) is banner
        assert "KL(q(z) ‖ p(z)) ≤ 0.80</b>" in page and "at most 0.80 (20%)" in page
    assert "The run's evaluation" not in page
    page = _verdict(
        run,
        diag,
        "test",
        None,
        "No lower bound: the critic trains on the train split, which has 3 points (need at least 2 training, 2 validation).",
    )
    assert "which has 3 points" in page and "--no-aggregate-kl" not in page
    assert main(["evaluate", str(run_dir), "-k", "20", "--limit", "30"]) == 0
    page = _verdict(run, diag, "test", None)
    saved = re.search(r"The run's evaluation.*?<b>([-\d.]+)</b> nats per point on 30 points", page)
    assert saved is not None and "K = 20" in page
    (run_dir / "evaluation.json").unlink()


def test_the_bracket_of_a_semi_supervised_run_uses_unlabelled_rows(tmp_path):
    """M2's training rows include labelled ones, a plate of their own; the critic's pool
    drops their labels, so q(z) is that of unlabelled points, like the report's."""
    run = tmp_path / "m2"
    common = ["--epochs", "1", "--set", "model.latent_dim=2", "--no-progress"]
    assert main(["train", "--out", str(run), "--set", 'model.labels="latent"', *common]) == 0
    out = tmp_path / "m2.html"
    args = ["report", str(run), "--limit", "50", "-k", "30", "-o", str(out)]
    assert main(args) == 0
    assert re.search(r"lower bound \(critic\)</td><td>\d+\.\d+ ± ", out.read_text())


def test_report_projects_wider_latents_and_skips_images_for_vectors(wide_dir, tmp_path):
    run = load_run(wide_dir)
    vectors = dataclasses.replace(
        run, checkpoint=dataclasses.replace(run.checkpoint, image_shape=())
    )
    page = write_report(vectors, path=tmp_path / "r.html", **FAST).read_text()
    assert "not grey or RGB images" in page
    assert "<h2>Reconstructions</h2>" not in page
    assert "principal" in page  # a 3-D latent space is drawn through PCA
    assert len(embedded_pngs(page)) >= 5


def test_report_rejects_an_unknown_split(run_dir):
    with pytest.raises(PyrovaeError, match="unknown split"):
        write_report(run_dir, "holdout", **FAST)


def test_a_run_compared_with_itself_differs_by_exactly_zero(run_dir):
    comparison = compare_runs([run_dir, run_dir], limit=30, num_samples=30, num_latent_samples=4)
    first, second = comparison.rows
    assert second["delta_log_px"] == 0.0 and second["delta_log_px_se"] == 0.0
    assert torch.equal(comparison.log_px[0], comparison.log_px[1])
    assert first["log_px"] == second["log_px"] and first["elbo"] == second["elbo"]
    assert comparison.log_px.shape == (2, 30)
    text = format_comparison(comparison)
    assert "baseline" in text and "+0.000 ± 0.000" in text and str(run_dir) in text


@pytest.mark.parametrize("limit", [30, 150])  # one block, and two blocks of 100 points
def test_evaluate_compare_and_report_print_the_same_log_px(run_dir, tmp_path, limit):
    """The same run, K, seed and points give the same per-point log p(x) in all three."""
    from pyrovae.inference.experiment.evaluation import evaluate_run

    evaluation = evaluate_run(run_dir, num_samples=30, limit=limit, seed=3, write=False)
    comparison = compare_runs([run_dir], limit=limit, num_samples=30, num_latent_samples=4, seed=3)
    assert torch.equal(evaluation.result.log_px, comparison.log_px[0])
    report = write_report(
        run_dir, path=tmp_path / "report.html", limit=limit, num_samples=30, seed=3,
        num_latent_samples=4,
    )  # fmt: skip
    assert f"{evaluation.result.log_px.mean().item():.3f} ± " in report.read_text()


def test_paired_difference_is_the_mean_of_per_point_differences(run_dir, wide_dir):
    comparison = compare_runs([run_dir, wide_dir], limit=30, num_samples=30, num_latent_samples=4)
    difference = comparison.log_px[1] - comparison.log_px[0]
    row = comparison.rows[1]
    assert row["delta_log_px"] == pytest.approx(difference.mean().item())
    assert row["delta_log_px_se"] == pytest.approx(difference.std().item() / 30**0.5)
    assert row["delta_log_px"] == pytest.approx(row["log_px"] - comparison.rows[0]["log_px"])


def test_runs_on_different_data_are_refused(run_dir, tmp_path):
    other = tmp_path / "static"
    shutil.copytree(run_dir, other)
    spec = (other / "spec.toml").read_text()
    edited = spec.replace('binarize = "dynamic"', 'binarize = "static"')
    (other / "spec.toml").write_text(edited)
    # The same weights, recorded as trained on statically binarized data.
    checkpoint = Checkpoint.load(other)
    checkpoint.spec = edited
    checkpoint.save(other)
    with pytest.raises(PyrovaeError, match="other data") as error:
        compare_runs([run_dir, other], limit=10, num_samples=10)
    assert "\n" not in str(error.value)


def test_unit_charts_label_at_most_about_twenty_dimensions():
    from pyrovae.inference.reporting.plots import units_figure

    fig = units_figure(torch.rand(50), torch.rand(10, 50), 0.01)
    for ax in fig.axes:
        ticks = ax.get_xticks()
        assert len(ticks) <= 25 and ticks[0] == 0  # 50 labels would run into each other
    assert len(units_figure(torch.rand(8), None, 0.01).axes[0].get_xticks()) == 8


def test_unlabelled_latents_draw_without_a_colormap_warning(recwarn):
    from pyrovae.inference.reporting.plots import latent_scatter_figure

    latent_scatter_figure(torch.randn(30, 2), None, ("z0", "z1"))
    assert not [w for w in recwarn if "cmap" in str(w.message) or "colormapping" in str(w.message)]


def test_a_one_epoch_run_has_whole_epoch_ticks_and_labelled_values():
    from pyrovae.inference.reporting.plots import training_curves_figure

    history = [{"epoch": 1, "train_elbo": -17.7, "validation_elbo": -13.2, "validation_kl": 0.11}]
    fig = training_curves_figure(history)
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)  # no 0.96 ... 1.04 axis
    labels = [t.get_text() for t in fig.axes[0].texts] + [t.get_text() for t in fig.axes[1].texts]
    assert "-13.20" in labels and "0.11" in labels


def test_the_decoded_grid_of_a_2d_latent_space_has_legible_square_tiles():
    from pyrovae.inference.reporting.plots import latent_scatter_figure, separated_grid
    from pyrovae.inference.reporting.sections import GRID_STEPS

    tiles = torch.rand(GRID_STEPS * GRID_STEPS, 64)  # 8x8 digits, the smallest images we ship
    grid = separated_grid(tiles, (8, 8), GRID_STEPS)
    fig = latent_scatter_figure(torch.randn(30, 2), None, ("z0", "z1"), grid, (-3, 3, -3, 3))
    fig.set_dpi(100)
    fig.canvas.draw()
    box = fig.axes[1].get_window_extent()
    assert abs(box.width - box.height) < 2  # square, like the scatter it maps
    assert box.width / GRID_STEPS >= 40  # pixels per decoded digit at 100 dpi (15 tiles: 25)


def test_plotting_leaves_the_callers_matplotlib_alone(tmp_path):
    """No backend switch, no pyplot figures: a notebook's own plotting is untouched."""
    import subprocess
    import sys

    code = (
        "import sys, torch, matplotlib\n"
        "matplotlib.use('svg')\n"
        "from pyrovae.inference.reporting import plots\n"
        f"plots.save_image_grid(torch.rand(4, 64), (8, 8), {str(tmp_path / 'grid.png')!r})\n"
        "plots.figure_to_base64(plots.khat_figure(torch.rand(50), 0.7))\n"
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "False"]
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_a_long_unit_table_folds_and_captions_name_only_the_panels_drawn():
    from pyrovae.guides import AmortizedGuide, DiagonalNormal
    from pyrovae.inference.reporting.diagnostics import diagnose
    from pyrovae.inference.reporting.sections import FOLD_ROWS, units_section
    from pyrovae.model import VAE, Bernoulli, Decoder, StandardNormal

    torch.manual_seed(0)
    dims = FOLD_ROWS + 2
    vae = VAE(StandardNormal(dims), Decoder(dims, 8, [8]), Bernoulli())
    guide = AmortizedGuide(DiagonalNormal(8, dims, hidden=[8]))
    x = torch.bernoulli(torch.full((20, 8), 0.5))
    html = units_section(diagnose(vae, guide, x, num_samples=0, num_latent_samples=2))
    assert f"<details><summary>{dims} dimensions," in html
    assert "Left: how much" in html and "Right: the KL" in html  # both panels drawn


def test_histogram_ticks_are_legible():
    """Tick labels of at least 10 points, and few enough per axis not to collide."""
    from pyrovae.inference.reporting.plots import latent_histograms_figure

    samples = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    fig = latent_histograms_figure(
        samples, range(8), [f"z{d}" for d in range(8)], prior_samples=torch.randn(500, 8)
    )
    fig.canvas.draw()
    for ax in fig.axes[:8]:
        labels = [t for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]
        assert labels and min(t.get_fontsize() for t in labels) >= 10
        low, high = ax.get_xlim()
        shown = [
            t for t in ax.get_xticklabels() if t.get_text() and low <= t.get_position()[0] <= high
        ]
        assert len(shown) <= 5
