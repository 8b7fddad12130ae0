"""``python -m fastce bench --workloads DASK``: W1-sized logits as a Dask array against the
in-memory call.

W1 (4096, 32000) float32 logits (524 MB) are wrapped with ``dask.array.from_array`` in ~64 MB
chunks: rows only (512 x 32000), and rows x classes (1024 x 16000: the class chunks take the
mergeable-statistics path of ``fastce.shards``).  Each Dask call builds its graph and computes
it on the threaded scheduler.  Loss+grad four ways: ``compute()`` (one 524 MB array that
the chunk tasks write into: row chunks as slices, class chunks as tiles), ``persist()`` (the
gradient stays chunked in memory, how Dask arrays are kept), ``da.store`` into a
preallocated array (as into a memmap or Zarr store), and ``out=`` that preallocated array
(the chunk tasks write into it).  Reported: the median time (round-robin
samples) as a ratio to the in-memory call, and the peak NumPy memory of the forward
(tracemalloc) in chunks.

Then the rows chunking on a ``dask.distributed.LocalCluster`` of 2 single-threaded worker
processes, the logits read by the workers from a ``.npy`` memory map (a file; no 524 MB
pickled to them): the forward, and loss+grad with each gradient chunk computed on its worker
(one column of it sent back).
"""
from __future__ import annotations

import sys

import numpy as np

import fastce

from .bench import FWD, FWDBWD, make_workload, measure_side_by_side, peak_extra_memory

STORE = "l+g stored"
PERSIST = "l+g persist"
INTO = "l+g out="
OPS = (FWD, FWDBWD, PERSIST, STORE, INTO)
GOALS = {(name, op): goal for name, goal in (("rows", 1.3), ("rows x classes", 1.6))
         for op in OPS}


