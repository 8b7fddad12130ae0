"""Large host result buffers: recycled once their users drop them, on transparent huge pages.

A gradient the size of the logits is written exactly once, so a fresh allocation costs its
first-touch page faults, in which the kernel zeroes every page: at W1, (4096, 32000) float32,
``cross_entropy_with_grad`` took 124 ms allocating its gradient against 75 ms writing into a
reused ``out=`` buffer (2-core Xeon; huge pages alone: 120 ms, the zeroing remains).  JAX's
and torch's allocators reuse their buffers; so does fastce, here:

- ``empty(shape, dtype)`` hands out buffers of at least ``POOL_MIN`` bytes from a pool of
  anonymous mappings (advised MADV_HUGEPAGE where Linux has transparent huge pages).  A
  mapping is free again once no array, view or exported buffer refers to it any more: each
  one holds a reference to its mapping, so a mapping whose reference count is back to the
  pool's own is unused (CPython's reference counts; a view of a view still refers to it).
- The pool holds at most ``max_bytes`` (default 1 GiB, ``FASTCE_POOL_BYTES`` in the environment,
  ``set_pool_bytes`` at run time); 0 turns it off.  Free mappings are dropped, oldest first,
  to make room for a new size; a buffer that does not fit is a plain allocation.
- Smaller buffers, and everything when the pool is off, are ``np.empty``.
- ``advise_huge(array)``: for large buffers another allocator hands fastce to fill (XLA's
  result buffers in ``fastce.jax``), huge pages for their whole 2 MiB pages.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
import threading

import numpy as np

__all__ = ["empty", "advise_huge", "set_pool_bytes", "pool_info", "POOL_MIN"]

POOL_MIN = 8 << 20               # buffers from this size come from the pool
# Where a buffer starts in its mapping: half a page away from page-aligned and malloc'd arrays
# (NumPy's large arrays start 16 bytes into a page).  Copying between two arrays whose
# addresses agree modulo 4 KiB stalls each load on the store just before it ("4K aliasing"):
# np.copyto(numpy_array, gradient) at W1 took 130 ms from a page-aligned buffer, 45 ms from
# this offset (2-core EPYC); fastce's own kernels ran the same at either.
_OFFSET = 2048
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)


def _env_bytes():
    try:
        return max(0, int(os.environ.get("FASTCE_POOL_BYTES", 1 << 30)))
    except ValueError:
        return 1 << 30


class _Pool:
    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self.maps = []                   # held mappings, oldest first
        self.lock = threading.Lock()
        self.baseline = None

    def _is_free(self, i):
        """Whether mapping i is referred to by self.maps alone (called the same way as when
        the baseline was measured: no other name may hold the mapping meanwhile)."""
        return sys.getrefcount(self.maps[i]) <= self.baseline

    def _drop_free(self, held, target):
        """Drop free mappings, oldest first, until at most ``target`` bytes are held."""
        i = 0
        while held > target and i < len(self.maps):
            if self._is_free(i):
                held -= len(self.maps.pop(i))
            else:
                i += 1
        return held

    def take(self, nbytes):
        """A mapping of exactly ``nbytes`` bytes, reused if one is free; None if the pool
        cannot hold it (the caller allocates outside the pool)."""
        with self.lock:
            for i in range(len(self.maps)):
                if len(self.maps[i]) == nbytes and self._is_free(i):
                    self.maps.append(self.maps.pop(i))      # most recently used last
                    return self.maps[-1]
            held = self._drop_free(sum(map(len, self.maps)),
                                   max(0, self.max_bytes - nbytes))
            if held + nbytes > self.max_bytes:
                return None
            m = _new_map(nbytes)
            if m is not None:
                self.maps.append(m)
            return m

    def shrink(self):
        """Drop the free mappings above max_bytes (all free ones when it is 0)."""
        with self.lock:
            self._drop_free(sum(map(len, self.maps)), self.max_bytes)


def _new_map(nbytes):
    try:
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError, AttributeError):
        return None
    if _MADV_HUGEPAGE is not None:
        try:
            m.madvise(_MADV_HUGEPAGE)
        except (OSError, ValueError):
            pass
    return m


_POOL = _Pool(_env_bytes())
_HUGE = 2 << 20
_libc_madvise = None


def advise_huge(a):
    """Advise transparent huge pages (MADV_HUGEPAGE) for the whole 2 MiB pages inside a large
    array's memory, before it is first written: at W1, writing fastce's gradient into a fresh
    XLA buffer took 200 ms on 4 KiB pages and 115 ms after this.  Advice only: the contents
    and the mapping stay as they are, and failures (no THP, not Linux) are ignored."""
    global _libc_madvise
    if a.nbytes < POOL_MIN or _MADV_HUGEPAGE is None or not sys.platform.startswith("linux"):
        return
    if _libc_madvise is None:
        f = ctypes.CDLL(None, use_errno=True).madvise
        f.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        f.restype = ctypes.c_int
        _libc_madvise = f
    start = a.__array_interface__["data"][0]
    lo = -(-start // _HUGE) * _HUGE
    hi = (start + a.nbytes) // _HUGE * _HUGE
    if hi > lo:
        _libc_madvise(lo, hi - lo, _MADV_HUGEPAGE)


def _unlock_in_child():
    # A forked child keeps the parent's mappings (copy-on-write) but not its other threads:
    # the lock may have been held by one of them at fork time.
    _POOL.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_unlock_in_child)


def _measure_baseline():
    """The reference count that _is_free sees for a mapping held by the pool alone."""
    probe = _Pool(0)
    probe.maps.append(mmap.mmap(-1, mmap.PAGESIZE))
    probe.baseline = -1
    count = sys.getrefcount(probe.maps[0])
    probe.maps.clear()
    return count


_POOL.baseline = _measure_baseline()


def set_pool_bytes(max_bytes):
    """Cap the bytes that fastce's pool of large result buffers may hold (0: no pool).  Returns
    the previous cap.  Buffers in use are never taken back; free ones above the cap are
    released now."""
    max_bytes = int(max_bytes)
    if max_bytes < 0:
        raise ValueError(f"fastce: the pool's size must be >= 0 bytes, got {max_bytes}")
    old, _POOL.max_bytes = _POOL.max_bytes, max_bytes
    _POOL.shrink()
    return old


def may_hold(nbytes):
    """Whether a buffer of ``nbytes`` (and its offset) is within the pool's cap (False when the
    pool is off)."""
    return 0 < nbytes and nbytes + _OFFSET <= _POOL.max_bytes


def pool_info():
    """{"max_bytes", "held_bytes", "free_bytes", "buffers"} of the pool, now."""
    with _POOL.lock:
        held = sum(map(len, _POOL.maps))
        free = sum(len(_POOL.maps[i]) for i in range(len(_POOL.maps)) if _POOL._is_free(i))
        return {"max_bytes": _POOL.max_bytes, "held_bytes": held, "free_bytes": free,
                "buffers": len(_POOL.maps)}


def empty(shape, dtype):
    """An uninitialised, writable, C-contiguous NumPy array; a large one from the pool (or on
    huge pages when the pool cannot hold it).  The array keeps its mapping in use until the
    last array or view of it is gone."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < POOL_MIN or dtype.hasobject:
        return np.empty(shape, dtype)
    m = _POOL.take(nbytes + _OFFSET)
    if m is None:
        m = _new_map(nbytes + _OFFSET)
        if m is None:
            return np.empty(shape, dtype)
    return np.ndarray(shape, dtype, buffer=m, offset=_OFFSET)
