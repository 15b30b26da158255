"""Plain :mod:`torch.nn` building blocks. No Pyro here.

Shapes: every network maps ``(..., in_features) -> (..., out_features)``; leading dimensions
(particles, batch) pass through untouched, which is what Pyro's vectorized particles need.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

from pvae.errors import UsageError
from pvae.registry import Registry

__all__ = ["ACTIVATIONS", "NETS", "MLP", "GatedLinear", "ConvEncoder", "ConvDecoder", "MLPNets", "ConvNets"]

ACTIVATIONS: Registry = Registry("activation", doc="""
Activation functions of the networks by name (``"relu"``, ``"softplus"``, ``"tanh"``, ``"elu"``,
``"leaky-relu"``, ``"gelu"``, ``"silu"``, ``"gated"``: :class:`GatedLinear` layers); the nets'
``activation`` option names one.""")
ACTIVATIONS.register("relu")(nn.ReLU)
ACTIVATIONS.register("softplus")(nn.Softplus)
ACTIVATIONS.register("tanh")(nn.Tanh)
ACTIVATIONS.register("elu")(nn.ELU)
ACTIVATIONS.register("gelu")(nn.GELU)
ACTIVATIONS.register("leaky-relu")(nn.LeakyReLU)
ACTIVATIONS.register("silu")(nn.SiLU)
class GatedLinear(nn.Module):
    """``h = (W x + b) * sigmoid(V x + c)``: a gated dense layer (Dauphin et al. 2017), the
    hidden layer of the VampPrior paper's MLPs (Tomczak & Welling 2018, their ``GatedDense``).
    Both maps are one :class:`~torch.nn.Linear` of twice the width (one matrix product).

    Shapes: ``(..., in_features) -> (..., out_features)``.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.linear = nn.Linear(in_features, 2 * out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.linear(x).chunk(2, dim=-1)
        return h * torch.sigmoid(gate)


# Not an elementwise activation: "gated" makes every hidden layer of an MLP a GatedLinear (the
# gated MLP of Tomczak & Welling 2018's VampPrior code); conv nets refuse it.
ACTIVATIONS.register("gated")(GatedLinear)


def _elementwise(activation: str):
    act = ACTIVATIONS.get(activation)
    if act is GatedLinear:
        raise UsageError("activation 'gated' is a gated dense layer, for MLPs only; pick an "
                         f"elementwise one for conv nets: {', '.join(n for n in ACTIVATIONS.names() if n != 'gated')}")
    return act


class MLP(nn.Sequential):
    """A multilayer perceptron: ``Linear → activation`` for each hidden layer, then ``Linear``.

    :param int in_features: input size.
    :param int out_features: output size (no activation on the output layer).
    :param hidden: widths of the hidden layers; its length is the depth. ``()`` gives a
        single linear map.
    :param str activation: a name in :data:`ACTIVATIONS`, or ``"gated"``: every hidden layer
        is a :class:`GatedLinear` (no further activation).

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
            raise UsageError(
                f"MLP sizes must be positive, got in={in_features}, hidden={hidden}, "
                f"out={out_features}"
            )
        act = ACTIVATIONS.get(activation)
        layers = []
        widths = (in_features,) + hidden
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [GatedLinear(w_in, w_out)] if act is GatedLinear else [nn.Linear(w_in, w_out), act()]
        layers.append(nn.Linear(widths[-1], out_features))
        super().__init__(*layers)
        self.in_features = in_features
        self.out_features = out_features
        self.hidden = hidden
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise UsageError(
                f"MLP expects inputs of shape (..., {self.in_features}), got {tuple(x.shape)}"
            )
        return super().forward(x)


def _conv_out(size: int) -> int:
    """Spatial size after a 3x3 convolution with stride 2 and padding 1."""
    return (size - 1) // 2 + 1


class ConvEncoder(nn.Module):
    """Convolutional encoder for images stored as flat vectors.

    Two 3x3 stride-2 convolutions (``channels``) with ``activation``, then a linear layer.
    The image shape ``(C, H, W)`` comes from the data set, so any size works.

    Shapes: ``(..., C*H*W) -> (..., out_features)``.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        out_features: int,
        channels: Sequence[int] = (32, 64),
        activation: str = "relu",
    ):
        super().__init__()
        if len(image_shape) == 2:
            image_shape = (1, *image_shape)
        self.image_shape = tuple(int(s) for s in image_shape)
        c, h, w = self.image_shape
        self.in_features = c * h * w
        self.out_features = int(out_features)
        act = _elementwise(activation)
        layers, c_in = [], c
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), act()]
            c_in, h, w = c_out, _conv_out(h), _conv_out(w)
        self.convs = nn.Sequential(*layers)
        self.linear = nn.Linear(c_in * h * w, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise UsageError(
                f"ConvEncoder expects inputs of shape (..., {self.in_features}) "
                f"(images {self.image_shape} flattened), got {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        h = self.convs(x.reshape(-1, *self.image_shape))
        return self.linear(h.flatten(1)).reshape(*lead, self.out_features)


class ConvDecoder(nn.Module):
    """Convolutional decoder mirroring :class:`ConvEncoder`: a linear layer to a small
    feature map, then 4x4 stride-2 transposed convolutions up to (at least) the image size,
    cropped to ``(H, W)``; ``params_per_pixel`` output maps per image channel.

    Shapes: ``(..., in_features) -> (..., params_per_pixel * C*H*W)``.
    """

    def __init__(
        self,
        in_features: int,
        image_shape: Sequence[int],
        channels: Sequence[int] = (64, 32),
        activation: str = "relu",
        params_per_pixel: int = 1,
    ):
        super().__init__()
        if len(image_shape) == 2:
            image_shape = (1, *image_shape)
        self.image_shape = tuple(int(s) for s in image_shape)
        c, h, w = self.image_shape
        self.in_features = int(in_features)
        self.params_per_pixel = int(params_per_pixel)
        self.out_features = self.params_per_pixel * c * h * w
        for _ in channels:
            h, w = _conv_out(h), _conv_out(w)
        self.start = (channels[0], h, w)
        act = _elementwise(activation)
        self.linear = nn.Sequential(nn.Linear(self.in_features, channels[0] * h * w), act())
        layers = []
        widths = list(channels) + [c * self.params_per_pixel]
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            if i < len(widths) - 2:
                layers.append(act())
        self.deconvs = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        h = self.linear(z.reshape(-1, self.in_features)).reshape(-1, *self.start)
        c, height, width = self.image_shape
        out = self.deconvs(h)[:, :, :height, :width]
        # (N, k*C, H, W) -> (N, k, C*H*W) -> flat, parameter blocks outermost
        out = out.reshape(out.shape[0], self.params_per_pixel, c * height * width)
        return out.reshape(*lead, self.out_features)


NETS: Registry = Registry("net", doc="""
Encoder/decoder pairs by name (``"mlp"``, ``"conv"``). An entry's options are its constructor's
keyword parameters; a config's ``net`` section names one.""")


@NETS.register("mlp")
class MLPNets:
    """MLP encoder and decoder; the decoder mirrors the encoder's widths.

    :param hidden: widths of the encoder's hidden layers; its length is the depth.
    :param str activation: a name in ACTIVATIONS, or "gated" (gated dense layers).
    """

    def __init__(self, hidden: Tuple[int, ...] = (256, 256), activation: str = "softplus"):
        ACTIVATIONS.get(activation)  # an unknown name is an error now, with the choices
        self.hidden, self.activation = tuple(hidden), activation

    def encoder(self, data_dim: int, image_shape=None):
        """A factory ``out_features -> module`` (the guide decides how many outputs it needs)."""
        return lambda n_out: MLP(data_dim, n_out, self.hidden, self.activation)

    def decoder(self, latent_dim: int, likelihood, image_shape=None) -> nn.Module:
        return MLP(latent_dim, likelihood.param_dim, self.hidden[::-1], self.activation)


@NETS.register("conv")
class ConvNets:
    """Stride-2 convolutions and a transposed mirror, for image data (the image shape comes from
    the data set).

    :param channels: channels of the encoder's convolutions (the decoder mirrors them).
    :param str activation: a name in ACTIVATIONS, or "gated" (gated dense layers; mlp only).
    """

    def __init__(self, channels: Tuple[int, ...] = (32, 64), activation: str = "softplus"):
        _elementwise(activation)
        if not channels or min(channels) < 1:
            raise UsageError(f"channels must be positive, got {channels}")
        self.channels, self.activation = tuple(channels), activation

    def encoder(self, data_dim: int, image_shape=None):
        if image_shape is None:
            raise UsageError("net 'conv' needs image data; this data set has no image shape")
        return lambda n_out: ConvEncoder(image_shape, n_out, self.channels, self.activation)

    def decoder(self, latent_dim: int, likelihood, image_shape=None) -> nn.Module:
        if image_shape is None:
            raise UsageError("net 'conv' needs image data; this data set has no image shape")
        return ConvDecoder(latent_dim, image_shape, self.channels[::-1], self.activation,
                           params_per_pixel=likelihood.params_per_dim)
