import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory):
    """Generated data (MNIST-1D) is cached for the whole run in a fresh directory, which the
    subprocesses the tests start inherit: the suite neither reads nor fills the user's cache."""
    old = os.environ.get("EFFORTLESS_CACHE")
    os.environ["EFFORTLESS_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))
    yield
    if old is None:
        os.environ.pop("EFFORTLESS_CACHE")
    else:
        os.environ["EFFORTLESS_CACHE"] = old


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


class InPlace(nn.Module):
    """In-place ops on layer outputs: ReLU(inplace=True) and ``z += h`` (the torchvision ResNet
    pattern), which change the tensors the hook engine saved."""

    def __init__(self, d=4, c=3):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(d, 5), nn.Linear(5, 5), nn.Linear(5, c)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.act(self.inp(x))
        z = self.mid(h)
        z += h
        return self.out(self.act(z))


class ConvVariants(nn.Module):
    """Convolutions beyond the plain one: reflect padding, a depthwise (grouped) convolution with
    padding="same", and a grouped Conv1d with circular padding."""

    def __init__(self, c=3):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect")
        self.c2 = nn.Conv2d(4, 4, 2, padding="same", groups=4)  # (an even kernel: asymmetric padding)
        self.c3 = nn.Conv1d(4, 2, 3, padding=1, padding_mode="circular", groups=2)
        self.out = nn.Linear(2 * 25, c)

    def forward(self, x):
        h = torch.tanh(self.c2(torch.tanh(self.c1(x.view(-1, 1, 5, 5)))))
        return self.out(torch.tanh(self.c3(h.flatten(2))).flatten(1))


class Decoder(nn.Module):
    """Transposed convolutions (stride, padding, output_padding; 2-D then 1-D), as in decoders."""

    def __init__(self, c=3):
        super().__init__()
        self.up2 = nn.ConvTranspose2d(1, 2, 3, stride=2, padding=1, output_padding=1)  # 2×2 -> 4×4
        self.up1 = nn.ConvTranspose1d(2, 1, 2, stride=2, bias=False)  # 16 -> 32
        self.out = nn.Linear(32, c)

    def forward(self, x):
        h = torch.tanh(self.up2(x.view(-1, 1, 2, 2))).flatten(2)
        return self.out(torch.tanh(self.up1(h)).flatten(1))


class InstanceNormNet(nn.Module):
    """InstanceNorm2d (each sample's own statistics) and InstanceNorm1d tracking running statistics,
    which it uses in eval mode (the module is put in eval mode; in training mode both use the
    sample's own)."""

    def __init__(self, c=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.in2 = nn.InstanceNorm2d(4, affine=True)
        self.in1 = nn.InstanceNorm1d(4, affine=True, track_running_stats=True)
        self.in1.running_mean.uniform_(-0.5, 0.5)
        self.in1.running_var.uniform_(0.5, 2.0)
        self.out = nn.Linear(36, c)
        self.eval()

    def forward(self, x):
        # (tanh before in2: right after the convolution it would remove the bias, whose curvature
        # would then be exactly zero, equal to the reference only up to the dtype's round-off)
        h = torch.tanh(self.in2(torch.tanh(self.conv(x.view(-1, 1, 5, 5))))).flatten(2)  # (B, 4, 9)
        return self.out(torch.tanh(self.in1(h)).flatten(1))


class TinyTransformer(nn.Module):
    """A hand-written pre-norm attention block (RMSNorm, a fused q/k/v Linear, scaled dot-product
    attention, a residual): every parameter sits in a Linear or RMSNorm, so the hook engine
    serves it (nn.MultiheadAttention would not: it uses its weights outside any such layer)."""

    def __init__(self, c=3):
        super().__init__()
        self.inp, self.qkv, self.proj = nn.Linear(2, 4), nn.Linear(4, 12), nn.Linear(4, 4)
        self.norm = nn.RMSNorm(4)
        self.out = nn.Linear(4, c)

    def forward(self, x):
        h = self.inp(x.view(-1, 2, 2))  # (B, T=2, 4)
        q, k, v = self.qkv(self.norm(h)).chunk(3, -1)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v))
        return self.out(torch.tanh(h).mean(1))


class Unused(nn.Module):
    """A registered layer the forward never calls (a spare head, a branch switched off): its
    parameters have no gradient at all, and zero curvature."""

    def __init__(self, d=4, c=3):
        super().__init__()
        self.inp, self.spare, self.out = nn.Linear(d, 5), nn.Linear(5, c), nn.Linear(5, c)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


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


