"""Cold start: how long a fresh environment waits for its first results, and ahead-of-time warmup.

fastce's kernels are compiled by Numba on their first call and cached on disk (``cache=True``):
next to the package when its directory is writable, else in Numba's user-wide cache directory
(``~/.cache/numba``, or ``NUMBA_CACHE_DIR``).  A process that finds them cached gets its first
result in milliseconds; a fresh environment pays the compilation once.

- ``run_cold`` (``python -m fastce bench --workloads COLD``): the first calls of ``TABLE`` in
  subprocesses with an empty ``NUMBA_CACHE_DIR``, each next to the compile time of a small
  reference kernel measured in the same process, then the first result of a process that finds
  the cache warm.
- ``warmup`` (``python -m fastce warmup``): compiles the common signatures ahead of time, for
  container images and CI, in parallel processes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

__all__ = ["TABLE", "QUICK_ROWS", "reference_compile", "run_cold", "warmup", "LAYOUTS",
           "DTYPES"]

# The table: (key, label).  Arrays come from _make; the calls run in this order.
TABLE = (
    ("rows", "cross_entropy rows (512, 4000) float32, int64 targets"),
    ("rows_f64", "same, float64 logits"),
    ("rows_i32", "same (float32), int32 targets"),
    ("strided", "(4, 21, 64, 64) float32 (strided kernel), int64 targets"),
    ("strided_u8", "same, uint8 targets with ignore_index=255"),
    ("small", "(4096, 10) float32 (small-C rows)"),
    ("prob", "probability targets (512, 4000) float32"),
    ("softmax", "softmax (512, 4000) float32"),
)
QUICK_ROWS = ("small", "small_i32")         # --quick: the cheapest kernel, two target dtypes
_EXTRA = {"small_i32": "same, int32 targets"}
GOAL_EACH = 2.0         # each first call <= 2x the reference kernel's compile time
GOAL_TOTAL = 12.0       # all of them together <= 12x
GOAL_CACHED_S = 0.3     # a cached process's first result


def reference_compile():
    """Seconds to import Numba and compile (and run) a small vectorised kernel: the yardstick,
    measured in the process whose first calls it is compared with (LLVM start-up included)."""
    t0 = time.perf_counter()
    import math

    import numba
    import numpy as np

    @numba.njit(fastmath=True, error_model="numpy")
    def _reference_kernel(x, out):
        for i in range(x.shape[0]):
            out[i] = math.sqrt(x[i] * x[i] + 1.0) * 0.5 + x[i]

    x = np.linspace(0.0, 1.0, 1000)
    _reference_kernel(x, np.empty_like(x))
    return time.perf_counter() - t0


def _make(key):
    """A callable making the first call of row ``key`` (arrays built outside the timing)."""
    import numpy as np

    import fastce
    rng = np.random.default_rng(0)

    def rows(shape=(512, 4000), dtype=np.float32, tdtype=np.int64):
        x = rng.standard_normal(shape).astype(dtype)
        t = rng.integers(0, shape[1], shape[0]).astype(tdtype)
        return lambda: fastce.cross_entropy(x, t)

    def strided(tdtype=np.int64, ignore_index=-100):
        x = rng.standard_normal((4, 21, 64, 64)).astype(np.float32)
        t = rng.integers(0, 21, (4, 64, 64)).astype(tdtype)
        if ignore_index >= 0:
            t[:, :4] = ignore_index
        return lambda: fastce.cross_entropy(x, t, ignore_index=ignore_index)

    if key == "rows":
        return rows()
    if key == "rows_f64":
        return rows(dtype=np.float64)
    if key == "rows_i32":
        return rows(tdtype=np.int32)
    if key == "strided":
        return strided()
    if key == "strided_u8":
        return strided(np.uint8, 255)
    if key == "small":
        return rows((4096, 10))
    if key == "small_i32":
        return rows((4096, 10), tdtype=np.int32)
    if key == "prob":
        x = rng.standard_normal((512, 4000)).astype(np.float32)
        p = rng.random((512, 4000)).astype(np.float32)
        p /= p.sum(axis=1, keepdims=True)
        return lambda: fastce.cross_entropy(x, p)
    if key == "softmax":
        x = rng.standard_normal((512, 4000)).astype(np.float32)
        return lambda: fastce.softmax(x)
    raise KeyError(key)


def _child(keys, reference=True, import_s=None):
    """In a subprocess: the reference kernel (or, unless ``reference``, Numba's import alone),
    then each row's first call.  ``import_s``: how long ``import fastce`` took (the caller
    imported it before this module; it does not import Numba)."""
    t0 = time.perf_counter()
    if reference:
        ref = reference_compile()
    else:
        import numba  # noqa: F401
        ref = None
    numba_s = time.perf_counter() - t0
    firsts = {}
    for key in keys:
        fn = _make(key)
        t0 = time.perf_counter()
        fn()
        firsts[key] = time.perf_counter() - t0
    return {"reference": ref, "import": import_s, "import_numba": numba_s, "first": firsts}


def _run_child(keys, cache_dir, timeout=1800, reference=True):
    env = dict(os.environ)
    env["NUMBA_CACHE_DIR"] = cache_dir
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    code = ("import json, sys, time; t0 = time.perf_counter(); import fastce; "
            "t = time.perf_counter() - t0; from fastce.coldstart import _child; "
            f"print('COLD ' + json.dumps(_child(sys.argv[1:], {bool(reference)}, t)))")
    proc = subprocess.run([sys.executable, "-c", code, *keys], env=env, capture_output=True,
                          text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("COLD "):
            return json.loads(line[5:])
    raise RuntimeError(f"cold-start child failed ({proc.returncode}):\n{proc.stdout}\n"
                       f"{proc.stderr}")


def run_cold(quick=False, fresh=False, out=sys.stdout, progress=None):
    """Print the cold-start table; return {"rows": [(key, seconds, reference)], "total",
    "reference", "cached": {key: seconds}, "goals": [(text, value, ok)]}.

    Default: the table's rows in order in ONE process with an empty cache (cumulative: a row
    reuses what earlier rows compiled, as a user's session would).  fresh=True: each row in its
    own process with its own empty cache (each row's worst case); the total is then the sum.
    Then one process on the warm cache: its first result (import excluded) for each row."""
    keys = QUICK_ROWS if quick else tuple(k for k, _ in TABLE)
    labels = dict(TABLE, **_EXTRA)
    with tempfile.TemporaryDirectory(prefix="fastce-cold-") as cache:
        rows = []
        if fresh:
            for key in keys:
                if progress:
                    progress(f"COLD: {key} in a fresh process, empty cache")
                with tempfile.TemporaryDirectory(prefix="fastce-cold-", dir=cache) as own:
                    r = _run_child([key], own)
                rows.append((key, r["first"][key], r["reference"]))
            _run_child(list(keys), cache)          # fill the shared cache for the cached run
        else:
            if progress:
                progress("COLD: the table in one fresh process, empty cache")
            r = _run_child(list(keys), cache)
            rows = [(key, r["first"][key], r["reference"]) for key in keys]
        if progress:
            progress("COLD: a second process on the warm cache")
        cached = _run_child(list(keys), cache)          # after the reference: LLVM started
        bare = _run_child(keys[:1], cache, reference=False)     # a user's bare process
    mode = ("each row in its own fresh process and empty cache" if fresh else
            "rows in order in one fresh process, empty Numba cache (cumulative)")
    print(f"cold start ({mode}); ref = compile time of a small reference Numba kernel in the "
          f"same process (Numba import and LLVM start-up included)", file=out)
    print(f"  {'first call':<58}{'seconds':>9}{'x ref':>8}", file=out)
    total = sum(t for _, t, _ in rows)
    ref_total = rows[0][2] if not fresh else sum(r for _, _, r in rows) / len(rows)
    for key, t, ref in rows:
        print(f"  {labels[key]:<58}{t:9.2f}{t / ref:8.2f}", file=out)
    print(f"  {'all of the above':<58}{total:9.2f}{total / ref_total:8.2f}", file=out)
    print(f"  {'reference kernel' + (' (mean)' if fresh else ''):<58}{ref_total:9.2f}", file=out)
    first_cached = cached["first"][keys[0]]
    print(f"  cached process, after the reference kernel: first result {first_cached:.3f} s "
          f"(slowest first call {max(cached['first'].values()):.3f} s)", file=out)
    print(f"  cached bare process: import fastce {bare['import']:.3f} s, import numba "
          f"{bare['import_numba']:.3f} s, then first result {bare['first'][keys[0]]:.3f} s "
          f"(LLVM's start-up included)", file=out)
    goals = [(f"every first call <= {GOAL_EACH:g}x ref", max(t / ref for _, t, ref in rows),
              max(t / ref for _, t, ref in rows) <= GOAL_EACH),
             (f"all together <= {GOAL_TOTAL:g}x ref", total / ref_total,
              total / ref_total <= GOAL_TOTAL),
             (f"cached process first result <= {GOAL_CACHED_S:g} s", first_cached,
              first_cached <= GOAL_CACHED_S)]
    for text, value, ok in goals:
        print(f"  [{'PASS' if ok else 'FAIL'}] {text}: {value:.2f}", file=out)
    return {"rows": rows, "total": total, "reference": ref_total, "cached": cached["first"],
            "bare": bare, "goals": goals}


# ---------------------------------------------------------------------------------------------
# Ahead-of-time warmup
# ---------------------------------------------------------------------------------------------
DTYPES = ("float32", "float64")
LAYOUTS = ("rows", "strided", "small", "prob")
# A problem of each layout, large enough for threads (one compilation serves every size).
_SHAPES = {
    "rows": ((512, 256),),
    "strided": ((2, 21, 64, 64),),
    "small": ((8192, 10),),
    "prob": ((256, 512),),
}


def _warm_one(layout, dtype):
    """Compile (or load) the kernels of one layout and dtype: forward and loss+grad.  Returns
    the seconds it took."""
    import numpy as np

    import fastce
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    for shape in _SHAPES[layout]:
        x = rng.standard_normal(shape).astype(dtype)
        if layout == "prob":
            t = np.full(shape, 1.0 / shape[1], dtype)
        else:
            t = rng.integers(0, shape[1], shape[:1] + shape[2:])
        fastce.cross_entropy(x, t)
        fastce.cross_entropy_with_grad(x, t)
    return time.perf_counter() - t0


def _warm_child(jobs):
    """In a subprocess: _warm_one for each (layout, dtype)."""
    return {f"{layout}/{dtype}": _warm_one(layout, dtype) for layout, dtype in jobs}


def _run_warm_child(jobs):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    code = ("import json, sys; from fastce.coldstart import _warm_child; "
            "print('WARM ' + json.dumps(_warm_child([a.split('/') for a in sys.argv[1:]])))")
    proc = subprocess.run([sys.executable, "-c", code, *[f"{l}/{d}" for l, d in jobs]],
                          env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("WARM "):
            return json.loads(line[5:])
    raise RuntimeError(f"warmup child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def _compiled_here():
    """Names of fastce's kernels that this process compiled rather than loaded from the cache."""
    from . import cpu
    out = set()
    for name, d in cpu._KERNELS.items():
        if sum(d.stats.cache_misses.values()):
            out.add("/".join(map(str, name)) if isinstance(name, tuple) else name)
    return out


def _cache_dir():
    """Where Numba caches fastce's kernels (NUMBA_CACHE_DIR, next to the package, or Numba's
    user-wide cache directory when the package's directory is read-only)."""
    try:
        from . import cpu
        return cpu._KERNELS["_target_stats"]._cache._cache_path
    except Exception:       # a Numba without these internals: say what it would be
        return os.environ.get("NUMBA_CACHE_DIR") or "Numba's default cache directory"


def warmup(dtypes=DTYPES, layouts=LAYOUTS, jobs=None, out=sys.stdout):
    """Compile fastce's kernels for ``dtypes`` x ``layouts`` into the on-disk cache.

    Work is split by layout (each kernel is compiled by one process only, so that no two
    processes write the same cache index) over ``jobs`` processes (default: the number of
    cores, at most the number of layouts); then this process loads every kernel back and
    reports any that was not found in the cache.  Returns {"layout/dtype": seconds}."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(layouts)))
    t0 = time.perf_counter()
    # Layouts sharing code (strided/small: the block kernel) go to the same process.
    groups = [[] for _ in range(jobs)]
    order = sorted(layouts, key=lambda l: ("strided", "small", "rows", "prob").index(l))
    for i, layout in enumerate(order):
        if layout == "small" and "strided" in layouts:
            groups[order.index("strided") % jobs].append(layout)
        else:
            groups[i % jobs].append(layout)
    tasks = [[(l, d) for l in g for d in dtypes] for g in groups if g]
    print(f"fastce warmup: {', '.join(dtypes)} x {', '.join(layouts)} (forward and loss+grad "
          f"kernels) in {len(tasks)} process(es)", file=out, flush=True)
    times = {}
    if len(tasks) == 1:
        times.update(_run_warm_child(tasks[0]))
    else:
        with ThreadPoolExecutor(len(tasks)) as ex:
            for res in ex.map(_run_warm_child, tasks):
                times.update(res)
    for key in sorted(times):
        print(f"  compiled {key:<18}{times[key]:8.1f} s", file=out)
    # This process loads every kernel back: any compiled here was missing from the cache.
    t1 = time.perf_counter()
    _warm_child([(l, d) for l in layouts for d in dtypes])
    load_s = time.perf_counter() - t1
    missed = sorted(_compiled_here())
    print(f"  cache: {_cache_dir()}", file=out)
    print(f"  total {time.perf_counter() - t0:.1f} s; a new process loads them in {load_s:.2f} s"
          + (f" (not found in the cache, compiled again: {', '.join(missed)})" if missed else ""),
          file=out)
    return times
