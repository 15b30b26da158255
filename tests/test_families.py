"""Model families (issue 25): hierarchical, conditional, semi-supervised (M2) and discrete-latent
VAEs as Pyro programs built from parts, scored by the one engine, trained by fit and the CLI."""

from __future__ import annotations

import json

import pyro
import pyro.distributions as dist
import pytest
import torch

import pvae
from pvae.cli import main
from pvae.config import RunConfig
from pvae.families import balanced_labelled_subset, build_program, model_data, resolve
from pvae.families.base import one_hot
from pvae.families.conditional import ConditionalVAE
from pvae.families.hierarchical import HierarchicalVAE
from pvae.families.labels import CategoricalVAE
from pvae.inference import engine
from pvae.parts.likelihoods import BernoulliLikelihood, GaussianLikelihood
from pvae.parts.priors import PRIORS
from pvae.testing import mc_tolerance

TINY = ["--latent-dim", "2", "--hidden", "16", "--epochs", "1", "--no-progress"]


def _binary(n=12, d=6, seed=0):
    return (torch.rand(n, d, generator=torch.Generator().manual_seed(seed)) < 0.4).float()


def _hvae(variant, prior="standard-normal", levels=2, d=6):
    torch.manual_seed(0)
    make_prior = (lambda dim, g: PRIORS.build(prior, latent_dim=dim, guide=g))
    return HierarchicalVAE(BernoulliLikelihood(d), (3,) * levels, make_prior, (8,), "tanh", variant)


# ------------------------------------------------------------------------------ hierarchies
@pytest.mark.parametrize("variant", ["tomczak", "ladder"])
@pytest.mark.parametrize("prior", ["standard-normal", "vamp"])
def test_hierarchy_log_weight_is_the_sum_of_its_documented_factors(variant, prior):
    """log w = log p(z2) + log p(z1|z2) + log p(x|.) - log q(z2|x) - log q(z1|x, z2), every factor
    computed here from the networks (fails if a level is dropped from the decoder, the lower guide
    ignores the level above, or the ladder's precision weighting is wrong)."""
    hvae, x = _hvae(variant, prior), _binary()
    torch.manual_seed(1)
    with torch.no_grad():
        s = engine.log_weights(hvae, x, 5)
    z1, z2 = s.latents["z1"], s.latents["z2"]
    with torch.no_grad():
        log_p = hvae.prior().log_prob(z2) + hvae.transition(1, z2).log_prob(z1)
        decoder_in = torch.cat([z1, z2], -1) if variant == "tomczak" else z1
        log_lik = dist.Bernoulli(logits=hvae.decoder(decoder_in)).log_prob(x).sum(-1)
        if variant == "tomczak":
            q2 = hvae.top_guide(x)
            loc, pre = hvae.lower_guides[0](torch.cat([x.expand(5, *x.shape), z2], -1)).split(3, -1)
            q1 = dist.Normal(loc, torch.nn.functional.softplus(pre) + 1e-4).to_event(1)
        else:
            (l1, s1), (l2, s2) = hvae._bottom_up(x)
            q2 = dist.Normal(l2, s2).to_event(1)
            p1 = hvae.transition(1, z2).base_dist
            var = 1 / (s1 ** -2 + p1.scale ** -2)
            q1 = dist.Normal(var * (l1 / s1 ** 2 + p1.loc / p1.scale ** 2), var.sqrt()).to_event(1)
        log_q = q2.log_prob(z2) + q1.log_prob(z1)
    assert torch.allclose(s.log_weight, log_lik + log_p - log_q, atol=1e-4)
    assert torch.allclose(s.log_likelihood, log_lik, atol=1e-4)


