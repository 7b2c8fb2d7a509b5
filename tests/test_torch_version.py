"""The oldest torch effortless supports: named on import when older, and the same as the package's
requirement."""

import re
import warnings
from pathlib import Path

import pytest

import effortless as ef


@pytest.mark.parametrize("version", ["2.4.1+cu121", "2.5.0", "1.13.1", "2.5.0a0+git1234abc"])
def test_an_older_torch_is_named_with_what_it_lacks(version):
    match = rf"needs torch >= 2\.6, found {re.escape(version)}.*named_parameters"
    with pytest.warns(RuntimeWarning, match=match):
        ef._check_torch(version)


@pytest.mark.parametrize("version", ["2.6.0", "2.6.0+cu124", "2.13.0+cpu", "2.15.0a0+git1", "3.0.0", "10.1"])
def test_a_supported_torch_is_not_warned_about(version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ef._check_torch(version)


def test_the_check_and_the_package_requirement_name_the_same_torch():
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=(\d+)\.(\d+)"', pyproject)
    assert floor is not None and tuple(int(v) for v in floor.groups()) == ef._OLDEST_TORCH
