"""Large host buffers on transparent huge pages (used by the framework adapters).

A gradient the size of the logits is written exactly once, so on a fresh allocation its
first-touch page faults (one per 4 KiB page) are most of what allocating costs: at W1,
(4096, 32000) float32, ~1/3 of a training step on a 2-core VM.  An anonymous private mapping
advised MADV_HUGEPAGE faults once per 2 MiB instead, on Linux with transparent huge pages in
"madvise" or "always" mode; elsewhere this is ``np.empty``.
"""
from __future__ import annotations

import math
import mmap

import numpy as np

HUGE_MIN = 8 << 20               # buffers from this size get huge pages
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)


def empty(shape, dtype):
    """An uninitialised, writable, C-contiguous NumPy array; a large one on huge pages.  The
    array keeps its mapping alive; it is unmapped when the last user (view, tensor) is gone."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if _MADV_HUGEPAGE is None or nbytes < HUGE_MIN:
        return np.empty(shape, dtype)
    try:
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(_MADV_HUGEPAGE)
    except (OSError, ValueError, AttributeError):
        return np.empty(shape, dtype)
    return np.frombuffer(m, dtype=dtype, count=numel).reshape(shape)
