"""Inference: every number derived from a model/guide pair.

- :mod:`pvae.inference.engine` — per-datapoint log-weights of any Pyro program pair
  (:func:`~pvae.inference.engine.log_weights`), the one source of every estimate;
- :mod:`pvae.inference.estimators` — ELBO, importance-weighted bounds L_K, the naive prior Monte
  Carlo estimate, streamed over minibatches and sample chunks;
- :mod:`pvae.inference.annealing` — annealed importance sampling and BDMC;
- :mod:`pvae.inference.diagnostics` — PSIS k̂ and ESS, KL per dimension, active units, ArviZ export.

The subpackage imports nothing eagerly (its modules import each other and the parts).
"""
