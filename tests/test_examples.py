"""Every script in examples/ runs (on tiny data, --quick) and prints its result."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script, tmp_path):
    out = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip(), "the example printed nothing"


def test_there_are_examples():
    assert len(EXAMPLES) >= 4
