"""Training: objectives and the loop that optimizes them.

- :mod:`pvae.training.objectives` — ELBO (Pyro's estimators), IWAE/DReG, β/warm-up, free bits,
  InfoVAE/MMD, as :class:`~pvae.training.objectives.Objective` parts;
- :mod:`pvae.training.loop` — :func:`~pvae.training.loop.fit` and the compiled
  :class:`~pvae.training.loop.TrainStep`;
- :mod:`pvae.training.controls` — optimizers, learning-rate schedules, precision;
- :mod:`pvae.training.tracking` — TensorBoard and MLflow trackers.

The subpackage imports nothing eagerly.
"""
