"""Files written whole or not at all."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``: a process
    killed while writing leaves the old file (a truncated results file or checkpoint lost
    everything in it), and a concurrent reader sees the old file or the new one. The temporary
    file is removed if ``write`` fails, and the error passed on.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "rows.json"
        >>> write_atomic(p, lambda tmp: tmp.write_text("[]"))
        >>> p.read_text(), [f.name for f in p.parent.iterdir()]
        ('[]', ['rows.json'])
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # (per process: two writers never share one)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
