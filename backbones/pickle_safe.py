"""Reading ``.pkl`` weight files without running code from them.

A pickle can name any importable callable and have it called while loading (``os.system``,
``builtins.eval``, ...). The MSRA / detectron2 weight files need only numpy arrays, numpy
scalars and containers, so ``SafeUnpickler`` admits exactly the globals that rebuild those and
refuses every other one with ``pickle.UnpicklingError``.

The files were written by Python 2 (load them with ``encoding="latin1"``) and name
``numpy.core.multiarray``, which numpy 2 renamed to ``numpy._core.multiarray``; both spellings
are accepted. Protocol-2 pickles written by Python 3 store ``bytes`` as
``_codecs.encode(text, "latin1")``: that call is admitted for the latin-1 codec only.
"""

import codecs
import importlib
import io
import os
import pickle
from typing import Any, BinaryIO, Tuple, Union

# (module, name) pairs a weight file may reference, with numpy's modules in their numpy 2 spelling.
ALLOWED_GLOBALS = frozenset({
    ("numpy._core.multiarray", "_reconstruct"),  # ndarray.__reduce__
    ("numpy._core.multiarray", "scalar"),  # numpy scalar __reduce__
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles from Python 3; latin-1 only
})

# numpy 1.x module paths -> numpy 2.x ones.
_NUMPY_RENAMES = {
    "numpy.core.multiarray": "numpy._core.multiarray",
    "numpy.core": "numpy._core",
}


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` restricted to what pickle's protocol 2 uses for ``bytes``."""
    if codecs.lookup(encoding).name != "iso8859-1" or errors != "strict":
        raise pickle.UnpicklingError(
            f"refusing _codecs.encode with encoding {encoding!r}: only latin1 is allowed"
        )
    if not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode of {type(text).__name__}")
    return codecs.encode(text, "latin1")


def _import_attr(module: str, name: str) -> Any:
    """``module.name``; for numpy 1.x, which lacks ``numpy._core``, fall back to ``numpy.core``."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        if not module.startswith("numpy._core"):
            raise
        mod = importlib.import_module(module.replace("numpy._core", "numpy.core", 1))
    return getattr(mod, name)


class SafeUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` admits only ``ALLOWED_GLOBALS``.

    Anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ``torch._utils``...)
    raises ``pickle.UnpicklingError`` naming the module and the name, before it is imported.
    """

    def find_class(self, module: str, name: str) -> Any:
        canonical = _NUMPY_RENAMES.get(module, module)
        if (canonical, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': weight files may only contain "
                "numpy arrays, numbers, strings and containers"
            )
        if (canonical, name) == ("_codecs", "encode"):
            return _latin1_encode
        return _import_attr(canonical, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"refusing persistent id {pid!r} in a weight file")


def safe_load(file: Union[str, "os.PathLike[str]", BinaryIO]) -> Any:
    """Unpickle a file (path or binary file object) with ``SafeUnpickler``, latin-1 strings."""
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as f:
            return SafeUnpickler(f, encoding="latin1").load()
    return SafeUnpickler(file, encoding="latin1").load()


def safe_loads(data: bytes) -> Any:
    """``safe_load`` for a bytes object."""
    return safe_load(io.BytesIO(data))


def allowed_globals() -> Tuple[Tuple[str, str], ...]:
    """The (module, name) pairs ``SafeUnpickler`` admits, sorted."""
    return tuple(sorted(ALLOWED_GLOBALS))
