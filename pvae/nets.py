"""Plain :mod:`torch.nn` building blocks. No Pyro here.

Shapes: every network maps ``(..., in_features) -> (..., out_features)``; leading dimensions
(particles, batch) pass through untouched, which is what Pyro's vectorized particles need.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .registry import Registry

ACTIVATIONS: Registry = Registry("activation")
ACTIVATIONS.register("relu")(nn.ReLU)
ACTIVATIONS.register("softplus")(nn.Softplus)
ACTIVATIONS.register("tanh")(nn.Tanh)
ACTIVATIONS.register("elu")(nn.ELU)
ACTIVATIONS.register("gelu")(nn.GELU)
ACTIVATIONS.register("leaky-relu")(nn.LeakyReLU)
ACTIVATIONS.register("silu")(nn.SiLU)


class MLP(nn.Sequential):
    """A multilayer perceptron: ``Linear → activation`` for each hidden layer, then ``Linear``.

    :param int in_features: input size.
    :param int out_features: output size (no activation on the output layer).
    :param hidden: widths of the hidden layers; its length is the depth. ``()`` gives a
        single linear map.
    :param str activation: a name in :data:`ACTIVATIONS`.

    Shapes: ``(..., in_features) -> (..., out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (500, 500),
        activation: str = "softplus",
    ):
        hidden = tuple(int(h) for h in hidden)
        if in_features < 1 or out_features < 1 or any(h < 1 for h in hidden):
            raise ValueError(
                f"MLP sizes must be positive, got in={in_features}, hidden={hidden}, "
                f"out={out_features}"
            )
        act = ACTIVATIONS.get(activation)
        layers = []
        widths = (in_features,) + hidden
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), act()]
        layers.append(nn.Linear(widths[-1], out_features))
        super().__init__(*layers)
        self.in_features = in_features
        self.out_features = out_features
        self.hidden = hidden
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"MLP expects inputs of shape (..., {self.in_features}), got {tuple(x.shape)}"
            )
        return super().forward(x)
