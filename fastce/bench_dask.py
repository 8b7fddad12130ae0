"""``python -m fastce bench --workloads DASK``: W1-sized logits as a Dask array against the
in-memory call.

W1 (4096, 32000) float32 logits (524 MB) are wrapped with ``dask.array.from_array`` in ~64 MB
chunks: rows only (512 x 32000), and rows x classes (1024 x 16000: the class chunks take the
mergeable-statistics path of ``fastce.shards``).  Each Dask call builds its graph and computes
it on the threaded scheduler.  Reported: the median time (round-robin samples) as a ratio to
the in-memory call, and the peak NumPy memory of the forward (tracemalloc) in chunks.
"""
from __future__ import annotations

import sys

import numpy as np

import fastce

from .bench import FWD, FWDBWD, make_workload, measure_side_by_side, peak_extra_memory

STORE = "l+g stored"
GOALS = {("rows", FWD): 1.3, ("rows", FWDBWD): 1.3, ("rows", STORE): 1.3,
         ("rows x classes", FWD): 1.6, ("rows x classes", FWDBWD): 1.6,
         ("rows x classes", STORE): 1.6}


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
        fns[(name, STORE)] = (lambda dx=dx, dt=dt: _store(dask, da, dx, dt, kw, sched))
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
    print(f"  {'chunking':<16}{'chunk':>16}{'op':>11}{'time':>11}{'x in-memory':>13}"
          f"{'goal':>7}{'fwd peak / chunk':>18}{'rel. err':>10}", file=out)
    results = {}
    for op in (FWD, FWDBWD, STORE):
        base = times[("in-memory", FWD if op == FWD else FWDBWD)]
        if op != STORE:
            print(f"  {'in-memory':<16}{'-':>16}{op:>11}{base * 1e3:>8.1f} ms{1.0:>12.2f}x",
                  file=out)
        for name, chunks in layouts.items():
            r = times[(name, op)] / base
            goal = GOALS[(name, op)]
            results[(name, op)] = (times[(name, op)], r, r <= goal)
            print(f"  {name:<16}{str(chunks):>16}{op:>11}{times[(name, op)] * 1e3:>8.1f} ms"
                  f"{r:>12.2f}x{'<=' + str(goal):>7}"
                  f"{(f'{mem[name]:.2f}' if op == FWD else ''):>18}"
                  f"{(f'{exact[name]:.1e}' if op == FWD else ''):>10}", file=out)
    print("  goals: rows <= 1.3x, rows x classes <= 1.6x the in-memory time:", file=out)
    for (name, op), (_, r, ok) in results.items():
        print(f"    [{'PASS' if ok else 'FAIL'}] {name} {op}: {r:.2f}x", file=out)
    print(f"  ('{STORE}': the gradient's chunks written with dask.array.store into a "
          f"preallocated array, as to a memmap or Zarr store, instead of concatenated by "
          f"compute(); both against the in-memory loss+grad)", file=out)
    return {"times": times, "ratios": results, "memory": mem, "exactness": exact}


_OUT = {}


def _store(dask, da, dx, dt, kw, sched):
    out = _OUT.get(dx.shape)
    if out is None:
        out = _OUT[dx.shape] = np.empty(dx.shape, dx.dtype)
    loss, grad = fastce.cross_entropy_with_grad(dx, dt, **kw)
    return dask.compute(loss, da.store(grad, out, lock=False, compute=False), **sched)
