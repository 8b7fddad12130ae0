"""Dask arrays as a backend: lazy results that agree with the in-memory call (bitwise for
row chunks, to float rounding with class chunks) and with the spec, for every option; the
same bits whatever the scheduler; a worker killed mid-computation changes nothing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fastce
from fastce import spec
from helpers import canonical

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

OPTIONS = [
    dict(),
    dict(label_smoothing=0.1, z_loss=1e-2),
    dict(softcap=3.0, ignore_index=2),
    dict(label_smoothing=0.2, softcap=5.0, z_loss=1e-3),
]

EXTRAS = dict(return_z_loss=True, return_token_accuracy=True, return_lse=True)


def _index_case(rng, shape, axis, dtype=np.float32):
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    C = shape[axis]
    t = rng.integers(0, C, tuple(s for i, s in enumerate(shape) if i != axis))
    t.reshape(-1)[::5] = -100
    w = (rng.random(C) + 0.5).astype(dtype)
    return x, t, w


def _compare(got, ref, tol):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * scale)


def _check(x, t, w, chunks, axis, reduction, opts, tol, exact):
    dx = da.from_array(x, chunks=chunks)
    tchunks = tuple(c for i, c in enumerate(dx.chunks) if i != axis) if t.dtype.kind != "f" \
        else dx.chunks
    dt = da.from_array(t, chunks=tchunks)
    extras = dict(EXTRAS) if t.dtype.kind != "f" else dict(return_z_loss=True, return_lse=True)
    lazy, lgrad = fastce.cross_entropy_with_grad(dx, dt, w, reduction=reduction,
                                                 class_axis=axis, **extras, **opts)
    assert isinstance(lgrad, da.Array) and lgrad.chunks == dx.chunks
    assert isinstance(lazy.loss, da.Array)
    out, grad = dask.compute(lazy, lgrad)
    ref, rgrad = fastce.cross_entropy_with_grad(x, t, w, reduction=reduction, class_axis=axis,
                                                **extras, **opts)
    fwd = dask.compute(fastce.cross_entropy(dx, dt, w, reduction=reduction, class_axis=axis,
                                            **opts))[0]
    bwd = dask.compute(fastce.cross_entropy_backward(dx, dt, None, w, reduction=reduction,
                                                     class_axis=axis, **opts))[0]
    if exact:               # one class chunk: the in-memory kernels on each chunk
        np.testing.assert_array_equal(grad, rgrad)
        np.testing.assert_array_equal(bwd, rgrad)
        if reduction == "none":
            np.testing.assert_array_equal(out.loss, ref.loss)
    assert np.shape(out.loss) == np.shape(ref.loss) and out.loss.dtype == ref.loss.dtype
    for got, want in ((out.loss, ref.loss), (fwd, ref.loss), (out.z_loss, ref.z_loss),
                      (out.lse, ref.lse)):
        _compare(got, want, tol)
    if t.dtype.kind != "f":
        assert float(out.token_accuracy) == pytest.approx(ref.token_accuracy, abs=1e-12)
    gs = max(float(np.max(np.abs(rgrad))), 1e-30)
    np.testing.assert_allclose(grad, rgrad, rtol=0, atol=4 * tol * gs)
    np.testing.assert_allclose(bwd, rgrad, rtol=0, atol=4 * tol * gs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_rows_and_class_chunks_match_in_memory(reduction):
    rng = np.random.default_rng({"mean": 0, "sum": 1, "none": 2}[reduction])
    cases = [
        ((37, 29), 1, [((10, 29), True), ((37, (7, 1, 21)), False), ((12, (1,) * 29), False)]),
        ((3, 11, 4, 5), 1, [((2, 11, 3, 5), True), ((1, (4, 7), 4, (2, 3)), False)]),
        ((4, 6, 13), -1, [((3, 2, 13), True), ((2, 6, (6, 1, 6)), False)]),
    ]
    for shape, axis, chunkings in cases:
        x, t, w = _index_case(rng, shape, axis % len(shape))
        for chunks, exact in chunkings:
            for i, opts in enumerate(OPTIONS):
                weight = w if i % 2 else None
                tt = np.where(t == -100, opts.get("ignore_index", -100), t)
                _check(x, tt, weight, chunks, axis % len(shape), reduction, opts, 3e-6, exact)


def test_probability_targets_and_spec():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((9, 7, 6))
    p = rng.random(x.shape) ** 2
    p /= p.sum(axis=1, keepdims=True)
    w = rng.random(7) + 0.5
    opts = dict(label_smoothing=0.1, softcap=4.0, z_loss=1e-2)
    for chunks in [(4, 7, 6), (3, (2, 1, 4), (5, 1))]:
        dx, dp = da.from_array(x, chunks=chunks), da.from_array(p, chunks=chunks)
        loss, grad = dask.compute(*fastce.cross_entropy_with_grad(dx, dp, w, **opts))
        x3, p3 = canonical(x, p)
        sl, sg = spec.cross_entropy_with_grad(x3, p3, w, **opts)
        assert float(loss) == pytest.approx(sl, rel=1e-12)
        np.testing.assert_allclose(canonical(grad, p)[0], sg, rtol=0, atol=1e-14)
        _check(x, p, w, chunks, 1, "none", opts, 1e-12, False)


def test_float16_and_grad_output():
    rng = np.random.default_rng(12)
    x, t, w = _index_case(rng, (20, 9), 1, np.float16)
    g = rng.random(20)
    for chunks in [(7, 9), (7, (4, 5))]:
        dx, dt = da.from_array(x, chunks=chunks), da.from_array(t, chunks=7)
        gg = fastce.cross_entropy_backward(dx, dt, da.from_array(g, chunks=5), w,
                                           reduction="none").compute()
        ref = fastce.cross_entropy_backward(x, t, g, w, reduction="none")
        assert gg.dtype == np.float16
        np.testing.assert_allclose(gg.astype(np.float32), ref.astype(np.float32), atol=2e-3)
        s = fastce.cross_entropy_backward(dx, dt, 2.5, w).compute()
        np.testing.assert_allclose(s.astype(np.float32),
                                   fastce.cross_entropy_backward(x, t, 2.5, w).astype(np.float32),
                                   atol=2e-3)


@pytest.mark.parametrize("chunks", [(1, 4), (1, 2), (1, 1)])
def test_unreduced_z_loss_is_zero_beside_an_infinite_loss(chunks):
    """Without z-loss the per-position z-loss is 0, also where the loss is +inf (a -inf
    target logit): class chunks must not derive it from the loss (inf * 0 = nan)."""
    x = np.array([[0.0, -np.inf, 1.0, 2.0], [0.5, 1.0, 1.5, 2.0]])
    y = np.array([1, 0])
    mem = fastce.cross_entropy(x, y, reduction="none", return_z_loss=True)
    out = fastce.cross_entropy(da.from_array(x, chunks=chunks), da.from_array(y, chunks=1),
                               reduction="none", return_z_loss=True)
    np.testing.assert_array_equal(out.loss.compute(), mem.loss)
    np.testing.assert_array_equal(out.z_loss.compute(), np.zeros(2))


def test_bitwise_identical_across_schedulers():
    rng = np.random.default_rng(13)
    x, t, w = _index_case(rng, (64, 50), 1)
    for chunks in [(9, 50), (9, (13, 1, 36))]:
        dx, dt = da.from_array(x, chunks=chunks), da.from_array(t, chunks=9)
        lazy = fastce.cross_entropy_with_grad(dx, dt, w, label_smoothing=0.1, z_loss=1e-3,
                                              return_token_accuracy=True)
        runs = [dask.compute(lazy, scheduler="sync")[0]]
        for n in (1, 2, 4):
            runs.append(dask.compute(lazy, scheduler="threads", num_workers=n)[0])
        for (o, g) in runs[1:]:
            assert np.float32(o.loss).tobytes() == np.float32(runs[0][0].loss).tobytes()
            assert o.token_accuracy == runs[0][0].token_accuracy
            np.testing.assert_array_equal(g, runs[0][1])


def test_linear_cross_entropy_rows():
    rng = np.random.default_rng(14)
    N, H, V = 50, 16, 37
    h = rng.standard_normal((N, H)).astype(np.float32)
    c = (rng.standard_normal((V, H)) / 4).astype(np.float32)
    b = rng.standard_normal(V).astype(np.float32)
    t = rng.integers(0, V, N)
    t[::7] = -100
    w = (rng.random(V) + 0.5).astype(np.float32)
    dh, dt = da.from_array(h, chunks=(12, 8)), da.from_array(t, chunks=17)
    for red in ("mean", "sum", "none"):
        opts = dict(weight=w, reduction=red, label_smoothing=0.1, z_loss=1e-3, chunk_size=5)
        loss = fastce.linear_cross_entropy(dh, c, dt, b, **opts)
        lazy = fastce.linear_cross_entropy_with_grad(dh, c, dt, b, **opts)
        assert lazy[1].chunks == ((12, 12, 12, 12, 2), (16,))
        assert type(lazy[1]).__name__ == "PooledGradient"      # compute(): pool buffer
        got = dask.compute(loss, lazy)
        ref = fastce.linear_cross_entropy_with_grad(h, c, t, b, **opts)
        _compare(got[0], ref[0], 3e-6)
        for a, r in zip(got[1], ref):
            _compare(a, r, 3e-6)
    # without bias, the gradient of the bias is None
    assert fastce.linear_cross_entropy_with_grad(dh, c, dt)[3] is None


def test_errors_and_laziness():
    rng = np.random.default_rng(15)
    x, t, w = _index_case(rng, (8, 5), 1)
    dx, dt = da.from_array(x, chunks=4), da.from_array(t, chunks=4)
    with pytest.raises(TypeError, match="Dask array"):
        fastce.cross_entropy(dx, t)
    with pytest.raises(TypeError, match="Dask array"):
        fastce.nll_loss(dx, dt)
    with pytest.raises(TypeError, match="out= is for the gradient"):
        from fastce import dask_backend
        dask_backend.cross_entropy(dx, dt, None, None, ignore_index=-100, reduction="mean",
                                   label_smoothing=0.0, softcap=None, z_loss=0.0,
                                   class_axis=None, want_loss=True, want_grad=False, out=x)
    bad = da.from_array(np.full(8, 7), chunks=4)
    lazy = fastce.cross_entropy(dx, bad)           # nothing computed yet
    with pytest.raises(ValueError, match="out of bounds"):
        lazy.compute()
    with pytest.raises(ValueError, match="shape"):
        fastce.cross_entropy(dx, da.from_array(t[:5], chunks=4))


def test_loss_tree_reads_whole_chunk_results_only_when_they_are_small():
    """The loss tree's leaves read the chunk results themselves only when those hold just their
    sums (a forward with mean/sum); with a gradient (or per-position outputs) a task per chunk
    picks the sums where the chunk ran, so that a cluster never ships gradients to the tree."""
    from dask.core import get_dependencies
    rng = np.random.default_rng(20)
    x, t, w = _index_case(rng, (40, 30), 1)
    dx, dt = da.from_array(x, chunks=(10, 30)), da.from_array(t, chunks=10)
    cases = ((fastce.cross_entropy(dx, dt, w), True),
             (fastce.cross_entropy_with_grad(dx, dt, w)[0], False),
             (fastce.cross_entropy(dx, dt, w, return_lse=True).loss, False))
    for loss, direct in cases:
        graph = dict(loss.__dask_graph__())
        leaves = [k for k in graph if isinstance(k, tuple) and "-total-" in k[0]
                  and k[1] == 0]
        deps = {d[0].split("-")[1] for k in leaves for d in get_dependencies(graph, k)}
        assert deps == ({"chunk"} if direct else {"sums"}), deps


@pytest.mark.parametrize("chunks", [((10, 0, 30), 30), ((0, 40), 30), ((10, 0, 30), (7, 23))])
def test_forward_sums_its_chunks_denominators_and_empty_chunks_count_nothing(chunks):
    """The forward's graph has no denominator tasks: each chunk's call counts its own targets,
    summed in the tree of the losses, so its mean is its sum over the chunks' denominators added
    in chunk order (bitwise); the same results as loss+grad's (whose denominators come first)
    and the in-memory call's, to rounding; a chunk of no rows adds nothing (it crashed)."""
    from fastce import shards
    rng = np.random.default_rng(16)
    x, t, w = _index_case(rng, (40, 30), 1, np.float64)
    dx, dt = da.from_array(x, chunks=chunks), da.from_array(t, chunks=(chunks[0],))
    starts = np.cumsum((0,) + chunks[0])
    D = Dz = 0.0
    for a, b in zip(starts, starts[1:]):
        d, dz = shards.target_denominators(t[a:b], w, num_classes=30, dtype=np.float64)
        D, Dz = D + d, Dz + dz
    for kw in (dict(), dict(z_loss=1e-2, return_z_loss=True, return_token_accuracy=True)):
        fwd = fastce.cross_entropy(dx, dt, w, **kw)
        total = fastce.cross_entropy(dx, dt, w, reduction="sum", **kw)
        keys = dict((fwd.loss if isinstance(fwd, tuple) else fwd).__dask_graph__())
        assert not any("denom" in str(k) for k in keys), sorted(map(str, keys))
        lazy, _ = fastce.cross_entropy_with_grad(dx, dt, w, **kw)
        got, summed, with_grad = dask.compute(fwd, total, lazy)
        ref = fastce.cross_entropy(x, t, w, **kw)
        if kw:          # token accuracy: hits / Dz, exact; the z-loss mean divides by Dz
            assert got.token_accuracy == with_grad.token_accuracy == ref.token_accuracy
            assert float(got.z_loss) == float(summed.z_loss) / Dz
            got, with_grad, ref = got.loss, with_grad.loss, ref.loss
        else:
            assert float(got) == float(summed) / D          # the chunks' D, in chunk order
        for a in (with_grad, ref):
            assert float(got) == pytest.approx(float(a), rel=1e-12), kw


