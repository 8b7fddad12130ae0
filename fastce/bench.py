"""Benchmarks and the demo behind ``python -m fastce``: fastce next to NumPy, PyTorch and JAX.

Everything here is importable (the asv suite and the tests use it):

- ``numpy_cross_entropy`` / ``numpy_cross_entropy_with_grad``: a plain, log-softmax based NumPy
  implementation (the baseline a NumPy user would write), class axis 1, weights, ignore_index.
- ``WORKLOADS`` / ``make_workload``: the benchmark problems W1-W5 (full and ``quick`` sizes).
- ``implementations``: {(library, op): callable} for one workload; torch and JAX are optional
  and simply absent when not importable.
- ``measure_side_by_side``: medians of several libraries timed in rounds (warm-up excluded).
- ``run_bench`` / ``run_demo``: the two command-line reports.
- ``run_softmax_bench`` (workload ``SOFTMAX``): logsumexp / softmax / log_softmax against
  ``scipy.special``, and fastce's axis=-1, tuple and None forms on the same elements.

Timings are medians of samples; each sample runs a callable ``number`` times, with ``number``
chosen so that a sample lasts at least ``MIN_SAMPLE_S`` (so microsecond calls are measured
reliably).  Libraries are timed in rounds, one sample each per round, so that a noisy machine
disturbs them alike; each round takes them in another order (seeded: the same orders in every
run), so that none always follows the same library, and each sample comes after a pause of
``SETTLE_S`` (the thread pools of the library timed before it go idle).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import random
import sys
import time
import tracemalloc
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

import fastce
from fastce import cpu, spec

__all__ = [
    "numpy_cross_entropy", "numpy_cross_entropy_with_grad", "Workload", "WORKLOADS",
    "make_workload", "implementations", "measure", "measure_side_by_side", "exactness",
    "peak_extra_memory", "GOALS", "evaluate_goals", "run_bench", "run_demo", "DEMO_EXAMPLES",
    "main", "run_softmax_bench", "softmax_forms", "roofline_impls", "roofline_ratios",
    "cpu_target",
]

MIN_SAMPLE_S = 0.05
SETTLE_S = 0.05
FASTCE, NUMPY, TORCH, JAX = "fastce", "numpy", "torch", "jax"
FWD, FWDBWD = "forward", "loss+grad"
# Roofline rows, timed round-robin with the libraries on the rows-layout workloads: what reading
# the logits once costs (READ), and the row max + sum of exps with fastce's own exp (ROOF).
READ, ROOF = "read", "exp roof"
ROOFLINE_WORKLOADS = ("W1",)
# bfloat16 rows (ml_dtypes logits), timed in the same rounds as float32 on these workloads:
# the forward, and loss+grad into a reused buffer (out=) beside float32's own out= row.
BF16, F32_OUT, BF16_OUT = "fastce-bf16", "fastce-out", "fastce-bf16-out"
BF16_WORKLOADS = ("W1",)


# ---------------------------------------------------------------------------------------------
# The NumPy baseline (log-softmax based, float32 in, float32 out)
# ---------------------------------------------------------------------------------------------
def _numpy_parts(x, target, weight, ignore_index):
    m = np.max(x, axis=1, keepdims=True)
    logp = x - m
    s = np.exp(logp)
    lse = np.log(np.sum(s, axis=1, keepdims=True))
    logp -= lse                                     # log_softmax
    valid = target != ignore_index
    t = np.where(valid, target, 0).astype(np.intp)
    w_t = (weight[t] if weight is not None else np.ones(t.shape, x.dtype)) * valid
    w_t = w_t.astype(x.dtype, copy=False)
    picked = np.take_along_axis(logp, np.expand_dims(t, 1), axis=1)
    D = np.sum(w_t, dtype=np.float64)
    loss = x.dtype.type(-np.sum(w_t * np.squeeze(picked, 1), dtype=np.float64) / D)
    return loss, logp, t, w_t, D


def numpy_cross_entropy(x, target, weight=None, ignore_index=-100):
    """Weighted-mean cross entropy of (N, C, ...) logits, torch's semantics, plain NumPy."""
    return _numpy_parts(x, target, weight, ignore_index)[0]


def numpy_cross_entropy_with_grad(x, target, weight=None, ignore_index=-100):
    """(loss, d loss / d x) in plain NumPy: grad = (softmax - onehot) * w_t / D."""
    loss, logp, t, w_t, D = _numpy_parts(x, target, weight, ignore_index)
    grad = np.exp(logp, out=logp)                    # softmax, reusing the buffer
    scale = np.expand_dims((w_t / D).astype(x.dtype), 1)
    grad *= scale
    idx = np.expand_dims(t, 1)
    np.put_along_axis(grad, idx, np.take_along_axis(grad, idx, axis=1) - scale, axis=1)
    return loss, grad


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    shape: tuple            # logits shape, class axis 1
    quick_shape: tuple
    target_dtype: type
    ignore_index: int
    ignore_fraction: float
    weighted: bool
    unit: str = "ms"        # how the report prints its times ("ms" or "us")
    # torch on one thread too: on small problems torch's thread pool can cost more than the
    # work (and on a loaded machine a lot more), so the fair comparison is the faster torch.
    torch_one_thread: bool = False

    def sized(self, quick):
        return self.quick_shape if quick else self.shape


