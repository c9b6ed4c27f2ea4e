"""A MONAI image encoder for mmfed, plugged in through the encoder entry point.

    PYTHONPATH=examples/encoders mmfed simulate \
        --set model.image_encoder=monai_encoder:image_encoder

``monai.networks.nets.Regressor`` is a stack of strided residual convolution units with a
linear layer mapping to any output shape: here the embedding the fusion expects. Two
choices make it trainable under DP-SGD: GroupNorm instead of the BatchNorm most image
networks use (Opacus refuses BatchNorm, whose batch statistics mix patients: mmfed
names the offending layer), and few, narrow channels, since DP noise grows with every
parameter. A tanh bounds the embedding like the built-in encoders'.

Deployed sites run this file only once they approve it: each lists
``mmfed app hash --encoder monai_encoder:image_encoder`` in ``approved_encoders``.
"""

from __future__ import annotations

from typing import Any

from monai.networks.nets import Regressor
from torch import nn


class MonaiImageEncoder(nn.Module):
    """(n, 1, H, W) images → (n, out_dim) embeddings, through a MONAI Regressor."""

    def __init__(self, out_dim: int, image_size: tuple[int, int],
                 norm: Any = ("group", {"num_groups": 2})) -> None:
        super().__init__()
        # halve the resolution first: a quarter of the convolution cost per patient,
        # which DP-SGD pays again for every per-sample gradient
        self.stem = nn.AvgPool2d(2, ceil_mode=True)
        size = tuple((s + 1) // 2 for s in image_size)
        self.net = Regressor(in_shape=(1, *size), out_shape=(out_dim,), channels=(4, 8),
                             strides=(2, 2), num_res_units=1, act="TANH", norm=norm)

    def forward(self, x: Any) -> Any:
        return self.net(self.stem(x)).tanh()


def image_encoder(out_dim: int, schema: Any) -> nn.Module:
    """The entry point: ``model.image_encoder = "monai_encoder:image_encoder"``."""
    return MonaiImageEncoder(out_dim, tuple(schema.image_size))


def batchnorm_image_encoder(out_dim: int, schema: Any) -> nn.Module:
    """The same network with MONAI's default-style BatchNorm: mmfed refuses it under DP."""
    return MonaiImageEncoder(out_dim, tuple(schema.image_size), norm="BATCH")
