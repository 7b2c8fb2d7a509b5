import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


class Residual(nn.Module):
    def __init__(self, d=4, c=3):
        super().__init__()
        self.inp = nn.Linear(d, 5)
        self.block = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5))
        self.out = nn.Linear(5, c)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h + self.block(h))


class Shared(nn.Module):
    """The same weight used twice (weight sharing)."""

    def __init__(self, d=4, c=3):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.out = nn.Linear(d, c)

    def forward(self, x):
        return self.out(torch.tanh(self.a(torch.tanh(self.a(x)))))


class SmallCNN(nn.Module):
    def __init__(self, c=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 3 * 3, c)

    def forward(self, x):
        x = x.view(-1, 1, 5, 5)
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def make_model(kind: str, out: int = 3) -> nn.Module:
    """Tiny float64 networks of several architectures (inputs have 25 features for the CNN, else 4)."""
    table = {
        "mlp": lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, out)),
        "cnn": lambda: SmallCNN(out),
        "residual": lambda: Residual(4, out),
        "layernorm": lambda: nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, out)),
        "shared": lambda: Shared(4, out),
    }
    return table[kind]().double()


def make_batch(kind: str, likelihood: str, n: int = 6, out: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d = 25 if kind == "cnn" else 4
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if likelihood == "classification":
        y = torch.randint(0, out, (n,), generator=g)
    else:
        y = torch.randn(n, out, generator=g, dtype=torch.float64)
    return x, y


ARCHS = ["mlp", "cnn", "residual", "layernorm", "shared"]