WORKLOADS = {
    "W1": Workload("W1", "language-model logits", (4096, 32000), (256, 32000), np.int64,
                   -100, 0.10, False),
    "W2": Workload("W2", "segmentation, class weights", (8, 21, 512, 512), (2, 21, 64, 64),
                   np.uint8, 255, 0.10, True),
    "W3": Workload("W3", "small classifier", (256, 10), (256, 10), np.int64, -100, 0.0,
                   False, unit="us", torch_one_thread=True),
    # Per-call cost beyond W3's few classes: the rows kernel, and strided logits
    "W4": Workload("W4", "mid-size classifier", (64, 1000), (64, 1000), np.int64, -100, 0.0,
                   False, unit="us", torch_one_thread=True),
    "W5": Workload("W5", "small segmentation batch", (2, 21, 32, 32), (2, 21, 32, 32),
                   np.uint8, 255, 0.10, False, unit="us", torch_one_thread=True),
}


@dataclass
class Problem:
    workload: Workload
    x: np.ndarray
    target: np.ndarray
    weight: np.ndarray | None
    ignore_index: int

    @property
    def kwargs(self):
        return dict(ignore_index=self.ignore_index)


def make_workload(name, quick=False, seed=0, shape=None):
    """A Problem: float32 logits ~ N(0, 2), targets with the workload's ignored fraction."""
    wl = WORKLOADS[name]
    shape = tuple(shape) if shape is not None else wl.sized(quick)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= 2.0
    C = shape[1]
    tshape = shape[:1] + shape[2:]
    t = rng.integers(0, C, size=tshape).astype(wl.target_dtype)
    if wl.ignore_fraction:
        t[rng.random(tshape) < wl.ignore_fraction] = wl.ignore_index
    w = rng.uniform(0.5, 2.0, C).astype(np.float32) if wl.weighted else None
    return Problem(wl, x, t, w, wl.ignore_index)


# ---------------------------------------------------------------------------------------------
# Implementations per library
# ---------------------------------------------------------------------------------------------
def _fastce_impls(p):
    x, t, w, ii = p.x, p.target, p.weight, p.ignore_index
    return {
        FWD: lambda: fastce.cross_entropy(x, t, w, ignore_index=ii),
        FWDBWD: lambda: fastce.cross_entropy_with_grad(x, t, w, ignore_index=ii),
    }


def _numpy_impls(p):
    x, t, w, ii = p.x, p.target, p.weight, p.ignore_index
    return {
        FWD: lambda: numpy_cross_entropy(x, t, w, ii),
        FWDBWD: lambda: numpy_cross_entropy_with_grad(x, t, w, ii),
    }


def torch_available():
    try:
        import torch  # noqa: F401
        return True
    except Exception:
        return False


def jax_available():
    try:
        import jax  # noqa: F401
        return True
    except Exception:
        return False


def _torch_impls(p, threads=None):
    """F.cross_entropy forward (no_grad) and forward+backward (autograd.grad), on ``threads``
    intra-op threads (default: all cores), set before every timed sample."""
    import torch
    import torch.nn.functional as F
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    x = torch.from_numpy(p.x)
    t = torch.from_numpy(p.target.astype(np.int64))       # torch wants int64 targets
    w = torch.from_numpy(p.weight) if p.weight is not None else None
    ii = p.ignore_index
    xg = x.detach().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return F.cross_entropy(x, t, w, ignore_index=ii)

    def fwdbwd():
        loss = F.cross_entropy(xg, t, w, ignore_index=ii)
        (g,) = torch.autograd.grad(loss, xg)
        return loss, g

    for fn in (fwd, fwdbwd):
        fn.before = lambda: torch.set_num_threads(threads)
    return {FWD: fwd, FWDBWD: fwdbwd}


_JAX_FNS = {}


def _jax_fns(ignore_index):
    """jitted (loss, value_and_grad) of an optax-free log-softmax cross entropy."""
    if ignore_index in _JAX_FNS:
        return _JAX_FNS[ignore_index]
    import jax
    import jax.numpy as jnp

    def loss_fn(x, t, w):
        logp = jax.nn.log_softmax(x, axis=1)
        valid = t != ignore_index
        tt = jnp.where(valid, t, 0)
        picked = jnp.squeeze(jnp.take_along_axis(logp, jnp.expand_dims(tt, 1), axis=1), 1)
        w_t = jnp.where(valid, w[tt], 0.0)
        return -jnp.sum(w_t * picked) / jnp.sum(w_t)

    fns = (jax.jit(loss_fn), jax.jit(jax.value_and_grad(loss_fn)))
    _JAX_FNS[ignore_index] = fns
    return fns


def _jax_impls(p):
    import jax
    import jax.numpy as jnp
    fwd_fn, vg_fn = _jax_fns(p.ignore_index)
    x = jnp.asarray(p.x)
    t = jnp.asarray(p.target.astype(np.int32))
    C = p.x.shape[1]
    w = jnp.asarray(p.weight if p.weight is not None else np.ones(C, np.float32))
    return {
        FWD: lambda: jax.block_until_ready(fwd_fn(x, t, w)),
        FWDBWD: lambda: jax.block_until_ready(vg_fn(x, t, w)),
    }


