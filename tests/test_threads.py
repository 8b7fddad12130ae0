"""Concurrency and determinism of the CPU backend."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest

import fastce


def test_eight_threads_agree_and_do_not_abort():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 2048)).astype(np.float32)      # large enough: parallel kernel
    t = rng.integers(0, 2048, 512)
    x2 = rng.standard_normal((4, 5, 64, 64)).astype(np.float32)
    t2 = rng.integers(0, 5, (4, 64, 64))
    want = fastce.cross_entropy_with_grad(x, t)
    want2 = fastce.cross_entropy_with_grad(x2, t2)

    def work(i):
        if i % 2:
            return fastce.cross_entropy_with_grad(x, t)
        return fastce.cross_entropy_with_grad(x2, t2)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(32)))
    for i, (loss, grad) in enumerate(results):
        ref = want if i % 2 else want2
        assert loss == ref[0]
        np.testing.assert_array_equal(grad, ref[1])


SCRIPT = textwrap.dedent("""
    import numpy as np, fastce
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 1500)).astype(np.float32)
    t = rng.integers(0, 1500, 3000)
    x2 = rng.standard_normal((2, 7, 300, 200)).astype(np.float32)
    t2 = rng.integers(0, 7, (2, 300, 200))
    w = rng.uniform(0.5, 2.0, 7).astype(np.float32)
    x3 = rng.standard_normal((200000, 5)).astype(np.float32)
    t3 = rng.integers(0, 5, 200000)
    a = fastce.cross_entropy(x, t, label_smoothing=0.1)
    b, g = fastce.cross_entropy_with_grad(x2, t2)
    c = fastce.cross_entropy(x2, t2, w, return_z_loss=True, return_token_accuracy=True)
    d = fastce.cross_entropy(x3, t3, z_loss=1e-4)
    print(repr(float(a)), repr(float(b)), float(np.abs(g).sum(dtype=np.float64)).hex(),
          repr(float(c.loss)), repr(float(c.z_loss)), repr(c.token_accuracy), repr(float(d)))
