"""Evaluation in one call: every estimator a spec asks for, on any program, as one report.

:class:`EvaluationSpec` holds what an evaluation computes (estimators, samples, minibatches,
chunks, seed, PSIS subset, and the :class:`~pvae.inference.annealing.AISSettings`) — one
dataclass shared by :func:`evaluate`, :func:`pvae.runs.evaluate_run` and ``pvae evaluate``;
:func:`evaluate` runs any of :data:`ESTIMATORS` and returns an :class:`EvaluationReport` (JSON
schema :data:`REPORT_VERSION`)::

    spec = pvae.EvaluationSpec(estimators=("elbo", "iwae", "ais"), num_samples=5000,
                               ais=pvae.AISSettings(num_chains=16, num_steps=1000))
    report = pvae.evaluate(vae, data.test, spec)
    print(report.summary())
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from pvae.checkpoint import atomic_write, write_json
from pvae.data.files import file_sha256
from pvae.errors import UsageError
from pvae.inference.annealing import AISSettings, ais
from pvae.inference.diagnostics import importance_diagnostics, latent_diagnostics
from pvae.inference.paired import PER_DATAPOINT_SUFFIX, per_datapoint_table
from pvae.inference.estimators import (
    DEFAULT_CHUNK_SIZE,
    Estimate,
    auto_chunk_size,
    evaluate_bounds,
    naive_prior_estimate,
    reconstruction_error,
)

__all__ = ["EvaluationSpec", "EvaluationReport", "evaluate", "classification_error", "ESTIMATORS", "REPORT_VERSION"]

#: the estimators an evaluation can run
ESTIMATORS = ("elbo", "iwae", "naive", "ais")
#: fewest draws per datapoint for which PSIS k-hat is fitted (the Pareto tail then has
#: min(K/5, 3 sqrt(K)) >= 20 draws)
PSIS_MIN_SAMPLES = 100
#: ``evaluate_run``'s keywords of pvae 0.2 that are AIS settings now
LEGACY_AIS_NAMES = {"num_chains": "num_chains", "ais_steps": "num_steps", "ais_start": "start",
                    "ais_schedule": "betas"}


@dataclass(frozen=True)
class EvaluationSpec:
    """What an evaluation computes.

    :ivar estimators: any of :data:`ESTIMATORS`: ``"elbo"`` and ``"iwae"`` (the ELBO and the
        importance-weighted bound L_K from the same K draws of the guide), ``"naive"`` (the prior
        Monte Carlo estimate with K draws), ``"ais"`` (annealed importance sampling, ``ais``).
    :ivar int num_samples: K, importance samples per datapoint.
    :ivar int batch_size: datapoints per minibatch.
    :ivar chunk_size: samples per chunk (None: from a memory budget on the device).
    :ivar seed: minibatch i draws under :func:`pvae.distributed.batch_seed` of it (None: unseeded).
    :ivar int psis_datapoints: PSIS k-hat of the guide on a seeded random subset of this many
        datapoints (0: off; needs K >= :data:`PSIS_MIN_SAMPLES`).
    :ivar ais: the :class:`~pvae.inference.annealing.AISSettings` (a dict of its fields is taken).
    """

    estimators: Tuple[str, ...] = ("elbo", "iwae")
    num_samples: int = 1000
    batch_size: int = 100
    chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE
    seed: Optional[int] = 0
    psis_datapoints: int = 500
    ais: AISSettings = field(default_factory=AISSettings)

    def __post_init__(self):
        names = (self.estimators,) if isinstance(self.estimators, str) else tuple(self.estimators)
        object.__setattr__(self, "estimators", names)
        unknown = sorted(set(names) - set(ESTIMATORS))
        if unknown:
            raise UsageError(f"unknown estimator(s) {unknown}; valid choices: {', '.join(ESTIMATORS)}")
        for name in ("num_samples", "batch_size", "chunk_size", "psis_datapoints"):
            value = getattr(self, name)
            if value is None and name == "chunk_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "psis_datapoints" else 1):
                raise UsageError(f"EvaluationSpec.{name} must be a {'non-negative' if name == 'psis_datapoints' else 'positive'} "
                                 f"integer, got {value!r}")
        if isinstance(self.ais, dict):
            object.__setattr__(self, "ais", AISSettings(**self.ais))
        elif not isinstance(self.ais, AISSettings):
            raise UsageError(f"EvaluationSpec.ais must be AISSettings or a dict of its fields, got {self.ais!r}")

    @classmethod
    def of(cls, spec: Optional["EvaluationSpec"] = None, **settings) -> "EvaluationSpec":
        """``spec`` (default: the defaults) with ``settings`` replaced: its fields, AIS fields
        (``num_chains``, ``num_steps``, ...) and pvae 0.2's names (``ais_steps``, ``ais_start``,
        ``ais_schedule``); another name is an error that lists them."""
        spec = spec if spec is not None else cls()
        ais_fields = {f.name for f in dataclasses.fields(AISSettings)}
        ais_changes = {}
        for name in list(settings):
            if name in LEGACY_AIS_NAMES or (name in ais_fields and name not in cls.__dataclass_fields__):
                ais_changes[LEGACY_AIS_NAMES.get(name, name)] = settings.pop(name)
        unknown = sorted(set(settings) - set(cls.__dataclass_fields__))
        if unknown:
            raise UsageError(f"unknown evaluation setting(s) {unknown}; valid: "
                             f"{', '.join(sorted(set(cls.__dataclass_fields__) | ais_fields | set(LEGACY_AIS_NAMES)))}")
        if ais_changes:
            settings["ais"] = dataclasses.replace(spec.ais, **ais_changes)
        return dataclasses.replace(spec, **settings) if settings else spec

    def to_dict(self) -> dict:
        """Plain values (for a report or JSON); ``EvaluationSpec(**d)`` rebuilds it."""
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "ais"},
                "estimators": list(self.estimators), "ais": self.ais.to_dict()}


def _guide_has_density(program, x) -> Tuple[bool, bool]:
    """(the guide has a density, it scores any point) — pvae's guides say so; a user's program is
    asked by tracing it."""
    guide_net = getattr(program, "guide_net", None)
    if guide_net is not None:
        return bool(guide_net.has_density), bool(guide_net.scores_any_point)
    from pvae.training.loop import _has_density

    has = _has_density(program, x)
    return has, has


def evaluate(program, data, spec: Optional[EvaluationSpec] = None, *, labels: Optional[torch.Tensor] = None,
             label_names=None, progress: bool = False, report: Optional["EvaluationReport"] = None,
             cache: Optional[Callable] = None, **settings) -> "EvaluationReport":
    """Evaluate ``program`` (a :class:`~pvae.model.VAE` or any
    :class:`~pvae.inference.engine.ModelGuidePair`) on ``data`` (``(N, D)``) as ``spec`` says
    (keywords: :meth:`EvaluationSpec.of`). Always: the latent diagnostics (active units and KL per
    dimension, per site for a program with several) and, for a ``VAE``, the reconstruction error at
    the encoder's code. Guide-based bounds are skipped, with the reason in ``report.skipped``, for a
    guide without a density. ``labels``: also report each estimate per label (keyed by
    ``label_names[label]`` when given, e.g. a data set's :attr:`~pvae.data.Dataset.label_names`). ``report``: fill
    this report (its identifying fields set by the caller); ``cache(name, **settings)``: a
    resumable record of an estimator's minibatches (:func:`pvae.runs.evaluate_run` keeps them in
    the run directory)."""
    spec = EvaluationSpec.of(spec, **settings)
    x = data
    device = next(iter(program.parameters())).device if any(True for _ in program.parameters()) else x.device
    x = x.to(device)
    cache = cache or (lambda name, **_: None)
    chunk_size = spec.chunk_size if spec.chunk_size is not None else auto_chunk_size(
        program, spec.batch_size, spec.num_samples, device)
    if report is None:
        report = EvaluationReport(model=type(program).__name__)
    report.num_datapoints, report.seed, report.batch_size = int(x.shape[0]), spec.seed, spec.batch_size
    report.evaluated_sha256 = _tensor_sha256(x)
    report.chunk_size, report.num_samples, report.spec = chunk_size, spec.num_samples, spec.to_dict()
    has_density, scores_any_point = _guide_has_density(program, x)
    from pvae.model import VAE

    estimates = reconstruction_error(program, x) if isinstance(program, VAE) else {}
    common = dict(batch_size=spec.batch_size, chunk_size=chunk_size, seed=spec.seed, progress=progress)
    bounds = [e for e in ("elbo", "iwae") if e in spec.estimators]
    if bounds and not has_density:
        report.skipped.update({name: "the guide is a point mass without a density" for name in bounds})
    elif bounds:
        result = evaluate_bounds(program, x, spec.num_samples, cache=cache("bounds"), **common)
        estimates.update({name: result[name] for name in bounds})
    if "naive" in spec.estimators:
        estimates["naive"] = naive_prior_estimate(program, x, spec.num_samples, cache=cache("naive"), **common)
    if "ais" in spec.estimators:
        why = _ais_refusal(spec.ais, program, has_density, scores_any_point)
        if why:
            report.skipped["ais"] = why
        else:
            legacy = {"num_chains": spec.ais.num_chains, "ais_steps": spec.ais.num_steps,
                      "schedule": spec.ais.betas, "start": spec.ais.start,
                      "num_leapfrog": spec.ais.num_leapfrog, "target_accept": spec.ais.target_accept}
            estimates["ais"] = ais(program, x, spec.ais, batch_size=spec.batch_size, seed=spec.seed,
                                   progress=progress, cache=cache("ais", **legacy))
            report.ais_settings = spec.ais.to_dict()
    report.estimates = dict(estimates)
    report.data_dim = int(x.shape[-1])
    if report.discrete is None:
        report.discrete = _likelihood_is_discrete(program, device)
    if labels is not None:
        report.by_label = _by_label(estimates, labels.cpu(), label_names)
        if getattr(program, "predicts_labels", False):
            report.classification = classification_error(program, x, labels, spec.batch_size)
    _psis(report, program, x, spec, chunk_size, has_density)
    with warnings.catch_warnings():  # the collapse message goes into the report (and the CLI prints it)
        warnings.filterwarnings("ignore", message="posterior collapse", category=UserWarning)
        report.latent = latent_diagnostics(program, x)
    return report


def _tensor_sha256(x) -> str:
    """SHA-256 of the evaluated data's values (as :meth:`~pvae.data.Dataset.fingerprint` hashes a
    split; covariates included): two reports with the same hash scored the same datapoints in the
    same order (:func:`pvae.paired_difference`)."""
    import hashlib

    from pvae.data.dataset import update_hash

    digest = hashlib.sha256()
    covariates = getattr(x, "covariates", {})
    update_hash(digest, "x", x.x if covariates else x)
    for name in sorted(covariates):
        update_hash(digest, f"covariates {name}", covariates[name])
    return digest.hexdigest()


def classification_error(program, x, labels: torch.Tensor, batch_size: int = 1000) -> dict:
    """The error rate of ``program.classify`` (e.g. M2's argmax over y of q(y|x)) on ``x``
    against ``labels``."""
    tensor = x.x if hasattr(x, "covariates") else x
    with torch.no_grad():
        predicted = torch.cat([program.classify(xb) for xb in tensor.split(batch_size)]).cpu()
    errors = int((predicted != labels.cpu().long()).sum())
    n = int(labels.shape[0])
    return {"error": errors / n, "num_errors": errors, "num_datapoints": n,
            "classifier": "argmax_y q(y|x)"}


def _likelihood_is_discrete(program, device) -> Optional[bool]:
    """Whether ``program``'s likelihood is a probability mass function of discrete data (its
    log p(x) is then a code length, and bits/dim means something); None when that cannot be told
    (a program without a pvae likelihood, or one that cannot be probed)."""
    from pvae.parts.likelihoods import (
        BernoulliLikelihood,
        ContinuousBernoulliLikelihood,
        DiscretizedLogisticLikelihood,
        GaussianLikelihood,
        Likelihood,
        PoissonLikelihood,
    )

    likelihood = getattr(program, "likelihood", None)
    if not isinstance(likelihood, Likelihood):
        return None
    if isinstance(likelihood, (BernoulliLikelihood, PoissonLikelihood, DiscretizedLogisticLikelihood)):
        return True  # (the discretized logistic's support reads as [0, 1]: its log-probabilities are log-masses)
    if isinstance(likelihood, (GaussianLikelihood, ContinuousBernoulliLikelihood)):
        return False
    try:  # a likelihood of one's own: its distribution's support says
        with torch.no_grad():
            support = likelihood(torch.zeros(likelihood.param_dim, device=device)).support
    except Exception:  # noqa: BLE001 (a probe: whatever it meets, the answer is "cannot tell")
        return None
    discrete = getattr(support, "is_discrete", None)
    return bool(discrete) if discrete is not None else None


def _ais_refusal(settings, program, has_density, scores_any_point) -> Optional[str]:
    if settings.start == "guide" and not has_density:
        return "AIS from the guide needs a guide with a density; use --ais-start prior"
    if settings.start == "guide" and not scores_any_point:
        return (f"AIS from the guide needs q(z|x) at any z; the {type(program.guide_net).__name__} "
                "scores only its own samples; use --ais-start prior")
    return None


def _psis(report, program, x, spec, chunk_size, has_density) -> None:
    """PSIS k-hat of the guide on a seeded random subset (a split such as static MNIST's test set
    is ordered in blocks)."""
    n, num_samples, seed = spec.psis_datapoints, spec.num_samples, spec.seed or 0
    if not (n and has_density):
        return
    if num_samples < PSIS_MIN_SAMPLES:
        report.skipped["psis"] = (f"K={num_samples} is too few draws to fit the Pareto tail "
                                  f"(PSIS k-hat needs K >= {PSIS_MIN_SAMPLES} here)")
        return
    chosen = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n].sort().values
    sub = x[chosen.to(x.device)]
    khat = torch.cat([importance_diagnostics(program, xb, num_samples, chunk_size, seed=seed + 1000 + i)["khat"]
                      for i, xb in enumerate(sub.split(spec.batch_size))])
    finite = torch.isfinite(khat)
    good = khat[finite]
    report.khat = khat.cpu()
    report.khat_index = chosen.cpu()
    report.psis = {
        "datapoints": int(sub.shape[0]), "num_samples": int(num_samples),
        "subset": f"random, torch.randperm with seed {seed}", "indices_first": chosen[:10].tolist(),
        # a non-finite k-hat (a failed tail fit) is counted and excluded from every summary
        "nonfinite_khat": int((~finite).sum()),
        "khat_mean": float(good.mean()) if finite.any() else None,
        "khat_max": float(good.max()) if finite.any() else None,
        "fraction_above_0.5": float((good > 0.5).double().mean()) if finite.any() else None,
        "fraction_above_0.7": float((good > 0.7).double().mean()) if finite.any() else None,
    }


def _by_label(estimates: Dict[str, Estimate], labels: torch.Tensor, names=None) -> dict:
    """Per label (by its name when ``names`` are given): the number of datapoints and each
    estimate's mean and standard error over them."""
    out = {}
    for label in labels.unique().tolist():
        mask = labels == label
        row = {"num_datapoints": int(mask.sum())}
        for name, est in estimates.items():
            values = est.values.detach().cpu().double()[mask]
            row[name] = {"mean": float(values.mean()),
                         "stderr": float(values.std() / math.sqrt(values.numel())) if values.numel() > 1 else None}
        out[str(names[label]) if names is not None and 0 <= label < len(names) else str(label)] = row
    return out