class Conv1dNet(nn.Module):
    def __init__(self, c=3):
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * 3, c)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x[:, None, :5])).flatten(1))


class BNNet(nn.Module):
    """Conv + BatchNorm2d (eval) + Linear + BatchNorm1d (eval)."""

    def __init__(self, c=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 25, 4)
        self.bn1 = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, c)
        for bn in (self.bn, self.bn1):  # non-trivial running statistics
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.5, 0.5)
        self.eval()

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x.view(-1, 1, 5, 5))))
        return self.out(torch.tanh(self.bn1(self.fc(h.flatten(1)))))


class Sequence(nn.Module):
    """A Linear applied over a sequence dimension (per-sample gradients sum over positions)."""

    def __init__(self, c=3):
        super().__init__()
        self.emb = nn.Linear(2, 3)
        self.out = nn.Linear(3, c)

    def forward(self, x):
        h = torch.tanh(self.emb(x.view(x.shape[0], 2, 2)))  # (B, T=2, 3)
        return self.out(h.mean(1))


class EmbedNet(nn.Module):
    """Embedding of token ids (repeated tokens within a sample) + LayerNorm over a sequence."""

    def __init__(self, c=3):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.norm = nn.LayerNorm(3)
        self.out = nn.Linear(3, c)

    def forward(self, x):
        ids = (x.abs() * 3).long().clamp(max=4)  # (B, 4) ids in [0, 5), repeats likely
        h = torch.tanh(self.norm(self.emb(ids)))  # (B, T, 3)
        return self.out(h.mean(1))


class Recurrent(nn.Module):
    """An LSTM over a 2-step sequence (torch.func.vmap cannot batch it: per-sample loop)."""

    def __init__(self, c=3):
        super().__init__()
        self.rnn = nn.LSTM(2, 3, batch_first=True)
        self.out = nn.Linear(3, c)

    def forward(self, x):
        h, _ = self.rnn(x.view(x.shape[0], 2, 2))
        return self.out(h[:, -1])


class Attention(nn.Module):
    """A Transformer encoder layer over a 2-token sequence (scaled_dot_product_attention)."""

    def __init__(self, c=3):
        super().__init__()
        self.inp = nn.Linear(2, 4)
        self.enc = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
        self.out = nn.Linear(4, c)
        self.eval()

    def forward(self, x):
        return self.out(self.enc(self.inp(x.view(x.shape[0], 2, 2))).mean(1))


def make_model(kind: str, out: int = 3) -> nn.Module:
    """Tiny float64 networks of several architectures (inputs have 25 features for the CNN, else 4)."""
    table = {
        "mlp": lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, out)),
        "cnn": lambda: SmallCNN(out),
        "residual": lambda: Residual(4, out),
        "layernorm": lambda: nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, out)),
        "shared": lambda: Shared(4, out),
        "conv1d": lambda: Conv1dNet(out),
        "batchnorm": lambda: BNNet(out),
        "sequence": lambda: Sequence(out),
        "embedding": lambda: EmbedNet(out),
        "recurrent": lambda: Recurrent(out),
        "attention": lambda: Attention(out),
        "inplace": lambda: InPlace(4, out),
        "unused": lambda: Unused(4, out),
        "convvariants": lambda: ConvVariants(out),
        "decoder": lambda: Decoder(out),
        "instancenorm": lambda: InstanceNormNet(out),
        "transformer": lambda: TinyTransformer(out),
        "groupnorm": lambda: nn.Sequential(nn.Unflatten(1, (1, 5, 5)), nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4),
                                           nn.Tanh(), nn.Flatten(),
                                           nn.Linear(36, out)),  # (its own statistics per sample)
    }
    return table[kind]().double()


def make_batch(kind: str, likelihood: str, n: int = 6, out: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = ("cnn", "batchnorm", "convvariants", "groupnorm", "instancenorm")  # 5×5, one channel
    d = 25 if kind in images else 5 if kind == "conv1d" else 4
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if likelihood == "classification":
        y = torch.randint(0, out, (n,), generator=g)
    else:
        y = torch.randn(n, out, generator=g, dtype=torch.float64)
    return x, y


ARCHS = ["mlp", "cnn", "residual", "layernorm", "shared"]


def per_draw(model, posterior, x, n: int, seed: int) -> torch.Tensor:
    """The reference MC predictive's outputs (n, ...): each posterior draw (a generator seeded with
    ``seed``, the draws ef.predict makes from it) loaded into the model, which runs whole."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        outs = []
        for _ in range(n):
            with posterior.sampled(model, gen):
                outs.append(model(x))
    return torch.stack(outs)
