"""Small reference networks: MLP, LeNet-style CNN, 1-D CNN (each with optional MC dropout).

Example:
    >>> import torch
    >>> MLP(784, [512, 256], 10)(torch.zeros(2, 784)).shape
    torch.Size([2, 10])
    >>> LeNet()(torch.zeros(2, 784)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._checks import is_count, is_number

__all__ = ["MLP", "LeNet", "CNN1d"]


class MLP(nn.Sequential):
    """Fully connected ReLU network; ``dropout`` > 0 adds dropout after every hidden layer."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, dropout: float = 0.0):
        widths = {"in_features": in_features, "out_features": out_features}
        widths |= {f"hidden[{i}]": h for i, h in enumerate(hidden)}
        bad = {k: v for k, v in widths.items() if not is_count(v)}
        if bad:  # (0 made an empty layer with a warning, -1 failed in torch.empty)
            raise ValueError(f"MLP: widths must be positive ints, got {bad}")
        if not (is_number(dropout) and 0 <= dropout < 1):
            raise ValueError(f"MLP: dropout must be in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)


class LeNet(nn.Module):
    """LeNet-5 style CNN for 28×28 single-channel inputs (flat 784 or (B, 1, 28, 28))."""

    def __init__(self, n_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(120, 84), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(84, n_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, 28, 28)  # (B, 1, 28, 28); view(-1, ...) made 2B images of (B, 1568)
        return self.head(self.features(x))


class CNN1d(nn.Module):
    """Small 1-D CNN for MNIST-1D (40 inputs)."""

    def __init__(self, length: int = 40, n_classes: int = 10, channels: int = 32, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, channels, 5, padding=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, padding=1, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(channels * ((length + 3) // 4), n_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], 1, -1))  # (B, 1, L); any layout
