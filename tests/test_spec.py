"""The declarative spec: defaults, overrides, round trips and errors."""

from __future__ import annotations

import pytest

from pyrovae.inference import PyrovaeError, Spec, build, load_spec
from pyrovae.inference.experiment.spec import spec_from_dict


def test_default_spec_matches_the_documented_contract():
    spec = load_spec()
    assert spec == Spec()
    assert spec.data.name == "digits" and spec.data.binarize == "none"
    assert spec.model.latent_dim == 16
    assert spec.model.prior == {"kind": "standard_normal"}
    assert spec.model.likelihood == {"kind": "gaussian", "learn_scale": True}
    # No hidden sizes: each network takes its own default (MLP 256-256, conv 32-64 channels).
    assert spec.model.decoder == {"kind": "feedforward", "network": "mlp", "activation": "relu"}
    assert spec.guide.encoder == {"kind": "diagonal_normal", "network": "mlp", "activation": "relu"}
    assert spec.train.objective == {"kind": "elbo", "num_particles": 1}
    assert (spec.train.epochs, spec.train.batch_size, spec.train.lr, spec.train.seed) == (
        50,
        32,
        1e-3,
        0,
    )


def test_file_and_overrides(tmp_path):
    file = tmp_path / "s.toml"
    file.write_text(
        '[model]\nlatent_dim = 4\ndecoder = { kind = "feedforward", hidden = [8] }\n[train]\nepochs = 3\n'
    )
    spec = load_spec(
        file,
        [
            "model.latent_dim=2",
            'model.prior.kind="standard_normal"',
            "data.name=mnist",
            "train.lr=0.01",
        ],
    )
    assert spec.model.latent_dim == 2
    assert spec.model.decoder == {
        "kind": "feedforward",
        "network": "mlp",
        "hidden": [8],
        "activation": "relu",
    }
    assert spec.data.name == "mnist"  # a bare word that is not TOML is a string
    assert spec.train.lr == 0.01 and spec.train.epochs == 3


def test_changing_kind_starts_the_table_afresh():
    spec = load_spec(None, ['model.likelihood={ kind = "laplace", scale = 0.1 }'])
    assert spec.model.likelihood == {"kind": "laplace", "scale": 0.1}


def test_round_trip_through_toml(tmp_path):
    spec = load_spec(None, ["model.latent_dim=3", "train.grad_clip=5.0"])
    file = tmp_path / "spec.toml"
    file.write_text(spec.to_toml())
    assert load_spec(file) == spec


def test_build_gives_matching_shapes():
    model, guide = build(load_spec(None, ["model.latent_dim=3"]), features=64, image_shape=(8, 8))
    assert model.sample(2).shape == (2, 64)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model.foo=1",
            "unknown spec key 'model.foo'; valid under model: latent_dim, prior, decoder, likelihood",
        ),
        ("nosection.a=1", "unknown spec key 'nosection'"),
        ('model.prior.kind="nope"', "unknown model.prior.kind 'nope'; valid: standard_normal"),
        (
            "model.decoder.hiden=[3]",
            "unknown option model.decoder.hiden for kind 'feedforward'; valid: hidden, activation, network",
        ),
        ("train.objective.particles=2", "unknown option train.objective.particles"),
        ('train.epochs="x"', "train.epochs must be of type int"),
        ("model.prior=3", "model.prior must be of type table"),
        ("junk", "must look like KEY=VALUE"),
    ],
)
def test_bad_spec_is_one_clear_error(override, message):
    with pytest.raises(PyrovaeError) as info:
        load_spec(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_values_surface_from_constructors():
    spec = load_spec(None, ['model.likelihood={ kind = "gaussian", scale = -1.0 }'])
    with pytest.raises(
        PyrovaeError, match=r"model.likelihood \(kind 'gaussian'\): scale must be positive"
    ):
        build(spec, features=4)


def test_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nlatent_dim = ")
    with pytest.raises(PyrovaeError, match="is not valid TOML"):
        load_spec(bad)
    with pytest.raises(PyrovaeError, match="does not exist"):
        load_spec(tmp_path / "absent.toml")
    with pytest.raises(PyrovaeError, match="spec must be a table"):
        spec_from_dict([1])


def test_each_network_has_its_own_default_sizes():
    from pyrovae.inference import build

    spec = load_spec(None, ['guide.encoder.network="conv"', 'model.decoder.network="conv"'])
    model, guide = build(spec, 64, (8, 8))
    convs = [m.out_channels for m in guide.encoder.net if hasattr(m, "out_channels")]
    assert convs == [32, 64]  # not 256-channel convolutions inherited from the MLP default
    mlp_model, _ = build(load_spec(), 64, (8, 8))
    assert [m.out_features for m in mlp_model.decoder.net if hasattr(m, "out_features")] == [
        256,
        256,
        64,
    ]


def test_data_limit_trains_on_a_subset():
    from pyrovae.inference.experiment.runs import load_run_data

    full = load_run_data(load_spec())
    part = load_run_data(load_spec(None, ["data.limit=100"]))
    assert len(part.train) == 100 and len(full.train) > 1000
    assert part.validation.shape == full.validation.shape


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (['data.path="/data/mnist"'], "data.path does not apply to data.name = 'digits'"),
        (["data.labels_per_class=10"], r"data.labels_per_class applies only to a semi-supervised"),
        (['data.name="mnist"', "data.labelled_share=0.1"], "data.labelled_share applies only"),
    ],
)
def test_keys_that_would_have_no_effect_are_refused(overrides, message):
    with pytest.raises(PyrovaeError, match=message):
        load_spec(None, overrides)


def test_keys_that_apply_are_accepted():
    load_spec(None, ['data.name="mnist"', 'data.path="/data/mnist"'])
    load_spec(
        None,
        [
            'data.name="mnist"',
            'model.labels="latent"',
            "data.labels_per_class=10",
            "data.labelled_share=0.1",
        ],
    )
