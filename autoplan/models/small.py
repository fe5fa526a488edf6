"""Small classifiers for quick tests: an MLP on flat vectors and a CNN on images."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def _check_positive(cfg: object, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r} must be a positive integer, e.g. {key}={getattr(type(cfg), key)}")


@dataclass(frozen=True)
class MLPConfig:
    """Shape of the MLP classifier; the default is 784 -> 1024 -> 1024 -> 10."""

    inputs: int = 784  # input features (inputs are (B, inputs) float)
    hidden: int = 1024  # width of every hidden layer
    layers: int = 2  # number of hidden Linear+GELU layers
    classes: int = 10  # output classes (logits' last dimension)

    def __post_init__(self) -> None:
        _check_positive(self, ("inputs", "hidden", "layers", "classes"))


def mlp_num_params(cfg: MLPConfig) -> int:
    first = cfg.inputs * cfg.hidden + cfg.hidden
    rest = (cfg.layers - 1) * (cfg.hidden * cfg.hidden + cfg.hidden)
    return first + rest + cfg.hidden * cfg.classes + cfg.classes


class MLPClassifier(nn.Module):
    """``forward(x: (B, inputs) float) -> logits (B, classes)``."""

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.config = cfg
        widths = [cfg.inputs] + [cfg.hidden] * cfg.layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = nn.GELU()
        self.head = nn.Linear(cfg.hidden, cfg.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.act(layer(x))
        return self.head(x)


@dataclass(frozen=True)
class CNNConfig:
    """Shape of the CNN classifier: three conv3x3+ReLU+maxpool stages (widths w, 2w, 2w) and a linear head."""

    channels: int = 3  # input image channels (inputs are (B, channels, image, image) float)
    image: int = 32  # input image side; must be divisible by 8 (three 2x2 poolings)
    width: int = 32  # channels of the first conv (the next two have 2 * width)
    classes: int = 10  # output classes (logits' last dimension)

    def __post_init__(self) -> None:
        _check_positive(self, ("channels", "image", "width", "classes"))
        if self.image % 8:
            raise ValueError(f"image={self.image} is not divisible by 8 (three 2x2 poolings); use e.g. image=32")

    @property
    def widths(self) -> tuple[int, int, int]:
        return (self.width, 2 * self.width, 2 * self.width)


def cnn_num_params(cfg: CNNConfig) -> int:
    total, prev = 0, cfg.channels
    for w in cfg.widths:
        total += prev * w * 9 + w
        prev = w
    feats = prev * (cfg.image // 8) ** 2
    return total + feats * cfg.classes + cfg.classes


class CNNClassifier(nn.Module):
    """``forward(x: (B, channels, image, image) float) -> logits (B, classes)``."""

    def __init__(self, cfg: CNNConfig):
        super().__init__()
        self.config = cfg
        ins = (cfg.channels,) + cfg.widths[:-1]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, kernel_size=3, padding=1) for a, b in zip(ins, cfg.widths))
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(cfg.widths[-1] * (cfg.image // 8) ** 2, cfg.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = self.pool(self.act(conv(x)))
        return self.head(torch.flatten(x, 1))