""")


def test_bitwise_identical_across_thread_counts():
    outs = []
    for n in ("1", "2"):
        env = dict(os.environ, NUMBA_NUM_THREADS=n)
        outs.append(subprocess.run([sys.executable, "-c", SCRIPT], env=env, check=True,
                                   capture_output=True, text=True).stdout)
    assert outs[0] == outs[1]


def test_task_range_covers_each_task_once_in_balanced_shares():
    from fastce.cpu import task_range
    for K in range(0, 40):
        for nparts in range(1, 9):
            shares = [task_range(K, p, nparts) for p in range(nparts)]
            tasks = [t for lo, hi in shares for t in range(lo, hi)]
            assert tasks == list(range(K))
            sizes = [hi - lo for lo, hi in shares]
            assert max(sizes) - min(sizes) <= 1


def test_any_number_of_threads_gives_the_same_bits(monkeypatch):
    from fastce import cpu
    rng = np.random.default_rng(3)
    cases = [
        (rng.standard_normal((300, 700)).astype(np.float32), rng.integers(0, 700, 300)),
        (rng.standard_normal((3, 5, 80, 90)), rng.integers(0, 5, (3, 80, 90))),
        (rng.standard_normal((20000, 7)).astype(np.float32), rng.integers(0, 7, 20000)),
    ]
    results = {}
    for n in (1, 2, 3, 7):
        monkeypatch.setattr(cpu, "num_threads", lambda n=n: n)
        results[n] = [(fastce.cross_entropy(x, t, label_smoothing=0.1),)
                      + tuple(fastce.cross_entropy_with_grad(x, t)) for x, t in cases]
        results[n].append(fastce.softmax(cases[0][0]))     # axis=None: split rows
    for n in (2, 3, 7):
        for got, want in zip(results[n], results[1]):
            for a, b in zip(got if isinstance(got, tuple) else (got,),
                            want if isinstance(want, tuple) else (want,)):
                np.testing.assert_array_equal(a, b)


def test_softmax_family_bits_do_not_depend_on_the_thread_count(monkeypatch):
    """Few long rows are split into chunks by a fixed rule, not by the thread count: the row
    and chunked paths round differently, and (2, 100000) float32 softmax once differed by
    ~1e-7 between 1 and 2 threads."""
    from fastce import cpu
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((n, 2 * cpu.CHUNK + 5)).astype(np.float32) * 4
          for n in (1, 2, 5, cpu.SPLIT_ROWS_BELOW - 1, cpu.SPLIT_ROWS_BELOW)]
    b = rng.random(xs[1].shape)
    results = {}
    for n in (1, 2, 3, 7):
        monkeypatch.setattr(cpu, "num_threads", lambda n=n: n)
        results[n] = [f(x, axis=1) for x in xs
                      for f in (fastce.softmax, fastce.log_softmax, fastce.logsumexp)]
        results[n].append(fastce.logsumexp(xs[1], axis=1, b=b))
    for n in (2, 3, 7):
        for got, want in zip(results[n], results[1]):
            np.testing.assert_array_equal(got, want)


def test_thread_count_follows_numba():
    code = ("import numba, fastce.cpu as c; a = c.num_threads(); numba.set_num_threads(1); "
            "print(a, c.num_threads())")
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    assert out == ["2", "1"]


def _forked_large_call(_):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1024, 2500)).astype(np.float32)     # 10 MB: threads and the pool
    loss, grad = fastce.cross_entropy_with_grad(x, rng.integers(0, 2500, 1024))
    return float(loss), float(np.abs(grad).sum(dtype=np.float64))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_fork_while_another_thread_holds_the_pools_locks():
    """A child forked while a parent's thread holds the thread pool's or the buffer pool's lock
    must not wait for that thread, which does not exist in the child."""
    import multiprocessing

    from fastce import _alloc, cpu
    want = _forked_large_call(0)
    ctx = multiprocessing.get_context("fork")
    with cpu._pool_lock, _alloc._POOL.lock:
        pool = ctx.Pool(1)
    try:
        got = pool.map_async(_forked_large_call, [0]).get(timeout=120)
    finally:
        pool.terminate()
    assert got == [want]


def test_serial_keeps_the_kernels_on_the_calling_thread(monkeypatch):
    """cpu.serial (the Dask backend's chunk tasks): no share goes to the thread pool, and the
    results are bitwise those of a split call; the setting is per thread and restored."""
    from fastce import cpu, dask_backend
    submitted = []
    real = cpu._executor

    class Spy:
        def submit(self, *args, **kwargs):
            submitted.append(1)
            return real().submit(*args, **kwargs)
    monkeypatch.setattr(cpu, "_executor", lambda: Spy())
    monkeypatch.setattr(cpu, "num_threads", lambda: 3)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, cpu.SERIAL_BELOW // 32), dtype=np.float32)
    t = rng.integers(0, x.shape[1], 64)
    split = fastce.cross_entropy_with_grad(x, t)
    assert len(submitted) > 0
    del submitted[:]
    with cpu.serial():
        with cpu.serial():
            pass
        one = fastce.cross_entropy_with_grad(x, t)
        assert not submitted
        other = ThreadPoolExecutor(1).submit(fastce.cross_entropy, x, t).result()
    assert submitted                            # the other thread's call was split
    np.testing.assert_array_equal(one[0], split[0])
    np.testing.assert_array_equal(one[1], split[1])
    np.testing.assert_array_equal(other, split[0])
    assert not getattr(cpu._task, "serial", False)
    assert dask_backend._per_chunk(len, 3) is not len and dask_backend._per_chunk(len, 2) is len


def test_split_calls_do_not_wait_for_a_late_worker(monkeypatch):
    """in_parts: the calling thread runs every chunk no worker has claimed, and returns without
    waiting for a worker that has not started (an idle vCPU can take ~0.5 ms to wake)."""
    from fastce import cpu
    gate = threading.Event()
    pool = ThreadPoolExecutor(1)
    pool.submit(gate.wait)              # its only worker is busy: it starts nothing new
    monkeypatch.setattr(cpu, "_executor", lambda: pool)
    ran = []
    cpu.in_parts(lambda tag, chunk, n: ran.append((threading.get_ident(), chunk, n)), 2, "x")
    n = 2 * cpu.CHUNKS_PER_PART
    assert sorted(c for _, c, _ in ran) == list(range(n)) and {m for _, _, m in ran} == {n}
    assert {i for i, _, _ in ran} == {threading.get_ident()}
    gate.set()
    pool.shutdown(wait=True)
    assert len(ran) == n                # the withdrawn share never ran


def test_split_calls_run_each_chunk_once_on_any_thread():
    from fastce import cpu
    ran = []

    def fn(chunk, n):
        time.sleep(0.002)               # (releases the GIL: the workers take chunks too)
        ran.append((threading.get_ident(), chunk))

    for nparts in (2, 3, 5):
        del ran[:]
        cpu.in_parts(fn, nparts)
        assert sorted(c for _, c in ran) == list(range(nparts * cpu.CHUNKS_PER_PART))


def test_split_threshold_grows_with_the_pools_round_trip(monkeypatch):
    """A pool slow to answer (a VM's idle vCPU) moves the split threshold up, once; a fast
    one leaves it at SERIAL_BELOW; either way the results are the same bits."""
    from fastce import cpu

    class SlowPool:
        def submit(self, fn, *args):
            f = Future()
            time.sleep(0.0005)          # a 0.5 ms round trip
            f.set_result(fn(*args))
            return f

    monkeypatch.setattr(cpu, "_split_below", None)
    monkeypatch.setattr(cpu, "_executor", lambda: SlowPool())
    monkeypatch.setattr(cpu, "num_threads", lambda: 2)
    assert cpu.n_parts(cpu.SERIAL_BELOW - 1) == 1 and cpu._split_below is None
    assert cpu.n_parts(cpu.SERIAL_BELOW) == 1
    assert 2 * 0.0005 * cpu.ELEMENTS_PER_SECOND <= cpu._split_below <= cpu.SPLIT_BELOW_MAX
    assert cpu.n_parts(cpu._split_below) == 2
    monkeypatch.setattr(cpu, "_split_below", None)
    monkeypatch.setattr(cpu, "ELEMENTS_PER_SECOND", 1e15)      # a pool busy with long chunks
    assert cpu.n_parts(cpu.SPLIT_BELOW_MAX) == 2 and cpu._split_below == cpu.SPLIT_BELOW_MAX
    monkeypatch.setattr(cpu, "_split_below", None)
    monkeypatch.setattr(cpu, "ELEMENTS_PER_SECOND", 1.0)        # as if the pool were instant
    assert cpu.n_parts(cpu.SERIAL_BELOW) == 2 and cpu._split_below == cpu.SERIAL_BELOW
    monkeypatch.setattr(cpu, "num_threads", lambda: 1)
    assert cpu.n_parts(10 * cpu.SERIAL_BELOW) == 1
