"""What every model family shares: Pyro programs that are modules, data checks, broadcasting.

A family is a :class:`torch.nn.Module` with two Pyro programs, ``model(x, index=None,
**covariates)`` and ``guide(...)``, whose datapoints sit in the plate :data:`~pvae.model.DATA_PLATE`
(the contract of :class:`pvae.inference.engine.ModelGuidePair`). Everything pvae computes —
objectives, bounds, AIS, diagnostics — reads the programs' traces, so a family needs no code of
its own there. The programs announce the module's parameters to Pyro (as :class:`pvae.VAE`'s
do), so ``SVI(fam.model, fam.guide, pyro.optim.Adam(...), Trace_ELBO())`` also trains it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pvae.errors import UsageError, UsageTypeError, rows_phrase
from pvae.inference.engine import unpack
from pvae.model import DATA_PLATE, program

__all__ = ["FamilyModel", "cat_broadcast", "one_hot"]


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
        if not isinstance(tensor, torch.Tensor):
            raise UsageTypeError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise UsageTypeError(f"{what} must be a floating-point tensor, got dtype {tensor.dtype}")
        if tensor.dim() != 2 or tensor.shape[-1] != self.data_dim:
            raise UsageError(f"{what} must have shape (batch, {self.data_dim}), got {tuple(tensor.shape)}")
        if tensor.shape[0] == 0:
            raise UsageError(f"{what} hold no datapoints (shape {tuple(tensor.shape)}); pass at least one row")
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            rows = (~finite).any(-1).nonzero().flatten()
            raise UsageError(f"{what} contain NaN or infinite values in {rows_phrase(rows)}; clean or drop those rows")
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
