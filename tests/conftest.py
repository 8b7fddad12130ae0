"""Shared fixtures: every backend-neutral test takes ``backend`` and runs once per backend.

Backends under test:
- "cpu": always (NumPy arrays), except in the simulator run.
- "gpu": CuPy arrays on a real GPU (when CuPy and a device are present), or, when
  NUMBA_ENABLE_CUDASIM=1, the Numba CUDA simulator's device arrays.  The simulator runs every
  GPU thread in Python, so that run selects only the GPU cases, with small shapes.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _real_gpu() -> bool:
    if SIMULATOR:
        return False
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


HAVE_GPU = _real_gpu()


class Backend:
    """Moves test arrays to a backend and back."""

    def __init__(self, name):
        self.name = name
        self.simulator = name == "gpu" and SIMULATOR
        self.small = self.simulator    # keep shapes tiny under the simulator

    def to(self, a):
        """A NumPy array (or None) as this backend's array type."""
        if a is None or self.name == "cpu":
            return a
        a = np.array(a, order="C")          # (ascontiguousarray would make 0-d arrays 1-d)
        if self.simulator:
            from numba import cuda
            return cuda.to_device(a)
        import cupy
        return cupy.asarray(a)

    def host(self, a):
        """A backend result (array or scalar) as NumPy."""
        if a is None:
            return None
        if self.name == "cpu" or isinstance(a, (float, int, np.generic, np.ndarray)):
            return np.asarray(a)
        if hasattr(a, "copy_to_host"):
            return np.asarray(a.copy_to_host())
        import cupy
        return cupy.asnumpy(a)

    def __repr__(self):
        return self.name


def _backends():
    if SIMULATOR:
        return ["gpu"]
    return ["cpu"] + (["gpu"] if HAVE_GPU else [])


@pytest.fixture(params=_backends())
def backend(request):
    return Backend(request.param)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU with CuPy")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not HAVE_GPU:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _split_at_serial_below(monkeypatch):
    """Calls of SERIAL_BELOW logits or more are split over threads, as on a machine whose pool
    answers fast: the tests' shapes exercise the split kernels whatever this machine's pool
    round trip (cpu._split_threshold, tested in test_threads.py)."""
    from fastce import cpu
    monkeypatch.setattr(cpu, "_split_below", cpu.SERIAL_BELOW)
