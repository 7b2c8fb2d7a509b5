"""Where a warning raised deep inside the package should point: the user's line."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

_INSIDE = (str(Path(__file__).resolve().parent), str(Path(torch.__file__).resolve().parent))


def outside_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called by the caller of this function that names the
    first frame outside this package, torch and functools (decorators), wherever the warning is
    raised."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(_INSIDE)
                                 or "functools" in frame.f_code.co_filename):  # fmt: skip
        frame, level = frame.f_back, level + 1
    return level