#: version of the evaluation-report JSON schema (1: pvae 0.1, no "version" key; 2: pvae 0.2 before
#: EvaluationSpec, ``ais_settings`` with pvae 0.2's names and no ``spec``)
REPORT_VERSION = 3


@dataclass
class EvaluationReport:
    """What :func:`evaluate` (and :func:`pvae.runs.evaluate_run`) measured. Estimates are :class:`~pvae.estimators.Estimate`
    objects (each names its estimator and sample count); :meth:`to_dict` is the JSON schema
    (version :data:`REPORT_VERSION`)::

        {"version": 3, "run_dir", "dataset", "model", "split", "data": {"name", "fingerprint",
         "training_data"}, "num_datapoints", "num_samples", "seed", "batch_size", "chunk_size",
         "estimates": {name: Estimate.to_dict()}, "nll_iwae", "bits_per_dim_iwae",
         "skipped": {name: reason}, "latent": {...}, "psis": {...} | null,
         "spec": EvaluationSpec.to_dict(), "ais_settings": AISSettings.to_dict() | null, "figure": file name | null,
         "by_label": {label: {"num_datapoints", name: {"mean", "stderr"}}} | null (labelled data),
         "per_datapoint": {"file", "sha256", "columns"} | null, "evaluated_sha256",
         "environment": {"pvae", "torch", "pyro", "device", "cuda_device" (CUDA), "evaluated", ...}}

    ``environment`` was added within version 2 (pvae 0.2); older version-2 reports lack it.
    ``per_datapoint`` and ``evaluated_sha256`` were added within version 3; older reports lack them
    (they cannot be paired)."""

    run_dir: Optional[str] = None
    dataset: Optional[str] = None
    model: Optional[str] = None
    split: Optional[str] = None
    data: dict = field(default_factory=dict)
    num_datapoints: int = 0
    seed: Optional[int] = 0
    batch_size: int = 0
    chunk_size: Optional[int] = None
    num_samples: int = 0
    spec: Optional[dict] = None  # the EvaluationSpec that ran, as plain values
    scored: Optional[str] = None  # other data than the run's own: its name (in the file name of the report)
    estimates: Dict[str, Estimate] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    latent: dict = field(default_factory=dict)
    by_label: Optional[dict] = None
    psis: Optional[dict] = None
    ais_settings: Optional[dict] = None
    data_dim: Optional[int] = None
    khat: Optional[torch.Tensor] = field(default=None, repr=False)  # per datapoint, for the figure
    khat_index: Optional[torch.Tensor] = field(default=None, repr=False)  # the rows of the data ``khat`` is of
    #: the per-datapoint file :meth:`save` wrote beside the report (``{"file", "sha256", "columns"}``;
    #: :mod:`pvae.inference.paired`), None before it is saved
    per_datapoint: Optional[dict] = None
    #: SHA-256 of the evaluated datapoints' values, in order (the rows a per-datapoint file is of)
    evaluated_sha256: Optional[str] = None
    figure: Optional[str] = None
    environment: Optional[dict] = None  # versions, machine and device (see evaluation_environment)
    #: whether the data are discrete under a probability mass function (Bernoulli, Poisson,
    #: discretized logistic): only then is -log p(x) a code length and bits/dim shown by
    #: :meth:`summary`; False for densities (Gaussian, continuous Bernoulli); None: unknown, not
    #: shown. :func:`evaluate` sets it from the program's likelihood when it is None.
    discrete: Optional[bool] = None
    #: for a program that predicts labels (``predicts_labels``, ``classify(x)``: M2's q(y|x)) and labelled data: the
    #: test error of ``argmax_y q(y|x)`` (``{"error", "num_datapoints", "num_errors", "classifier"}``)
    classification: Optional[dict] = None

    @property
    def nll_iwae(self) -> Optional[float]:
        """-L_K in nats per datapoint (an estimate of -log p(x) from above), if L_K was computed."""
        return -self.estimates["iwae"].mean if "iwae" in self.estimates else None

    @property
    def bits_per_dim_iwae(self) -> Optional[float]:
        if "iwae" not in self.estimates or self.data_dim is None:
            return None
        return self.estimates["iwae"].bits_per_dim(self.data_dim)

    @property
    def stem(self) -> str:
        """The report's file name without suffix: ``evaluation-<split>-K<K>`` for the run's own
        data, ``evaluation-<data>-<split>-K<K>`` for other data (``scored``), so that scoring other
        data never overwrites the run's own report; ``-seed<S>`` appended for a seed other than 0."""
        return self.stem_for(self.split, self.num_samples, self.scored, self.seed)

    @staticmethod
    def stem_for(split: str, num_samples: int, scored: Optional[str] = None, seed: Optional[int] = 0) -> str:
        """:attr:`stem` of a report of these settings; a seed other than the default 0 is part of the
        name (``evaluation-test-K5000-seed1``), so that evaluations with two seeds, to be paired, do
        not overwrite each other."""
        stem = f"evaluation-{scored}-{split}-K{num_samples}" if scored else f"evaluation-{split}-K{num_samples}"
        return stem if seed in (0, None) else f"{stem}-seed{seed}"

    def to_dict(self) -> dict:
        return {
            "version": REPORT_VERSION, "run_dir": self.run_dir, "dataset": self.dataset, "model": self.model,
            "split": self.split, "data": self.data, "num_datapoints": self.num_datapoints,
            "num_samples": self.num_samples, "seed": self.seed, "batch_size": self.batch_size,
            "chunk_size": self.chunk_size, "data_dim": self.data_dim,
            "estimates": {name: est.to_dict() for name, est in self.estimates.items()},
            "nll_iwae": self.nll_iwae, "bits_per_dim_iwae": self.bits_per_dim_iwae,
            "skipped": self.skipped, "latent": self.latent, "psis": self.psis,
            "ais_settings": self.ais_settings, "figure": self.figure, "by_label": self.by_label,
            "environment": self.environment, "spec": self.spec, "scored": self.scored,
            "classification": self.classification, "per_datapoint": self.per_datapoint,
            "evaluated_sha256": self.evaluated_sha256,
        }

    def save(self, run_dir=None) -> Path:
        """Write ``evaluation-<split>-K<K>.json``, its figure (estimates with standard errors,
        k-hat histogram) and its per-datapoint values (``.per-datapoint.csv``, for
        :func:`pvae.paired_difference`) into ``run_dir`` (default: the evaluated run's); returns the
        JSON path."""
        from pvae import plots

        if run_dir is None and self.run_dir is None:
            raise UsageError("this report has no run directory: pass report.save(run_dir=...)")
        stem = Path(run_dir or self.run_dir) / self.stem
        bounds = {k: v for k, v in self.estimates.items() if k not in ("reconstruction", "squared-error")}
        if bounds or self.khat is not None:
            fig = plots.evaluation_figure(bounds, self.khat, title=f"{self.dataset} {self.split}")
            fig.savefig(stem.with_suffix(".png"), dpi=100)
            self.figure = stem.with_suffix(".png").name
        if any(getattr(est, "values", None) is not None for est in self.estimates.values()):
            table = per_datapoint_table(self)  # written first: the report names it with its SHA-256
            values_path = stem.with_name(stem.name + PER_DATAPOINT_SUFFIX)
            atomic_write(values_path, lambda fh: fh.write(table), "w")
            self.per_datapoint = {"file": values_path.name, "sha256": file_sha256(values_path),
                                  "columns": table.split("\n", 1)[0].split(",")}
        write_json(self.to_dict(), stem.with_suffix(".json"))
        return stem.with_suffix(".json")

    def summary(self) -> str:
        """The report in a few lines of text (what ``pvae evaluate`` prints)."""
        where = f"{self.dataset} {self.split} split" if self.dataset and self.split else (self.dataset or "data")
        lines = [f"{where}, {self.num_datapoints} datapoints, seed {self.seed}"]
        for name, est in self.estimates.items():
            if name in ("reconstruction", "squared-error"):
                unit = "nats" if name == "reconstruction" else "(squared data units)"
                lines.append(f"  {est.estimator} at the code E_q[z|x]: {est.mean:.3f} ± {est.stderr:.3f} {unit}")
                continue
            lines.append(
                f"  {est.estimator:>5} ({'chains' if name == 'ais' else 'K'}={est.num_samples}): {est.mean:.3f} "
                f"± {est.stderr:.3f} nats (± is the std. error over datapoints; "
                f"Monte Carlo part ± {est.mc_stderr_of_mean:.3f})")
        latent = self.latent
        if latent:
            kl = "" if latent.get("kl_total") is None else f", KL(q(z|x)||p(z)) {latent['kl_total']:.2f} nats"
            lines.append(f"  active units: {latent['active_units']} of {latent['latent_dim']}{kl}")
            if latent.get("per_site"):  # a hierarchy's levels (top first, in the guide's order)
                levels = [f"{name} {site['active_units']}/{site['latent_dim']}"
                          + ("" if site.get("kl_total") is None else f" (KL {site['kl_total']:.2f})")
                          for name, site in latent["per_site"].items()]
                lines.append(f"  per level: {', '.join(levels)}")
            if latent.get("posterior_collapse"):
                lines.append(f"  warning: {latent['posterior_collapse']}")
        if self.psis:
            p = self.psis
            mean = "n/a" if p["khat_mean"] is None else f"{p['khat_mean']:.2f}"
            above = "n/a" if p["fraction_above_0.7"] is None else f"{p['fraction_above_0.7']:.1%}"
            lines.append(f"  PSIS k-hat of q(z|x) ({p['datapoints']} random datapoints, K={p['num_samples']}): "
                         f"mean {mean}, {above} above 0.7")
            if p["fraction_above_0.7"] and "iwae" in self.estimates:  # (k-hat is of the guide, L_K's proposal)
                # (the paper's §5 measures it: two seeds' L_5000 of each shipped model against these errors)
                lines.append("  warning: where k-hat > 0.7 the Monte Carlo part of L_K is a delta-method error "
                             "that understates the real one; compare two seeds (pvae compare A.json B.json)")
        if self.figure and self.run_dir:
            lines.append(f"  figure: {Path(self.run_dir) / self.figure}")
        for name, why in self.skipped.items():
            lines.append(f"  {name}: skipped ({why})")
        if self.classification:
            c = self.classification
            lines.append(f"  classification error of {c['classifier']}: {c['error']:.2%} "
                         f"({c['num_errors']} of {c['num_datapoints']})")
        if self.nll_iwae is not None:
            # bits/dim is a code length: only for discrete data under a probability mass function
            bpd = "" if self.bits_per_dim_iwae is None or self.discrete is not True else \
                f", {self.bits_per_dim_iwae:.4f} bits/dim"
            lines.append(f"  -log p(x) ≈ {self.nll_iwae:.3f} nats (from L_{self.num_samples}){bpd}")
        return "\n".join(lines)