TORCH1 = "torch-1t"
# ---------------------------------------------------------------------------------------------
# The roofline: the same logits read once, and their max + exp-sum alone
# ---------------------------------------------------------------------------------------------
@njit(parallel=True, fastmath=cpu.FASTMATH, error_model="numpy", cache=True)
def _read_rows(x, out):
    """out[i] = sum of row i: one parallel read of the logits (the memory limit)."""
    for i in prange(x.shape[0]):
        row = x[i]
        acc = row[0] - row[0]
        for c in range(row.shape[0]):
            acc += row[c]
        out[i] = acc


@njit(parallel=True, fastmath=cpu.FASTMATH, error_model="numpy", cache=True)
def _exp_roof_rows(x, out):
    """out[i] = sum_c exp(x_ic - max_i) with cpu.py's own row passes and exp: the least work
    a forward must do beyond reading (its compute limit)."""
    for i in prange(x.shape[0]):
        row = x[i]
        m = cpu._row_max(row)
        out[i] = cpu._row_exp_sum(row, m, cpu.cast_like(cpu.LOG2E, row))


def roofline_impls(p):
    """{READ: fn, ROOF: fn} over the problem's logits viewed as rows (N, C)."""
    x = p.x.reshape(p.x.shape[0], -1)
    out = np.empty(x.shape[0], x.dtype)
    return {READ: lambda: _read_rows(x, out), ROOF: lambda: _exp_roof_rows(x, out)}


def bf16_impls(p):
    """{op: {row: fn}}: fastce on the problem's logits rounded to bfloat16 (forward; loss+grad
    with out= a reused bfloat16 buffer) and float32 loss+grad with out= a reused float32
    buffer, the row it is compared with.  {} without ml_dtypes."""
    try:
        import ml_dtypes
    except ImportError:
        return {}
    x, t, w, ii = p.x, p.target, p.weight, p.ignore_index
    xb = x.astype(ml_dtypes.bfloat16)
    gb, g32 = np.empty_like(xb), np.empty_like(x)
    return {
        FWD: {BF16: lambda: fastce.cross_entropy(xb, t, w, ignore_index=ii)},
        FWDBWD: {F32_OUT: lambda: fastce.cross_entropy_with_grad(x, t, w, ignore_index=ii,
                                                                 out=g32),
                 BF16_OUT: lambda: fastce.cross_entropy_with_grad(xb, t, w, ignore_index=ii,
                                                                  out=gb)},
    }


def _print_bf16(times, out):
    """bfloat16 rows as ratios to their float32 counterparts (issue #11's goals)."""
    pairs = (("forward", BF16, FWD, FASTCE, 1.05), ("loss+grad out=", BF16_OUT, FWDBWD, F32_OUT,
                                                      0.8))
    lines = []
    for name in BF16_WORKLOADS:
        for what, row, op, ref, goal in pairs:
            a, b = times.get((name, op, row)), times.get((name, op, ref))
            if a and b:
                lines.append(f"  {name} bfloat16 {what}: {a * 1e3:.1f} ms = {a / b:.3f}x "
                             f"float32 (goal <= {goal}x)")
    if lines:           # only the workloads of BF16_WORKLOADS have bf16 rows
        print("\nbfloat16 logits (ml_dtypes; same rounds as float32):", file=out)
        print("\n".join(lines), file=out)


def roofline_ratios(times, workload="W1"):
    """{(op, row): fastce time / roofline row time} for op in (FWD, FWDBWD), row in (READ, ROOF),
    from run_bench's times; absent where not measured."""
    out = {}
    for op in (FWD, FWDBWD):
        a = times.get((workload, op, FASTCE))
        for row in (READ, ROOF):
            b = times.get((workload, FWD, row))
            if a is not None and b:
                out[(op, row)] = a / b
    return out


def _sum_probe(v):
    acc = v[0] - v[0]
    for c in range(v.shape[0]):
        acc += v[c]
    return acc


def cpu_target():
    """(LLVM CPU name, ISA vector width in bits, widest register in compiled code) of the code
    Numba generates here: NUMBA_CPU_NAME / NUMBA_CPU_FEATURES honoured.  The register is read
    from a compiled sum loop, since LLVM may prefer 256-bit vectors on AVX-512 CPUs."""
    import llvmlite.binding as ll
    import numba
    name = numba.config.CPU_NAME or ll.get_host_cpu_name()
    feats = numba.config.CPU_FEATURES
    if feats is None:
        feats = ll.get_host_cpu_features().flatten()
    on = {f[1:] for f in feats.split(",") if f.startswith("+")}
    width = 512 if "avx512f" in on else 256 if "avx" in on else 128 if on else None
    # Compiled uncached: Numba cannot show the assembly of code loaded from its cache.
    probe = njit(fastmath=cpu.FASTMATH, error_model="numpy")(_sum_probe)
    probe(np.zeros(64, np.float32))
    asm = probe.inspect_asm(probe.signatures[0])
    reg = next((r for r in ("zmm", "ymm", "xmm") if r in asm), "none")
    if width is None:               # NUMBA_CPU_FEATURES="": the named CPU's own features
        width = {"zmm": 512, "ymm": 256, "xmm": 128}.get(reg)
    return name, width, reg


