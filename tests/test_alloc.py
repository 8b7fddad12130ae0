"""The pool of large result buffers (fastce._alloc): recycled only once nothing refers to them."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import fastce
from fastce import _alloc

SHAPE = (2048, 1024)            # 8 MiB of float32: the pool's smallest size


def _addr(a):
    return a.__array_interface__["data"][0]


@pytest.fixture
def pool():
    old = fastce.set_pool_bytes(64 << 20)
    yield
    fastce.set_pool_bytes(old)


def test_a_dropped_buffer_is_reused_and_a_live_one_never(pool):
    a = _alloc.empty(SHAPE, np.float32)
    b = _alloc.empty(SHAPE, np.float32)
    assert _addr(a) != _addr(b)
    pa = _addr(a)
    view = a[3:]
    mv = memoryview(b)
    del a, b
    held = [_alloc.empty(SHAPE, np.float32) for _ in range(2)]      # a's view, b's memoryview
    assert pa not in {_addr(h) for h in held}
    del view
    c = _alloc.empty(SHAPE, np.float32)
    assert _addr(c) == pa
    c[...] = 1.0
    del mv
    assert all(not np.shares_memory(c, h) for h in held)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
def test_buffers_start_half_a_page_from_other_arrays(pool, dtype):
    """Pool buffers start 2 KiB into a page, away from NumPy's and malloc's large arrays
    (a few bytes into theirs): copies between two arrays at the same place in their pages
    run ~3x slower (4K aliasing)."""
    shape = (_alloc.POOL_MIN // np.dtype(dtype).itemsize // 1024, 1024)
    for _ in range(2):                              # a new mapping, then a reused one
        a = _alloc.empty(shape, dtype)
        assert _addr(a) % 4096 == 2048 and _addr(a) % 64 == 0
        assert a.flags.c_contiguous and a.flags.writeable and a.shape == shape
        a[-1, -1] = 1                               # the mapping covers the whole array
        del a


def test_may_hold_says_whether_the_pool_takes_the_buffer(pool):
    """may_hold (what the Dask backend asks before planning a slab) counts the offset too."""
    nbytes = _alloc.POOL_MIN
    for cap, pooled in ((nbytes + _alloc._OFFSET, True), (nbytes, False)):
        fastce.set_pool_bytes(0)
        fastce.set_pool_bytes(cap)
        assert _alloc.may_hold(nbytes) is pooled
        a = _alloc.empty((nbytes // 4,), np.float32)
        assert fastce.pool_info()["buffers"] == (1 if pooled else 0)
        del a


def test_small_buffers_and_object_dtypes_bypass_the_pool(pool):
    before = fastce.pool_info()["buffers"]
    assert _alloc.empty((10, 10), np.float32).flags.owndata
    big_objects = _alloc.empty((2048, 1024), object)
    assert big_objects.flags.owndata and big_objects.dtype == object
    assert fastce.pool_info()["buffers"] == before


def test_the_cap_holds_and_zero_releases_the_free_buffers(pool):
    fastce.set_pool_bytes(20 << 20)                 # room for two 8 MiB buffers
    keep = [_alloc.empty(SHAPE, np.float32) for _ in range(4)]
    info = fastce.pool_info()
    assert info["held_bytes"] <= 20 << 20 and info["buffers"] == 2
    assert all(k.shape == SHAPE and k.flags.writeable and k.flags.c_contiguous for k in keep)
    del keep
    assert fastce.pool_info()["free_bytes"] == 2 * ((16 << 20) // 2 + _alloc._OFFSET)
    assert fastce.set_pool_bytes(0) == 20 << 20
    assert fastce.pool_info()["held_bytes"] == 0
    with pytest.raises(ValueError, match=">= 0"):
        fastce.set_pool_bytes(-1)


def test_recycled_gradients_are_fully_rewritten(pool):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 1500)).astype(np.float32)
    t = rng.integers(0, 1500, 2048)
    want_loss, want = fastce.cross_entropy_with_grad(x, t, out=np.empty_like(x))
    loss, g = fastce.cross_entropy_with_grad(x, t)
    first = _addr(g)
    g[...] = np.nan                                 # garbage left in the buffer
    del g
    loss2, g2 = fastce.cross_entropy_with_grad(x, t)
    assert _addr(g2) == first
    assert loss == loss2 == want_loss
    np.testing.assert_array_equal(g2, want)
    s = fastce.softmax(x, axis=-1)
    np.testing.assert_array_equal(s, fastce.softmax(x.copy(), axis=-1))
    assert not np.shares_memory(s, g2)


def test_the_environment_sets_the_cap():
    code = "import fastce; print(fastce.pool_info()['max_bytes'])"
    for value, want in (("0", "0"), ("12345", "12345"), ("junk", str(1 << 30))):
        env = dict(os.environ, FASTCE_POOL_BYTES=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
        assert out == want


def _vm_flags(addr):
    """The VmFlags of the mapping holding addr (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps") or _alloc._MADV_HUGEPAGE is None,
                    reason="needs Linux's /proc/self/smaps and MADV_HUGEPAGE")
def test_advise_huge_marks_the_whole_huge_pages_and_keeps_the_contents():
    import mmap
    m = mmap.mmap(-1, 12 << 20)        # another allocator's memory (NumPy advises its own)
    a = np.frombuffer(m, np.uint8)
    a[:] = 7
    mid = _addr(a) + (6 << 20)
    assert "hg" not in _vm_flags(mid)
    _alloc.advise_huge(a)
    assert "hg" in _vm_flags(mid)
    assert (a == 7).all()
    small = np.empty(1 << 20, np.uint8)             # below POOL_MIN: left alone
    _alloc.advise_huge(small)
    _alloc.advise_huge(a[1:])                       # unaligned starts are rounded inwards
    del a
    m.close()
