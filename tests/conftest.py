"""Test session set-up and what several test modules share.

8 simulated CPU devices (sequence-parallel tests) and Pallas interpret mode must be set before JAX
initializes its backends, hence here and not in the test modules.

Fast and full runs: a bare `python -m pytest` deselects the tests marked `slow` (interpret-mode
kernel sweeps, property sweeps with many examples, large cross-framework sweeps: `addopts` in
pyproject.toml); `python -m pytest -m "slow or not slow"` runs everything (CI).
"""
import importlib
import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_ATTN_INTERPRET", "1")

# Where each framework keeps its backend registry (imported only when a test asks for it).
_REGISTRIES = {"jax": "jax_attn.backends", "torch": "torch_ref.backends"}


def _position(mark, params):
    """The index, in the argument values of one `parametrize` mark, of the entry a test item got."""
    names = mark.args[0] if mark.args else mark.kwargs["argnames"]
    values = mark.args[1] if len(mark.args) > 1 else mark.kwargs["argvalues"]
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    for position, entry in enumerate(values):
        got = entry.values if hasattr(entry, "marks") else (entry,) if len(names) == 1 else entry
        if all(value is params[name] for value, name in zip(got, names)):
            return position, len(values)
    raise LookupError(f"no entry of parametrize({names}) matches {params}")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.fast_diagonal` on a test with stacked parametrize: the fast run keeps a
    diagonal of its parameter grid and the other combinations are marked `slow`. With i the
    item's position in the longest parametrize list, the item is on the diagonal when its position
    in every list of length n is i % n, so every value of every list runs at least once."""
    seen: dict[str, int] = {}
    for item in items:
        every = item.get_closest_marker("fast_every")
        if every is not None:  # the fast run keeps every k-th parameter combination of the test
            name = item.nodeid.split("[")[0]
            seen[name] = seen.get(name, -1) + 1
            if seen[name] % every.args[0]:
                item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("fast_diagonal") is None or not hasattr(item, "callspec"):
            continue
        axes = [_position(mark, item.callspec.params) for mark in item.iter_markers("parametrize")]
        i = max(axes, key=lambda axis: axis[1])[0]
        if any(position != i % length for position, length in axes):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def small_chunks(request):
    """Chunk sizes that do not divide the test lengths, so the `chunked` backends run tails and
    several chunks (and chunks a window skips), for tests marked
    `pytest.mark.small_chunks(q_chunk, k_chunk, frameworks=("jax",))`; `frameworks` names whose
    `chunked` backend changes, "jax" (jax_attn) and/or "torch" (torch_ref). The sizes are put back
    after each test. Unmarked tests see the defaults.
    """
    marker = request.node.get_closest_marker("small_chunks")
    if marker is None:
        yield
        return
    q_chunk, k_chunk = marker.args
    backends = [importlib.import_module(_REGISTRIES[name]).BACKENDS["chunked"]
                for name in marker.kwargs.get("frameworks", ("jax",))]
    saved = [(b, b.q_chunk, b.k_chunk) for b in backends]
    for b in backends:
        b.q_chunk, b.k_chunk = q_chunk, k_chunk
    try:
        yield
    finally:
        for b, q, k in saved:
            b.q_chunk, b.k_chunk = q, k
