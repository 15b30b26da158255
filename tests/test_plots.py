"""Figures: built from estimates and reports, showing what their captions say."""

import json

import pytest
import torch

import pvae
from pvae import plots
from pvae.testing import exact_log_marginal, linear_gaussian_vae


def test_bounds_versus_k_plots_each_k_with_monte_carlo_error_bars():
    vae = linear_gaussian_vae()
    x = torch.randn(20, 5, dtype=torch.float64)
    by_k = pvae.estimators.bounds_by_k(vae, x, [1, 10, 100])
    assert sorted(by_k) == [1, 10, 100] and by_k[10]["iwae"].num_samples == 10
    # the means grow with K on average (checked properly in test_estimators); here: plotted as given
    fig = plots.bounds_versus_k(by_k, references={"exact log p(x)": float(exact_log_marginal(vae, x).mean().detach())})
    ax = fig.axes[0]
    iwae_line = ax.lines[0]
    assert list(iwae_line.get_xdata()) == [1, 10, 100]
    assert list(iwae_line.get_ydata()) == pytest.approx([by_k[k]["iwae"].mean for k in (1, 10, 100)])
    assert ax.get_xscale() == "log"
    assert "exact log p(x)" in [t.get_text() for t in ax.get_legend().get_texts()]
    with pytest.raises(ValueError, match="K=10 appears twice"):
        pvae.estimators.bounds_by_k(vae, x, [10, 10])


def test_estimator_comparison_accepts_estimates_and_report_dicts():
    vae = linear_gaussian_vae()
    x = torch.randn(30, 5, dtype=torch.float64)
    bounds = pvae.evaluate_bounds(vae, x, 50)
    report_like = {k: json.loads(json.dumps(v.to_dict())) for k, v in bounds.items()}
    fig = plots.estimator_comparison({"objects": bounds, "from JSON": report_like})
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["ELBO (K=50)", "L_K (IWAE) (K=50)"]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["objects", "from JSON"]


def test_khat_histogram_marks_thresholds_and_drops_nonfinite_values():
    khat = torch.tensor([0.1, 0.3, 0.6, 0.8, 0.9, float("inf")])
    fig = plots.khat_histogram(khat)
    title = fig.axes[0].get_title()
    assert "50.0% of 6 datapoints above 0.7" in title and "1 non-finite not shown" in title
    assert [line.get_xdata()[0] for line in fig.axes[0].lines] == [0.5, 0.7]
    assert len(plots.evaluation_figure({"elbo": pvae.Estimate("elbo", 1, torch.zeros(3), torch.zeros(3))},
                                       khat).axes) == 2
