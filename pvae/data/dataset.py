"""The container of a data set's three splits, and binarization of values in [0, 1].

Separate from the zoo (:mod:`pvae.data`) and from users' files (:mod:`pvae.data.files`), which
both build :class:`Dataset` objects, so that neither imports the other.

:data:`SPLITS` names the three splits; :data:`BINARIZE_MODES` lists the ``binarize`` option's values
(:func:`binarized`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import numpy as np
import torch

from pvae.data.streaming import is_streamed
from pvae.errors import UsageError

__all__ = ["Dataset", "binarized", "fixed_binarization", "update_hash", "SPLITS", "BINARIZE_MODES"]

SPLITS = ("train", "valid", "test")


def update_hash(h, name: str, t) -> None:
    """Feed ``name``, ``t``'s shape and its float32 values (row-major) to the hash ``h``: a streamed
    split gives the same bytes, read a chunk at a time. :meth:`Dataset.fingerprint` hashes each
    split this way, and an evaluation report the datapoints it scored."""
    h.update(f"{name}{tuple(t.shape)}".encode())
    if is_streamed(t):
        t.update_hash(h)
    else:
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
#: the name of every datapoint of a data set at once (``Dataset.split("all")``)
ALL = "all"


def _refuse_all_streamed():
    raise UsageError("split 'all' of streamed data (bigger than memory) is not supported; evaluate each split")


@dataclass(frozen=True)
class Dataset:
    """Three splits of flattened examples.

    :ivar str name: registry name.
    :ivar train, valid, test: float tensors ``(N, D)``, or for data bigger than memory
        :class:`~pvae.streaming.StreamedSplit` views read on demand (``streamed``).
    :ivar labels: dict split -> int64 tensor ``(N,)``, or None when unlabelled.
    :ivar label_names: the name of each label value (a CSV column's values, image class folders),
        or None (the values are their own names).
    :ivar image_shape: ``(H, W)`` for image data (for plots), else None.
    :ivar bool binary: all values are 0 or 1.
    :ivar source: where the data came from: for a user's file its path, size, SHA-256 and split;
        for a named benchmark its files and their SHA-256; else None.
    :ivar covariates: dict split -> float tensor ``(N, C)`` of observed covariates read beside the
        data (a table's covariate columns, what a conditional VAE conditions on), or None.
    :ivar covariate_names: the covariate columns' names, or None.
    :ivar bool dynamic_binarization: ``train`` holds probabilities in [0, 1] and training draws a
        fresh Bernoulli sample of every minibatch (``fit(..., dynamic_binarization=True)``);
        ``valid`` and ``test`` are fixed binary draws. ``split("train")`` is then one fixed seeded
        draw too, so that every split evaluates as binary data.
    """

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    labels: Optional[dict] = None
    image_shape: Optional[Tuple[int, ...]] = None
    binary: bool = False
    source: Optional[dict] = None
    dynamic_binarization: bool = False
    label_names: Optional[Tuple[str, ...]] = None
    covariates: Optional[dict] = None
    covariate_names: Optional[Tuple[str, ...]] = None

    @property
    def streamed(self) -> bool:
        """Whether the splits are read on demand (:mod:`pvae.streaming`)."""
        return any(is_streamed(getattr(self, s)) for s in SPLITS)

    @property
    def data_dim(self) -> int:
        return int(self.train.shape[-1])

    def split(self, name: str) -> torch.Tensor:
        """The examples of one split as the model sees them (for dynamically binarized data, the
        training split as one fixed seeded draw); ``"all"``: the three splits in one tensor
        (train, valid, test: every datapoint of the data set once)."""
        if name == ALL:
            return torch.cat([self.split(s) for s in SPLITS]) if not self.streamed else _refuse_all_streamed()
        if name not in SPLITS:
            raise UsageError(f"unknown split {name!r}; valid choices: {', '.join(SPLITS)}, {ALL}")
        if name == "train" and self.dynamic_binarization:
            return fixed_binarization(self.train, seed=1)
        return getattr(self, name)

    def fingerprint(self) -> str:
        """SHA-256 over the three splits' shapes and float32 values: which data a run saw."""
        h = hashlib.sha256()
        for name in SPLITS:
            update_hash(h, name, getattr(self, name))
        for name in SPLITS if self.covariates else ():  # (data without covariates keep their fingerprint)
            update_hash(h, f"covariates {name}", self.covariates[name])
        return h.hexdigest()

    def split_covariates(self, name: str) -> Optional[torch.Tensor]:
        """The covariates of a split (``"all"``: of the three, in :meth:`split`'s order), or None."""
        if self.covariates is None:
            return None
        if name == ALL:
            return torch.cat([self.covariates[s] for s in SPLITS])
        self.split(name)
        return self.covariates[name]

    def split_labels(self, name: str) -> Optional[torch.Tensor]:
        """The labels of a split (``"all"``: of the three, in :meth:`split`'s order), or None."""
        if name == ALL:
            parts = [self.split_labels(s) for s in SPLITS]
            return None if any(p is None for p in parts) else torch.cat(parts)
        self.split(name)
        return None if self.labels is None else self.labels.get(name)

    def label_name(self, value: int) -> str:
        """The name of label ``value`` (its number as text when the data set has no names)."""
        names = self.label_names
        return names[int(value)] if names is not None and 0 <= int(value) < len(names) else str(int(value))

    def standardized(self, stats: Optional[dict] = None) -> "Dataset":
        """Every split with each column shifted and scaled, ``(x - mean) / scale``: by the training
        split's column means and standard deviations (a constant column keeps scale 1), or by
        ``stats`` (``{"mean": [...], "scale": [...]}``, e.g. the ones a run was trained with). The
        statistics are recorded in ``source["standardization"]`` with the log-determinant of the
        map, ``-sum(log scale)``: a log-density of standardized data plus it is the log-density of
        the data in their own units."""
        if self.streamed:
            raise UsageError("standardizing streamed data is not supported; standardize the file before")
        if stats is None:
            train = self.train.double()
            mean = train.mean(0)
            scale = train.std(0, unbiased=False) if train.shape[0] > 1 else torch.ones_like(mean)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            stats = {"mean": mean.tolist(), "scale": scale.tolist(), "from": "the training split"}
        mean = torch.tensor(stats["mean"], dtype=torch.float64)
        scale = torch.tensor(stats["scale"], dtype=torch.float64)
        if mean.shape != (self.data_dim,) or scale.shape != (self.data_dim,) or not bool((scale > 0).all()):
            raise UsageError(f"standardization statistics for {mean.numel()} columns (positive scales) cannot "
                             f"be applied to data with {self.data_dim} columns")
        record = {**stats, "log_abs_det_jacobian": float(-scale.log().sum())}
        splits = {s: ((getattr(self, s).double() - mean) / scale).to(getattr(self, s).dtype) for s in SPLITS}
        binary = all(bool(((t == 0) | (t == 1)).all()) for t in splits.values())
        covariates = self.covariates
        if covariates is not None:  # covariates in the networks' scale too (by the training split's own statistics)
            cstats = stats.get("covariates")
            if cstats is None:
                train = covariates["train"].double()
                cscale = train.std(0, unbiased=False) if train.shape[0] > 1 else torch.ones(train.shape[-1])
                cstats = {"mean": train.mean(0).tolist(),
                          "scale": torch.where(cscale > 0, cscale, torch.ones_like(cscale)).tolist()}
                record["covariates"] = cstats
            cmean = torch.tensor(cstats["mean"], dtype=torch.float64)
            cscale = torch.tensor(cstats["scale"], dtype=torch.float64)
            covariates = {s: ((c.double() - cmean) / cscale).to(c.dtype) for s, c in covariates.items()}
        return dataclasses.replace(self, **splits, binary=binary, covariates=covariates,
                                   source={**(self.source or {}), "standardization": record})


def fixed_binarization(probabilities: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """One Bernoulli draw of ``probabilities`` from NumPy's ``RandomState(seed)`` (whose stream
    NumPy keeps stable across versions), so that a fixed binarization is the same bits everywhere."""
    p = probabilities.detach().cpu().numpy()
    u = np.random.RandomState(seed).uniform(size=p.shape)
    return torch.from_numpy((u < p).astype(np.float32)).to(probabilities.device)


def binarized(data: "Dataset", mode: str) -> "Dataset":
    """``data`` (values in [0, 1]) binarized: ``"none"`` (as is), ``"threshold"`` (x > 0.5),
    ``"static"`` (every split one fixed seeded Bernoulli draw) or ``"dynamic"`` (fresh draws of the
    training data during training; fixed draws of the others)."""
    mode = _binarize_option(mode)
    if mode == "none":
        return data
    if mode != "threshold":
        for split in SPLITS:
            t = getattr(data, split)
            if not bool(((t >= 0) & (t <= 1)).all()):
                raise UsageError(f"binarize={mode!r} draws Bernoulli(x), but the {split} data have values outside "
                                 f"[0, 1] (range {float(t.min())} to {float(t.max())}); rescale them or use 'threshold'")
    if mode == "threshold":
        return dataclasses.replace(data, binary=True, **{s: (getattr(data, s) > 0.5).to(torch.float32)
                                                         for s in SPLITS})
    valid = fixed_binarization(data.valid, seed=2)
    test = fixed_binarization(data.test, seed=3)
    if mode == "static":
        return dataclasses.replace(data, train=fixed_binarization(data.train, seed=1), valid=valid, test=test,
                                   binary=True)
    return dataclasses.replace(data, valid=valid, test=test, binary=True, dynamic_binarization=True)


#: how a data set's values in [0, 1] become binary (the ``binarize`` option of data sets)
BINARIZE_MODES = ("none", "threshold", "static", "dynamic")
Binarize = Literal["none", "threshold", "static", "dynamic"]


def _binarize_option(binarize) -> str:
    if isinstance(binarize, bool):  # pvae 0.2.dev's file option was a flag: True meant threshold
        binarize = "threshold" if binarize else "none"
    if binarize not in BINARIZE_MODES:
        raise UsageError(f"unknown binarize mode {binarize!r}; valid choices: {', '.join(BINARIZE_MODES)}")
    return binarize
