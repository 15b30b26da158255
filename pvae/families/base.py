"""What every model family shares: Pyro programs that are modules, data checks, broadcasting.

A family is a :class:`torch.nn.Module` with two Pyro programs, ``model(x, index=None,
**covariates)`` and ``guide(...)``, whose datapoints sit in the plate :data:`~pvae.model.DATA_PLATE`
(the contract of :class:`pvae.inference.engine.ModelGuidePair`). Everything pvae computes —
objectives, bounds, AIS, diagnostics — reads the programs' traces, so a family needs no code of
its own there. The programs announce the module's parameters to Pyro (as :class:`pvae.VAE`'s
do), so ``SVI(fam.model, fam.guide, pyro.optim.Adam(...), Trace_ELBO())`` also trains it.
Their Gaussian heads share :func:`loc_scale` / :func:`diagonal_normal` and :data:`MIN_SCALE`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import pyro.distributions as dist

from pvae.errors import UsageError
from pvae.inference.engine import unpack
from pvae.model import DATA_PLATE, check_data_tensor, program
from pvae.parts.guides import DiagonalGaussianGuide, _positive

__all__ = ["FamilyModel", "cat_broadcast", "one_hot", "loc_scale", "diagonal_normal", "MIN_SCALE"]

#: the smallest scale of every Gaussian a family's network outputs (the diagonal guide's)
MIN_SCALE = DiagonalGaussianGuide.min_scale


def loc_scale(params: torch.Tensor, dim: int):
    """A Gaussian head's ``(loc, scale)``: the first ``dim`` outputs, and ``softplus`` of the next
    ``dim`` plus :data:`MIN_SCALE` (as :class:`~pvae.parts.guides.DiagonalGaussianGuide` does)."""
    loc, pre = params.split(dim, -1)
    return loc, _positive(pre, MIN_SCALE)


def diagonal_normal(params: torch.Tensor, dim: int) -> dist.Distribution:
    """The diagonal Gaussian of a head's outputs (:func:`loc_scale`), event shape ``(dim,)``."""
    return dist.Normal(*loc_scale(params, dim)).to_event(1)


def cat_broadcast(*tensors: torch.Tensor) -> torch.Tensor:
    """Concatenate on the last dimension after broadcasting the others (an enumerated label of
    shape ``(K, 1, 1, C)`` next to data ``(B, D)`` gives ``(K, 1, B, C + D)``)."""
    shape = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(*shape, t.shape[-1]) for t in tensors], -1)


def one_hot(label: torch.Tensor, num_classes: int, dtype) -> torch.Tensor:
    """``label`` (integers, any shape) as one-hot vectors of ``dtype``."""
    return torch.nn.functional.one_hot(label.long().clamp(0, num_classes - 1), num_classes).to(dtype)


class FamilyModel(nn.Module):
    """Base class of pvae's model families (:mod:`pvae.families`).

    Subclasses define ``model`` and ``guide`` (plain methods: they become
    :class:`pvae.model.Program` s) and set :attr:`likelihood`. ``covariates`` names the keyword
    arguments the programs read (data then come as :class:`pvae.WithCovariates`)."""

    #: plates the programs nest (the data plate); samples are vectorized just outside
    max_plate_nesting = 1
    data_plate = DATA_PLATE
    needs_index = False
    #: the covariates the programs read, required ones first
    covariates: tuple = ()
    required_covariates: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in ("model", "guide"):
            fn = cls.__dict__.get(name)
            if fn is not None and not isinstance(fn, program):
                p = program(fn)
                p.__set_name__(cls, name)
                setattr(cls, name, p)

    def programs_are_builtin(self) -> bool:  # no closed-form fast path: the traces are the definition
        return False

    @property
    def data_dim(self) -> int:
        return self.likelihood.data_dim

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def check_data(self, x, what: str = "data") -> None:
        """That ``x`` (a tensor, or :class:`~pvae.WithCovariates` carrying the covariates the
        programs need) is finite ``(B, data_dim)`` floating-point data in the likelihood's support."""
        tensor, covariates = unpack(x)
        check_data_tensor(tensor, self.data_dim, what)
        missing = [name for name in self.required_covariates if name not in covariates]
        if missing:
            raise UsageError(f"{type(self).__name__} needs the covariate(s) {', '.join(missing)} with the {what}: "
                             f"pass pvae.WithCovariates(x, {missing[0]}=...)")
        unknown = sorted(set(covariates) - set(self.covariates))
        if unknown:
            raise UsageError(f"{type(self).__name__} reads no covariate {', '.join(unknown)} (it reads "
                             f"{', '.join(self.covariates) or 'none'})")
        for name, c in covariates.items():
            if c.is_floating_point() and not bool(torch.isfinite(c).all()):
                raise UsageError(f"covariate {name!r} of the {what} contains NaN or infinite values")
        self.check_covariates(covariates, what)
        self.likelihood.check_data(tensor)

    def check_covariates(self, covariates: dict, what: str) -> None:
        """A family's own checks of its covariates (shapes, label ranges)."""

    @torch.no_grad()
    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """Likelihood means :math:`E[x|h]` for the decoder's input ``h``."""
        return self.likelihood.mean(self.decoder(h))

    def _size(self, x: Optional[torch.Tensor], num_datapoints: Optional[int]) -> int:
        size = x.shape[0] if x is not None else num_datapoints
        if size is None:
            raise UsageError("model(None) generates data: pass num_datapoints=")
        return size