def test_a_vampprior_on_the_top_level_encodes_its_pseudo_inputs_with_the_top_guide():
    for variant in ("tomczak", "ladder"):
        hvae = _hvae(variant, "vamp")
        u = hvae.prior.pseudo_inputs
        z = torch.randn(4, 3)
        components = hvae._top.base(u).base_dist  # (K, 3)
        expected = torch.logsumexp(dist.Normal(components.loc, components.scale).log_prob(z[:, None]).sum(-1), -1) \
            - torch.log(torch.tensor(float(u.shape[0])))
        assert torch.allclose(hvae.prior().log_prob(z), expected, atol=1e-5)
        # and the pseudo-inputs are trained: they get a gradient from the ELBO
        loss = -engine.log_weights(hvae, _binary(), 2).log_weight.mean()
        loss.backward()
        assert u.grad is not None and u.grad.abs().sum() > 0


def test_hierarchy_reports_active_units_and_kl_per_level():
    hvae, x = _hvae("tomczak", levels=3), _binary(40)
    report = pvae.evaluate(hvae, x, num_samples=3, estimators=("elbo", "iwae"))
    per_site = report.latent["per_site"]
    assert sorted(per_site) == ["z1", "z2", "z3"]
    assert all(site["latent_dim"] == 3 and 0 <= site["active_units"] <= 3 for site in per_site.values())
    assert sum(site["kl_total"] for site in per_site.values()) == pytest.approx(report.latent["kl_total"])
    assert "per level: z3" in report.summary()


def test_hierarchy_refuses_one_level_and_unknown_variants():
    with pytest.raises(pvae.UsageError, match="at least 2 levels"):
        HierarchicalVAE(BernoulliLikelihood(4), (3,))
    with pytest.raises(pvae.UsageError, match="unknown hierarchy variant 'nvae'"):
        HierarchicalVAE(BernoulliLikelihood(4), (3, 3), variant="nvae")


# ------------------------------------------------------------------------------ labels
def _m2(classes=3, d=5, weight=0.0, relaxed=False, label_in="decoder", scale=0.5):
    torch.manual_seed(0)
    return CategoricalVAE(GaussianLikelihood(d, scale=scale), classes, 2, label_in, (8,), "tanh", weight, relaxed)


@pytest.mark.parametrize("label_in", ["decoder", "prior"])
def test_summing_the_label_out_agrees_with_scoring_each_label(label_in):
    """log p(x) two ways: the guide's enumerated label (one L_K), and logsumexp over k of
    log p(x, y=k), each an L_K with the label observed. Both converge to log p(x); the
    tolerance is the Monte Carlo error of the two estimates (fails if enumeration dropped
    q(y|x) or p(y) from the weight)."""
    prog, x, K = _m2(label_in=label_in), torch.randn(6, 5), 4000
    if label_in == "prior":  # components far apart: the label matters for p(x)
        prog.component_loc.data *= 4
    prog.eval()
    torch.manual_seed(2)
    summed = pvae.iwae_bound(prog, x, K, batch_size=6)
    per_label = []
    for k in range(prog.num_classes):
        data = pvae.WithCovariates(x, y=torch.full((6,), k), observed=torch.ones(6, dtype=torch.bool))
        per_label.append(pvae.iwae_bound(prog, data, K, batch_size=6))
    values = torch.stack([e.values for e in per_label])
    joint = torch.logsumexp(values, 0)
    # the error of a logsumexp: at most that of its largest-weighted term, so add them
    err = torch.stack([e.mc_stderr_per_datapoint for e in per_label]).pow(2).sum(0).sqrt()
    tol = mc_tolerance(1.0) * (summed.mc_stderr_per_datapoint ** 2 + err ** 2).sqrt() + 0.02
    assert ((summed.values - joint).abs() < tol).all(), (summed.values, joint, tol)