def run(quick=False, repeats=None, out=sys.stdout, progress=None, num_workers=None):
    import dask
    import dask.array as da
    p = make_workload("W1", quick=quick)
    x, t = p.x, p.target
    N, C = x.shape
    rows = max(1, N // 8)
    layouts = {"rows": (rows, C), "rows x classes": (2 * rows, C // 2)}
    repeats = repeats if repeats is not None else (3 if quick else 7)
    kw = p.kwargs
    fns = {("in-memory", FWD): lambda: fastce.cross_entropy(x, t, **kw),
           ("in-memory", FWDBWD): lambda: fastce.cross_entropy_with_grad(x, t, **kw)}
    sched = dict(scheduler="threads", num_workers=num_workers)
    for name, chunks in layouts.items():
        dx = da.from_array(x, chunks=chunks)
        dt = da.from_array(t, chunks=chunks[0])
        fns[(name, FWD)] = (lambda dx=dx, dt=dt:
                            fastce.cross_entropy(dx, dt, **kw).compute(**sched))
        fns[(name, FWDBWD)] = (lambda dx=dx, dt=dt:
                               dask.compute(*fastce.cross_entropy_with_grad(dx, dt, **kw),
                                            **sched))
        fns[(name, PERSIST)] = (lambda dx=dx, dt=dt:
                                dask.persist(*fastce.cross_entropy_with_grad(dx, dt, **kw),
                                             **sched))
        fns[(name, STORE)] = (lambda dx=dx, dt=dt: _store(dask, da, dx, dt, kw, sched))
        fns[(name, INTO)] = (lambda dx=dx, dt=dt: dask.compute(
            *fastce.cross_entropy_with_grad(dx, dt, out=_out(dx), **kw), **sched))
    # exactness first (and the warm-up: compilation)
    ref = fastce.cross_entropy(x, t, **kw)
    exact = {name: abs(float(fns[(name, FWD)]()) - float(ref)) / abs(float(ref))
             for name in layouts}
    times = measure_side_by_side(fns, repeats=repeats, max_time=20.0 if quick else 60.0,
                                 progress=progress)
    chunk_bytes = {name: c[0] * c[1] * x.itemsize for name, c in layouts.items()}
    mem = {name: peak_extra_memory(fns[(name, FWD)], chunk_bytes[name])[1] for name in layouts}
    print(f"\nDASK: W1 {x.shape} float32 logits ({x.nbytes / 1e6:.0f} MB) as a Dask array, "
          f"threaded scheduler ({num_workers or 'default'} workers); median of {repeats}",
          file=out)
    print(f"  {'chunking':<16}{'chunk':>16}{'op':>13}{'time':>11}{'x in-memory':>13}"
          f"{'goal':>7}{'fwd peak / chunk':>18}{'rel. err':>10}", file=out)
    results = {}
    for op in OPS:
        base = times[("in-memory", FWD if op == FWD else FWDBWD)]
        if op in (FWD, FWDBWD):
            print(f"  {'in-memory':<16}{'-':>16}{op:>13}{base * 1e3:>8.1f} ms{1.0:>12.2f}x",
                  file=out)
        for name, chunks in layouts.items():
            r = times[(name, op)] / base
            goal = GOALS[(name, op)]
            results[(name, op)] = (times[(name, op)], r, r <= goal)
            print(f"  {name:<16}{str(chunks):>16}{op:>13}{times[(name, op)] * 1e3:>8.1f} ms"
                  f"{r:>12.2f}x{'<=' + str(goal):>7}"
                  f"{(f'{mem[name]:.2f}' if op == FWD else ''):>18}"
                  f"{(f'{exact[name]:.1e}' if op == FWD else ''):>10}", file=out)
    print("  goals: rows <= 1.3x, rows x classes <= 1.6x the in-memory time:", file=out)
    for (name, op), (_, r, ok) in results.items():
        print(f"    [{'PASS' if ok else 'FAIL'}] {name} {op}: {r:.2f}x", file=out)
    print(f"  (loss+grad: '{FWDBWD}' computes the gradient into one array (the chunk tasks "
          f"write into it: row chunks as slices, class chunks as tiles), '{PERSIST}' keeps "
          f"it chunked in memory, '{STORE}' writes its chunks with dask.array.store into a "
          f"preallocated array, as to a memmap or Zarr store, '{INTO}' has the chunk tasks "
          f"write into that array; all against the in-memory loss+grad)",
          file=out)
    cluster = _cluster(p, rows, repeats, out, progress, quick)
    return {"times": times, "ratios": results, "memory": mem, "exactness": exact,
            "cluster": cluster}


def _cluster(p, rows, repeats, out, progress, quick):
    """The rows chunking on a 2-worker LocalCluster reading a .npy memory map; None when
    dask.distributed is not installed."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        print("  (no 2-worker LocalCluster run: dask.distributed is not installed)", file=out)
        return None
    import os
    import tempfile

    import dask.array as da

    from .dask_backend import from_npy
    x, t, kw = p.x, p.target, p.kwargs
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "logits.npy")
        np.save(path, x)
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            dx = from_npy(path, chunks=(rows, x.shape[1]))
            dt = da.from_array(t, chunks=rows)

            def loss_grad():
                # each chunk's gradient computed on its worker; a column of it comes back
                # (a persist() would find its deterministic keys still held from the last call)
                loss, grad = fastce.cross_entropy_with_grad(dx, dt, **kw)
                return client.compute([loss, grad[:, 0]], sync=True)
            fns = {"in-memory": lambda: fastce.cross_entropy(x, t, **kw),
                   "cluster": lambda: fastce.cross_entropy(dx, dt, **kw).compute(),
                   "in-memory l+g": lambda: fastce.cross_entropy_with_grad(x, t, **kw),
                   "cluster l+g": loss_grad}
            ref = float(fns["in-memory"]())
            err = abs(float(fns["cluster"]()) - ref) / abs(ref)
            times = measure_side_by_side(fns, repeats=repeats,
                                         max_time=20.0 if quick else 60.0, progress=progress)
    print(f"\nDASK on a LocalCluster (2 worker processes x 1 thread), rows {(rows, x.shape[1])} "
          f"read from a .npy memory map; median of {repeats}:", file=out)
    for op, a, b in ((FWD, "cluster", "in-memory"), ("l+g", "cluster l+g", "in-memory l+g")):
        print(f"  {op:<12}{times[a] * 1e3:>9.1f} ms{times[a] / times[b]:>8.2f}x in-memory "
              f"({times[b] * 1e3:.1f} ms)", file=out)
    print(f"  relative error of the loss against the in-memory call: {err:.1e}", file=out)
    return {"times": times, "rel_err": err}


_OUT = {}


def _out(dx):
    """The preallocated gradient array of the store and out= rows, reused from call to call."""
    out = _OUT.get(dx.shape)
    if out is None:
        out = _OUT[dx.shape] = np.empty(dx.shape, dx.dtype)
    return out


def _store(dask, da, dx, dt, kw, sched):
    loss, grad = fastce.cross_entropy_with_grad(dx, dt, **kw)
    return dask.compute(loss, da.store(grad, _out(dx), lock=False, compute=False), **sched)