OUT_CASES = [       # (shape, chunks, class axis, options): in place, tiles, copies
    ((40, 30), (10, 30), 1, {}),                            # rows: written in place
    ((40, 30), (10, (7, 1, 22)), 1, {}),                    # class tiles: exps kept in place
    ((40, 30), (10, (7, 0, 23)), 1, {}),                    # a tile of no classes (crashed)
    ((40, 30), (10, (7, 23)), 1, dict(softcap=3.0)),        # class chunks, copied into out
    ((4, 5, 6, 7), (2, 5, 3, 7), 1, dict(label_smoothing=0.1)),   # a middle axis split
    ((4, 6, 13), (2, 3, (6, 7)), 2, {}),                    # class chunks and a middle split
    ((4, 13, 6), (2, (6, 7), 3), 1, dict(z_loss=1e-3)),     # class chunks not last
]


@pytest.mark.parametrize("shape, chunks, axis, opts", OUT_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradient_into_out(shape, chunks, axis, opts, dtype):
    """out=: every chunk's gradient lands in its place in the caller's array (computed there
    or copied there), the bits of the gradient computed without it; compute() returns out."""
    rng = np.random.default_rng(17)
    x, t, w = _index_case(rng, shape, axis, dtype)
    dx = da.from_array(x, chunks=chunks)
    dt = da.from_array(t, chunks=tuple(c for i, c in enumerate(dx.chunks) if i != axis))
    ref_loss, ref = dask.compute(*fastce.cross_entropy_with_grad(dx, dt, w, class_axis=axis,
                                                                 **opts))
    for scheduler in ("threads", "sync"):
        out = np.full(shape, np.nan, dtype)
        loss, grad = fastce.cross_entropy_with_grad(dx, dt, w, class_axis=axis, out=out, **opts)
        got_loss, got = dask.compute(loss, grad, scheduler=scheduler)
        assert got is out and got_loss == ref_loss
        np.testing.assert_array_equal(out, ref)
        out[...] = np.nan
        got = fastce.cross_entropy_backward(dx, dt, None, w, class_axis=axis, out=out,
                                            **opts).compute(scheduler=scheduler)
        assert got is out
        np.testing.assert_array_equal(out, ref)


def test_gradient_into_out_checks_its_array_and_scheduler(tmp_path):
    from fastce import dask_backend as db
    rng = np.random.default_rng(18)
    x, t, w = _index_case(rng, (32, 10), 1)
    path = str(tmp_path / "x.npy")
    np.save(path, x)
    src = np.load(path, mmap_mode="r+")
    dx, dt = da.from_array(x, chunks=(8, 10)), da.from_array(t, chunks=8)
    bad = [(np.ones((32, 10)), ValueError, "dtype"), (np.ones((10, 32), np.float32).T,
           ValueError, "C-contiguous"), ([0.0], TypeError, "NumPy"),
           (np.ones((32, 11), np.float32), ValueError, "shape")]
    for out, err, match in bad:
        with pytest.raises(err, match=match):
            fastce.cross_entropy_with_grad(dx, dt, out=out)
    other = dx.map_blocks(_AsList, meta=_AsList(x[:0]))
    with pytest.raises(TypeError, match="NumPy chunks"):
        fastce.cross_entropy_backward(other, dt, out=np.empty_like(x))
    assert type(fastce.cross_entropy_backward(other, dt)) is da.Array     # (no out=: fine)
    # the logits' own memory (arrays the graph holds, or the file it reads them from)
    own = np.array(x)
    held = da.Array({("held", 0, 0): own[:16], ("held", 1, 0): own[16:]}, "held",
                    chunks=((16, 16), (10,)), dtype=own.dtype)
    for logits, out in ((held, own), (db.from_npy(path, chunks=(8, 10)), src)):
        with pytest.raises(ValueError, match="overlaps"):
            fastce.cross_entropy_with_grad(logits, dt, out=out)
    # a worker process would write into a copy of out: it raises instead
    lazy = fastce.cross_entropy_backward(dx, dt, out=np.empty_like(x))
    with pytest.raises(RuntimeError, match="local scheduler"):
        lazy.compute(scheduler="processes", num_workers=2)


class _AsList(np.ndarray):
    """A chunk type that is not NumPy's (an ndarray subclass stands in for CuPy's)."""

    def __new__(cls, a):
        return np.asarray(a).view(cls)


def test_from_npy_reads_chunks_lazily(tmp_path):
    """from_npy: nothing of the file is read when the array is built (da.from_array of a
    memory map copies the whole file into memory, dask/dask#11850), the values are the file's,
    and the gradient can be streamed into another file with out=."""
    from fastce import dask_backend as db
    rng = np.random.default_rng(19)
    x, t, w = _index_case(rng, (60, 25), 1)
    path = str(tmp_path / "logits.npy")
    np.save(path, x)
    logits = db.from_npy(path, chunks=(16, (10, 15)))
    assert logits.shape == x.shape and logits.dtype == x.dtype
    assert not list(db._graph_arrays(logits))          # no array in the graph: no copy
    np.testing.assert_array_equal(logits.compute(), x)
    gfile = np.lib.format.open_memmap(str(tmp_path / "grad.npy"), mode="w+",
                                      dtype=x.dtype, shape=x.shape)
    loss, grad = fastce.cross_entropy_with_grad(logits, da.from_array(t, chunks=16), w, out=gfile)
    dask.compute(loss, grad)
    gfile.flush()
    ref_loss, ref = fastce.cross_entropy_with_grad(x, t, w)
    np.testing.assert_allclose(np.load(str(tmp_path / "grad.npy")), ref, rtol=0,
                               atol=1e-6 * float(np.abs(ref).max()))
    assert float(loss.compute()) == pytest.approx(float(ref_loss), rel=1e-6)


def test_import_fastce_does_not_import_dask():
    code = "import sys, fastce; assert not any(m.split('.')[0] in ('dask', 'distributed') " \
           "for m in sys.modules), sorted(m for m in sys.modules if 'dask' in m)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def _slow(a):
    time.sleep(0.15)
    return a


def _slabs_held():
    from fastce import dask_backend
    return len(dask_backend._SLABS.live)


def test_local_cluster_processes_and_worker_killed():
    """Two worker processes give the threaded scheduler's bits; a worker killed while the
    graph runs is replaced by its nanny, its tasks rerun, and the result is unchanged."""
    distributed = pytest.importorskip("distributed")
    import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    rng = np.random.default_rng(16)
    x, t, w = _index_case(rng, (96, 40), 1)
    dx = da.from_array(x, chunks=(12, (15, 1, 24))).map_blocks(_slow, dtype=x.dtype)
    dt = da.from_array(t, chunks=12)
    lazy = fastce.cross_entropy_with_grad(dx, dt, w, label_smoothing=0.1, z_loss=1e-3,
                                          return_token_accuracy=True)
    want = dask.compute(lazy, scheduler="threads")[0]
    with distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        got = client.compute(lazy, sync=True)
        assert np.float32(got[0].loss).tobytes() == np.float32(want[0].loss).tobytes()
        np.testing.assert_array_equal(got[1], want[1])
        rows = fastce.cross_entropy_backward(da.from_array(x, chunks=(12, 40)), dt, None, w)
        np.testing.assert_array_equal(client.compute(rows, sync=True),
                                      fastce.cross_entropy_backward(x, t, None, w))
        assert set(client.run(_slabs_held).values()) == {0}     # workers take no slab
        with pytest.raises(RuntimeError, match="local scheduler"):       # out= is local
            fastce.cross_entropy_backward(dx, dt, None, w, out=np.empty_like(x))
        with dask.config.set(scheduler="threads"):      # built for a local scheduler
            local = fastce.cross_entropy_backward(dx, dt, None, w, out=np.empty_like(x))
        with pytest.raises(RuntimeError, match="local scheduler"):       # computed on workers
            client.compute(local, sync=True)
        pids = client.run(os.getpid)
        futs = client.compute([lazy[0].loss, lazy[0].token_accuracy, lazy[1]])
        deadline = time.time() + 20
        while not any(client.processing().values()) and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)                 # some tasks done, some running
        os.kill(pids[sorted(pids)[0]], signal.SIGKILL)        # its nanny starts another
        loss, acc, grad = client.gather(futs)
        assert np.float32(loss).tobytes() == np.float32(want[0].loss).tobytes()
        assert acc == want[0].token_accuracy
        np.testing.assert_array_equal(grad, want[1])
        assert len(client.scheduler_info()["workers"]) == 2
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_dask_bench_quick_reports_every_row_with_exact_losses():
    """``python -m fastce bench --workloads DASK`` at its quick size: every chunking x op row,
    the losses equal to the in-memory call, and the 2-worker LocalCluster section."""
    pytest.importorskip("distributed")
    import io

    from fastce import bench_dask
    buf = io.StringIO()
    r = bench_dask.run(quick=True, repeats=1, out=buf)
    text = buf.getvalue()
    assert set(r["ratios"]) == {(name, op) for name in ("rows", "rows x classes")
                                for op in bench_dask.OPS}
    assert all(ratio > 0 for _, ratio, _ in r["ratios"].values())
    assert all(err < 1e-6 for err in r["exactness"].values())
    assert r["cluster"]["rel_err"] < 1e-6 and "LocalCluster" in text