def test_a_labelled_datapoint_scores_log_p_x_y_and_adds_the_classification_term_only_in_training():
    prog, x = _m2(weight=2.5), torch.randn(4, 5)
    y = torch.tensor([0, 2, 1, 0])
    observed = torch.tensor([True, False, True, False])
    data = pvae.WithCovariates(x, y=y, observed=observed)
    prog.eval()
    torch.manual_seed(3)
    plain = engine.log_weights(prog, data, 2).log_weight
    prog.train()
    torch.manual_seed(3)
    trained = engine.log_weights(prog, data, 2).log_weight
    log_q = torch.log_softmax(prog.classifier(x), -1).gather(1, y[:, None])[:, 0].detach()
    expected = torch.where(observed, 2.5 * log_q, torch.zeros_like(log_q))
    assert torch.allclose(trained - plain, expected.expand_as(plain), atol=1e-4)


def test_the_relaxed_label_is_reparametrized_in_training_and_enumerated_in_evaluation():
    prog, x = _m2(relaxed=True, label_in="prior"), torch.randn(4, 5)
    prog.train()
    s = engine.log_weights(prog, x, 3)
    assert not s.enumerated and isinstance(s.guide_dists["y"], dist.RelaxedOneHotCategorical)
    assert s.latents["y"].shape[-1] == prog.num_classes and not s.not_reparametrized
    s.log_weight.mean().backward()
    assert prog.classifier[0].weight.grad is not None
    prog.eval()
    assert "y" in engine.log_weights(prog, x, 3).enumerated
    with pytest.raises(pvae.UsageError, match="relaxed label cannot be observed"):
        prog.train()
        prog.check_data(pvae.WithCovariates(x, y=torch.zeros(4), observed=torch.ones(4, dtype=torch.bool)))


def test_m2_trains_with_pyro_traceenum_elbo_as_written_in_pyros_examples():
    prog, x = _m2(), torch.randn(8, 5)
    data = dict(y=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), observed=torch.tensor([True] * 3 + [False] * 5))
    svi = pyro.infer.SVI(prog.model, prog.guide, pyro.optim.Adam({"lr": 1e-2}),
                         pyro.infer.TraceEnum_ELBO(max_plate_nesting=1))
    before = [p.detach().clone() for p in prog.parameters()]
    losses = [svi.step(x, None, **data) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, prog.parameters()))


