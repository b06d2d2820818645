"""Atomic file writes: a kill during writing never leaves a truncated file under the final name."""
from __future__ import annotations

import os
import tempfile
from typing import IO, Callable, Union

__all__ = ["atomic_write"]


def atomic_write(path: Union[str, "os.PathLike[str]"], write: Callable[[IO], None], binary: bool = False) -> None:
    """Call ``write(f)`` on a temporary file in ``path``'s folder, flush it to disk, then rename it to ``path``.

    The rename is atomic on POSIX and Windows (``os.replace``), so readers see the old file or the whole new
    one; on any error (or a ``KeyboardInterrupt``) the temporary file is removed and the error re-raised.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
