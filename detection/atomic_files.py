"""Writing files atomically: a temporary file in the same folder, flushed to disk, then
renamed over the target. A crash leaves the previous file intact, never a half-written one."""

import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Union

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[IO], None], *, binary: bool = True) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it and rename it to
    ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})
                       ) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), binary=False)
