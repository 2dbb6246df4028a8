"""Writing files atomically: a temporary file in the same folder, flushed to disk, renamed over
the target, then the folder itself flushed so that the rename survives a power cut. A crash at
any moment leaves the previous file intact (or no file), never a half-written one.

Temporary files are named ``.<name>.<random>.tmp``: hidden, and never with the target's
suffix, so that a reader globbing ``*.pth`` cannot pick one up. :func:`stray_temp_files`
finds the ones a killed process left behind.
"""

import os
import tempfile
from pathlib import Path
from typing import IO, Callable, List, Union

PathLike = Union[str, os.PathLike]
TEMP_SUFFIX = ".tmp"


def fsync_dir(folder: PathLike) -> None:
    """Flush a folder's entries (renames, new files) to disk. No-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename still happened
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[IO], None], *, binary: bool = True) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, rename it to ``path``
    and fsync the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
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
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), binary=False)


def stray_temp_files(folder: PathLike, name_glob: str = "*") -> List[Path]:
    """Temporary files of :func:`atomic_write` in ``folder`` whose target matches
    ``name_glob`` (left by a process killed while writing)."""
    return sorted(Path(folder).glob(f".{name_glob}.*{TEMP_SUFFIX}"))