def test_balanced_labelled_subsets_are_balanced_and_fixed_by_the_seed():
    labels = torch.arange(10).repeat(30)[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    a = balanced_labelled_subset(labels, 50, 10, seed=4)
    assert torch.equal(a, balanced_labelled_subset(labels, 50, 10, seed=4))
    assert not torch.equal(a, balanced_labelled_subset(labels, 50, 10, seed=5))
    assert torch.bincount(labels[a], minlength=10).tolist() == [5] * 10


# ------------------------------------------------------------------------------ conditional
def test_the_conditional_vae_needs_its_covariate_and_scores_log_p_x_given_c():
    torch.manual_seed(0)
    prog = ConditionalVAE(BernoulliLikelihood(6), 3, 2, (8,), "tanh")
    x, c = _binary(), one_hot(torch.arange(12) % 3, 3, torch.float32)
    with pytest.raises(pvae.UsageError, match="needs the covariate"):
        prog.check_data(x)
    s = engine.log_weights(prog, pvae.WithCovariates(x, c=c), 4)
    z = s.latents["z"]
    with torch.no_grad():
        loc, pre = prog.prior_net(c).split(2, -1)
        log_p = dist.Normal(loc, torch.nn.functional.softplus(pre) + 1e-4).to_event(1).log_prob(z)
        log_lik = dist.Bernoulli(logits=prog.decoder(torch.cat([z, c.expand(4, 12, 3)], -1))).log_prob(x).sum(-1)
    assert torch.allclose(s.log_prior, log_p, atol=1e-5) and torch.allclose(s.log_likelihood, log_lik, atol=1e-4)


# ------------------------------------------------------------------------------ runs and CLI
@pytest.mark.parametrize("flags, figure", [
    (["--model", "hvae", "--levels", "2"], "samples.png"),
    (["--model", "hvae", "--levels", "3", "--variant", "ladder", "--prior", "vamp", "--prior-pseudo-inputs", "5"],
     "samples.png"),
    (["--model", "cvae"], "samples_per_class.png"),
    (["--model", "m2", "--labelled", "100"], "samples_per_class.png"),
    (["--model", "mixture", "--components", "4", "--relaxed"], "samples_per_class.png"),
])
def test_each_family_trains_and_evaluates_from_the_command_line(tmp_path, flags, figure, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--run-dir", str(run), *flags, *TINY]) == 0, capsys.readouterr().err
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["name"] == flags[1]
    assert (run / figure).exists() and (run / "latent.png").exists()
    assert main(["evaluate", str(run), "--num-samples", "3", "--no-progress"]) == 0
    report = json.loads((run / "evaluation-test-K3.json").read_text())
    assert report["model"] == flags[1] and "iwae" in report["estimates"]
    if flags[1] == "m2":
        record = json.loads((run / "data.json").read_text())["labelled"]
        assert record["count"] == 100 and len(record["positions"]) == 100
        assert config["model"]["classes"] == 10 and config["model"]["classification_weight"] == pytest.approx(
            0.1 * 1197 / 100)
        assert 0 <= report["classification"]["error"] <= 1 and report["classification"]["num_datapoints"] == 300
        # a resumed run resolves to the same config (classes, alpha, the same known labels)
        argv = ["train", "--dataset", "digits", "--run-dir", str(run), *flags, *TINY]
        argv[argv.index("--epochs") + 1] = "2"
        assert main([*argv, "--resume"]) == 0, capsys.readouterr().err
        assert json.loads((run / "data.json").read_text())["labelled"] == record
    else:
        assert report["classification"] is None


def test_family_options_are_checked_against_the_data(tmp_path, capsys):
    assert main(["train", "--dataset", "digits", "--model", "m2", "--labelled", "15", "--run-dir",
                 str(tmp_path / "a"), *TINY]) == 2
    assert "multiple of the 10 classes" in capsys.readouterr().err
    assert main(["train", "--dataset", "digits", "--model", "hvae", "--guide", "iaf", "--run-dir",
                 str(tmp_path / "b"), *TINY]) == 2
    assert "has its own guide" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_family_run_config_round_trips_and_reloads():
    from pvae.data import load_dataset

    data = load_dataset("digits")
    config = resolve(RunConfig(dataset="digits", model={"name": "m2", "labelled": 50}, latent_dim=2,
                               net={"hidden": (8,)}), data)
    again = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    prog = build_program(again, data.data_dim)
    assert isinstance(prog, CategoricalVAE) and prog.classification_weight == pytest.approx(0.1 * 1197 / 50)
    train = model_data(again, data, "train", training=True)
    assert int(train.covariates["observed"].sum()) == 50
    assert isinstance(model_data(again, data, "test"), torch.Tensor)  # scored with the label summed out


def test_the_sampled_kl_per_level_agrees_with_the_closed_form_where_both_exist():
    """A VampPrior on the top level has no closed-form KL, so each level's KL is then sampled
    (E_q[log q - log p] per site); on a hierarchy where the closed form exists the two agree
    within the sampled estimate's Monte Carlo error (fails if a level's terms were swapped or
    the lower level's conditional KL dropped its dependence on the level above)."""
    from pvae.inference.diagnostics import SITE_KL_DRAWS, _sampled_site_kl, kl_per_dimension

    hvae, x = _hvae("tomczak"), _binary(40)
    # the closed form of the lower level is itself at one draw of z2 per datapoint: average 16 seeds
    closed_draws = torch.stack([torch.stack([kl_per_dimension(hvae, x, per_site=True, seed=s)[site].sum()
                                             for site in ("z2", "z1")]) for s in range(16)]).double()
    closed, closed_err = closed_draws.mean(0), closed_draws.std(0) / 4.0
    sampled = _sampled_site_kl(hvae, x, ["z2", "z1"], batch_size=40, seed=3)
    with torch.no_grad():
        terms = engine.log_weights(hvae, x, SITE_KL_DRAWS, enumerate=False).site_terms
    for i, site in enumerate(("z2", "z1")):
        log_p, log_q = terms[site]
        stderr = float((log_q - log_p).double().std() / (log_q.numel() ** 0.5))
        tol = mc_tolerance(float((stderr ** 2 + closed_err[i] ** 2) ** 0.5))
        assert abs(sampled[site] - float(closed[i])) < tol, (site, sampled[site], float(closed[i]), tol)


def _table(path, n=60):
    """A table whose covariate column 'row' is each row's number and 'double' twice a data column."""
    rng = torch.Generator().manual_seed(0)
    a = torch.randn(n, generator=rng)
    with open(path, "w") as fh:
        fh.write("a,row,b,double,kind\n")
        for i in range(n):
            fh.write(f"{float(a[i]):.5f},{i},{float(a[i]) + 1:.5f},{2 * float(a[i]):.5f},{'xy'[i % 2]}\n")


def test_a_tables_covariate_columns_are_read_beside_the_data_row_for_row(tmp_path):
    from pvae.data.files import DataFileError, load_file

    _table(tmp_path / "t.csv")
    data = load_file(tmp_path / "t.csv", label_column="kind", covariate_columns=("row", "double"))
    assert data.data_dim == 2 and data.covariate_names == ("row", "double")
    for split in ("train", "valid", "test"):
        x, c = data.split(split), data.split_covariates(split)
        assert c.shape == (x.shape[0], 2)
        assert torch.allclose(c[:, 1], 2 * x[:, 0], atol=1e-4)  # the same rows, in the same order
        assert torch.equal(data.split_labels(split), (c[:, 0].long() % 2))
    plain = load_file(tmp_path / "t.csv", label_column="kind", covariate_columns=("double",))
    assert plain.fingerprint() != data.fingerprint()
    with pytest.raises(DataFileError, match="no covariate column 'nope'; columns: a, row, b, double, kind"):
        load_file(tmp_path / "t.csv", label_column="kind", covariate_columns=("nope",))
    with pytest.raises(DataFileError, match="both the label column and a covariate column"):
        load_file(tmp_path / "t.csv", label_column="kind", covariate_columns=("kind",))
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((10, 3)))
    with pytest.raises(DataFileError, match="covariate columns are read from tables"):
        load_file(tmp_path / "x.npy", covariate_columns=("0",))


def test_a_cvae_conditions_on_columns_of_a_users_table_from_the_command_line(tmp_path, capsys):
    _table(tmp_path / "t.csv")
    run = tmp_path / "run"
    argv = ["train", "--data", str(tmp_path / "t.csv"), "--label-column", "kind", "--likelihood", "gaussian",
            "--model", "cvae", "--condition", "row,double", "--run-dir", str(run), *TINY]
    assert main(argv) == 0, capsys.readouterr().err
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"]["covariate_columns"] == ["row", "double"] and config["model"]["covariate_dim"] == 2
    stats = json.loads((run / "data.json").read_text())["file"]["standardization"]
    assert len(stats["covariates"]["mean"]) == 2  # the covariates standardized by the training split's statistics
    assert main(["evaluate", str(run), "--num-samples", "3", "--no-progress"]) == 0
    assert main(["evaluate", str(run), "--data", str(tmp_path / "t.csv"), "--split", "all", "--num-samples", "3",
                 "--no-progress"]) == 0
    report = json.loads((run / "evaluation-t_csv-all-K3.json").read_text())
    assert report["num_datapoints"] == 60
    assert main(["train", "--dataset", "digits", "--model", "cvae", "--condition", "row", "--run-dir",
                 str(tmp_path / "bad"), *TINY]) == 2
    assert "names columns of your own table" in capsys.readouterr().err
