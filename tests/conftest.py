"""Session-wide test order: tests marked ``starts_processes`` run first.

In the whole suite, a process started from the pytest process after the runtime and parity
tests (at test 407 of 422, twice in a row) crashed the pytest process itself with SIGSEGV,
while the same test passed alone or early; the root cause is not found (candidates: thread
pools of oneDNN, OpenVINO and ONNX Runtime alive in the parent at fork time). It struck again
on 2026-12-02 in the test after a `subprocess.run` that came after the export tests, so every
test that starts a process is marked."""


def pytest_collection_modifyitems(items):
    first = [item for item in items if item.get_closest_marker("starts_processes")]
    items[:] = first + [item for item in items if item not in first]