ADAPTER_WORKLOADS = ("TORCH", "JAX")      # fastce.torch / fastce.jax steps: bench_adapters.py
_LIBRARIES = {FASTCE: _fastce_impls, NUMPY: _numpy_impls, TORCH: _torch_impls,
              TORCH1: lambda p: _torch_impls(p, threads=1), JAX: _jax_impls}


def available_libraries():
    libs = [FASTCE, NUMPY]
    if torch_available():
        libs += [TORCH, TORCH1]
    if jax_available():
        libs.append(JAX)
    return libs


def implementations(problem, libraries=None):
    """{library: {op: callable}} for the libraries that are importable."""
    out = {}
    for lib in libraries or available_libraries():
        try:
            out[lib] = _LIBRARIES[lib](problem)
        except ImportError:
            continue
    return out


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def _calibrate(fn, min_sample_s=MIN_SAMPLE_S):
    """Calls per sample so that a sample lasts >= min_sample_s (fn is already warm).

    The per-call estimate is the fastest of three calls, so that one call slowed down by a
    busy machine does not leave microsecond workloads with samples of a handful of calls.
    """
    dt = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        dt = min(dt, time.perf_counter() - t0)
        if dt >= min_sample_s:
            return 1
    return int(min(100_000, math.ceil(min_sample_s / max(dt, 1e-7))))


def _sample(fn, number):
    before = getattr(fn, "before", None)
    if before is not None:
        before()                    # per-library state (torch's thread count), not timed
    # Let the previous sample's worker threads (XLA's, OpenMP's) stop spinning: otherwise each
    # library is timed while its predecessor in the round still holds the cores.
    time.sleep(SETTLE_S)
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def measure(fn, repeats=5, warmup=1, max_time=None):
    """Median seconds per call of ``fn`` over ``repeats`` samples (warm-up calls excluded)."""
    return measure_side_by_side({"fn": fn}, repeats, warmup, max_time)["fn"]


def measure_side_by_side(fns, repeats=5, warmup=1, max_time=None, progress=None):
    """{key: median seconds per call}, the callables timed in rounds after a warm-up.

    ``max_time`` (seconds) stops adding rounds once spent (at least 3 rounds are kept).
    """
    numbers = {}
    for key, fn in fns.items():
        if progress:
            progress(f"warm-up {key}")
        if getattr(fn, "before", None) is not None:
            fn.before()
        for _ in range(warmup):
            fn()
        numbers[key] = _calibrate(fn)
    samples = {key: [] for key in fns}
    start = time.perf_counter()
    # Each round in its own order (a fixed seed: the same orders in every run), so that no
    # library is always timed right after the same one: a call timed after JAX's
    # value_and_grad took 1.4x its time after anything else (W1 loss+grad, 2-core EPYC), and
    # with one fixed order that penalty fell on the same row in every round.
    order = list(fns)
    rng = random.Random(0)
    for r in range(repeats):
        if r:
            rng.shuffle(order)
        for key in order:
            samples[key].append(_sample(fns[key], numbers[key]))
        if progress:
            progress(f"round {r + 1}/{repeats}")
        if max_time is not None and r >= 2 and time.perf_counter() - start > max_time:
            break
    return {key: float(np.median(v)) for key, v in samples.items()}