def test_class_chunked_gradient_rescales_the_stored_exps(monkeypatch):
    """Class chunks with the gradient: every chunk's gradient comes from the exps its
    statistics pass kept (no second exp pass over the logits), and equals the in-memory one."""
    from fastce import _shard_kernels
    used = []
    real = _shard_kernels.grad_stored
    monkeypatch.setattr(_shard_kernels, "grad_stored",
                        lambda *a: used.append(a[0].shape) or real(*a))
    rng = np.random.default_rng(21)
    x, t, w = _index_case(rng, (40, 30), 1)
    dx = da.from_array(x, chunks=(20, (11, 1, 18)))
    loss, grad = dask.compute(*fastce.cross_entropy_with_grad(
        dx, da.from_array(t, chunks=20), w, label_smoothing=0.1), scheduler="sync")
    ref, rgrad = fastce.cross_entropy_with_grad(x, t, w, label_smoothing=0.1)
    assert sorted(used) == sorted([(20, 11), (20, 1), (20, 18)] * 2)
    np.testing.assert_allclose(loss, ref, rtol=2e-6)
    np.testing.assert_allclose(grad, rgrad, rtol=0, atol=2e-6 * float(np.abs(rgrad).max()))


def test_row_chunked_gradient_is_computed_into_one_buffer():
    """compute() of a gradient chunked along the first axis returns the buffer its chunks were
    written into (no concatenated copy); a second computation, a persisted copy and two
    computations at once never share or overwrite an earlier result."""
    from concurrent.futures import ThreadPoolExecutor

    from fastce import dask_backend as db
    rng = np.random.default_rng(15)
    x, t, w = _index_case(rng, (4, 8, 33), 2, np.float64)      # (4, 8) positions, 33 classes
    ref_loss, ref = fastce.cross_entropy_with_grad(x, t, w, class_axis=-1)
    dx, dt = da.from_array(x, chunks=(1, 8, 33)), da.from_array(t, chunks=(1, 8))
    loss, lgrad = fastce.cross_entropy_with_grad(dx, dt, w, class_axis=-1)
    assert type(lgrad).__name__ == "PooledGradient"
    for scheduler in ("threads", "sync"):
        got_loss, g1 = dask.compute(loss, lgrad, scheduler=scheduler)
        assert got_loss == ref_loss
        np.testing.assert_array_equal(g1, ref)
        assert g1.flags.c_contiguous and g1.flags.writeable
        assert db._SLABS.live[lgrad.name][0]() is g1          # the chunks' own buffer
        g2 = lgrad.compute(scheduler=scheduler)
        assert not np.shares_memory(g1, g2)
        g1[...] = 7.0                                          # the caller owns its result
        np.testing.assert_array_equal(g2, ref)
    twice = dask.compute(lgrad, lgrad, lgrad[1:3], scheduler="threads")
    for g, r in zip(twice, (ref, ref, ref[1:3])):
        np.testing.assert_array_equal(g, r)
    # the processes scheduler: the chunks come back as copies, gathered into one array
    np.testing.assert_array_equal(lgrad.compute(scheduler="processes", num_workers=2), ref)
    (persisted,) = dask.persist(lgrad, scheduler="threads")
    assert type(persisted) is da.Array                          # compute() of it copies
    whole = persisted.compute(scheduler="threads")
    assert not np.shares_memory(whole, persisted.blocks[0].compute(scheduler="sync"))
    np.testing.assert_array_equal(whole, ref)
    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda _: lgrad.compute(scheduler="threads"), range(6)))
    for i, g in enumerate(runs):
        np.testing.assert_array_equal(g, ref)
        assert not any(np.shares_memory(g, h) for h in runs[i + 1:])
    # A gradient of the buffer pool's size: the slab is a pool mapping (huge pages).
    from fastce import _alloc
    xb = rng.standard_normal((64, _alloc.POOL_MIN // 256)).astype(np.float32)
    tb = rng.integers(0, xb.shape[1], 64)
    lazy = fastce.cross_entropy_backward(da.from_array(xb, chunks=(16, -1)),
                                         da.from_array(tb, chunks=16), None)
    gb = lazy.compute(scheduler="threads")
    assert db._SLABS.live[lazy.name][0]() is gb and gb.base is not None
    np.testing.assert_array_equal(gb, fastce.cross_entropy_backward(xb, tb))
    # class chunks of that size under softcap (no stored exps, so no slab): copied into a
    # pool buffer (a mapping), not a fresh array
    lazy = fastce.cross_entropy_backward(da.from_array(xb, chunks=(32, xb.shape[1] // 2)),
                                         da.from_array(tb, chunks=32), None, softcap=30.0)
    gc = lazy.compute(scheduler="threads")
    assert lazy.name not in db._SLABS.live and type(gc.base).__name__ == "mmap"
    np.testing.assert_allclose(gc, fastce.cross_entropy_backward(xb, tb, softcap=30.0),
                               rtol=0, atol=1e-7)
    # The lazy gradient is a Dask array to fastce too: lazy through another call, or an error.
    again = fastce.cross_entropy(lgrad, dt, class_axis=-1)
    assert isinstance(again, da.Array)
    assert again.compute() == fastce.cross_entropy(ref, t, class_axis=-1)
    with pytest.raises(TypeError, match="Dask array"):
        fastce.logsumexp(lgrad)
    # Beyond the pool's cap (here: the pool off), a buffer per chunk, gathered by a copy.
    old = fastce.set_pool_bytes(0)
    try:
        lazy = fastce.cross_entropy_backward(dx, dt, None, w, class_axis=-1)
        g = lazy.compute(scheduler="threads")
        assert lazy.name not in db._SLABS.live
        np.testing.assert_array_equal(g, fastce.cross_entropy_backward(x, t, None, w,
                                                                       class_axis=-1))
    finally:
        fastce.set_pool_bytes(old)
    # A second axis split: no slab, the chunks copied into one array.
    other = fastce.cross_entropy_backward(da.from_array(x, chunks=(2, 4, 33)),
                                          da.from_array(t, chunks=(2, 4)), None, w,
                                          class_axis=-1)
    g = other.compute(scheduler="threads")
    assert other.name not in db._SLABS.live and g.flags.c_contiguous
    np.testing.assert_array_equal(g, ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, chunks", [((40, 30), (20, (11, 1, 18))),
                                           ((40, 30), (40, 7)),
                                           ((4, 8, 33), (2, 8, (16, 17))),
                                           ((13, 9), ((5, 0, 8), 4))])
def test_class_chunked_gradient_is_computed_into_one_buffer(dtype, shape, chunks):
    """Class chunks along the last axis: each statistics task stores its exps into its tile of
    one buffer, which the gradient tasks rescale in place and compute() returns; the same bits
    as with a buffer per chunk (the pool off), never shared with another computation."""
    from fastce import dask_backend as db
    rng = np.random.default_rng(16)
    x, t, w = _index_case(rng, shape, len(shape) - 1, dtype)
    dx = da.from_array(x, chunks=chunks)
    dt = da.from_array(t, chunks=chunks[:-1])
    kw = dict(class_axis=-1, label_smoothing=0.05)
    loss, lgrad = fastce.cross_entropy_with_grad(dx, dt, w, **kw)
    old = fastce.set_pool_bytes(0)
    try:
        ref_loss, ref = dask.compute(loss, lgrad, scheduler="threads")
        assert lgrad.name not in db._SLABS.live
    finally:
        fastce.set_pool_bytes(old)
    r_loss, r_grad = fastce.cross_entropy_with_grad(x, t, w, **kw)
    np.testing.assert_allclose(ref_loss, r_loss, rtol=5e-6)
    np.testing.assert_allclose(ref, r_grad, rtol=0, atol=5e-6 * float(np.abs(r_grad).max()))
    runs = []
    for scheduler in ("threads", "sync", "threads"):
        got_loss, g = dask.compute(loss, lgrad, scheduler=scheduler)
        assert got_loss == ref_loss
        np.testing.assert_array_equal(g, ref)
        assert db._SLABS.live[lgrad.name][0]() is g and g.flags.c_contiguous
        assert not any(np.shares_memory(g, h) for h in runs)
        runs.append(g)
    # softcap needs the logits again for its derivative: no stored exps, no slab
    capped = fastce.cross_entropy_backward(dx, dt, None, w, softcap=5.0, **kw)
    g = capped.compute(scheduler="threads")
    assert capped.name not in db._SLABS.live
    np.testing.assert_allclose(g, fastce.cross_entropy_backward(x, t, None, w, softcap=5.0,
                                                                **kw),
                               rtol=0, atol=5e-6 * float(np.abs(r_grad).max()))


def test_slab_claims_and_tiling():
    """Each chunk index of a slab is handed out once (a task run again writes elsewhere), and
    only chunks that tile one buffer, each at its own place, are returned as that buffer."""
    from fastce import dask_backend as db
    slabs = db._Slabs()
    rows = ((3, 3), (4,))
    a = slabs.claim("k", (6, 4), np.float32, 0, (slice(0, 3),))
    b = slabs.claim("k", (6, 4), np.float32, 1, (slice(3, 6),))
    assert a.base is b.base and db._whole_slab([a, b], rows) is a.base
    assert db._whole_slab([a, b], ((3,), (8,))) is None          # not the slab's shape
    again = slabs.claim("k", (6, 4), np.float32, 1, (slice(3, 6),))    # a retry: a new slab
    assert again.base is not a.base
    assert db._whole_slab([a, again], rows) is None
    assert db._whole_slab([b, a], rows) is None                  # out of order
    assert db._whole_slab([a], rows) is None                     # not covering it
    assert db._whole_slab([np.zeros((3, 4)), np.zeros((3, 4))], rows) is None
    gathered = db._gather_grad([[a], [again]])                   # Dask's concatenation
    assert gathered.shape == (6, 4) and not np.shares_memory(gathered, a)
    # tiles: a 2 x 2 grid of (3, 2) blocks, in Dask's order (row-major over the grid)
    grid = ((3, 3), (2, 2))
    tiles = [slabs.claim("t", (6, 4), np.float64, (i, j), (slice(3 * i, 3 * i + 3),
                                                         slice(2 * j, 2 * j + 2)))
             for i in range(2) for j in range(2)]
    assert db._whole_slab(tiles, grid) is tiles[0].base
    assert db._whole_slab([tiles[0], tiles[2], tiles[1], tiles[3]], grid) is None
    assert db._whole_slab(tiles, ((3, 3), (1, 3))) is None       # not where they lie
    assert db._whole_slab([t.copy() for t in tiles], grid) is None
    wide = slabs.claim("w", (6, 4), np.float64, 0, (slice(0, 3),))
    assert db._whole_slab([wide[:, :2], wide[:, 2:]] + tiles[2:], grid) is None
    del a, b, again, gathered, tiles, wide
    slabs.claim("other", (2, 2), np.float64, 0, (slice(0, 1),))  # dead entries are dropped
    assert list(slabs.live) == ["other"]


def _claim_pool_slab():
    """In a forked child: claim a chunk of a pool-sized slab (the slab registry's lock and the
    pool's), write it; exit 0."""
    from fastce import _alloc
    from fastce import dask_backend as db
    rows = _alloc.POOL_MIN // 4 // 1024
    part = db._SLABS.claim("forked", (rows, 1024), np.float32, 0, (slice(0, 2),))
    part[...] = 1.0
    os._exit(0 if part.shape == (2, 1024) else 1)


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="needs os.fork")
def test_slabs_and_pool_work_in_a_child_forked_while_another_thread_holds_their_locks():
    """Dask's processes scheduler forks; a lock held by another thread at that moment stays
    held forever in the child unless it is replaced after the fork."""
    import multiprocessing
    import threading

    from fastce import _alloc
    from fastce import dask_backend as db
    held, release = threading.Event(), threading.Event()

    def hold():
        with db._SLABS.lock, _alloc._POOL.lock:
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        child = multiprocessing.get_context("fork").Process(target=_claim_pool_slab)
        child.start()
        child.join(60)
        alive = child.is_alive()
        if alive:
            child.kill()
            child.join()
    finally:
        release.set()
        holder.join()
    assert not alive and child.exitcode == 0
