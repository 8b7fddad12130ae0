"""Choose the backend from the arrays themselves: NumPy arrays (and lists) run on the CPU,
CUDA arrays (CuPy, Numba device arrays, anything with ``__cuda_array_interface__``) on the GPU.

CuPy is never imported here: a CUDA array is recognised by its interface attribute, so
``import fastce`` works on machines without CuPy or a GPU.
"""
from __future__ import annotations

import numpy as np

__all__ = ["is_device_array", "is_dask_array", "backend_for", "cpu_backend"]


def is_dask_array(a) -> bool:
    """True for a ``dask.array.Array`` or a subclass (fastce's own lazy gradients are one),
    recognised by its type: dask is never imported here."""
    return any(t.__name__ == "Array" and t.__module__.partition(".")[0] == "dask"
               for t in type(a).__mro__)


def is_device_array(a) -> bool:
    """True for CuPy arrays, Numba device arrays (real or simulated) and torch CUDA tensors."""
    if isinstance(a, np.ndarray) or a is None:
        return False
    if hasattr(type(a), "__cuda_array_interface__"):     # a class property: not evaluated
        return True
    try:
        if hasattr(a, "__cuda_array_interface__"):
            return True
    except Exception:       # the interface exists but refused (e.g. a tensor requiring grad)
        return True
    # The Numba CUDA simulator's fake device arrays carry no interface attribute.
    return type(a).__name__ == "FakeCUDAArray"


def backend_for(**named):
    """The backend (a ``fastce.backend.Backend``) for a call, given its array arguments by name.

    Raises TypeError naming the first argument whose device differs from ``input``'s: fastce
    never copies between host and device behind the caller's back.
    """
    for v in named.values():                # the common case: host arrays only
        if type(v) is not np.ndarray and v is not None:
            break
    else:
        return cpu_backend()
    items = [(k, v) for k, v in named.items() if v is not None]
    for name, value in items:
        if is_dask_array(value):
            raise TypeError(f"fastce: {name!r} is a Dask array; this function takes NumPy or "
                            f"CUDA arrays (Dask arrays are taken by cross_entropy, "
                            f"cross_entropy_with_grad, cross_entropy_backward and "
                            f"linear_cross_entropy[_with_grad])")
    first_name, first = items[0]
    on_gpu = is_device_array(first)
    for name, value in items[1:]:
        if np.isscalar(value) or (isinstance(value, np.ndarray) and value.ndim == 0 and name == "grad_output"):
            continue
        if is_device_array(value) != on_gpu:
            where = "a CUDA device" if on_gpu else "the host"
            raise TypeError(
                f"fastce: {first_name!r} is on {where} but {name!r} is not; move {name!r} to the "
                f"same device (fastce makes no implicit host/device copies)")
    if on_gpu:
        from . import gpu
        return gpu.BACKEND
    return cpu_backend()


_CPU = []


def cpu_backend():
    """The CPU backend (NumPy arrays)."""
    if not _CPU:                            # imported on first use (it compiles nothing yet)
        from . import cpu
        _CPU.append(cpu.BACKEND)
    return _CPU[0]