# ---------------------------------------------------------------------------------------------
# Exactness and memory
# ---------------------------------------------------------------------------------------------
def _subset(p, max_elements):
    """A leading slice of the problem with at most ~max_elements logits (contiguous copies)."""
    x, t = p.x, p.target
    if x.size <= max_elements:
        return x, t
    per_row = x.size // x.shape[0]
    n = max(1, max_elements // per_row)
    x, t = x[:n], t[:n]
    if x.ndim > 2 and x.size > max_elements:        # one image is still too large: cut pixels
        flat_x = x.reshape(n, x.shape[1], -1)
        k = max(1, max_elements // (n * x.shape[1]))
        return np.ascontiguousarray(flat_x[:, :, :k]), np.ascontiguousarray(t.reshape(n, -1)[:, :k])
    return np.ascontiguousarray(x), np.ascontiguousarray(t)


def exactness(p, max_elements=1 << 23):
    """Max relative errors of fastce (loss; gradient, normwise by max |grad|) vs the float64
    reference ``fastce.spec`` on (a leading slice of) the problem, canonical (N, C, S) layout."""
    x, t = _subset(p, max_elements)
    N, C = x.shape[:2]
    x3 = x.reshape(N, C, -1)
    t2 = t.reshape(N, -1)
    w64 = None if p.weight is None else p.weight.astype(np.float64)
    ref_loss, ref_grad = spec.cross_entropy_with_grad(x3, t2, w64, ignore_index=p.ignore_index)
    loss, grad = fastce.cross_entropy_with_grad(x, t, p.weight, ignore_index=p.ignore_index)
    loss_f = fastce.cross_entropy(x, t, p.weight, ignore_index=p.ignore_index)
    grad = np.asarray(grad, np.float64).reshape(N, C, -1)
    scale = float(np.max(np.abs(ref_grad))) or 1.0
    ref = float(ref_loss)
    return {
        "elements": x.size,
        "loss_rel": max(abs(float(loss) - ref), abs(float(loss_f) - ref)) / abs(ref),
        "grad_rel": float(np.max(np.abs(grad - ref_grad))) / scale,
    }


def peak_extra_memory(fn, reference_bytes):
    """Peak memory that ``fn`` allocates (through NumPy/Python, tracemalloc) / reference_bytes.

    Numba's own allocations inside kernels are not traced; fastce's kernels allocate nothing
    on the hot paths without a softcap (per-element results come from NumPy on the host).
    """
    fn()                                   # warm (compile) first
    gc.collect()
    was = tracemalloc.is_tracing()
    if not was:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    if not was:
        tracemalloc.stop()
    return peak, peak / reference_bytes


# ---------------------------------------------------------------------------------------------
# Goals
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Goal:
    workload: str
    op: str
    other: str
    limit: float             # time of row `mine` / time of row `other` must be <= limit
    text: str
    mine: str = FASTCE
    other_op: str | None = None     # the other row's op, when not `op` (roofline rows: forward)


# Issue #11's goals (they replaced the first round's <= 1.0x JAX, <= 0.5x JAX, <= 0.33x torch
# and <= 1.0x torch); the allocating loss+grad is compared, as JAX's value_and_grad allocates.
GOALS = (
    Goal("W1", FWD, ROOF, 1.15, "W1 forward <= 1.15x exp roof"),
    Goal("W1", FWD, JAX, 0.4, "W1 forward <= 0.4x JAX"),
    Goal("W1", FWDBWD, JAX, 0.35, "W1 loss+grad <= 0.35x JAX value_and_grad"),
    Goal("W1", FWDBWD, ROOF, 2.0, "W1 loss+grad out= <= 2.0x exp roof", mine=F32_OUT,
         other_op=FWD),
    Goal("W1", FWD, FASTCE, 1.05, "W1 bfloat16 forward <= 1.05x float32", mine=BF16),
    Goal("W1", FWDBWD, F32_OUT, 0.8, "W1 bfloat16 loss+grad out= <= 0.8x float32 out=",
         mine=BF16_OUT),
    Goal("W2", FWD, TORCH, 0.3, "W2 forward <= 0.3x torch"),
    Goal("W2", FWDBWD, TORCH, 0.3, "W2 loss+grad <= 0.3x torch fwd+bwd"),
    Goal("W3", FWD, TORCH, 0.7, "W3 forward <= 0.7x torch"),
    Goal("W3", FWDBWD, TORCH, 0.5, "W3 loss+grad <= 0.5x torch fwd+bwd"),
)


def evaluate_goals(times):
    """[(goal, ratio or None, passed or None)] from {(workload, op, library): seconds}.

    Against torch, the faster of torch (all cores) and torch-1t (one thread) counts."""
    out = []
    for g in GOALS:
        a = times.get((g.workload, g.op, g.mine))
        op = g.other_op or g.op
        others = [times.get((g.workload, op, lib)) for lib in
                  ((TORCH, TORCH1) if g.other == TORCH else (g.other,))]
        others = [b for b in others if b is not None]
        b = min(others) if others else None
        if a is None or b is None:
            out.append((g, None, None))
        else:
            r = a / b
            out.append((g, r, r <= g.limit))
    return out


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------
def _fmt_time(seconds, unit):
    return f"{seconds * 1e6:10.1f} us" if unit == "us" else f"{seconds * 1e3:10.2f} ms"


def _progress(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _environment():
    import numba
    parts = [f"numpy {np.__version__}", f"numba {numba.__version__} "
             f"({numba.config.NUMBA_NUM_THREADS} threads)", f"cores {os.cpu_count()}"]
    if torch_available():
        import torch
        parts.append(f"torch {torch.__version__}")
    if jax_available():
        import jax
        parts.append(f"jax {jax.__version__}")
    return ", ".join(parts)


def _print_roofline(times, out):
    for name in ROOFLINE_WORKLOADS:
        ratios = roofline_ratios(times, name)
        if not ratios:
            continue
        print(f"\nroofline, {name} (fastce time / row time; {READ}: a parallel sum over the "
              f"logits, {ROOF}: parallel row max + exp-sum with fastce's exp):", file=out)
        for op in (FWD, FWDBWD):
            print(f"  fastce {op:<10}" + "".join(
                f"{ratios[(op, row)]:8.2f}x {row}" for row in (READ, ROOF)
                if (op, row) in ratios), file=out)


def run_bench(workloads=("W1", "W2", "W3"), quick=False, repeats=None, out=sys.stdout,
              libraries=None, progress=_progress, max_time=None, linear=False, softmax=False):
    """Time every library on every workload, check exactness, print the table and the goals.

    Returns {"times": {(workload, op, library): seconds}, "exactness": {...}, "goals": [...],
    "memory": (bytes, fraction) or None}.
    """
    if repeats is None:
        repeats = 3 if quick else 11
    if max_time is None:
        max_time = 2.0 if quick else 30.0
    libs = libraries or available_libraries()
    times, exact, memory = {}, {}, None
    print(f"fastce {fastce.__version__} benchmark{' (--quick sizes)' if quick else ''}: "
          f"{_environment()}", file=out)
    print(f"medians of {repeats} samples per library (in rounds, each in its own seeded order; "
          f"warm-up excluded); ratio = fastce time / that library's time (< 1: fastce faster)",
          file=out)
    name_, width, reg = cpu_target()
    print(f"LLVM CPU {name_}, vector width {width} bits, widest register in compiled loops "
          f"{reg} (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES choose them)", file=out)
    rows = []
    for name in workloads:
        wl = WORKLOADS[name]
        progress(f"{name}: building {wl.sized(quick)} float32 ({wl.title})")
        p = make_workload(name, quick)
        impls = implementations(
            p, [lib for lib in libs if lib != TORCH1 or wl.torch_one_thread])
        bf16 = bf16_impls(p) if name in BF16_WORKLOADS else {}
        for op in (FWD, FWDBWD):
            fns = {lib: ops[op] for lib, ops in impls.items()}
            if op == FWD and name in ROOFLINE_WORKLOADS:
                fns.update(roofline_impls(p))
            if name in BF16_WORKLOADS:
                fns.update(bf16.get(op, {}))
            progress(f"{name} {op}: timing {', '.join(fns)}")
            res = measure_side_by_side(
                fns, repeats, max_time=max_time,
                progress=lambda m, n=name, o=op: progress(f"{name} {op}: {m}"))
            for lib, t in res.items():
                times[(name, op, lib)] = t
                rows.append((name, op, lib, t, res[FASTCE] / t, p.x.nbytes / t / 1e9, wl.unit))
        progress(f"{name}: exactness vs float64 reference")
        exact[name] = exactness(p)
        if name == "W1":
            progress("W1: peak extra memory of the forward")
            memory = peak_extra_memory(impls[FASTCE][FWD], p.x.nbytes)
        del impls, p, bf16
        gc.collect()

    print(file=out)
    print(f"{'workload':<9}{'op':<10}{'library':<8}{'median':>14}{'fastce/other':>14}"
          f"{'GB/s':>9}", file=out)
    for name, op, lib, t, ratio, gbs, unit in rows:
        rtxt = "" if lib.startswith(FASTCE) else f"{ratio:.3f}x"     # bf16 rows: see below
        print(f"{name:<9}{op:<10}{lib:<8}{_fmt_time(t, unit):>14}{rtxt:>14}{gbs:9.2f}", file=out)

    print("\nexactness (fastce float32 vs float64 reference fastce.spec):", file=out)
    for name, e in exact.items():
        print(f"  {name}: {e['elements']} logits, loss max rel err {e['loss_rel']:.2e}, "
              f"grad max err / max|grad| {e['grad_rel']:.2e}", file=out)
    _print_roofline(times, out)
    _print_bf16(times, out)
    if memory is not None:
        print(f"\npeak extra memory, fastce W1 forward: {memory[0] / 2**20:.2f} MiB = "
              f"{memory[1]:.4f} x the logits (tracemalloc)", file=out)

    if linear:
        from .linear import bench_linear
        progress("LIN: fused vs unfused linear cross-entropy")
        lin = bench_linear(quick=quick, repeat=repeats)
        fused, unfused = lin[0], lin[1]
        print("\nfused linear cross-entropy, loss + 3 gradients (N=%d, H=256, V=32000 float32):"
              % (1024 if quick else 4096), file=out)
        for name, ms, mb in lin:
            print(f"  {name:<20}{ms:10.1f} ms   peak extra {mb:8.1f} MB", file=out)
        print(f"  fused / unfused time: {fused[1] / unfused[1]:.3f}x (goal <= 1.2x); fused peak "
              f"extra memory / logits: {fused[2] * 1e6 / ((1024 if quick else 4096) * 32000 * 4):.3f}"
              f" (goal <= 0.15)", file=out)

    if softmax:
        run_softmax_bench(quick=quick, repeats=repeats, out=out, progress=progress)

    goals = evaluate_goals(times)
    print("\ngoals (fastce time / other time; torch = the faster of torch, torch-1t):", file=out)
    for g, r, ok in goals:
        if r is None:
            print(f"  [skip] {g.text}: not measured", file=out)
        else:
            print(f"  [{'PASS' if ok else 'FAIL'}] {g.text}: {r:.3f}x", file=out)
    if quick:
        print("  (--quick sizes: the goals are defined at full size)", file=out)
    return {"times": times, "exactness": exact, "goals": goals, "memory": memory}


# ---------------------------------------------------------------------------------------------
# SOFTMAX: the softmax family against scipy.special, and fastce's axis forms against each other
# ---------------------------------------------------------------------------------------------
SOFTMAX_SHAPE, SOFTMAX_QUICK_SHAPE = (4096, 32000), (256, 4000)
SOFTMAX_FUNCS = ("logsumexp", "softmax", "log_softmax")
SOFTMAX_GOALS = {"logsumexp": 0.1, "softmax": 0.25, "log_softmax": 0.25}   # fastce / SciPy
AXIS_FORM_GOAL = 1.5            # tuple / None form / single-axis form, same elements


def softmax_forms(x):
    """{form label: (array, axis)}: the same elements reduced per row along one axis, along a
    trailing axis pair (a view), and as a whole (axis=None)."""
    n, c = x.shape
    k = 8 if c % 8 == 0 else 1
    return {"axis=-1": (x, -1), "axis=(1, 2)": (x.reshape(n, k, c // k), (1, 2)),
            "axis=None": (x, None)}


def run_softmax_bench(quick=False, repeats=None, out=sys.stdout, progress=_progress,
                      max_time=None):
    """fastce vs scipy.special on (4096, 32000) float32 (last axis), then fastce's axis=-1,
    (1, 2) and None forms on those logits (the tuple and None forms reduce more elements per
    group, so the comparison is per element).  Returns {"times", "ratios", "goals"}."""
    import scipy.special as sps
    if repeats is None:
        repeats = 3 if quick else 7
    if max_time is None:
        max_time = 2.0 if quick else 20.0
    shape = SOFTMAX_QUICK_SHAPE if quick else SOFTMAX_SHAPE
    progress(f"SOFTMAX: {shape} float32")
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32) * 3
    times, goals = {}, []
    print(f"\nsoftmax family, {shape} float32, last axis: fastce vs scipy.special "
          f"(medians of {repeats}, round-robin)", file=out)
    print(f"  {'function':<13}{'fastce':>12}{'scipy':>12}{'fastce/scipy':>14}{'goal':>8}",
          file=out)
    for name in SOFTMAX_FUNCS:
        f, g = getattr(fastce, name), getattr(sps, name)
        res = measure_side_by_side({FASTCE: lambda f=f: f(x, axis=-1),
                                    "scipy": lambda g=g: g(x, axis=-1)}, repeats,
                                   max_time=max_time,
                                   progress=lambda m, n=name: progress(f"SOFTMAX {n}: {m}"))
        r = res[FASTCE] / res["scipy"]
        times[(name, "scipy")] = res["scipy"]
        goals.append((f"{name} <= {SOFTMAX_GOALS[name]}x scipy", r, r <= SOFTMAX_GOALS[name]))
        print(f"  {name:<13}{res[FASTCE] * 1e3:>9.2f} ms{res['scipy'] * 1e3:>9.2f} ms"
              f"{r:>13.3f}x{SOFTMAX_GOALS[name]:>7}x", file=out)
    forms = softmax_forms(x)
    print(f"\nfastce axis forms on the same {x.size} elements (ratio: form / axis=-1)", file=out)
    for name in SOFTMAX_FUNCS:
        f = getattr(fastce, name)
        res = measure_side_by_side({k: (lambda f=f, a=a, ax=ax: f(a, axis=ax))
                                    for k, (a, ax) in forms.items()}, repeats, max_time=max_time,
                                   progress=lambda m, n=name: progress(f"SOFTMAX {n} forms: {m}"))
        base = res["axis=-1"]
        cells = []
        for k, t in res.items():
            times[(name, k)] = t
            cells.append(f"{k} {t * 1e3:.2f} ms" + ("" if k == "axis=-1" else f" ({t / base:.2f}x)"))
            if k != "axis=-1":
                goals.append((f"{name} {k} <= {AXIS_FORM_GOAL}x axis=-1", t / base,
                              t / base <= AXIS_FORM_GOAL))
        print(f"  {name:<13}" + ", ".join(cells), file=out)
    print("\nsoftmax goals:", file=out)
    for text, r, ok in goals:
        print(f"  [{'PASS' if ok else 'FAIL'}] {text}: {r:.3f}x", file=out)
    if quick:
        print("  (--quick sizes: the goals are defined at full size)", file=out)
    return {"times": times, "goals": goals}


DEMO_EXAMPLES = (
    # (label, input values, view shape, target, weight, torch prints)
    ("(a) weight [1, 1, 1]", [0, 1, 0, 0, 0, 1], (1, 3, 2), [[0, 1]], [1, 1, 1], "1.4803"),
    ("(b) weight [1, 2, 3]", [0, 1, 0, 0, 0, 1], (1, 3, 2), [[0, 1]], [1, 2, 3], "1.6075"),
    ("(c) weight [1, 2, 3]", [0, 1, 2, 0, 0, 0, 0, 0, 0, 1, 0, 0.5], (1, 3, 4), [[0, 1, 2, 2]],
     [1, 2, 3], "1.5472"),
)
DEMO_SHAPE = (2048, 8192)


def demo_values():
    """[(label, fastce.cross_entropy, fastce.CrossEntropyLoss, torch's printed value)]."""
    out = []
    for label, vals, shape, target, weight, torch_prints in DEMO_EXAMPLES:
        x = np.array(vals, np.float32).reshape(shape)
        t = np.array(target, np.int64)
        w = np.array(weight, np.float32)
        f = fastce.cross_entropy(x, t, w, ignore_index=255)
        m = fastce.CrossEntropyLoss(w, ignore_index=255)(x, t)
        out.append((label, float(f), float(m), torch_prints))
    return out


def run_demo(out=sys.stdout, repeats=5, shape=DEMO_SHAPE):
    print("fastce: PyTorch's cross entropy, exactly, for NumPy arrays (Numba CPU kernels)\n",
          file=out)
    print("The article's examples (float32, ignore_index=255):", file=out)
    print(f"  {'example':<22}{'fastce.cross_entropy':>22}{'CrossEntropyLoss':>18}"
          f"{'torch prints':>14}", file=out)
    for label, f, m, tp in demo_values():
        print(f"  {label:<22}{f:>22.4f}{m:>18.4f}{tp:>14}", file=out)
    print("  With class weights, reduction='mean' divides by the sum of the targets' weights "
          "(not by their count).", file=out)

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    t = rng.integers(0, shape[1], shape[0])
    res = {}
    for op, a, b in ((FWD, lambda: fastce.cross_entropy(x, t), lambda: numpy_cross_entropy(x, t)),
                     (FWDBWD, lambda: fastce.cross_entropy_with_grad(x, t),
                      lambda: numpy_cross_entropy_with_grad(x, t))):
        res[op] = measure_side_by_side({FASTCE: a, NUMPY: b}, repeats, max_time=2.0)
    print(f"\nCPU timing, {shape} float32 logits (median of {repeats}; "
          f"{os.cpu_count()} cores):", file=out)
    print(f"  {'op':<11}{'fastce':>11}{'NumPy':>11}{'speed-up':>10}{'fastce GB/s':>13}",
          file=out)
    for op, r in res.items():
        print(f"  {op:<11}{r[FASTCE] * 1e3:>8.2f} ms{r[NUMPY] * 1e3:>8.2f} ms"
              f"{r[NUMPY] / r[FASTCE]:>9.1f}x{x.nbytes / r[FASTCE] / 1e9:>13.2f}", file=out)
    print("\nMore: python -m fastce bench [--quick] [--workloads W1,...,W5,LIN,COLD] "
          "[--repeats K];\n      python -m fastce warmup [--dtypes float32,float64] "
          "[--layouts rows,strided]", file=out)
    return res


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastce",
                                     description="fastce demo (default) and benchmarks")
    sub = parser.add_subparsers(dest="command")
    b = sub.add_parser("bench", help="fastce vs NumPy, torch and JAX on W1-W5")
    b.add_argument("--quick", action="store_true", help="small sizes: finishes in seconds")
    b.add_argument("--workloads", default="W1,W2,W3,W4,W5,LIN,SOFTMAX,TORCH,JAX",
                   help="comma-separated subset of " + ",".join(WORKLOADS) + ",LIN,SOFTMAX,"
                   "TORCH,JAX,DASK,COLD (LIN: the fused linear cross-entropy against the unfused "
                   "path; SOFTMAX: logsumexp / softmax / log_softmax against scipy.special, and "
                   "their axis forms; TORCH, JAX: training steps through fastce.torch / "
                   "fastce.jax, see fastce/bench_adapters.py; skipped when torch / jax is not "
                   "installed; DASK: W1 as a Dask array against the in-memory call; COLD: first "
                   "calls with an empty Numba cache, see fastce.coldstart)")
    b.add_argument("--repeats", type=int, default=None, help="samples per measurement")
    b.add_argument("--no-compile", action="store_true",
                   help="TORCH: skip the torch.compile rows (inductor compiles take a minute)")
    b.add_argument("--fresh", action="store_true", help="COLD: each row in its own fresh "
                   "process (default: the rows in order in one fresh process)")
    sub.add_parser("demo", help="the worked examples and a short timing (the default)")
    wu = sub.add_parser("warmup", help="compile the common kernels into Numba's on-disk cache "
                        "(for container images and CI)")
    wu.add_argument("--dtypes", default="float32,float64", help="logits dtypes")
    wu.add_argument("--layouts", default="rows,strided,small,prob",
                    help="rows ((N, C), C > 32), strided ((N, C, d1, ...)), small ((N, C), "
                    "C <= 32), prob (probability targets)")
    wu.add_argument("--jobs", type=int, default=None, help="processes (default: cores)")
    args = parser.parse_args(argv)
    if args.command == "warmup":
        from . import coldstart
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        layouts = [l.strip() for l in args.layouts.split(",") if l.strip()]
        bad = ([d for d in dtypes if d not in coldstart.DTYPES] +
               [l for l in layouts if l not in coldstart.LAYOUTS])
        if bad or not dtypes or not layouts:
            parser.error(f"unknown or missing dtypes/layouts {bad}; choose from "
                         f"{list(coldstart.DTYPES)} and {list(coldstart.LAYOUTS)}")
        coldstart.warmup(dtypes, layouts, jobs=args.jobs)
    elif args.command == "bench":
        names = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
        linear = "LIN" in names
        softmax = "SOFTMAX" in names
        with_dask = "DASK" in names
        cold = "COLD" in names
        adapters = [w for w in names if w in ADAPTER_WORKLOADS]
        names = [w for w in names
                 if w not in ("LIN", "SOFTMAX", "DASK", "COLD") and w not in ADAPTER_WORKLOADS]
        unknown = [w for w in names if w not in WORKLOADS]
        if unknown:
            parser.error(f"unknown workload(s) {unknown}; choose from "
                         f"{list(WORKLOADS) + ['LIN', 'SOFTMAX', 'DASK', 'COLD'] + list(ADAPTER_WORKLOADS)}")
        if args.repeats is not None and args.repeats < 1:
            parser.error("--repeats must be >= 1")
        if cold:
            from .coldstart import run_cold
            run_cold(quick=args.quick, fresh=args.fresh, progress=_progress)
        if names or linear or softmax:
            run_bench(names, quick=args.quick, repeats=args.repeats, linear=linear,
                      softmax=softmax)
        if adapters:
            from .bench_adapters import run_adapters
            run_adapters(adapters, quick=args.quick, repeats=args.repeats, progress=_progress,
                         compile=not args.no_compile)
        if with_dask:
            from . import bench_dask
            bench_dask.run(quick=args.quick, repeats=args.repeats, progress=_progress)
    else:
        run_demo()
    return 0
