"""Options are declared once, by the parts' constructors; config, validation and CLI flags follow."""

import json

import pytest
import torch

import pvae
from pvae.cli import _parser, main
from pvae.config import PART_REGISTRIES, Training, section_options
from pvae.options import Option, Part
from pvae.priors import PRIORS, Prior


def _all_options():
    for section in PART_REGISTRIES:
        for part, options in section_options(section).items():
            for option in options.values():
                yield section, part, option
    for option in Training.options().values():
        yield "training", "training", option


@pytest.mark.parametrize("section, part, option", list(_all_options()),
                         ids=lambda v: getattr(v, "name", v))
def test_every_declared_option_has_help_a_type_and_a_default_of_that_type(section, part, option):
    assert option.help, f"{section} {part!r}: option {option.name!r} has no ':param {option.name}:' line"
    assert option.coerce(option.default, "test") == option.default
    # a command-line string of the default parses back to the default
    text = ",".join(map(str, option.default)) if isinstance(option.default, tuple) else str(option.default)
    assert option.coerce(text, "test") == option.default


def test_an_option_name_means_one_type_within_a_section():
    for section in PART_REGISTRIES:
        seen = {}
        for part, options in section_options(section).items():
            for name, option in options.items():
                assert seen.setdefault(name, option.type) == option.type, (section, part, name)


def test_every_option_has_a_command_line_flag():
    train = next(a for a in _parser()._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    flags = {s for action in train._actions for s in action.option_strings}
    for section, part, option in _all_options():
        expected = option.flag if section == "training" else f"--{section}-{option.name.replace('_', '-')}"
        assert expected in flags, expected


def test_a_new_option_is_one_keyword_argument_in_one_place(tmp_path, capsys):
    """Register a prior whose constructor has a new documented keyword: the config validates and
    stores it, the command line has a flag for it, and the built part receives it."""

    class ScaledNormalPrior(Prior):
        """N(0, s^2 I).

        :param float prior_scale: the standard deviation s.
        """

        def __init__(self, latent_dim: int, prior_scale: float = 1.0):
            super().__init__(latent_dim)
            self.register_buffer("scale", torch.full((latent_dim,), float(prior_scale)))

        def forward(self):
            import pyro.distributions as dist

            return dist.Normal(torch.zeros_like(self.scale), self.scale).to_event(1)

    PRIORS.register("scaled-normal")(ScaledNormalPrior)
    try:
        assert PRIORS.options("scaled-normal") == {
            "prior_scale": Option("prior_scale", float, 1.0, "the standard deviation s.")}
        config = pvae.RunConfig(prior={"name": "scaled-normal", "prior_scale": "2.5"})  # strings parse
        assert config.prior == Part("scaled-normal", prior_scale=2.5)
        vae = pvae.build_vae(config, 64)
        assert torch.all(vae.prior.scale == 2.5)
        with pytest.raises(pvae.UsageError, match="option 'prior_scale' must be a number"):
            pvae.RunConfig(prior={"name": "scaled-normal", "prior_scale": "wide"})
        run = tmp_path / "run"
        assert main(["train", "--prior", "scaled-normal", "--prior-prior-scale", "0.5", "--epochs", "1",
                     "--latent-dim", "2", "--hidden", "16", "--run-dir", str(run), "--no-progress"]) == 0
        assert json.loads((run / "config.json").read_text())["prior"] == {"name": "scaled-normal", "prior_scale": 0.5}
    finally:
        PRIORS._entries.pop("scaled-normal")


def test_options_are_checked_against_the_chosen_part_with_the_fix_named():
    with pytest.raises(pvae.UsageError, match="prior 'mog' does not take pseudo_inputs; it takes num_components"):
        pvae.RunConfig(prior={"name": "mog", "pseudo_inputs": 3})
    with pytest.raises(pvae.UsageError, match="guide 'iaf': option 'num_flows' must be an integer"):
        pvae.RunConfig(guide={"name": "iaf", "num_flows": 1.5})
    with pytest.raises(pvae.UsageError, match="scale_mode' must be one of fixed, global, per-dim"):
        pvae.RunConfig(likelihood={"name": "gaussian", "scale_mode": "per-pixel"})
    with pytest.raises(pvae.UsageError, match="training does not take epoch; it takes epochs"):
        pvae.RunConfig(training={"epoch": 3})
    with pytest.raises(pvae.UsageError, match="num_flows must be a positive integer"):
        pvae.build_vae(pvae.RunConfig(guide={"name": "iaf", "num_flows": 0}), 64)


def test_replace_changes_options_of_the_current_part_and_a_new_name_starts_from_defaults():
    config = pvae.RunConfig(prior=Part("vamp", pseudo_inputs=7), training={"epochs": 3})
    assert config.replace(prior={"pseudo_inputs": 9}).prior == Part("vamp", pseudo_inputs=9)
    assert config.replace(prior="mog").prior == Part("mog", num_components=10)
    assert config.replace(training={"lr": 0.01}).training == Training(epochs=3, lr=0.01)
    assert pvae.RunConfig.from_dict(config.to_dict()) == config
    assert json.loads(json.dumps(config.to_dict()))["prior"] == {"name": "vamp", "pseudo_inputs": 7}


def test_every_registered_part_is_exported_at_the_top_level():
    for section, registry in PART_REGISTRIES.items():
        for name in registry.names():
            entry = registry.get(name)
            if isinstance(entry, type):
                assert getattr(pvae, entry.__name__) is entry, f"pvae.{entry.__name__} ({section} {name!r})"
    assert callable(pvae.ais) and callable(pvae.bdmc)
    assert not [n for n in pvae.__all__ if n.startswith("_")]


def test_review_findings_stay_fixed(tmp_path, monkeypatch, capsys):
    """Positive integers everywhere (num_particles, latent_dim given as text), patience 'off'/0
    (pvae 0.1's spellings), a flat 0.1 config without 'objective' keeps 0.1's default (elbo), a
    relative file path is stored absolutely, and --model autoencoder refuses options of the parts
    it sets."""
    with pytest.raises(pvae.UsageError, match="num_particles must be a positive integer"):
        pvae.make_objective("iwae", 0)
    with pytest.raises(pvae.UsageError, match="num_particles must be a positive integer"):
        pvae.RunConfig(objective={"name": "iwae", "num_particles": 0})
    with pytest.raises(pvae.UsageError, match="latent_dim must be a positive integer"):
        pvae.RunConfig.from_dict({"version": 2, "latent_dim": "abc"})
    assert pvae.RunConfig(training={"patience": "off"}).training.patience is None
    assert pvae.RunConfig(training={"patience": 0}).training.patience is None
    assert pvae.RunConfig.from_dict({"latent_dim": 3}).objective.name == "elbo"  # 0.1's default
    monkeypatch.chdir(tmp_path)
    config = pvae.RunConfig(dataset=Part("file", path="mine.npy"))
    assert config.dataset["path"] == str(tmp_path / "mine.npy")
    assert main(["train", "--model", "autoencoder", "--loss", "mse", "--likelihood-scale", "2",
                 "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "conflicts with --likelihood-scale" in capsys.readouterr().err
    with pytest.raises(pvae.UsageError, match="'gated' is a gated dense layer, for MLPs only"):
        pvae.RunConfig(dataset="binarized-mnist", net={"name": "conv", "activation": "gated"})
