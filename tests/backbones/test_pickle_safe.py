import collections
import os
import pickle

import numpy as np
import pytest

from backbones.pickle_safe import SafeUnpickler, allowed_globals, safe_load, safe_loads


class _RunsShell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evals:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_arrays_scalars_and_containers_round_trip():
    data = {
        "blobs": collections.OrderedDict(
            conv1_w=np.random.rand(4, 3, 7, 7).astype(np.float32),
            pred_b=np.arange(5, dtype=np.float64),
            ids=np.array([1, 2, 3], dtype=np.int64),
        ),
        "scale": np.float32(0.5),
        "meta": ["a", 1, 2.0, (None, True)],
    }
    out = safe_loads(pickle.dumps(data, protocol=2))
    assert isinstance(out["blobs"], collections.OrderedDict)
    for key, value in data["blobs"].items():
        np.testing.assert_array_equal(out["blobs"][key], value)
        assert out["blobs"][key].dtype == value.dtype
    assert out["scale"] == np.float32(0.5)
    assert out["meta"] == ["a", 1, 2.0, (None, True)]


def test_numpy1_module_names_and_latin1_strings(tmp_path):
    weights = np.random.rand(8, 8).astype(np.float32)
    raw = pickle.dumps({"blobs": {"res2_0_branch2a_w": weights}}, protocol=2)
    assert b"numpy._core.multiarray" in raw
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # numpy 1 spelling
    path = tmp_path / "np1.pkl"
    path.write_bytes(raw)
    out = safe_load(path)
    np.testing.assert_array_equal(out["blobs"]["res2_0_branch2a_w"], weights)
    # a Python 2 str (SHORT_BINSTRING) holding non-ASCII bytes decodes as latin-1
    assert safe_loads(b"\x80\x02U\x02\xe9\xff.") == "\xe9\xff"


def test_shell_command_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    raw = pickle.dumps({"w": _RunsShell(f"touch {marker}")}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"system"):
        safe_loads(raw)
    assert not marker.exists()
    # the same bytes through the plain unpickler would have run it: the test is meaningful
    pickle.loads(raw)
    assert marker.exists()


def test_eval_refused_naming_module_and_name():
    with pytest.raises(pickle.UnpicklingError, match=r"'builtins\.eval'"):
        safe_loads(pickle.dumps(_Evals(), protocol=4))
    with pytest.raises(pickle.UnpicklingError, match=r"'__builtin__\.eval'"):  # py2 spelling
        safe_loads(pickle.dumps(_Evals(), protocol=2))


@pytest.mark.parametrize("module,name", [
    ("builtins", "exec"), ("subprocess", "Popen"), ("numpy", "load"),
    ("numpy.testing._private.utils", "runstring"), ("torch", "load"), ("collections", "deque"),
])
def test_other_globals_refused(module, name):
    raw = f"c{module}\n{name}\n.".encode()  # protocol 0: push a global, stop
    with pytest.raises(pickle.UnpicklingError, match=f"{module}.{name}"):
        safe_loads(raw)


def test_codecs_encode_only_for_latin1():
    # what protocol 2 from Python 3 writes for bytes: _codecs.encode(text, "latin1")
    assert safe_loads(pickle.dumps(b"\x00\xff", protocol=2)) == b"\x00\xff"
    raw = pickle.dumps(b"abc", protocol=2).replace(b"latin1", b"rot_13")
    with pytest.raises(pickle.UnpicklingError, match="rot_13"):
        safe_loads(raw)


def test_allowlist_is_small():
    allowed = allowed_globals()
    assert ("collections", "OrderedDict") in allowed
    assert len(allowed) <= 6
    assert all(m.split(".")[0] in ("numpy", "collections", "_codecs") for m, _ in allowed)
    assert issubclass(SafeUnpickler, pickle.Unpickler)
