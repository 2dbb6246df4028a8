"""Shared fixtures."""

import pickle
import struct
from typing import Any, Callable

import pytest


class _Py2StylePickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it: ``bytes`` become py2 ``str`` (BINSTRING opcodes, which
    Python 3 reads back with ``encoding="latin1"``), and numpy's module is ``numpy.core``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str

    def save_global(self, obj: Any, name: Any = None) -> None:
        module = getattr(obj, "__module__", "")
        if module.startswith("numpy._core"):
            qualname = name or obj.__qualname__
            self.write(pickle.GLOBAL + f"numpy.core{module[len('numpy._core'):]}\n"
                       f"{qualname}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch[type(len)] = save_global  # builtin functions such as _reconstruct


@pytest.fixture
def py2_pickle_dumps() -> Callable[[Any], bytes]:
    """``dumps(obj)``: a protocol-2 pickle laid out as Python 2 (MSRA's ``.pkl`` files)
    wrote it. Pass ``bytes`` keys to get py2 ``str`` keys."""

    def dumps(obj: Any) -> bytes:
        import io

        buf = io.BytesIO()
        _Py2StylePickler(buf, protocol=2).dump(obj)
        return buf.getvalue()

    return dumps
